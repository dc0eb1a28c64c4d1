"""The records that cross the engine boundary: what the server and the Python API see.

No torch here: results are numpy arrays, so the server layer never imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import numpy as np


class ModelKind(str, Enum):
    EMBEDDING = "embedding"  # returns pooled (and maybe normalised) embeddings
    CLASSIFIER = "classifier"  # also has a sequence-classification head: logits and labels
    GENERATOR = "generator"  # a text generation model (GPT-2, LLaMA); generation is not served yet


class ModelState(str, Enum):
    READY = "READY"  # can serve now (it may still need a switch, which is transparent)
    LOADING = "LOADING"  # an explicit load is in progress
    UNAVAILABLE = "UNAVAILABLE"  # unloaded under explicit control, or its last load failed


@dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str
    kind: ModelKind
    dim: int  # embedding width (hidden size)
    labels: tuple[str, ...]  # class names, empty for embedding-only models
    max_tokens: int  # inputs longer than this are truncated
    vocab_size: int  # token ids must be below this
    dtype: str  # dtype the model computes in, e.g. "bfloat16"
    stored_bytes: int  # bytes of its weights in the repository
    state: ModelState
    reason: str = ""  # why it is UNAVAILABLE, when it is


@dataclass(frozen=True, slots=True)
class InferenceOptions:
    """Per-request scheduling hints, with Triton's schedule-policy semantics."""

    priority: int = 0  # 0 = the model's default class, 1 = highest (real-time), >= 2 batch
    timeout_us: int | None = None  # the request must complete within this, or fail as a timeout


@dataclass(slots=True)
class EmbedResult:
    embeddings: np.ndarray  # (B, D) float32
    prompt_tokens: int  # tokens actually computed, after truncation


@dataclass(slots=True)
class ClassifyResult:
    logits: np.ndarray  # (B, C) float32
    labels: list[str]  # argmax label per input
    prompt_tokens: int
    embeddings: np.ndarray | None = None  # (B, D) float32 pooled embeddings, from the same forward pass


@dataclass(slots=True)
class TierUsage:
    name: str  # "host" or "device"
    used_bytes: int
    budget_bytes: int
    per_model: dict[str, int] = field(default_factory=dict)

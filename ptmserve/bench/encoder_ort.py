"""ONNX Runtime as a comparison for ``ptmserve bench encoder`` (optional: runs when it imports).

The benchmark exports the ``transformers`` model it already holds (the same weights as ours) with the
TorchScript exporter (``torch.onnx.export(..., dynamo=False)``, which needs only ``onnx``), then runs it
in an ``InferenceSession`` with all graph optimizations (on BERT graphs these fuse attention,
LayerNorm, skip+LayerNorm and bias+GELU) and torch's thread count, the way a careful user would:

- **padded**: one call, every input padded to the longest;
- **length-bucketed**: inputs sorted by length into ``buckets`` groups of equal count, one call per
  group, each padded to its own longest (the strong baseline of issue 14).

Both pool like the Hugging Face side (mean over real tokens, L2 normalise), included in the time.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

GRAPHS = ("plain", "fused")
BUCKETS = 8  # as the "careful user" baseline (and our attention plan's MAX_BUCKETS)


def available() -> bool:
    """Whether onnxruntime and onnx are importable (the ``ort`` extra)."""
    return all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnx"))


class _LastHidden(torch.nn.Module):
    """``transformers`` encoder -> its last hidden state only (one graph output)."""

    def __init__(self, hf: torch.nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor):
        return self.hf(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state


@dataclass(slots=True)
class OrtEncoder:
    """An exported encoder in an ORT session; ``embed`` pools like the HF side of the benchmark."""

    session: Any  # onnxruntime.InferenceSession
    pad_token_id: int
    export_s: float  # seconds the export and session creation took (not part of any timed run)

    def embed(self, ids: Sequence[Sequence[int]], buckets: int = 1) -> torch.Tensor:
        """Float32 ``(B, H)`` mean-pooled, L2-normalised embeddings of ``ids`` in their order, run as
        ``buckets`` length-sorted groups of equal count (1: one padded batch)."""
        order = sorted(range(len(ids)), key=lambda i: len(ids[i])) if buckets > 1 else list(range(len(ids)))
        count = max(1, min(buckets, len(ids)))
        parts: list[torch.Tensor] = []
        for j in range(count):
            members = order[j * len(ids) // count : (j + 1) * len(ids) // count]
            parts.append(self._run([ids[i] for i in members]))
        pooled = torch.cat(parts)
        out = torch.empty_like(pooled)
        out[torch.tensor(order)] = pooled
        return out

    def _run(self, ids: Sequence[Sequence[int]]) -> torch.Tensor:
        width = max(len(s) for s in ids)
        input_ids = np.full((len(ids), width), self.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(ids), width), dtype=np.int64)
        for row, seq in enumerate(ids):
            input_ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
        feed = {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": np.zeros_like(mask)}
        (last,) = self.session.run(None, feed)  # (b, L, H) float32
        m = torch.from_numpy(mask)[..., None].float()
        pooled = (torch.from_numpy(last) * m).sum(1) / m.sum(1)
        return F.normalize(pooled, dim=-1)


def export(
    hf: torch.nn.Module,
    pad_token_id: int,
    *,
    threads: int | None = None,
    graph: str = "plain",
    profile_prefix: str | None = None,
) -> OrtEncoder:
    """``hf`` (a float32 ``transformers`` encoder on the CPU) exported to ONNX and loaded in ORT with
    all graph optimizations and ``threads`` intra-op threads (default: torch's).

    ``graph`` "plain": the export of ``hf`` as it is (SDPA attention), ORT's own optimizations only;
    "fused": exported with eager attention and rewritten by ``onnxruntime.transformers.optimizer``
    (``model_type="bert"``: fused Attention, EmbedLayerNormalization, SkipLayerNormalization,
    BiasGelu), as Optimum's ORT optimizer does. ``profile_prefix``: ORT's per-op profiling on, its JSON
    file named from this prefix (``session.end_profiling()`` writes it and returns its path).
    """
    import time

    import onnxruntime as ort

    if graph not in GRAPHS:
        raise ValueError(f"graph must be one of {GRAPHS}, not {graph!r}")
    start = time.perf_counter()
    # A copy: exporting a model in eager attention leaves it computing differently afterwards (seen
    # with transformers 5.x), and the caller goes on using ``hf``.
    hf = copy.deepcopy(hf).float().cpu().eval()
    if graph == "fused" and hasattr(hf, "set_attn_implementation"):
        hf.set_attn_implementation("eager")  # the attention pattern the fusion recognises
    wrapper = _LastHidden(hf)
    example = (
        torch.full((2, 16), 1000, dtype=torch.int64),
        torch.ones(2, 16, dtype=torch.int64),
        torch.zeros(2, 16, dtype=torch.int64),
    )
    axes = {0: "batch", 1: "seq"}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "encoder.onnx")
        with torch.no_grad():
            torch.onnx.export(
                wrapper,
                example,
                path,
                input_names=["input_ids", "attention_mask", "token_type_ids"],
                output_names=["last_hidden_state"],
                dynamic_axes={"input_ids": axes, "attention_mask": axes, "token_type_ids": axes},
                opset_version=17,
                dynamo=False,
            )
        if graph == "fused":
            from onnxruntime.transformers import optimizer

            cfg = hf.config
            fused = optimizer.optimize_model(
                path,
                model_type="bert",
                num_heads=cfg.num_attention_heads,
                hidden_size=cfg.hidden_size,
                opt_level=0,
            )
            fused.save_model_to_file(path)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if profile_prefix:
            options.enable_profiling = True
            options.profile_file_prefix = profile_prefix
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return OrtEncoder(session=session, pad_token_id=pad_token_id, export_s=time.perf_counter() - start)

"""What the decoder families share: RMSNorm, RoPE, SwiGLU, and the ``Decoder`` module that runs one
step (``paged.StepBatch``) as stages, one per load group.

The families (``families/gpt2.py``, ``families/llama.py``) give the embeddings, the layer and the LM
head; the step's attention over the paged KV cache is ``paged.paged_attention``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ptmserve.errors import InvalidInput
from ptmserve.models.paged import KVCache, StepBatch
from ptmserve.models.registry import check_tensors
from ptmserve.models.runner import Activations, Stage, run_stages

GROUP_EMBEDDINGS = "embeddings"
GROUP_HEAD = "head"


def decoder_group_names(config: Any) -> list[str]:
    """Load groups of a decoder in execution order: ``embeddings``, ``layers.{i}``, ``head``."""
    return [GROUP_EMBEDDINGS, *(f"layers.{i}" for i in range(config.num_layers)), GROUP_HEAD]


# ----------------------------------------------------------------------------------- shared blocks


class RMSNorm(nn.Module):
    """``weight * x / rms(x)``, the statistics in float32 (Hugging Face's ``LlamaRMSNorm``)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In-place ops on fresh tensors: a decode step runs 2 norms per layer on a single row, where
        # each allocation costs about as much as the arithmetic.
        h = x.float()
        h = (h * h.pow(2).mean(-1, keepdim=True).add_(self.eps).rsqrt_()).to(x.dtype)
        if self.weight.dtype == h.dtype and not torch.is_grad_enabled():
            return h.mul_(self.weight)
        return self.weight * h


def rope_tables(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin`` ``(T, 1, head_dim)`` of the rotate-half RoPE at ``positions``, computed in float32
    then cast to ``dtype`` (Hugging Face's default rotary embedding), for ``apply_rope``: the first half
    of ``sin`` is negated (the sign of rotate-half's ``-x2``)."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim)
    )
    freqs = positions.float()[:, None] * inv_freq[None, :]  # (T, d/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # (T, 1, d)
    sin = emb.sin()
    sin[..., : head_dim // 2].neg_()
    return emb.cos().to(dtype), sin.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x`` ``(T, heads, d)`` rotated by position (rotate-half convention: q/k in Hugging Face layout);
    ``cos, sin`` from ``rope_tables``.

    ``x * cos + cat(-x2, x1) * sin`` as ``x * cos + cat(x2, x1) * sin'`` with ``sin'`` negated on the
    first half: bit for bit the same (a sign flip is exact), in 4 ops instead of 7.
    """
    rotated = torch.roll(x, x.shape[-1] // 2, -1).mul_(sin)  # cat(x2, x1) * sin'
    return torch.mul(x, cos).add_(rotated)


def swiglu(x: torch.Tensor, gate: nn.Module, up: nn.Module, down: nn.Module) -> torch.Tensor:
    """``down(silu(gate(x)) * up(x))``, the LLaMA MLP."""
    return down(F.silu(gate(x)) * up(x))


# -------------------------------------------------------------------------------- the staged module


@dataclass(slots=True)
class StepContext:
    """What the stages of one step share besides the activations."""

    batch: StepBatch
    cache: KVCache
    rope: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, sin (T, 1, d), made by the first layer


class Decoder(nn.Module):
    """A causal LM run one step at a time as stages, one per load group; subclasses give ``embed``,
    ``run_layer`` and ``lm_logits`` and the parameters ``embeddings.*``, ``layers.{i}.*``, ``head.*``.

    The module keeps no derived tensors and no buffers: build it on the meta device and assign parameters
    (``load_state_dict(..., assign=True)``); parameters are read at call time.
    """

    config: Any

    def embed(self, step: StepContext) -> torch.Tensor:
        """Embedding rows of the step's new tokens ``(T, H)``."""
        raise NotImplementedError

    def run_layer(self, i: int, hidden: torch.Tensor, step: StepContext) -> torch.Tensor:
        """Layer ``i`` on ``hidden`` ``(T, H)``, writing its keys and values into the cache."""
        raise NotImplementedError

    def lm_logits(self, last: torch.Tensor) -> torch.Tensor:
        """Float32 logits ``(B, V)`` of the final-layer states ``last`` ``(B, H)``."""
        raise NotImplementedError

    @classmethod
    def from_tensors(
        cls,
        config: Any,
        tensors: Mapping[str, torch.Tensor],
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
    ) -> Decoder:
        """A decoder whose parameters are ``tensors`` (our names), on ``device`` in ``dtype``.

        Raises:
            InvalidCheckpoint: a parameter is missing, unexpected or has the wrong shape.
        """
        with torch.device("meta"):
            model = cls(config)
        check_tensors(model, tensors)
        model.load_state_dict(
            {k: v.to(device=device, dtype=dtype or v.dtype) for k, v in tensors.items()}, assign=True
        )
        return model.eval()

    def group_names(self) -> list[str]:
        return decoder_group_names(self.config)

    def stages(self, *, classify: bool, pooling: object) -> list[Stage]:
        """Decoders do not embed or classify.

        Raises:
            InvalidInput: always; run ``step_stages`` instead.
        """
        raise InvalidInput(
            f"{self.config.architecture} is a text generation model; it has no embedding or classification"
        )

    def step_stages(self, batch: StepBatch, cache: KVCache) -> list[Stage]:
        """The stages of one decode/prefill step: ``embeddings``, ``layers.{i}`` (each writes its keys
        and values into ``cache``), ``head`` (sets ``acts.logits``, float32 ``(B, V)``, of each
        sequence's last new token). Run them with ``run_stages(stages, Activations(batch))``.

        Raises:
            InvalidInput: a position beyond the model's context (when the stages run).
        """
        step = StepContext(batch, cache)
        stages = [Stage(GROUP_EMBEDDINGS, partial(self._embed_stage, step))]
        stages += [
            Stage(f"layers.{i}", partial(self._layer_stage, i, step)) for i in range(self.config.num_layers)
        ]
        return [*stages, Stage(GROUP_HEAD, partial(self._head_stage, step))]

    def forward_step(self, batch: StepBatch, cache: KVCache) -> torch.Tensor:
        """Run one step; float32 logits ``(B, V)`` of each sequence's last new token."""
        acts = run_stages(self.step_stages(batch, cache), Activations(batch))  # type: ignore[arg-type]
        assert acts.logits is not None
        return acts.logits

    def _embed_stage(self, step: StepContext, acts: Activations) -> None:
        if step.batch.max_context_len > self.config.max_tokens:
            raise InvalidInput(
                f"a sequence reaches {step.batch.max_context_len} tokens; "
                f"the model allows {self.config.max_tokens}"
            )
        acts.hidden = self.embed(step)

    def _layer_stage(self, i: int, step: StepContext, acts: Activations) -> None:
        assert acts.hidden is not None
        acts.hidden = self.run_layer(i, acts.hidden, step)

    def _head_stage(self, step: StepContext, acts: Activations) -> None:
        assert acts.hidden is not None
        acts.logits = self.lm_logits(acts.hidden.index_select(0, step.batch.last_rows()))

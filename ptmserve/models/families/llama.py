"""LLaMA-style decoders (LLaMA 2/3 without RoPE scaling, SmolLM2, TinyLlama ...): RoPE, RMSNorm, SwiGLU,
grouped-query attention, LM head tied to the word embedding or its own.

Query and key weights are in Hugging Face's layout (rotate-half RoPE). The GGUF importer builds a
``LlamaConfig`` and hands tensors over with our names, its interleaved q/k rows already un-permuted.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ptmserve.errors import InvalidCheckpoint
from ptmserve.models import quant
from ptmserve.models.decoder import (
    Decoder,
    RMSNorm,
    StepContext,
    apply_rope,
    decoder_group_names,
    rope_tables,
    swiglu,
)
from ptmserve.models.names import NameTable
from ptmserve.models.paged import paged_attention
from ptmserve.models.registry import Family, register

ARCHITECTURE = "llama"


@dataclass(frozen=True, slots=True)
class LlamaConfig:
    """Shapes and numerics of a LLaMA-style decoder."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    labels: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        problems = [
            f"{name} must be positive, got {getattr(self, name)}"
            for name in (
                "vocab_size",
                "hidden_size",
                "num_layers",
                "num_heads",
                "num_kv_heads",
                "intermediate_size",
                "max_position_embeddings",
            )
            if getattr(self, name) <= 0
        ]
        if not problems and self.hidden_size % self.num_heads:
            problems.append(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if not problems and self.num_heads % self.num_kv_heads:
            problems.append(
                f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}"
            )
        if not problems and self.head_dim % 2:
            problems.append(f"head_dim {self.head_dim} must be even for RoPE")
        if problems:
            raise InvalidCheckpoint("invalid llama config: " + "; ".join(problems))
        object.__setattr__(self, "labels", tuple(self.labels))

    @property
    def architecture(self) -> str:
        return ARCHITECTURE

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def max_tokens(self) -> int:
        return self.max_position_embeddings

    @property
    def position_offset(self) -> int:
        return 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; ``from_dict(to_dict())`` gives an equal config."""
        return {**asdict(self), "labels": list(self.labels)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LlamaConfig:
        """Inverse of ``to_dict``. Raises ``InvalidCheckpoint`` on unknown or missing fields."""
        try:
            return cls(**{**data, "labels": tuple(data.get("labels", ()))})
        except TypeError as exc:
            raise InvalidCheckpoint(f"invalid llama config dict: {exc}") from exc

    @classmethod
    def from_hf(cls, cj: dict[str, Any]) -> LlamaConfig:
        """Build from a Hugging Face LLaMA ``config.json`` (missing keys take transformers' defaults;
        RoPE's theta from ``rope_theta`` or, as transformers 5 writes it, ``rope_parameters``).

        Raises:
            InvalidCheckpoint: an option this module does not implement (RoPE scaling, attention or MLP
                biases, an activation other than SiLU, a head size other than hidden / heads).
        """
        hidden = int(cj.get("hidden_size", 4096))
        heads = int(cj.get("num_attention_heads", 32))
        rope = cj.get("rope_parameters") or cj.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        bad = []
        if rope_type != "default":
            bad.append(f"RoPE scaling {rope_type!r}")
        if rope.get("partial_rotary_factor", cj.get("partial_rotary_factor")) not in (None, 1, 1.0):
            bad.append("partial rotary embeddings")
        if cj.get("attention_bias") or cj.get("mlp_bias"):
            bad.append("attention or MLP biases")
        if cj.get("hidden_act", "silu") != "silu":
            bad.append(f"hidden_act {cj.get('hidden_act')!r}")
        if cj.get("head_dim") not in (None, hidden // max(heads, 1)):
            bad.append(f"head_dim {cj.get('head_dim')} != hidden_size / num_attention_heads")
        if bad:
            raise InvalidCheckpoint(f"unsupported llama options: {', '.join(bad)}")
        theta = cj.get("rope_theta") or rope.get("rope_theta") or 10000.0
        return cls(
            vocab_size=int(cj.get("vocab_size", 32000)),
            hidden_size=hidden,
            num_layers=int(cj.get("num_hidden_layers", 32)),
            num_heads=heads,
            num_kv_heads=int(cj.get("num_key_value_heads") or heads),
            intermediate_size=int(cj.get("intermediate_size", 11008)),
            max_position_embeddings=int(cj.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(cj.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            tie_word_embeddings=bool(cj.get("tie_word_embeddings", False)),
        )


class Embeddings(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden_size)


class Layer(nn.Module):
    """One block: ``x += O(attn(RoPE(QKV RMS(x))))``; ``x += down(silu(gate y) * up y)``, ``y = RMS(x)``."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        h, kv = cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim
        self.attn_norm = RMSNorm(h, cfg.rms_norm_eps)
        self.q = nn.Linear(h, h, bias=False)
        self.k = nn.Linear(h, kv, bias=False)
        self.v = nn.Linear(h, kv, bias=False)
        self.o = nn.Linear(h, h, bias=False)
        self.ffn_norm = RMSNorm(h, cfg.rms_norm_eps)
        self.gate = nn.Linear(h, cfg.intermediate_size, bias=False)
        self.up = nn.Linear(h, cfg.intermediate_size, bias=False)
        self.down = nn.Linear(cfg.intermediate_size, h, bias=False)


class Head(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)


class Llama(Decoder):
    """A LLaMA-style decoder: ``embeddings.word``, ``layers.{i}.*``, ``head.norm`` and, untied,
    ``head.lm``."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.num_layers))
        self.head = Head(config)

    def embed(self, step: StepContext) -> torch.Tensor:
        return self.embeddings.word(step.batch.input_ids)  # (T, H)

    def run_layer(self, i: int, hidden: torch.Tensor, step: StepContext) -> torch.Tensor:
        layer, cfg = self.layers[i], self.config
        t, d = hidden.shape[0], cfg.head_dim
        if step.rope is None:  # once per step, shared by every layer
            step.rope = rope_tables(step.batch.positions, d, cfg.rope_theta, hidden.dtype)
        cos, sin = step.rope
        x = layer.attn_norm(hidden)
        q = apply_rope(layer.q(x).view(t, cfg.num_heads, d), cos, sin)  # (T, nh, d)
        k = apply_rope(layer.k(x).view(t, cfg.num_kv_heads, d), cos, sin)  # (T, kvh, d)
        v = layer.v(x).view(t, cfg.num_kv_heads, d)
        hidden = hidden + layer.o(paged_attention(q, k, v, i, step.batch, step.cache))  # a fresh tensor:
        return hidden.add_(swiglu(layer.ffn_norm(hidden), layer.gate, layer.up, layer.down))  # in place

    def lm_logits(self, last: torch.Tensor) -> torch.Tensor:
        head = self.embeddings.word if self.head.lm is None else self.head.lm
        return quant.project(self.head.norm(last), head).float()  # (B, V), whatever the weight format


NAMES = NameTable(
    prefix="model.",
    body={
        "embed_tokens": "embeddings.word",
        "layers.{i}.input_layernorm": "layers.{i}.attn_norm",
        "layers.{i}.self_attn.q_proj": "layers.{i}.q",
        "layers.{i}.self_attn.k_proj": "layers.{i}.k",
        "layers.{i}.self_attn.v_proj": "layers.{i}.v",
        "layers.{i}.self_attn.o_proj": "layers.{i}.o",
        "layers.{i}.post_attention_layernorm": "layers.{i}.ffn_norm",
        "layers.{i}.mlp.gate_proj": "layers.{i}.gate",
        "layers.{i}.mlp.up_proj": "layers.{i}.up",
        "layers.{i}.mlp.down_proj": "layers.{i}.down",
        "norm": "head.norm",
        "lm_head": "head.lm",  # only in untied checkpoints
    },
    ignored=(r"(model\.)?layers\.\d+\.self_attn\.rotary_emb\.inv_freq",),  # a buffer in older checkpoints
)

FAMILY = register(
    Family(
        name=ARCHITECTURE,
        hf_model_types=("llama",),
        config_from_hf=LlamaConfig.from_hf,
        config_from_dict=LlamaConfig.from_dict,
        names=NAMES,
        build=Llama,
        group_names=decoder_group_names,
        generates=True,
        tied_groups=lambda config: (
            frozenset({"embeddings"}) if config.tie_word_embeddings else frozenset()
        ),  # the LM head reads the word embeddings
        quantized_head=True,  # lm_logits projects through quant.project: the tied embedding may be int8
    )
)

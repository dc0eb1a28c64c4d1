"""GPT-2: learned positions, pre-LayerNorm blocks, ``gelu_new`` MLP, LM head tied to the word embedding.

Hugging Face stores GPT-2's linears as ``Conv1D`` with weights ``(in, out)`` and the query, key and value
projections fused in ``attn.c_attn``; the name table's hooks transpose and split them, so the module
holds plain ``(out, in)`` linears named as every other family's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ptmserve.errors import InvalidCheckpoint
from ptmserve.models import quant
from ptmserve.models.decoder import Decoder, StepContext, decoder_group_names
from ptmserve.models.names import Hook, NameTable
from ptmserve.models.paged import paged_attention
from ptmserve.models.registry import Family, register

ARCHITECTURE = "gpt2"


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "gelu": F.gelu,
    "relu": F.relu,
}


@dataclass(frozen=True, slots=True)
class GPT2DecoderConfig:
    """Shapes and numerics of a GPT-2 model (the LM head is always the word embedding)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    layer_norm_eps: float = 1e-5
    activation: str = "gelu_new"
    labels: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        problems = [
            f"{name} must be positive, got {getattr(self, name)}"
            for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size")
            if getattr(self, name) <= 0
        ]
        if self.num_heads > 0 and self.hidden_size % self.num_heads:
            problems.append(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.activation not in ACTIVATIONS:
            problems.append(f"activation {self.activation!r} is not one of {sorted(ACTIVATIONS)}")
        if problems:
            raise InvalidCheckpoint("invalid gpt2 config: " + "; ".join(problems))
        object.__setattr__(self, "labels", tuple(self.labels))

    @property
    def architecture(self) -> str:
        return ARCHITECTURE

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_kv_heads(self) -> int:
        """Every head has its own keys and values (what the KV cache is sized by)."""
        return self.num_heads

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
    def from_dict(cls, data: dict[str, Any]) -> GPT2DecoderConfig:
        """Inverse of ``to_dict``. Raises ``InvalidCheckpoint`` on unknown or missing fields."""
        try:
            return cls(**{**data, "labels": tuple(data.get("labels", ()))})
        except TypeError as exc:
            raise InvalidCheckpoint(f"invalid gpt2 config dict: {exc}") from exc

    @classmethod
    def from_hf(cls, cj: dict[str, Any]) -> GPT2DecoderConfig:
        """Build from a Hugging Face GPT-2 ``config.json`` (missing keys take transformers' defaults).

        Raises:
            InvalidCheckpoint: an option this module does not implement (untied LM head, cross
                attention, attention scaled otherwise than by ``1/sqrt(head_dim)``).
        """
        unsupported = {
            "tie_word_embeddings": (True, cj.get("tie_word_embeddings", True)),
            "add_cross_attention": (False, cj.get("add_cross_attention", False)),
            "scale_attn_weights": (True, cj.get("scale_attn_weights", True)),
            "scale_attn_by_inverse_layer_idx": (False, cj.get("scale_attn_by_inverse_layer_idx", False)),
        }
        bad = [f"{k}={got!r}" for k, (want, got) in unsupported.items() if bool(got) != want]
        if bad:
            raise InvalidCheckpoint(f"unsupported gpt2 options: {', '.join(bad)}")
        hidden = int(cj.get("n_embd", cj.get("hidden_size", 768)))
        inner = cj.get("n_inner")
        return cls(
            vocab_size=int(cj.get("vocab_size", 50257)),
            hidden_size=hidden,
            num_layers=int(cj.get("n_layer", cj.get("num_hidden_layers", 12))),
            num_heads=int(cj.get("n_head", cj.get("num_attention_heads", 12))),
            intermediate_size=int(inner) if inner else 4 * hidden,
            max_position_embeddings=int(cj.get("n_positions", cj.get("max_position_embeddings", 1024))),
            layer_norm_eps=float(cj.get("layer_norm_epsilon", 1e-5)),
            activation=str(cj.get("activation_function", "gelu_new")),
        )


class Embeddings(nn.Module):
    def __init__(self, cfg: GPT2DecoderConfig) -> None:
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)


class Layer(nn.Module):
    """One pre-LN block: ``x += O(attn(QKV LN(x)))``; ``x += down(act(up LN(x)))``."""

    def __init__(self, cfg: GPT2DecoderConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.attn_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.q = nn.Linear(h, h)
        self.k = nn.Linear(h, h)
        self.v = nn.Linear(h, h)
        self.o = nn.Linear(h, h)
        self.ffn_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.up = nn.Linear(h, cfg.intermediate_size)
        self.down = nn.Linear(cfg.intermediate_size, h)


class Head(nn.Module):
    def __init__(self, cfg: GPT2DecoderConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class GPT2(Decoder):
    """GPT-2 of ``config``: ``embeddings.{word,position}``, ``layers.{i}.*``, ``head.norm``."""

    def __init__(self, config: GPT2DecoderConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.num_layers))
        self.head = Head(config)
        self._act = ACTIVATIONS[config.activation]

    def embed(self, step: StepContext) -> torch.Tensor:
        b = step.batch
        return self.embeddings.word(b.input_ids) + self.embeddings.position(b.positions)  # (T, H)

    def run_layer(self, i: int, hidden: torch.Tensor, step: StepContext) -> torch.Tensor:
        layer = self.layers[i]
        t, nh, d = hidden.shape[0], self.config.num_heads, self.config.head_dim
        x = layer.attn_norm(hidden)
        q, k, v = (proj(x).view(t, nh, d) for proj in (layer.q, layer.k, layer.v))  # (T, nh, d)
        hidden = hidden + layer.o(paged_attention(q, k, v, i, step.batch, step.cache))
        return hidden.add_(layer.down(self._act(layer.up(layer.ffn_norm(hidden)))))  # fresh: in place

    def lm_logits(self, last: torch.Tensor) -> torch.Tensor:
        return quant.project(self.head.norm(last), self.embeddings.word).float()  # (B, V), any format


def _conv1d(tensor: torch.Tensor, param: str) -> torch.Tensor:
    """Conv1D stores ``(in, out)``; a linear wants ``(out, in)``."""
    return tensor.t() if param == "weight" else tensor


def _split_qkv(tensor: torch.Tensor, param: str) -> tuple[torch.Tensor, ...]:
    """``c_attn`` ``(in, 3H)`` (or its bias ``(3H,)``) into query, key and value ``(H, in)``."""
    return tuple(_conv1d(tensor, param).chunk(3, dim=0))


NAMES = NameTable(
    prefix="transformer.",
    body={
        "wte": "embeddings.word",
        "wpe": "embeddings.position",
        "h.{i}.ln_1": "layers.{i}.attn_norm",
        "h.{i}.attn.c_attn": Hook(("layers.{i}.q", "layers.{i}.k", "layers.{i}.v"), _split_qkv),
        "h.{i}.attn.c_proj": Hook("layers.{i}.o", _conv1d),
        "h.{i}.ln_2": "layers.{i}.ffn_norm",
        "h.{i}.mlp.c_fc": Hook("layers.{i}.up", _conv1d),
        "h.{i}.mlp.c_proj": Hook("layers.{i}.down", _conv1d),
        "ln_f": "head.norm",
    },
    ignored=(
        r"lm_head\.weight",  # tied to wte (from_hf refuses untied configs)
        r"(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)",  # causal-mask buffers of older checkpoints
    ),
)

FAMILY = register(
    Family(
        name=ARCHITECTURE,
        hf_model_types=("gpt2",),
        config_from_hf=GPT2DecoderConfig.from_hf,
        config_from_dict=GPT2DecoderConfig.from_dict,
        names=NAMES,
        build=GPT2,
        group_names=decoder_group_names,
        generates=True,
        tied_groups=lambda config: frozenset({"embeddings"}),  # the LM head reads the word embeddings
        quantized_head=True,  # lm_logits projects through quant.project: the tied embedding may be int8
    )
)

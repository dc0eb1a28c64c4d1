"""Read a GGUF file (llama.cpp's single-file format) into a ``Checkpoint`` of the LLaMA family.

Only ``general.architecture == "llama"`` files are read (SmolLM2, LLaMA 1-3 without rope scaling,
Mistral-style models without sliding windows), with a byte-level BPE tokenizer (``gguf_tokenizer``).
Weights are read with ``gguf.GGUFReader`` (a memory map, nothing unpickled) and dequantized to
float32 with ``gguf.quants.dequantize``: F32, F16, BF16, Q8_0, Q4_0 and Q4_1; other types are refused.

Two layout differences from a Hugging Face checkpoint are undone here:

- GGUF lists a tensor's dimensions innermost first, so ``[in, out]`` in the file is ``(out, in)`` here;
- llama.cpp's converter permutes the rows of the q and k projections so that rotary pairs are adjacent
  (``(2i, 2i + 1)``, GPT-J style); ours rotate halves (``(i, i + head_dim / 2)``), as Hugging Face's
  LLaMA does, so those rows are permuted back (``unpermute_rows``).
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ptmserve.errors import InvalidCheckpoint
from ptmserve.models import registry
from ptmserve.models.config import Pooling
from ptmserve.models.gguf_tokenizer import tokenizer_from_gguf
from ptmserve.models.hf import Checkpoint
from ptmserve.models.registry import check_tensors

log = logging.getLogger(__name__)

ARCHITECTURES = ("llama",)  # general.architecture values we read
TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")  # GGML types we dequantize

_GLOBAL_NAMES = {
    "token_embd.weight": "embeddings.word.weight",
    "output_norm.weight": "head.norm.weight",
    "output.weight": "head.lm.weight",
}
_LAYER_NAMES = {  # blk.{i}.<gguf> -> layers.{i}.<ours>
    "attn_norm": "attn_norm",
    "attn_q": "q",
    "attn_k": "k",
    "attn_v": "v",
    "attn_output": "o",
    "ffn_norm": "ffn_norm",
    "ffn_gate": "gate",
    "ffn_up": "up",
    "ffn_down": "down",
}
# What a damaged or hostile file makes GGUFReader or numpy raise while parsing or viewing it.
_READ_ERRORS = (
    ValueError,
    TypeError,
    IndexError,
    KeyError,
    OverflowError,
    UnicodeDecodeError,
    OSError,
    struct.error,
    MemoryError,
    NotImplementedError,
    AssertionError,
)


def read_gguf(path: str | Path, weights: str = "fp") -> Checkpoint:
    """Read the GGUF file at ``path`` as a LLaMA-family checkpoint with float32 weights, or, with
    ``weights`` "int8" or "int4", with the Q8_0 / Q4_0 / Q4_1 tensors of linears of that format kept
    quantized (``read_tensors``); the other tensors are float32, for the importer to quantize.

    Returns:
        A ``Checkpoint`` whose ``generation`` holds the chat template and the special tokens, whose
        pooling is the default and whose ``max_length`` is the context length.

    Raises:
        InvalidCheckpoint: not a readable GGUF file (missing, truncated, wrong magic), another
            architecture, tokenizer or tensor type, or tensors that do not match the config.
    """
    path = Path(path)
    reader = open_gguf(path)
    meta = read_metadata(reader)
    names = [t.name for t in reader.tensors]
    config_dict = llama_config_dict(meta, tied="output.weight" not in names)
    tokenizer_json, generation = tokenizer_from_gguf(meta)
    family = registry.get("llama")
    config = family.config_from_dict(config_dict)
    with torch.device("meta"):
        skeleton = family.build(config)
    # Names and shapes are checked before anything is dequantized.
    check_tensors(
        skeleton, {_our_name(n): torch.empty(s, device="meta") for n, s in tensor_shapes(reader).items()}
    )
    tensors = read_tensors(reader, config_dict, _formats(family, config, weights))
    return Checkpoint(
        architecture="llama",
        config=config,
        pooling=Pooling(),
        max_length=int(config_dict["max_position_embeddings"]),
        tensors=tensors,
        tokenizer_json=tokenizer_json,
        source=path,
        generation=generation,
    )


def open_gguf(path: Path) -> Any:
    """A ``gguf.GGUFReader`` over ``path``.

    Raises:
        InvalidCheckpoint: the file is missing, is not GGUF, or is truncated or malformed.
    """
    from gguf import GGUFReader

    if not path.is_file():
        raise InvalidCheckpoint(f"GGUF file {str(path)!r} does not exist")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise InvalidCheckpoint(f"{str(path)!r} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    try:
        reader = GGUFReader(path)
    except _READ_ERRORS as exc:
        raise InvalidCheckpoint(f"{str(path)!r} is not a readable GGUF file: {exc!r}") from exc
    if reader.byte_order != "I":
        raise InvalidCheckpoint(f"{str(path)!r} is a GGUF file of the other byte order; not supported")
    return reader


def read_metadata(reader: Any) -> dict[str, Any]:
    """Every metadata key of the file -> its value as Python (str, int, float, bool or a list).

    Raises:
        InvalidCheckpoint: a value cannot be decoded.
    """
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):  # the header, not metadata
            continue
        try:
            out[key] = field.contents()
        except _READ_ERRORS as exc:
            raise InvalidCheckpoint(f"GGUF metadata {key!r} cannot be read: {exc!r}") from exc
    return out


def llama_config_dict(meta: Mapping[str, Any], tied: bool) -> dict[str, Any]:
    """The LLaMA family's config fields from GGUF metadata (``LlamaConfig.from_dict`` takes them).

    Raises:
        InvalidCheckpoint: another architecture, missing or mistyped keys, or features the family
            does not implement (rope scaling, mixture of experts, a head size other than d / heads).
    """
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise InvalidCheckpoint(
            f"GGUF architecture {arch!r} is not supported; supported: {list(ARCHITECTURES)}"
        )
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise InvalidCheckpoint("GGUF metadata has no token list ('tokenizer.ggml.tokens')")
    hidden = _int(meta, "llama.embedding_length")
    heads = _int(meta, "llama.attention.head_count")
    kv_heads = _int(meta, "llama.attention.head_count_kv", heads)
    if hidden % heads or heads % kv_heads or (hidden // heads) % 2:
        raise InvalidCheckpoint(
            f"GGUF shapes do not fit: hidden size {hidden}, {heads} heads, {kv_heads} key/value heads"
        )
    head_dim = hidden // heads
    for key in ("llama.rope.dimension_count", "llama.attention.key_length", "llama.attention.value_length"):
        if _int(meta, key, head_dim) != head_dim:
            raise InvalidCheckpoint(
                f"GGUF {key} = {meta[key]} (not hidden / heads = {head_dim}); not supported"
            )
    scaling = meta.get("llama.rope.scaling.type", "none")
    if scaling != "none":
        raise InvalidCheckpoint(f"GGUF rope scaling {scaling!r} is not supported")
    if _int(meta, "llama.expert_count", 0):
        raise InvalidCheckpoint("GGUF mixture-of-experts models are not supported")
    return {
        "vocab_size": len(tokens),
        "hidden_size": hidden,
        "num_layers": _int(meta, "llama.block_count"),
        "num_heads": heads,
        "num_kv_heads": kv_heads,
        "intermediate_size": _int(meta, "llama.feed_forward_length"),
        "max_position_embeddings": _int(meta, "llama.context_length"),
        "rms_norm_eps": _float(meta, "llama.attention.layer_norm_rms_epsilon"),
        "rope_theta": _float(meta, "llama.rope.freq_base", 10000.0),
        "tie_word_embeddings": tied,
        "labels": [],
    }


def tensor_shapes(reader: Any) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name -> its shape in PyTorch order (GGUF lists dimensions innermost first)."""
    return {t.name: tuple(int(d) for d in reversed(t.shape.tolist())) for t in reader.tensors}


def read_tensors(
    reader: Any, config: Mapping[str, Any], formats: Mapping[str, str] | None = None
) -> dict[str, torch.Tensor]:
    """Every tensor of the file in our names and PyTorch's (out, in) order, with the q and k rows
    permuted back to the rotate-half layout: dequantized to float32, except that a Q8_0 weight of a
    module whose format in ``formats`` (module path -> "int8"/"int4") is int8, and a Q4_0 or Q4_1 weight of
    an int4 one, become that module's quantized tensors (``quant``) without a float copy of the weight.

    Raises:
        InvalidCheckpoint: an unknown tensor name or an unsupported tensor type.
    """
    from gguf.quants import dequantize

    unsupported = sorted(
        f"{t.name} ({t.tensor_type.name})" for t in reader.tensors if t.tensor_type.name not in TENSOR_TYPES
    )
    if unsupported:
        raise InvalidCheckpoint(
            f"GGUF tensor types not supported: {unsupported[:8]}{' ...' if len(unsupported) > 8 else ''}; "
            f"supported: {list(TENSOR_TYPES)}"
        )
    shapes = tensor_shapes(reader)
    formats = formats or {}
    out: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        name = _our_name(t.name)
        module = name.removesuffix(".weight")
        kind = (formats.get(module), t.tensor_type.name)
        try:
            if kind in _DIRECT:
                made = _DIRECT[kind](np.asarray(t.data).reshape(shapes[t.name][0], -1))
            else:
                values = dequantize(t.data, t.tensor_type)
                if np.may_share_memory(values, reader.data):  # F32 comes back as a view of the file
                    values = values.copy()
                values = np.ascontiguousarray(values, dtype=np.float32)
                made = {"weight": torch.from_numpy(values).reshape(shapes[t.name])}
        except _READ_ERRORS + (RuntimeError,) as exc:
            raise InvalidCheckpoint(f"GGUF tensor {t.name!r} cannot be read: {exc!r}") from exc
        heads = {".q": "num_heads", ".k": "num_kv_heads"}.get(module[module.rfind(".") :])
        for param, tensor in made.items():
            full = f"{module}.{param}" if kind in _DIRECT else name
            out[full] = tensor if heads is None else unpermute_rows(tensor, int(config[heads]))
    return out


def _formats(family: Any, config: Any, weights: str) -> dict[str, str]:
    """Module path -> weight format of the quantized modules of ``family``'s model in ``weights``."""
    from ptmserve.models import quant

    if weights == "fp":
        return {}
    with torch.device("meta"):
        return quant.quantized_names(family.with_weights(weights).module(config))


def _blocks(data: np.ndarray, block_bytes: int) -> torch.Tensor:
    """The rows of a block-quantized tensor as ``(rows, blocks, block_bytes)`` uint8 (a copy)."""
    rows = data.shape[0]
    return torch.from_numpy(np.ascontiguousarray(data, dtype=np.uint8).reshape(rows, -1, block_bytes).copy())


def _f16(raw: torch.Tensor) -> torch.Tensor:
    """``(..., 2)`` uint8 little-endian halves -> ``(...)`` float32."""
    return raw.contiguous().view(torch.float16)[..., 0].float()


def _q8_0_int8(data: np.ndarray) -> dict[str, torch.Tensor]:
    """Q8_0 (blocks of an fp16 scale and 32 int8) -> per-row int8 (``quant.requantize_int8``)."""
    from ptmserve.models import quant

    b = _blocks(data, 34)  # (N, G, 34)
    q = b[..., 2:].contiguous().view(torch.int8).reshape(b.shape[0], -1)  # (N, K)
    weight, scale = quant.requantize_int8(q, _f16(b[..., :2]))
    return {"weight": weight, "scale": scale}


def _q4_int4(data: np.ndarray, with_min: bool) -> dict[str, torch.Tensor]:
    """Q4_0 (``d * (q - 8)``) or Q4_1 (``d * q + m``) -> int4 nibbles, scale ``d`` and zero ``0`` or
    ``m + 8 d`` per 32 inputs, exactly. A block's 16 bytes hold its values 0..15 in the low nibbles and
    16..31 in the high ones."""

    start = 4 if with_min else 2
    b = _blocks(data, start + 16)  # (N, G, 18 or 20)
    scale = _f16(b[..., :2])  # (N, G)
    zero = _f16(b[..., 2:4]) + 8 * scale if with_min else torch.zeros_like(scale)
    qs = b[..., start:]  # (N, G, 16)
    lo, hi = qs & 0xF, qs >> 4  # values 0..15 and 16..31 of each block
    # ours pairs neighbours: byte i holds values 2i (low) and 2i + 1 (high)
    packed = torch.cat((lo[..., 0::2] | (lo[..., 1::2] << 4), hi[..., 0::2] | (hi[..., 1::2] << 4)), dim=2)
    return {"weight": packed.reshape(b.shape[0], -1), "scale": scale, "zero": zero}


_DIRECT = {  # (our module's format, GGUF type) -> its quantized tensors, without a float weight
    ("int8", "Q8_0"): _q8_0_int8,
    ("int4", "Q4_0"): lambda data: _q4_int4(data, with_min=False),
    ("int4", "Q4_1"): lambda data: _q4_int4(data, with_min=True),
}


def unpermute_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation: per head, rows ``(2i, 2i + 1)`` go back to ``(i, i + D/2)``.

    llama.cpp's ``permute`` views the rows of each head as ``(2, D/2)`` and transposes them to
    ``(D/2, 2)``; this views them as ``(D/2, 2)`` and transposes back.
    """
    rows = weight.shape[0]
    if rows % (2 * heads):
        raise InvalidCheckpoint(f"a q/k projection of {rows} rows does not split into {heads} heads of pairs")
    per_head = weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:])  # (H, D/2, 2, in)
    return per_head.transpose(1, 2).reshape(weight.shape).contiguous()  # (H, 2, D/2, in) -> (H*D, in)


def _our_name(name: str) -> str:
    """Our parameter name of GGUF tensor ``name``; unknown names raise InvalidCheckpoint."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"layers.{int(parts[1])}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    raise InvalidCheckpoint(f"GGUF tensor {name!r} is not part of a LLaMA-family model we can run")


def _int(meta: Mapping[str, Any], key: str, default: int | None = None) -> int:
    value = meta.get(key, default)
    if value is None:
        raise InvalidCheckpoint(f"GGUF metadata has no {key!r}")
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidCheckpoint(f"GGUF metadata {key!r} is {value!r}, not a non-negative integer")
    return value


def _float(meta: Mapping[str, Any], key: str, default: float | None = None) -> float:
    value = meta.get(key, default)
    if value is None:
        raise InvalidCheckpoint(f"GGUF metadata has no {key!r}")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidCheckpoint(f"GGUF metadata {key!r} is {value!r}, not a number")
    # Stored as float32: keep its shortest spelling (1e-05, not 9.999999747378752e-06), as config.json has.
    return float(str(np.float32(value)))

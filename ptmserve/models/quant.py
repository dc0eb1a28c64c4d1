"""Weight-only quantization of the linear layers (and of a word embedding), kept quantized in every tier.

Weight formats (``WEIGHT_FORMATS``), stored as plain tensors so that the store, the tiers and the
skeletons handle them like any other parameter:

- ``fp``: the family's own ``nn.Linear`` (float weights in the model dtype).
- ``int8``: ``weight`` int8 ``(N, K)`` and ``scale`` ``(N,)`` (float): ``w = weight * scale[:, None]``,
  symmetric, one scale per output channel. GGUF Q8_0 (one scale per 32 values) is re-scaled to this
  per-channel form at import (``requantize_int8``), a rounding of the int8 values, not of floats.
- ``int4``: ``weight`` uint8 ``(N, K / 2)`` of nibbles (value ``k`` in the low nibble of byte ``k // 2`` when
  ``k`` is even, in the high nibble when odd), ``scale`` and ``zero`` ``(N, K / 32)``:
  ``w = (q - 8) * scale + zero`` per group of 32 inputs, PyTorch's int4 convention. GGUF Q4_0 is
  ``scale = d, zero = 0``; Q4_1 (``d * q + m``) is ``scale = d, zero = m + 8 d``, both exact.
  A linear whose input size is not a multiple of 32 is stored as int8 instead (``linear_format``).

``bias``, ``scale`` and ``zero`` are floating, so the serve-dtype cast of the tiers applies to them; the
integer weights are never cast. The word embedding ``embeddings.word`` of an encoder is stored as int8
rows (``QuantEmbedding``): in MiniLM it is half the parameters. A decoder ties it to its LM head, so its
family must project through ``project`` before its embedding may be quantized (``Family.quantized_head``).

Kernels are picked per call from the device, dtype and rows (``quant_linear``), by what measured fastest
among the accurate ones on this project's CPU:

- int8, up to ``INT8_GEMM_MAX_ROWS`` rows (decoding, small batches): ``torch._int_mm``, with each row of
  ``x`` quantized on the fly to its own scale and zero point (``_int8_rows``);
- int4, up to ``INT4_KERNEL_MAX_ROWS`` rows: PyTorch's CPU int4 kernel (``_weight_int4pack_mm_for_cpu``);
- otherwise (prefill, encoder batches), and on other devices: the weight dequantized on the fly, then one
  GEMM, in bf16 on a CPU with bf16 arithmetic (``dequantize_linear``, also the tested reference).

What was measured and left out: fbgemm's dynamic-quantized linear is 3x fp32 on 9,000 rows but quantizes
the activations with one scale for all rows (MiniLM's smallest cosine to fp32 0.983; SmolLM2's perplexity
17.6 against 11.5) and its prepack costs about 1 s per switch of SmolLM2; ``_weight_int8pack_mm`` is 10-40x
slower than fp32 here; ``torch._int_mm`` beyond ~1,000 rows is slower than fp32.

A kernel's derived data (the int4 kernel's layout, the int8 weight's row sums) is made on first use and
cached on the bound weight parameter, so it lives exactly as long as that parameter: a tier entry's
parameter is made once per load, so a switch pays it once per weight, on the first request.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ptmserve.errors import InvalidInput

logger = logging.getLogger(__name__)

WEIGHT_FORMATS = ("fp", "int8", "int4")
GROUP_SIZE = 32  # inputs per int4 scale/zero (GGUF's block size)
WORD_EMBEDDING = "embeddings.word"  # the one embedding table that is quantized
_CACHE_ATTR = "_ptmserve_kernel"  # the cached re-layout, an attribute of the bound weight tensor
# Kernel choice by rows (tokens) per call, measured on a 2-core EPYC Zen 4 (AVX512-BF16, no AMX):
INT8_GEMM_MAX_ROWS = 256  # int8 x int8 ``torch._int_mm``: 1.7x fp32 at 1 row, slower than bf16 from ~1,000
INT4_KERNEL_MAX_ROWS = 64  # the int4 kernel in bf16: 6x fp32 at 1 row, level with a bf16 GEMM at 64


def check_format(weights: str) -> str:
    """Return ``weights`` if it is a weight format.

    Raises:
        InvalidInput: not one of ``WEIGHT_FORMATS``.
    """
    if weights not in WEIGHT_FORMATS:
        raise InvalidInput(f"weight format must be one of {list(WEIGHT_FORMATS)}, got {weights!r}")
    return weights


def linear_format(weights: str, in_features: int) -> str:
    """The format one linear of ``in_features`` inputs is stored in when the model's is ``weights``:
    int4 needs whole groups of 32 inputs, otherwise that linear is int8."""
    if weights == "int4" and in_features % GROUP_SIZE:
        return "int8"
    return weights


# ------------------------------------------------------------------------------ quantize, dequantize


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: ``(q int8 (N, K), scale float32 (N,))``, ``weight ~ q * scale[:, None]``."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)  # (N,)
    q = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``q * scale[:, None]`` in ``dtype`` (default: the scale's)."""
    dtype = dtype or scale.dtype
    return q.to(dtype) * scale.to(dtype)[:, None]


def requantize_int8(q: torch.Tensor, group_scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row int8 of groupwise int8 (GGUF Q8_0: ``q (N, K)``, ``group_scales (N, K / 32)``): each row
    keeps its largest group's scale, the other groups' values are rescaled to it and rounded."""
    n, k = q.shape
    groups = group_scales.float()  # (N, G)
    values = q.float().view(n, groups.shape[1], -1) * groups[:, :, None]  # (N, G, 32)
    return quantize_int8(values.view(n, k))


def quantize_int4(weight: torch.Tensor, group: int = GROUP_SIZE) -> tuple[torch.Tensor, ...]:
    """Asymmetric groupwise int4: ``(nibbles uint8 (N, K/2), scale (N, K/g), zero (N, K/g))``, float32,
    ``weight ~ (q - 8) * scale + zero``.

    Raises:
        InvalidInput: ``K`` is not a multiple of ``group``.
    """
    n, k = weight.shape
    if k % group:
        raise InvalidInput(f"int4 needs the input size to be a multiple of {group}, not {k}")
    w = weight.detach().float().view(n, k // group, group)  # (N, G, g)
    lo, hi = w.amin(dim=2), w.amax(dim=2)  # (N, G)
    scale = ((hi - lo) / 15.0).clamp_min(1e-12)
    q = torch.clamp(torch.round((w - lo[:, :, None]) / scale[:, :, None]), 0, 15).to(torch.uint8)
    zero = lo + 8.0 * scale
    return pack_nibbles(q.view(n, k)), scale.contiguous(), zero.contiguous()


def dequantize_int4(
    nibbles: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``(q - 8) * scale + zero`` per group, ``(N, K)`` in ``dtype`` (default: the scale's)."""
    dtype = dtype or scale.dtype
    q = unpack_nibbles(nibbles)  # (N, K) uint8
    n, k = q.shape
    g = scale.shape[1]
    w = (q.view(n, g, k // g).to(dtype) - 8) * scale.to(dtype)[:, :, None] + zero.to(dtype)[:, :, None]
    return w.view(n, k)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """``(N, K)`` values 0..15 -> ``(N, K/2)`` uint8, even columns in the low nibble."""
    q = q.to(torch.uint8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of ``pack_nibbles``: ``(N, K/2)`` uint8 -> ``(N, K)`` uint8 values 0..15."""
    return torch.stack((packed & 0xF, packed >> 4), dim=2).view(packed.shape[0], -1)


def quantize_linear(
    weight: torch.Tensor, bias: torch.Tensor | None, fmt: str, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """The stored tensors of one linear in ``fmt`` (``linear_format`` already applied), floating ones in
    ``dtype``: ``{"weight", "scale"[, "zero"][, "bias"]}`` (keys relative to the module)."""
    if fmt == "int8":
        q, scale = quantize_int8(weight)
        out = {"weight": q, "scale": scale.to(dtype)}
    elif fmt == "int4":
        q, scale, zero = quantize_int4(weight)
        out = {"weight": q, "scale": scale.to(dtype), "zero": zero.to(dtype)}
    else:
        raise InvalidInput(f"cannot quantize a linear to {fmt!r}")
    if bias is not None:
        out["bias"] = bias.detach().to(dtype).contiguous()
    return out


# -------------------------------------------------------------------------------------------- modules


def _frozen(shape: tuple[int, ...], dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)


class QuantLinear(nn.Module):
    """A linear layer whose weight is stored quantized (``int8`` or ``int4``, see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, fmt: str) -> None:
        super().__init__()
        if fmt not in ("int8", "int4"):
            raise InvalidInput(f"QuantLinear format must be int8 or int4, not {fmt!r}")
        if fmt == "int4" and in_features % GROUP_SIZE:
            raise InvalidInput(f"int4 needs an input size that is a multiple of {GROUP_SIZE}: {in_features}")
        self.in_features, self.out_features, self.fmt = in_features, out_features, fmt
        if fmt == "int8":
            self.weight = _frozen((out_features, in_features), torch.int8)
            self.scale = _frozen((out_features,), torch.float32)
        else:
            groups = in_features // GROUP_SIZE
            self.weight = _frozen((out_features, in_features // 2), torch.uint8)
            self.scale = _frozen((out_features, groups), torch.float32)
            self.zero = _frozen((out_features, groups), torch.float32)
        self.bias = _frozen((out_features,), torch.float32) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quant_linear(x, self)

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight ``(N, K)`` this module stands for."""
        if self.fmt == "int8":
            return dequantize_int8(self.weight, self.scale, dtype)
        return dequantize_int4(self.weight, self.scale, self.zero, dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.fmt}"


class QuantEmbedding(nn.Module):
    """An embedding table of int8 rows with one scale per row; its output has the scale's dtype. As a
    tied LM head (``project``) it is an int8 linear of ``(vocab, dim)``."""

    fmt = "int8"
    bias = None

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = _frozen((num_embeddings, embedding_dim), torch.int8)
        self.scale = _frozen((num_embeddings,), torch.float32)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.weight)  # (..., D) int8
        return rows.to(self.scale.dtype) * F.embedding(ids, self.scale[:, None])

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_int8(self.weight, self.scale, dtype)


def project(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """``x @ W^T (+ b)`` for a linear or an embedding used as an LM head, whatever its weight format."""
    if isinstance(module, QuantLinear | QuantEmbedding):
        return quant_linear(x, module)
    return F.linear(x, module.weight, getattr(module, "bias", None))


# -------------------------------------------------------------------------------------------- kernels


def quant_linear(x: torch.Tensor, module: QuantLinear | QuantEmbedding) -> torch.Tensor:
    """``x (..., K) @ W^T + b`` in ``x``'s dtype, with the fastest accurate kernel this device and shape
    have (module docstring); elsewhere dequantize-then-matmul."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    rows, n = x2.shape[0], module.weight.shape[0]
    if x2.device.type != "cpu" or rows == 0:
        return dequantize_linear(x, module)
    if module.fmt == "int8" and rows <= INT8_GEMM_MAX_ROWS:
        y = _int8_rows(x2, module)
    elif module.fmt == "int4" and n % 16 == 0 and rows <= INT4_KERNEL_MAX_ROWS:
        y = _int4_cpu(x2, module)
    else:
        y = dequantize_linear(x2, module, _cpu_compute_dtype(x2.dtype))
    return y.view(*lead, n)


def dequantize_linear(
    x: torch.Tensor, module: QuantLinear | QuantEmbedding, compute: torch.dtype | None = None
) -> torch.Tensor:
    """The reference: the weight dequantized on the fly to ``compute`` (default ``x``'s dtype), then
    ``F.linear``; the result in ``x``'s dtype."""
    compute = compute or x.dtype
    bias = module.bias.to(compute) if module.bias is not None else None
    y = F.linear(x.to(compute), module.dequantized(compute), bias)
    return y if y.dtype == x.dtype else y.to(x.dtype)


_NATIVE_BF16: bool | None = None


def _cpu_compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """bf16 for a float32 ``dtype`` on a CPU with bf16 arithmetic (AVX512-BF16, AMX): there a bf16 GEMM
    of a dequantized weight is faster than the float32 one (measured 1.5x at 9217 x 384 x 1536 on an EPYC
    Zen 4, dequantization included); elsewhere ``dtype``."""
    global _NATIVE_BF16
    if _NATIVE_BF16 is None:
        cpu = getattr(torch, "cpu", None)
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        _NATIVE_BF16 = any(bool(getattr(cpu, c, lambda: False)()) for c in checks)
    return torch.bfloat16 if dtype == torch.float32 and _NATIVE_BF16 else dtype


def _cached(weight: torch.Tensor, kind: str, deps: tuple[Any, ...], make: Any) -> Any:
    """The ``kind`` of re-layout of ``weight`` made by ``make()``, cached on ``weight`` while ``deps`` (the
    other bound tensors it was made from) are the same objects."""
    slots = getattr(weight, _CACHE_ATTR, None)
    if slots is None:
        slots = {}
        setattr(weight, _CACHE_ATTR, slots)
    hit = slots.get(kind)
    if hit is not None and len(hit[0]) == len(deps) and all(map(operator.is_, hit[0], deps)):
        return hit[1]
    made = make()
    slots[kind] = (deps, made)
    return made


def _int8_rows(x: torch.Tensor, module: QuantLinear | QuantEmbedding) -> torch.Tensor:
    """An int8 GEMM with every row of ``x`` quantized on its own, asymmetrically (a scale and a zero point
    per row, the uint8 grid shifted by 128 into int8): int32 accumulation in ``torch._int_mm``, then
    ``y = rows * (acc + (128 - zp) * sum_k W[n, k]) * scale[n]``. One scale for all rows (fbgemm's
    dynamic quantization) loses the small rows next to the large ones: SmolLM2's perplexity went from
    11.5 to 17.6; MiniLM's smallest cosine to fp32 from 0.998 (weights alone) to 0.983."""
    weight = module.weight
    xf = x.float()
    lo = xf.amin(dim=1, keepdim=True).clamp_max(0.0)  # (M, 1): the grid holds 0 exactly
    hi = xf.amax(dim=1, keepdim=True).clamp_min(0.0)
    rows = ((hi - lo) / 255.0).clamp_min(1e-12)
    zero = torch.round(-lo / rows)  # (M, 1) in 0..255
    xq = (torch.round(xf / rows) + (zero - 128.0)).clamp_(-128.0, 127.0).to(torch.int8)
    sums = _cached(weight, "colsum", (), lambda: _row_sums(weight))  # (N,)
    acc = torch._int_mm(xq, weight.t()).float()  # (M, N)
    y = (acc + (128.0 - zero) * sums) * (rows * module.scale.float())
    if module.bias is not None:
        y = y + module.bias.float()
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def _row_sums(weight: torch.Tensor) -> torch.Tensor:
    """``weight.sum(dim=1)`` as float32 ``(N,)``, through the int8 GEMM (6x faster than ``sum`` here)."""
    ones = torch.ones(1, weight.shape[1], dtype=torch.int8, device=weight.device)
    return torch._int_mm(ones, weight.t())[0].float()


def _int4_cpu(x: torch.Tensor, module: QuantLinear) -> torch.Tensor:
    """PyTorch's CPU int4 kernel: the weight re-laid out once, scales and zeros as ``(G, N, 2)``."""
    weight, scale, zero = module.weight, module.scale, module.zero
    dtype = _cpu_compute_dtype(x.dtype)  # in float32 the kernel is 5-15x slower than in bf16

    def pack() -> tuple[torch.Tensor, dict[torch.dtype, torch.Tensor]]:
        q = unpack_nibbles(weight.detach()).to(torch.int32)
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2), {}

    packed, qparams = _cached(weight, "int4", (scale, zero), pack)
    sz = qparams.get(dtype)
    if sz is None:
        sz = torch.stack((scale.detach(), zero.detach()), dim=2).transpose(0, 1).to(dtype).contiguous()
        qparams[dtype] = sz  # (G, N, 2)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(dtype), packed, GROUP_SIZE, sz)
    if module.bias is not None:
        y = y + module.bias.to(dtype)
    return y if y.dtype == x.dtype else y.to(x.dtype)


# --------------------------------------------------------------------------- whole models (meta swap)


def quantize_module(module: nn.Module, weights: str, *, embeddings: bool = True) -> nn.Module:
    """Replace ``module``'s ``nn.Linear`` submodules (and, with ``embeddings``, its ``embeddings.word``
    table) by their quantized form in ``weights``, in place; returns ``module``. Works on the meta device
    (skeletons); the new parameters are uninitialised. ``fp`` changes nothing."""
    check_format(weights)
    if weights == "fp":
        return module
    for name, child in list(module.named_modules()):
        if not isinstance(child, nn.Linear | nn.Embedding) or (
            isinstance(child, nn.Embedding) and not (embeddings and name == WORD_EMBEDDING)
        ):
            continue
        with torch.device(child.weight.device):  # meta for a skeleton: nothing is allocated
            if isinstance(child, nn.Linear):
                fmt = linear_format(weights, child.in_features)
                has_bias = child.bias is not None
                new: nn.Module = QuantLinear(child.in_features, child.out_features, has_bias, fmt)
            else:
                new = QuantEmbedding(child.num_embeddings, child.embedding_dim)
        owner, _, attr = name.rpartition(".")
        setattr(module.get_submodule(owner), attr, new)
    return module


def to_format(
    skeleton: nn.Module, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """``tensors`` in the formats of ``skeleton`` (a ``Family.module`` on the meta device): modules whose
    tensors are already quantized (a ``scale`` is there, e.g. read straight from GGUF) are kept, the others
    are quantized from their float ``weight`` ."""
    done = {n.removesuffix(".scale") for n in tensors if n.endswith(".scale")}
    todo = {n: m for n, m in skeleton.named_modules() if isinstance(m, QuantLinear | QuantEmbedding)}
    out = dict(tensors)
    for name, child in todo.items():
        if name in done:
            continue
        w = out.pop(f"{name}.weight")
        b = out.pop(f"{name}.bias", None)
        out.update({f"{name}.{k}": v for k, v in quantize_linear(w, b, child.fmt, dtype).items()})
    return out


def quantized_names(skeleton: nn.Module) -> dict[str, str]:
    """Module path -> format of each quantized module of ``skeleton``."""
    return {n: m.fmt for n, m in skeleton.named_modules() if isinstance(m, QuantLinear | QuantEmbedding)}


def check_stored_dtypes(dtypes: Mapping[str, torch.dtype]) -> list[str]:
    """Problems of a quantized model's stored dtypes (tensor name -> dtype): the ``weight`` next to a
    ``scale`` must be int8 (uint8 nibbles when a ``zero`` is there too), every other tensor but an
    embedding table's float. Empty if there are none."""
    wrong = []
    quantized = {n.removesuffix(".scale") for n in dtypes if n.endswith(".scale")}
    for name, dtype in dtypes.items():
        module, _, param = name.rpartition(".")
        want: torch.dtype | None = None
        if module in quantized and param == "weight":
            want = torch.uint8 if f"{module}.zero" in dtypes else torch.int8
        if (want is not None and dtype != want) or (want is None and not dtype.is_floating_point):
            wrong.append(f"{name}: {str(dtype).removeprefix('torch.')}")
    return wrong


def load_module(
    architecture: str,
    config: Any,
    tensors: Mapping[str, torch.Tensor],
    weights: str,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """The module of ``architecture`` and ``config`` in weight format ``weights``, on ``device``, its
    floating tensors in ``dtype`` (None: as given), integer ones as stored. ``tensors`` may be float (the
    fp names: quantized here) or already in the format (read from a repository). For benchmarks and tests;
    the engine binds skeletons instead.

    Raises:
        InvalidCheckpoint: the tensors do not match the model's names and shapes.
    """
    from ptmserve.models import registry

    family = registry.get(architecture, weights)
    with torch.device("meta"):
        module = family.module(config)
    stored = to_format(module, tensors, dtype or torch.float32) if weights != "fp" else dict(tensors)
    registry.check_tensors(module, stored)
    moved = {
        k: v.to(device=device, dtype=dtype) if dtype is not None and v.is_floating_point() else v.to(device)
        for k, v in stored.items()
    }
    module.load_state_dict(moved, assign=True)
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()

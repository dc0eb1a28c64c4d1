"""Quantized weights (``models.quant``): formats, kernels against dequantize-then-matmul, module swaps and
the GGUF blocks read straight into the quantized forms."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ptmserve.errors import InvalidInput
from ptmserve.models import quant, registry
from tests.models.test_gguf import HEADS, KV_HEADS, _unpermute_reference, write_tiny_gguf

FORMATS = ("int8", "int4")


def _linear(k: int, n: int, bias: bool, fmt: str, seed: int = 0) -> tuple[nn.Linear, quant.QuantLinear]:
    torch.manual_seed(seed)
    fp = nn.Linear(k, n, bias=bias)
    fmt = quant.linear_format(fmt, k)
    q = quant.QuantLinear(k, n, bias, fmt)
    q.load_state_dict(quant.quantize_linear(fp.weight, fp.bias, fmt), assign=True)
    return fp, q


def test_int8_round_trip_is_within_half_a_step_per_row() -> None:
    w = torch.randn(40, 70) * torch.logspace(-3, 1, 40)[:, None]  # rows of very different ranges
    q, scale = quant.quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (40,)
    err = (quant.dequantize_int8(q, scale) - w).abs()
    assert bool((err <= scale[:, None] / 2 + 1e-7).all())


def test_int4_round_trip_is_within_half_a_step_per_group() -> None:
    w = torch.randn(16, 96) + torch.linspace(-3, 3, 96)  # groups with an offset: asymmetric helps
    packed, scale, zero = quant.quantize_int4(w)
    assert packed.dtype == torch.uint8 and packed.shape == (16, 48) and scale.shape == zero.shape == (16, 3)
    err = (quant.dequantize_int4(packed, scale, zero) - w).abs().view(16, 3, 32)
    assert bool((err <= scale[:, :, None] / 2 + 1e-6).all())


def test_nibbles_pack_even_columns_low() -> None:
    q = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    packed = quant.pack_nibbles(q)
    assert torch.equal(packed & 0xF, q[:, 0::2]) and torch.equal(packed >> 4, q[:, 1::2])
    assert torch.equal(quant.unpack_nibbles(packed), q)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    ("rows", "k", "n", "bias"),
    [
        (1, 64, 32, True),  # decode: int8 GEMM, int4 kernel
        (3, 96, 48, False),
        (70, 64, 32, True),  # many rows: int4 dequantizes
        (300, 64, 32, True),  # more: int8 dequantizes too
        (5, 64, 17, True),  # N not a multiple of 16: int4 falls back
        (4, 33, 16, True),  # K not a multiple of 32: stored int8 even when int4 is asked
        (0, 64, 32, False),  # no rows
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_equal_dequantize_then_matmul(
    fmt: str, rows: int, k: int, n: int, bias: bool, dtype: torch.dtype
) -> None:
    fp, q = _linear(k, n, bias, fmt)
    q = q.to(dtype) if dtype != torch.float32 else q
    if dtype != torch.float32:  # as the device tier holds it: floating parts in the serve dtype
        q.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in q.state_dict().items()})
    x = torch.randn(2, rows, k).to(dtype)  # a leading batch dimension too
    with torch.inference_mode():
        got, ref = q(x), quant.dequantize_linear(x, q)
    assert got.dtype == dtype and got.shape == (2, rows, n)
    # int8 quantizes activations on the fly (a few steps of their 8-bit grid); many rows or int4 compute
    # in bf16 on a CPU with bf16 arithmetic
    tol = 0.03 if dtype == torch.float32 else 0.06
    if rows:
        assert (got.float() - ref.float()).abs().max().item() <= tol * ref.abs().max().item()
    # and the dequantized weight is the fp weight within its format's error
    weight_tol = 0.01 if q.fmt == "int8" else 0.1
    assert (q.dequantized(torch.float32) - fp.weight).abs().max().item() <= weight_tol * fp.weight.abs().max()


def test_int4_needs_whole_groups() -> None:
    assert quant.linear_format("int4", 48) == "int8" and quant.linear_format("int4", 64) == "int4"
    with pytest.raises(InvalidInput, match="multiple of 32"):
        quant.QuantLinear(48, 16, False, "int4")
    with pytest.raises(InvalidInput, match="multiple of 32"):
        quant.quantize_int4(torch.randn(4, 48))
    with pytest.raises(InvalidInput, match="weight format"):
        quant.check_format("int3")


@pytest.mark.parametrize("fmt", FORMATS)
def test_kernel_data_is_cached_per_bound_tensor(fmt: str) -> None:
    _, q = _linear(64, 32, True, fmt)
    x = torch.randn(1, 64)
    kind = "colsum" if fmt == "int8" else "int4"  # int8 row sums need the weight alone
    first = q(x)
    cached = getattr(q.weight, quant._CACHE_ATTR)[kind]
    assert torch.equal(q(x), first) and getattr(q.weight, quant._CACHE_ATTR)[kind] is cached  # reused
    # another model's scale bound next to the same weight tensor: right results, int4 re-packs
    q.scale = nn.Parameter(q.scale.detach() * 2, requires_grad=False)
    again = q(x)
    assert (getattr(q.weight, quant._CACHE_ATTR)[kind] is cached) is (fmt == "int8")
    ref = quant.dequantize_linear(x, q)
    assert (again - ref).abs().max() <= 0.03 * ref.abs().max() and not torch.allclose(again, first)
    # a fresh weight tensor (the next load's parameter) starts with nothing cached
    q.weight = nn.Parameter(q.weight.detach().clone(), requires_grad=False)
    assert not hasattr(q.weight, quant._CACHE_ATTR)


def test_quantized_embedding_looks_up_and_projects() -> None:
    torch.manual_seed(0)
    table = nn.Embedding(50, 32)
    emb = quant.QuantEmbedding(50, 32)
    q, scale = quant.quantize_int8(table.weight)
    emb.load_state_dict({"weight": q, "scale": scale}, assign=True)
    ids = torch.tensor([[0, 7, 49], [3, 3, 1]])
    assert torch.allclose(emb(ids), table(ids), atol=float(scale.max()) / 2 + 1e-6)
    x = torch.randn(4, 32)
    ref = x @ quant.dequantize_int8(q, scale).T
    assert (quant.project(x, emb) - ref).abs().max() <= 0.03 * ref.abs().max()
    assert torch.equal(quant.project(x, table), x @ table.weight.T)


@pytest.mark.parametrize("family_name", ["bert", "llama"])
def test_a_quantized_family_module_swaps_linears_on_meta(family_name: str) -> None:
    from tests.memory.helpers import tiny_config

    family = registry.get(family_name)
    config = tiny_config() if family_name == "bert" else registry.config_from_dict("llama", _llama_dict())
    keys = set()
    for weights in quant.WEIGHT_FORMATS:
        fam = registry.get(family_name, weights)
        with torch.device("meta"):
            module = fam.module(config)
        keys.add(fam.shape_key(config))
        linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
        quantized = quant.quantized_names(module)
        if weights == "fp":
            assert linears and not quantized
            continue
        assert not linears and all(p.device.type == "meta" for p in module.parameters())
        # an encoder's word embedding is quantized; a decoder's (tied to its LM head) when its family
        # projects through quant.project
        assert ("embeddings.word" in quantized) is family.quantizes_embeddings
    assert len(keys) == 3  # fp, int8 and int4 models never share a skeleton


def _llama_dict() -> dict[str, object]:
    return {
        "vocab_size": 64,
        "hidden_size": 64,
        "num_layers": 2,
        "num_heads": 4,
        "num_kv_heads": 2,
        "intermediate_size": 96,
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "labels": [],
    }


def test_stored_dtypes_are_checked_against_the_format() -> None:
    good = {
        "l.weight": torch.int8,
        "l.scale": torch.float32,
        "l.bias": torch.float32,
        "n.weight": torch.float32,
    }
    assert quant.check_stored_dtypes(good) == []
    int4 = {"l.weight": torch.uint8, "l.scale": torch.bfloat16, "l.zero": torch.bfloat16}
    assert quant.check_stored_dtypes(int4) == []
    assert quant.check_stored_dtypes({**good, "l.weight": torch.float32}) == ["l.weight: float32"]
    assert quant.check_stored_dtypes({**int4, "l.weight": torch.int8}) == ["l.weight: int8"]
    assert quant.check_stored_dtypes({**good, "l.scale": torch.int8}) == ["l.scale: int8"]


@pytest.mark.parametrize("weights", FORMATS)
def test_gguf_blocks_become_the_quantized_form_directly(tmp_path: Path, weights: str) -> None:
    """Q4_0/Q4_1 -> int4 is exact; Q8_0 -> per-row int8 is within half a step of the row's scale; the
    other types are dequantized (and quantized by the importer)."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize

    from ptmserve.models import gguf as gguf_reader

    f = write_tiny_gguf(tmp_path / "t.gguf", tied=False)
    ck = gguf_reader.read_gguf(f.path, weights)
    formats = gguf_reader._formats(registry.get("llama"), ck.config, weights)  # module -> its format
    assert formats["layers.0.q"] == weights and formats["head.lm"] == weights
    for gguf_name, (raw, qtype) in f.stored.items():
        ours = gguf_reader._our_name(gguf_name)
        module = ours.removesuffix(".weight")
        expected = torch.from_numpy(np.ascontiguousarray(dequantize(raw, qtype).astype(np.float32)))
        if ".attn_q." in gguf_name:
            expected = torch.from_numpy(_unpermute_reference(expected.numpy(), HEADS))
        elif ".attn_k." in gguf_name:
            expected = torch.from_numpy(_unpermute_reference(expected.numpy(), KV_HEADS))
        fmt = formats.get(module)
        is_direct = (fmt, qtype) in {("int8", Q.Q8_0), ("int4", Q.Q4_0), ("int4", Q.Q4_1)}
        if not is_direct:
            assert torch.equal(ck.tensors[ours], expected), gguf_name
            continue
        if fmt == "int4":
            got = quant.dequantize_int4(
                ck.tensors[ours], ck.tensors[f"{module}.scale"], ck.tensors[f"{module}.zero"]
            )
            assert torch.allclose(got, expected, atol=1e-5), gguf_name
        else:
            scale = ck.tensors[f"{module}.scale"]
            got = quant.dequantize_int8(ck.tensors[ours], scale)
            assert bool(((got - expected).abs() <= scale[:, None] / 2 + 1e-6).all()), gguf_name

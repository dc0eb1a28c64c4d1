"""A model stored int8 or int4 is read, held, copied, bound and run quantized in every tier: the real
WeightManager over a temp repository, with tier byte counts about a quarter of the fp32 model's."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import torch

from ptmserve import errors
from ptmserve.models import quant
from ptmserve.models.encoder import EncoderOutput
from ptmserve.store.repository import Repository

from .helpers import POOLING, batch, random_tensors, run, tiny_config

CONFIG = tiny_config(hidden=64, layers=2, vocab_size=300)


def add(
    repo: Repository, name: str, weights: str, tensors: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Store ``tensors`` (fp names) as ``name`` in format ``weights``; return what was stored."""
    module = quant.load_module("bert", CONFIG, tensors, weights)  # quantizes as the importer does
    stored = {k: v.detach().clone() for k, v in module.state_dict().items()}
    store(repo, name, stored, weights)
    return stored


def store(repo: Repository, name: str, tensors: Mapping[str, torch.Tensor], weights: str) -> None:
    """Store ``tensors`` as they are, under a manifest that says ``weights``."""
    repo.add_model(
        name,
        config=CONFIG.to_dict(),
        pooling=POOLING.to_dict(),
        tokenizer_json=b"{}",
        dtype="float32",
        tensors=tensors,
        weights=weights,
    )


def reference(
    stored: Mapping[str, torch.Tensor], weights: str, dtype: torch.dtype | None = None
) -> EncoderOutput:
    module = quant.load_module("bert", CONFIG, stored, weights, dtype=dtype)
    with torch.inference_mode():
        return module(batch(), POOLING)


def held(manager, tier: str, model: str) -> dict[torch.dtype, int]:  # noqa: ANN001
    """Bytes per dtype of ``model``'s entries in ``tier``."""
    cache = manager._dev if tier == "device" else manager._host
    out: dict[torch.dtype, int] = {}
    for entry in cache.entries_of(model).values():
        out[entry.tensor.dtype] = (
            out.get(entry.tensor.dtype, 0) + entry.tensor.numel() * entry.tensor.element_size()
        )
    return out


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_a_quantized_model_is_quantized_in_every_tier(repo: Repository, make_manager, weights: str) -> None:
    tensors = random_tensors(CONFIG, seed=1)
    add(repo, "fp", "fp", tensors)
    stored = add(repo, weights, weights, tensors)
    assert repo.manifest(weights).weights == weights and repo.manifest("fp").weights == "fp"
    integer = torch.int8 if weights == "int8" else torch.uint8
    disk = {e.dtype for e in repo.manifest(weights).tensors}
    assert disk >= {"int8"} | ({"uint8"} if weights == "int4" else set())  # the word embedding is int8 rows

    m = make_manager()
    out = run(m, weights, batch())
    fp_out = run(m, "fp", batch())
    # served by the quantized modules: exactly what the same modules give outside the manager
    ref = reference(stored, weights)
    assert torch.equal(out.embeddings, ref.embeddings)
    cos = torch.nn.functional.cosine_similarity(out.embeddings, fp_out.embeddings)
    assert cos.min() > (0.99 if weights == "int8" else 0.9), cos

    stats = m.stats()
    for tier, usage in (("host", stats.host), ("device", stats.device)):
        q, f = usage.per_model[weights], usage.per_model["fp"]
        assert 0.15 < q / f < (0.35 if weights == "int8" else 0.3), (tier, q, f)
        by_dtype = held(m, tier, weights)
        assert by_dtype.get(integer, 0) > by_dtype.get(torch.float32, 0), (tier, by_dtype)
        assert sum(by_dtype.values()) == q
    assert stats.device.per_model[weights] == repo.manifest(weights).total_bytes


def test_the_serve_dtype_casts_only_floating_tensors(repo: Repository, make_manager) -> None:
    stored = add(repo, "q", "int8", random_tensors(CONFIG, seed=2))
    m = make_manager(dtype=torch.bfloat16)
    out = run(m, "q", batch())
    device = held(m, "device", "q")
    assert set(device) == {torch.int8, torch.bfloat16}  # weights int8; scales, biases, norms bf16
    assert set(held(m, "host", "q")) == {torch.int8, torch.float32}  # the host tier holds what is stored
    ref = reference(stored, "int8", dtype=torch.bfloat16)
    assert torch.equal(out.embeddings, ref.embeddings)


def test_a_switch_between_formats_of_one_shape_uses_separate_skeletons(
    repo: Repository, make_manager
) -> None:
    tensors = random_tensors(CONFIG, seed=3)
    refs = {w: reference(add(repo, w, w, tensors), w) for w in ("fp", "int8", "int4")}
    m = make_manager()
    for _ in range(2):
        for w, ref in refs.items():
            assert torch.equal(run(m, w, batch()).embeddings, ref.embeddings), w
    assert m._skeletons.built == 3  # one per format, reused on the second round


def test_a_weight_of_the_wrong_dtype_is_corrupt_data(repo: Repository, make_manager) -> None:
    stored = add(repo, "q", "int8", random_tensors(CONFIG, seed=4))
    bad = dict(stored)
    bad["layers.0.q.weight"] = bad["layers.0.q.weight"].float()  # same shape, not int8
    store(repo, "bad", bad, "int8")
    m = make_manager()
    with pytest.raises(
        errors.CorruptData, match=r"wrong dtype for int8 weights: \['layers.0.q.weight: float32'\]"
    ):
        run(m, "bad", batch())


@pytest.mark.parametrize(("stored_as", "claimed"), [("int8", "fp"), ("fp", "int8"), ("int8", "int4")])
def test_a_manifest_that_names_the_wrong_format_is_corrupt_data(
    repo: Repository, make_manager, stored_as: str, claimed: str
) -> None:
    stored = add(repo, "src", stored_as, random_tensors(CONFIG, seed=5))
    store(repo, "liar", stored, claimed)
    m = make_manager()
    with pytest.raises(errors.CorruptData):
        run(m, "liar", batch())


def test_damaged_quantized_bytes_are_caught_by_the_checksum(repo: Repository, make_manager) -> None:
    from .helpers import segment_of

    add(repo, "q", "int8", random_tensors(CONFIG, seed=6))
    entry = next(e for e in repo.manifest("q").entries("layers.0") if e.dtype == "int8")
    path = segment_of(repo, "q", "layers.0")
    data = bytearray(path.read_bytes())
    data[entry.offset] ^= 0x01
    path.write_bytes(bytes(data))
    m = make_manager()
    with pytest.raises(errors.CorruptData, match="checksum"):
        run(m, "q", batch())

"""Placement: load groups left in the host tier compute from it in place; the device tier holds the rest."""

from __future__ import annotations

import pytest
import torch

from ptmserve.memory.placement import EMBEDDINGS_GROUP
from ptmserve.memory.records import Residency

from .helpers import POOLING, add_model, assert_same, batch, model_bytes, reference, run, tiny_config

HOST_EMBEDDINGS = frozenset({EMBEDDINGS_GROUP})


def embeddings_only(manifest) -> frozenset[str]:  # noqa: ANN001 - a ModelManifest
    return HOST_EMBEDDINGS


def group_bytes(tensors, prefix: str) -> int:  # noqa: ANN001
    return sum(t.numel() * t.element_size() for n, t in tensors.items() if n.startswith(prefix))


def test_host_embeddings_give_identical_outputs_and_leave_their_bytes_out_of_the_device_tier(
    repo, make_manager
) -> None:
    cfg = tiny_config(labels=("x", "y"), vocab_size=1000)
    tensors = add_model(repo, "a", cfg, seed=1)
    full = make_manager()
    placed = make_manager(placement=embeddings_only)
    b0 = batch()
    ref = reference(cfg, tensors, b0)
    assert_same(run(full, "a", b0, classify=True), ref)
    assert_same(run(placed, "a", b0, classify=True), ref)  # bit-identical: the same bytes, in place

    emb = group_bytes(tensors, "embeddings.")
    assert emb > model_bytes(tensors) / 2
    assert full.stats().device.used_bytes == model_bytes(tensors)
    assert placed.stats().device.used_bytes == model_bytes(tensors) - emb
    assert placed.placed_bytes("a") == model_bytes(tensors) - emb
    assert placed.stats().host.used_bytes == model_bytes(tensors)
    with placed.acquire("a") as loaded:  # the embedding table is the host entry itself
        record = placed._models["a"]
        host_entry = placed._host.entries_of("a")[record.host_specs["embeddings.word.weight"].key]
        assert loaded.module.embeddings.word.weight.data_ptr() == host_entry.tensor.data_ptr()


def test_a_budget_that_holds_one_full_model_holds_two_placed_ones(repo, make_manager) -> None:
    cfg = tiny_config(vocab_size=1000)
    ta, tb = add_model(repo, "a", cfg, seed=1), add_model(repo, "b", cfg, seed=2)
    size = model_bytes(ta)
    full = make_manager(device_budget=size)
    placed = make_manager(device_budget=size, placement=embeddings_only)
    b0 = batch()
    for m in (full, placed):
        for name, tensors in (("a", ta), ("b", tb)):
            assert_same(run(m, name, b0), reference(cfg, tensors, b0))
    assert not full.residency("a").on_device  # evicted to make room for b
    assert placed.residency("a").on_device and placed.residency("b").on_device
    assert sum(e.kind == "evict" for e in placed.events) == 0


def test_host_placed_groups_compute_in_the_stored_dtype_and_hand_on_the_serve_dtype(
    repo, make_manager
) -> None:
    cfg = tiny_config(labels=("x", "y"))
    tensors = add_model(repo, "a", cfg, seed=1)
    full = make_manager(dtype=torch.bfloat16)
    placed = make_manager(dtype=torch.bfloat16, placement=embeddings_only)
    b0 = batch()
    out_full = run(full, "a", b0, classify=True)
    out_placed = run(placed, "a", b0, classify=True)
    # the embedding group runs in float32 from the host copy (one rounding fewer), the rest in bfloat16
    assert torch.allclose(out_placed.embeddings, out_full.embeddings, atol=0.05)
    assert out_placed.logits is not None and out_full.logits is not None
    assert torch.allclose(out_placed.logits, out_full.logits, atol=0.1)
    assert (
        placed.stats().device.used_bytes == (model_bytes(tensors) - group_bytes(tensors, "embeddings.")) // 2
    )


def test_evicting_a_placed_model_from_the_host_tier_evicts_it_from_the_device_too(repo, make_manager) -> None:
    cfg = tiny_config()
    ta, tb = add_model(repo, "a", cfg, seed=1), add_model(repo, "b", cfg, seed=2)
    m = make_manager(host_budget=model_bytes(ta), placement=embeddings_only)
    b0 = batch()
    assert_same(run(m, "a", b0), reference(cfg, ta, b0))
    assert_same(run(m, "b", b0), reference(cfg, tb, b0))  # needs a's host bytes, which a computes from
    assert m.residency("a") == Residency(False, False, False)
    assert_same(run(m, "a", b0), reference(cfg, ta, b0))  # and a reloads correctly


def test_a_placed_model_in_use_keeps_its_host_bytes(repo, make_manager) -> None:
    from ptmserve import errors

    cfg = tiny_config()
    ta = add_model(repo, "a", cfg, seed=1)
    add_model(repo, "b", cfg, seed=2)
    m = make_manager(host_budget=model_bytes(ta), placement=embeddings_only, wait_timeout=0.2)
    b0 = batch()
    with m.acquire("a") as a:
        with pytest.raises(errors.NotReady, match="in use"):
            m.acquire("b")
        assert_same(a.run(b0, POOLING), reference(cfg, ta, b0))


def test_a_new_placement_applies_once_the_model_is_off_the_device(repo, make_manager) -> None:
    cfg = tiny_config(vocab_size=1000)
    ta = add_model(repo, "a", cfg, seed=1)
    chosen: dict[str, frozenset[str]] = {"a": frozenset()}
    m = make_manager(placement=lambda manifest: chosen[manifest.name])
    b0 = batch()
    assert_same(run(m, "a", b0), reference(cfg, ta, b0))
    assert m.stats().device.used_bytes == model_bytes(ta)
    chosen["a"] = HOST_EMBEDDINGS  # e.g. its profile arrived
    assert m.host_groups("a") == frozenset()  # resident: placed as it was loaded
    assert m.evict("a")
    assert m.host_groups("a") == HOST_EMBEDDINGS
    assert_same(run(m, "a", b0), reference(cfg, ta, b0))
    assert m.stats().device.per_model["a"] == model_bytes(ta) - group_bytes(ta, "embeddings.")

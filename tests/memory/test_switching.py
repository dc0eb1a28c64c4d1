"""Switching between models through every tier path gives a freshly loaded model's exact results."""

from __future__ import annotations

import pytest
import torch

from ptmserve.memory.records import Residency

from .helpers import add_model, assert_same, batch, model_bytes, random_tensors, reference, run, tiny_config


def loads(manager, tier: str = "device") -> list[tuple[str, int]]:
    return [(e.model, e.nbytes) for e in manager.events if e.kind == "load" and e.tier == tier]


@pytest.mark.parametrize("pipelined", [True, False])
def test_a_b_a_is_bit_identical_on_every_tier_path(repo, make_manager, pipelined: bool) -> None:
    cfg_a, cfg_b = tiny_config(labels=("x", "y")), tiny_config(hidden=48, layers=3)
    ta, tb = add_model(repo, "a", cfg_a, seed=1), add_model(repo, "b", cfg_b, seed=2)
    size_a, size_b = model_bytes(ta), model_bytes(tb)
    b0 = batch()
    ref_a, ref_b = reference(cfg_a, ta, b0), reference(cfg_b, tb, b0)
    # The device holds one of the two at a time; the host holds both.
    m = make_manager(
        device_budget=max(size_a, size_b) + 1000, host_budget=size_a + size_b, pipelined=pipelined
    )

    assert m.residency("a") == Residency(False, False, False)
    assert_same(run(m, "a", b0, classify=True), ref_a)  # disk
    assert loads(m, "host") == [("a", size_a)] and loads(m, "device") == [("a", size_a)]
    assert m.residency("a") == Residency(on_device=True, on_host=True, loading=False)

    assert_same(run(m, "a", b0, classify=True), ref_a)  # device hit: nothing moves
    assert len(loads(m)) == 1

    assert_same(run(m, "b", b0), ref_b)  # disk; evicts a from the device
    assert m.residency("a") == Residency(on_device=False, on_host=True, loading=False)
    assert [e.model for e in m.events if e.kind == "evict"] == ["a"]

    assert_same(run(m, "a", b0, classify=True), ref_a)  # host hit: copied, not read
    assert loads(m, "host") == [("a", size_a), ("b", size_b)]
    assert loads(m, "device")[-1] == ("a", size_a)

    m.evict("a", host=True)
    assert m.residency("a") == Residency(False, False, False)
    assert_same(run(m, "a", b0, classify=True), ref_a)  # disk again
    assert loads(m, "host")[-1] == ("a", size_a)


def test_pipelined_and_unpipelined_outputs_are_identical(repo, make_manager) -> None:
    cfg = tiny_config(layers=4, labels=("x", "y", "z"))
    add_model(repo, "m", cfg, seed=3)
    b0 = batch(5)
    outs = []
    for pipelined in (True, False):
        manager = make_manager(pipelined=pipelined)
        outs.append(run(manager, "m", b0, classify=True))
    assert_same(outs[0], outs[1])


def test_fine_tunes_of_one_backbone_share_bytes_and_a_switch_copies_only_the_head(repo, make_manager) -> None:
    cfg = tiny_config(labels=("x", "y"))
    base = add_model(repo, "c0", cfg, seed=10)
    backbone = {k: v for k, v in base.items() if not k.startswith("head.")}
    heads = {}
    for i in range(1, 4):
        heads[i] = {k: v for k, v in random_tensors(cfg, 10 + i).items() if k.startswith("head.")}
        add_model(repo, f"c{i}", cfg, tensors={**backbone, **heads[i]})
    full = model_bytes(base)
    head_bytes = model_bytes(heads[1])
    # Room on the device for the backbone and one head only.
    m = make_manager(device_budget=full + head_bytes // 2, host_budget=full + 3 * head_bytes)
    b0 = batch()
    for i in (1, 2, 3, 1):
        ref = reference(cfg, {**backbone, **heads[i]}, b0)
        assert_same(run(m, f"c{i}", b0, classify=True), ref)
    device_loads = loads(m)
    assert device_loads[0] == ("c1", full)
    assert device_loads[1:] == [("c2", head_bytes), ("c3", head_bytes), ("c1", head_bytes)]
    host = m.stats().host
    assert host.used_bytes == full + 2 * head_bytes  # backbone once, 3 heads
    assert m.stats().device.used_bytes <= full + head_bytes // 2
    assert m.stats().device.per_model == {"c1": full}


def test_switching_between_models_of_one_shape_allocates_and_builds_nothing(repo, make_manager) -> None:
    cfg = tiny_config()
    tensors = {n: add_model(repo, n, cfg, seed=i) for i, n in enumerate(("a", "b", "c"))}
    size = model_bytes(tensors["a"])
    m = make_manager(device_budget=size, host_budget=3 * size)
    b0 = batch()
    run(m, "a", b0)
    first = m.stats()
    for name in ("b", "c", "a", "c", "b"):
        assert_same(run(m, name, b0), reference(cfg, tensors[name], b0))
    after = m.stats()
    assert after.device.allocations == first.device.allocations  # every buffer came from the free list
    assert after.skeletons_built == 1
    assert after.device.used_bytes <= size


def test_serve_dtype_differs_from_the_stored_dtype(repo, make_manager) -> None:
    cfg = tiny_config(labels=("x", "y"))
    tensors = add_model(repo, "m", cfg, seed=4)
    m = make_manager(dtype="bfloat16")
    b0 = batch()
    out = run(m, "m", b0, classify=True)
    assert_same(out, reference(cfg, tensors, b0, dtype=torch.bfloat16))
    assert m.stats().device.per_model["m"] == model_bytes(tensors) // 2
    assert m.stats().host.per_model["m"] == model_bytes(tensors)


def test_loaded_model_exposes_a_bound_encoder_until_released(repo, make_manager) -> None:
    cfg = tiny_config()
    tensors = add_model(repo, "m", cfg, seed=6)
    m = make_manager()
    with m.acquire("m") as loaded:
        loaded.wait()
        assert torch.equal(loaded.module.layers[1].up.weight, tensors["layers.1.up.weight"])
        assert loaded.manifest.name == "m"
        enc = loaded.module
    assert enc.layers[1].up.weight.is_meta  # unbound: holds no device memory


def test_reimported_model_is_served_with_its_new_weights(repo, make_manager) -> None:
    cfg = tiny_config()
    old = add_model(repo, "m", cfg, seed=1)
    m = make_manager()
    b0 = batch()
    assert_same(run(m, "m", b0), reference(cfg, old, b0))
    new = add_model(repo, "m", cfg, seed=2)  # re-import under the same name
    assert_same(run(m, "m", b0), reference(cfg, new, b0))
    assert m.stats().device.per_model == {"m": model_bytes(new)}


def test_sizing_helpers_see_shared_tensors(repo, make_manager) -> None:
    cfg = tiny_config(labels=("x", "y"))
    base = add_model(repo, "a", cfg, seed=1)
    head = {k: v for k, v in random_tensors(cfg, 2).items() if k.startswith("head.")}
    add_model(repo, "b", cfg, tensors={**base, **head})
    m = make_manager(device_budget=model_bytes(base) + model_bytes(head))
    assert m.device_bytes_needed("b") == model_bytes(base)
    run(m, "a", batch())
    assert m.device_bytes_needed("a") == 0
    assert m.device_bytes_needed("b") == model_bytes(head)  # only its head is missing
    m.check_budget("b")
    m.evict("a")
    assert m.trim() == model_bytes(base)  # the free list went back to the allocator
    assert m.stats().device.used_bytes == 0


def test_a_device_load_says_whether_it_read_the_repository(repo, make_manager) -> None:
    cfg = tiny_config()
    ta = add_model(repo, "a", cfg, seed=1)
    add_model(repo, "b", cfg, seed=2)
    m = make_manager(device_budget=model_bytes(ta))
    for name in ("a", "b", "a"):  # a from disk, b from disk (a evicted from the device only), a from host
        run(m, name, batch())
    loads = [(e.model, e.read_bytes) for e in m.events if e.kind == "load" and e.tier == "device"]
    assert loads == [("a", model_bytes(ta)), ("b", model_bytes(ta)), ("a", 0)]

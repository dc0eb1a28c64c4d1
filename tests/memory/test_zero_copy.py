"""Zero-copy serving on the CPU: models compute straight from the host tier."""

from __future__ import annotations

import pytest
import torch

from ptmserve import errors
from ptmserve.memory.records import Residency

from .helpers import POOLING, add_model, assert_same, batch, model_bytes, reference, run, tiny_config


def test_zero_copy_switches_are_bit_identical_and_hold_each_byte_once(repo, make_manager) -> None:
    cfg = tiny_config(labels=("x", "y"))
    ta, tb = add_model(repo, "a", cfg, seed=1), add_model(repo, "b", cfg, seed=2)
    size = model_bytes(ta)
    m = make_manager(zero_copy=True, host_budget=size, device_budget=0)
    b0 = batch()
    for name, tensors in (("a", ta), ("b", tb), ("a", ta)):
        assert_same(run(m, name, b0, classify=True), reference(cfg, tensors, b0))
    stats = m.stats()
    assert stats.device.used_bytes == stats.host.used_bytes == size  # one region, one copy
    assert m.residency("a") == Residency(on_device=True, on_host=True, loading=False)
    assert m.residency("b") == Residency(False, False, False)
    with m.acquire("a") as loaded:
        assert (
            loaded.module.layers[0].q.weight.data_ptr()
            == m._host.entries_of("a")[m._models["a"].host_specs["layers.0.q.weight"].key].tensor.data_ptr()
        )


def test_zero_copy_never_evicts_a_model_in_use(repo, make_manager) -> None:
    cfg = tiny_config()
    ta = add_model(repo, "a", cfg, seed=1)
    add_model(repo, "b", cfg, seed=2)
    m = make_manager(zero_copy=True, host_budget=model_bytes(ta), device_budget=0, wait_timeout=0.2)
    b0 = batch()
    with m.acquire("a") as a:
        with pytest.raises(errors.NotReady, match="in use"):
            m.acquire("b")
        assert_same(a.run(b0, POOLING), reference(cfg, ta, b0))


def test_zero_copy_refuses_a_dtype_cast_and_a_non_cpu_device(repo, make_manager) -> None:
    add_model(repo, "a", tiny_config(), seed=1)
    m = make_manager(zero_copy=True, dtype=torch.bfloat16)
    with pytest.raises(errors.InvalidConfig, match="stored in float32"):
        m.acquire("a")
    assert m.stats().host.used_bytes == 0
    with pytest.raises(errors.InvalidConfig, match="cpu"):
        make_manager(zero_copy=True, device="meta")

"""Single-flight loads, failed loads, models in use, budgets."""

from __future__ import annotations

import random
import threading

import pytest
import torch

from ptmserve import errors
from ptmserve.memory.cache import TensorCache

from .helpers import (
    POOLING,
    GatedRepo,
    add_model,
    assert_same,
    batch,
    model_bytes,
    reference,
    run,
    segment_of,
    tiny_config,
)


def device_loads(manager, model: str) -> int:
    return sum(1 for e in manager.events if e.kind == "load" and e.tier == "device" and e.model == model)


def check_accounting(cache: TensorCache) -> None:
    """Accounted bytes equal the bytes of the buffers the tier really holds, within its budget."""
    buffers = {id(e.tensor): e.tensor for entries in cache._by_model.values() for e in entries.values()}
    buffers.update({id(t): t for pool in cache._free.values() for t in pool})
    held = sum(t.numel() * t.element_size() for t in buffers.values())
    assert held == cache.used_bytes <= cache.budget


@pytest.mark.parametrize("pipelined", [True, False])
def test_concurrent_acquires_of_a_cold_model_cause_one_load(repo, make_manager, pipelined: bool) -> None:
    cfg = tiny_config(labels=("x", "y"))
    tensors = add_model(repo, "m", cfg, seed=1)
    gated = GatedRepo(repo)
    gate = gated.gate("m", "embeddings")  # hold the load until every thread has joined it
    m = make_manager(pipelined=pipelined)
    m._repo = gated
    b0 = batch()
    ref = reference(cfg, tensors, b0)
    n = 8
    joined = threading.Barrier(n + 1)
    outs: list = [None] * n

    def worker(i: int) -> None:
        joined.wait()
        outs[i] = run(m, "m", b0, classify=True)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    joined.wait()
    while m.residency("m").loading is False:  # the first acquire started the load
        threading.Event().wait(0.01)
    gate.set()
    for t in threads:
        t.join(30)
    for out in outs:
        assert_same(out, ref)
    assert device_loads(m, "m") == 1
    assert gated.reads.count(("m", "embeddings")) == 1
    assert [e.nbytes for e in m.events if e.kind == "load" and e.tier == "host"] == [model_bytes(tensors)]


def test_corrupt_tensor_fails_that_model_only_and_its_room_is_reused(repo, make_manager) -> None:
    cfg = tiny_config()
    ta, tb, tc = (add_model(repo, n, cfg, seed=i) for i, n in enumerate(("a", "b", "c")))
    size = model_bytes(ta)
    path = segment_of(repo, "b", "layers.1")
    good = path.read_bytes()
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF
    path.write_bytes(bytes(bad))
    gated = GatedRepo(repo)
    gate = gated.gate("b", "layers.1")
    m = make_manager(device_budget=2 * size, host_budget=2 * size)
    m._repo = gated
    b0 = batch()
    ref_a = reference(cfg, ta, b0)
    with m.acquire("a") as a:
        first, second = m.acquire("b"), m.acquire("b")  # two waiters of the same failing load
        gate.set()
        for waiter in (first, second):
            with pytest.raises(errors.CorruptData) as exc:
                waiter.run(b0, POOLING)
            waiter.release()
            assert "'b'" in exc.value.message and "layers.1" in exc.value.message
            assert "checksum" in exc.value.message
        assert_same(a.run(b0, POOLING), ref_a)  # a keeps serving meanwhile
    stats = m.stats()
    assert "b" not in stats.device.per_model and "b" not in stats.host.per_model
    assert m.residency("b").on_device is False and m.residency("b").loading is False
    assert [e.model for e in m.events if e.kind == "load_failed"] == ["b"]
    check_accounting(m._dev)
    check_accounting(m._host)
    assert_same(run(m, "c", b0), reference(cfg, tc, b0))  # the failed model's room is reusable
    assert m.stats().device.allocations == 2 * len(ta)  # c reused b's buffers: nothing new
    with pytest.raises(errors.CorruptData):  # unpipelined acquire raises directly (and retries)
        m.pipelined = False
        m.acquire("b")
    path.write_bytes(good)  # repaired: the next acquire loads it afresh
    assert_same(run(m, "b", b0), reference(cfg, tb, b0))
    assert_same(run(m, "a", b0), ref_a)


def test_missing_segment_file_is_a_clear_error(repo, make_manager) -> None:
    cfg = tiny_config()
    add_model(repo, "m", cfg, seed=1)
    segment_of(repo, "m", "layers.0").unlink()
    m = make_manager(pipelined=False)
    with pytest.raises(errors.CorruptData, match="missing"):
        m.acquire("m")
    assert m.stats().device.used_bytes == m.stats().device.free_list_bytes  # nothing live


def test_a_model_in_use_is_never_evicted(repo, make_manager) -> None:
    cfg = tiny_config()
    ta, tb = add_model(repo, "a", cfg, seed=1), add_model(repo, "b", cfg, seed=2)
    m = make_manager(device_budget=model_bytes(ta), wait_timeout=0.2)
    b0 = batch()
    with m.acquire("a") as a:
        with pytest.raises(errors.NotReady, match=r"in use \['a'\]"):
            m.acquire("b")
        assert m.evict("a") is False
        assert m.residency("a").on_device
        assert_same(a.run(b0, POOLING), reference(cfg, ta, b0))
        m._wait_timeout = 30.0
        got: list = []
        waiter = threading.Thread(target=lambda: got.append(run(m, "b", b0)))
        waiter.start()  # waits for room until "a" is released
        waiter.join(0.2)
        assert waiter.is_alive() and m.residency("a").on_device
    waiter.join(30)
    assert_same(got[0], reference(cfg, tb, b0))
    assert m.residency("a").on_device is False


def test_a_model_larger_than_a_budget_is_refused(repo, make_manager) -> None:
    cfg = tiny_config()
    tensors = add_model(repo, "m", cfg, seed=1)
    size = model_bytes(tensors)
    m = make_manager(device_budget=size - 1)
    with pytest.raises(errors.BudgetExceeded, match="'m'.*device tier"):
        m.acquire("m")
    with pytest.raises(errors.BudgetExceeded):
        m.prefetch("m")
    m = make_manager(host_budget=size // 2)
    with pytest.raises(errors.BudgetExceeded, match="host tier"):
        m.acquire("m")
    assert m.stats().device.used_bytes == m.stats().device.free_list_bytes


def test_pipelined_compute_starts_before_later_layers_are_read(repo, make_manager) -> None:
    cfg = tiny_config(layers=3)
    tensors = add_model(repo, "m", cfg, seed=1)
    gated = GatedRepo(repo, timeout=10.0)
    gate = gated.gate("m", "layers.1")  # opens only once layer 0 has been computed
    m = make_manager(pipelined=True)
    m._repo = gated
    b0 = batch()
    with m.acquire("m") as loaded:
        enc = loaded.module
        computed = enc.run_layer

        def run_layer(i: int, hidden: torch.Tensor, b) -> torch.Tensor:  # noqa: ANN001
            out = computed(i, hidden, b)
            if i == 0:
                gate.set()
            return out

        enc.run_layer = run_layer
        try:
            out = loaded.run(b0, POOLING)
        finally:
            del enc.run_layer
    assert gated.opened_in_time[("m", "layers.1")] is True
    assert_same(out, reference(cfg, tensors, b0))


def test_prefetch_loads_in_the_background_without_blocking_resident_models(repo, make_manager) -> None:
    cfg = tiny_config()
    ta, tb = add_model(repo, "a", cfg, seed=1), add_model(repo, "b", cfg, seed=2)
    gated = GatedRepo(repo)
    gate = gated.gate("b", "embeddings")
    m = make_manager()
    m._repo = gated
    b0 = batch()
    run(m, "a", b0)
    assert m.prefetch("b") is True
    assert m.residency("b").loading
    assert_same(run(m, "a", b0), reference(cfg, ta, b0))  # b's load is stuck; a still serves
    gate.set()
    assert_same(run(m, "b", b0), reference(cfg, tb, b0))
    assert device_loads(m, "b") == 1  # acquire joined the prefetch
    assert m.prefetch("b") is True and device_loads(m, "b") == 1
    assert m.evict("b") is True and m.residency("b").on_host
    assert m.prefetch("a", tier="host") is True


def test_accounted_bytes_stay_within_budgets_under_random_traffic(repo, make_manager) -> None:
    shapes = [tiny_config(), tiny_config(hidden=48), tiny_config(layers=3, labels=("x", "y"))]
    tensors = {}
    for i in range(6):
        tensors[f"m{i}"] = (shapes[i % 3], add_model(repo, f"m{i}", shapes[i % 3], seed=i))
    biggest = max(model_bytes(t) for _, t in tensors.values())
    m = make_manager(device_budget=int(2.5 * biggest), host_budget=4 * biggest, wait_timeout=30.0)
    b0 = batch()
    refs = {n: reference(cfg, t, b0) for n, (cfg, t) in tensors.items()}
    violations: list[str] = []

    def watch(event) -> None:  # noqa: ANN001
        s = m.stats()
        for tier in (s.host, s.device):
            if tier.used_bytes > tier.budget_bytes:
                violations.append(f"{tier.name}: {tier.used_bytes} > {tier.budget_bytes} after {event}")

    m.add_listener(watch)
    failures: list[BaseException] = []

    def client(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(25):
                name = rng.choice(list(tensors))
                op = rng.random()
                if op < 0.7:
                    assert_same(run(m, name, b0, classify=bool(tensors[name][0].labels)), refs[name])
                elif op < 0.85:
                    m.prefetch(name, tier=rng.choice(["host", "device"]))
                else:
                    m.evict(name, host=rng.random() < 0.5)
                watch("step")
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    threads = [threading.Thread(target=client, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not failures, failures
    assert not violations, violations[:3]
    kinds = [(e.kind, e.tier) for e in m.events]
    assert kinds.count(("evict", "device")) >= 5 and kinds.count(("load", "device")) > len(tensors)
    m.close()
    check_accounting(m._dev)
    check_accounting(m._host)
    assert m.stats().skeletons_built <= 3 * 3  # at most one per shape per concurrent client


def test_a_closed_manager_refuses_new_work(repo, make_manager) -> None:
    add_model(repo, "m", tiny_config(), seed=1)
    m = make_manager()
    run(m, "m", batch())
    m.close()
    with pytest.raises(errors.NotReady, match="closed"):
        m.acquire("m")

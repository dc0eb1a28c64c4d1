"""Units under the manager: the tensor cache, the copy engine, the LRU policy, skeletons."""

from __future__ import annotations

import pytest
import torch

from ptmserve.errors import CorruptData
from ptmserve.memory.cache import TensorCache, TensorSpec
from ptmserve.memory.copy import Fence, ThreadCopyEngine
from ptmserve.memory.policy import LruPolicy
from ptmserve.memory.skeleton import SkeletonPool
from ptmserve.models import registry

from .helpers import tiny_config


def spec(key: str, n: int) -> TensorSpec:
    return TensorSpec(key, (n,), torch.float32)


def make_cache(budget: int) -> tuple[TensorCache, list[torch.Tensor]]:
    allocated: list[torch.Tensor] = []

    def alloc(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        allocated.append(torch.empty(shape, dtype=dtype))
        return allocated[-1]

    return TensorCache("device", budget, alloc), allocated


def test_shared_entries_are_held_once_and_freed_with_their_last_user() -> None:
    cache, allocated = make_cache(1000)
    entries_a, created_a = cache.claim("a", [spec("x", 100), spec("ha", 10)])
    entries_b, created_b = cache.claim("b", [spec("x", 100), spec("hb", 10)])
    assert len(created_a) == 2 and len(created_b) == 1  # "x" is shared
    assert entries_a["x"] is entries_b["x"]
    assert cache.used_bytes == 480 and len(allocated) == 3
    assert cache.model_bytes("a") == 440
    assert cache.release("a") == 40  # only a's head is freed; x is still b's
    assert cache.get("x") is not None
    assert cache.live_bytes == 440 and cache.free_bytes == 40


def test_free_list_reuses_buffers_of_the_same_shape_without_allocating() -> None:
    cache, allocated = make_cache(800)
    entries, _ = cache.claim("a", [spec("a1", 100), spec("a2", 100)])
    cache.release("a")
    assert cache.used_bytes == 800 and cache.free_bytes == 800
    assert cache.shortfall([spec("b1", 100), spec("b2", 100)]) == 0
    new, created = cache.claim("b", [spec("b1", 100), spec("b2", 100)])
    assert len(allocated) == 2 and cache.allocations == 2
    assert {id(e.tensor) for e in new.values()} == {id(e.tensor) for e in entries.values()}


def test_free_list_of_other_shapes_is_released_to_make_room_and_budget_holds() -> None:
    cache, allocated = make_cache(800)
    cache.claim("a", [spec("a1", 100), spec("a2", 100)])
    cache.release("a")
    assert cache.shortfall([spec("c", 150)]) == 0  # the free list can be given back
    cache.claim("c", [spec("c", 150)])
    assert cache.used_bytes <= 800 and cache.live_bytes == 600
    assert cache.shortfall([spec("d", 100)]) == 600 + 400 - 800
    with pytest.raises(MemoryError):
        cache.claim("d", [spec("d", 100)])
    assert cache.used_bytes <= 800


def test_claim_keeps_reusable_buffers_for_its_own_specs() -> None:
    cache, allocated = make_cache(1000)
    cache.claim("a", [spec("a1", 100), spec("a2", 50)])
    cache.release("a")  # free list: one (100,) and one (50,) buffer = 600 bytes
    # 100 reuses, 150 is new: the (50,) buffer must go, the (100,) one must stay for this claim.
    assert cache.shortfall([spec("n", 150), spec("r", 100)]) == 0
    cache.claim("b", [spec("n", 150), spec("r", 100)])
    assert cache.used_bytes == 1000 and cache.allocations == 3


def test_dropped_entries_are_not_offered_again() -> None:
    cache, _ = make_cache(1000)
    entries, _ = cache.claim("a", [spec("x", 10)])
    cache.drop(entries["x"])
    assert cache.get("x") is None
    _, created = cache.claim("b", [spec("x", 10)])
    assert len(created) == 1 and created[0] is not entries["x"]
    cache.release("a")
    assert cache.live_bytes == 40 and cache.free_bytes == 40


def test_thread_copy_engine_copies_and_sets_fences() -> None:
    engine = ThreadCopyEngine()
    try:
        src = torch.arange(10, dtype=torch.float32)
        dst = torch.zeros(10, dtype=torch.bfloat16)
        fence = Fence()
        engine.submit([(dst, src)], [fence])
        fence.synchronize(timeout=10)
        assert torch.equal(dst, src.to(torch.bfloat16))
        bad = Fence()
        engine.submit([(torch.zeros(3), src)], [bad])  # shape mismatch
        with pytest.raises(RuntimeError):
            bad.wait(timeout=10)
    finally:
        engine.close()


def test_failed_fence_raises_a_fresh_typed_error_for_every_waiter() -> None:
    fence = Fence()
    fence.fail(CorruptData("model 'x': checksum mismatch"))
    fence.set()  # no effect once failed
    for _ in range(2):
        with pytest.raises(CorruptData, match="checksum mismatch"):
            fence.wait()


def test_lru_picks_the_least_recently_used_candidate() -> None:
    policy = LruPolicy()
    for name in ("a", "b", "c"):
        policy.touch(name)
    policy.touch("a")
    assert policy.victim("device", ["a", "b", "c"]) == "b"
    assert policy.victim("device", ["a", "c"]) == "c"
    assert policy.victim("device", ["a", "new"]) == "new"  # never touched counts as oldest
    assert policy.victim("device", []) is None


def test_skeletons_are_built_once_per_shape_and_unbound_on_checkin() -> None:
    pool = SkeletonPool()
    cfg = tiny_config(labels=("x", "y"))
    same_shape = tiny_config(labels=("p", "q"))
    bert = registry.get("bert")
    assert bert.shape_key(cfg) == bert.shape_key(same_shape)
    assert bert.shape_key(cfg) != bert.shape_key(tiny_config(labels=("a", "b", "c")))
    sk = pool.checkout(bert, cfg)
    params = {n: torch.nn.Parameter(torch.ones(s), requires_grad=False) for n, s in sk.shapes.items()}
    enc = sk.bind("m", params)
    assert enc.layers[0].q.weight is params["layers.0.q.weight"]
    pool.checkin(sk)
    assert enc.layers[0].q.weight.is_meta
    again = pool.checkout(bert, same_shape)
    assert again is sk and pool.built == 1
    other = pool.checkout(bert, cfg)  # both checked out at once: a second one is built
    assert other is not sk and pool.built == 2
    with pytest.raises(CorruptData, match="missing"):
        sk.check("m", {n: s for n, s in sk.shapes.items() if not n.startswith("head")})

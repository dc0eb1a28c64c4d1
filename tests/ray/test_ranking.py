"""``ptmserve.ray.ranking``: the router's rule, without Ray."""

from __future__ import annotations

from ptmserve.ray.ranking import ReplicaView, expected_finish, rank_replicas


def view(
    rid: str, device: tuple[str, ...] = (), host: tuple[str, ...] = (), in_flight: int = 0, spr: float = 0.1
) -> ReplicaView:
    return ReplicaView(rid, frozenset(device), frozenset(host), in_flight, spr, 0.5)


def test_device_then_host_then_least_loaded() -> None:
    views = [
        view("a", in_flight=0),
        view("b", host=("m",), in_flight=3),
        view("c", device=("m",), in_flight=5),
    ]
    assert rank_replicas("m", views) == ["c", "b", "a"]
    assert rank_replicas("other", views) == ["a", "b", "c"]  # by load
    assert rank_replicas(None, views) == ["a", "b", "c"]


def test_ties_go_to_the_least_loaded_then_the_lowest_id() -> None:
    views = [
        view("b", device=("m",), in_flight=1),
        view("a", device=("m",), in_flight=1),
        view("c", device=("m",)),
    ]
    assert rank_replicas("m", views) == ["c", "a", "b"]


def test_a_pinned_replica_counts_as_holding_the_model() -> None:
    views = [view("a"), view("b", in_flight=2)]
    assert rank_replicas("m", views, pinned=frozenset({"b"})) == ["b", "a"]


def test_a_holder_that_would_miss_the_deadline_gives_way() -> None:
    busy = view("a", device=("m",), in_flight=9, spr=0.1)  # expects to finish in 1.0 s
    idle = view("b", in_flight=0, spr=0.1)  # 0.1 s + a 0.5 s load
    assert expected_finish("m", busy) == 1.0
    assert rank_replicas("m", [busy, idle], slack=5.0) == ["a", "b"]  # in time: stay on the holder
    assert rank_replicas("m", [busy, idle], slack=1.0) == ["b", "a"]  # late there, in time here
    # late everywhere: stay on the holder (a load elsewhere would not help)
    assert rank_replicas("m", [busy, view("b", in_flight=20)], slack=1.0) == ["a", "b"]


def full(rid: str, device: tuple[str, ...], in_flight: int = 0, spr: float = 0.1) -> ReplicaView:
    """A replica whose device budget is full of ``device`` (100 bytes each, 50 left)."""
    sizes = dict.fromkeys(device, 100)
    return ReplicaView(rid, frozenset(device), frozenset(), in_flight, spr, 0.5, 50, sizes)


def test_a_cold_model_goes_where_it_evicts_nothing() -> None:
    roomy = ReplicaView("b", frozenset({"x"}), frozenset(), 3, 0.1, 0.5, 500, {"x": 100})
    assert rank_replicas("m", [full("a", ("y", "z")), roomy]) == ["b", "a"]


def test_a_copy_that_evicts_needs_a_real_miss_and_a_copy_well_in_time() -> None:
    holder = full("a", ("m", "y"), in_flight=9)  # expects 1.0 s
    other = full("b", ("x", "z"))  # a copy there evicts x or z: 0.1 s + a 0.5 s load
    assert rank_replicas("m", [holder, other], slack=1.1) == ["a", "b"]  # in the margin only: stay
    assert rank_replicas("m", [holder, other], slack=0.9) == [
        "a",
        "b",
    ]  # late, but the copy is not well in time
    assert rank_replicas("m", [holder, other], slack=0.5) == ["a", "b"]
    fast = ReplicaView("b", frozenset({"x", "z"}), frozenset(), 0, 0.01, 0.05, 50, {"x": 100, "z": 100})
    assert rank_replicas("m", [holder, fast], slack=0.9) == ["b", "a"]  # late there; 0.06 s here


def test_a_model_no_replica_holds_goes_back_to_its_home() -> None:
    views = [view("a"), view("b", in_flight=2)]
    assert rank_replicas("m", views, home="b") == ["b", "a"]
    assert rank_replicas("m", [view("a", device=("m",), in_flight=5), view("b")], home="b") == ["a", "b"]

"""Exit placement on synthetic matrices whose best exit set is known."""

from __future__ import annotations

import numpy as np

from ptmserve.training.placement import TimeMatrix, choose, expected_seconds, running_shares


def _times(head: float) -> TimeMatrix:
    """Four layers, each exactly 1 s per row (linear in rows), exit heads ``head`` s per row."""
    sizes = (1, 2, 4, 8)
    per_row = np.array(sizes, dtype=float)
    return TimeMatrix(
        batch_sizes=sizes,
        embed=per_row * 0.0,
        layers=np.repeat(per_row[:, None], 4, axis=1),
        exit_head=per_row * head,
        final_head=per_row * 0.0,
    )


# Running shares (share of the batch computing each of 4 layers) of each exit set, as a calibration
# would give them: an exit after layer 0 lets 10% go, after layer 1 60%, after layer 2 70% (of all rows).
PATTERNS = {
    (): [1, 1, 1, 1],
    (0,): [1, 0.9, 0.9, 0.9],
    (1,): [1, 1, 0.4, 0.4],
    (2,): [1, 1, 1, 0.3],
    (0, 1): [1, 0.9, 0.4, 0.4],
    (0, 2): [1, 0.9, 0.9, 0.3],
    (1, 2): [1, 1, 0.4, 0.3],
    (0, 1, 2): [1, 0.9, 0.4, 0.3],
}


def _pattern(exits: tuple[int, ...]) -> np.ndarray:
    return np.array(PATTERNS[exits], dtype=float)


def test_expected_time_of_a_pattern() -> None:
    # 8 rows: 8 + 8 + 3.2 + 3.2 layer-seconds, plus one head over the 8 rows at layer 1
    assert np.isclose(expected_seconds(_times(0.5), 8, _pattern((1,)), (1,)), 22.4 + 4.0)


def test_picks_the_known_best_set_exhaustively_and_greedily() -> None:
    # Heads cost 0.5 s per row: exit 0 saves 3 x 0.1 = 0.3 row-layers per row, less than its head, so it
    # is left out; exit 1 saves 1.2, exit 2 then saves 0.1 more for 0.4 x 0.5 = 0.2: left out too.
    times = _times(0.5)
    costs = {s: expected_seconds(times, 8, _pattern(s), s) for s in PATTERNS}
    assert min(costs, key=costs.__getitem__) == (1,)
    exhaustive = choose([0, 1, 2], _pattern, times, 8)
    greedy = choose([0, 1, 2], _pattern, times, 8, exhaustive_max=0)
    assert exhaustive.exits == greedy.exits == (1,)
    assert exhaustive.method == "exhaustive" and greedy.method == "greedy"
    assert np.isclose(exhaustive.speedup, 32 / costs[(1,)])
    assert len(exhaustive.evaluated) == 8 and len(greedy.evaluated) < 8


def test_free_heads_take_every_useful_exit() -> None:
    placed = choose([0, 1, 2], _pattern, _times(0.0), 8)
    assert placed.exits == (0, 1, 2)


def test_costly_heads_take_none() -> None:
    placed = choose([0, 1, 2], _pattern, _times(5.0), 8)
    assert placed.exits == () and placed.speedup == 1.0


def test_running_shares_from_exit_traces() -> None:
    # exits after layers 0 and 2 of 4; rows leave at exit 0, exit 1 (layer 2) or the final classifier
    shares = running_shares([0, 2], np.array([0, 1, 2, 2]), 4)
    assert shares.tolist() == [1.0, 0.75, 0.75, 0.5]


def test_time_interpolates_through_zero_and_extrapolates() -> None:
    t = _times(0.5)
    assert t.seconds(t.exit_head, 0.5) == 0.25 and t.seconds(t.exit_head, 16) == 8.0


def test_an_exit_must_save_its_share_of_the_time() -> None:
    # Free heads: exit 0 saves 2.4 of 21.6 s over (1, 2), exit 2 saves 0.8 of 22.4 s over (1,): both
    # above 1%, both below 20%.
    for kwargs in ({}, {"exhaustive_max": 0}):
        assert choose([0, 1, 2], _pattern, _times(0.0), 8, **kwargs).exits == (0, 1, 2)  # type: ignore[arg-type]
        taken = choose([0, 1, 2], _pattern, _times(0.0), 8, min_gain=0.2, **kwargs)  # type: ignore[arg-type]
        assert taken.exits == (1,)  # 9.6 of 32 s saved; adding either other exit saves under 20%

"""Token choice (greedy, temperature, top-k, top-p, seeds) and stop strings."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from ptmserve.errors import InvalidInput
from ptmserve.models.sampling import (
    SamplingParams,
    StopMatch,
    filtered_logits,
    find_stop,
    make_generator,
    sample,
    streamable_length,
)

PROBS = [0.05, 0.5, 0.15, 0.3]  # token 1 first, then 3, 2, 0
LOGITS = torch.tensor([math.log(p) for p in PROBS])


def _draws(params: SamplingParams, n: int = 400) -> Counter[int]:
    g = make_generator(params)
    logits = LOGITS[None, :]
    return Counter(sample(logits, [params], [g])[0] for _ in range(n))


def test_greedy_takes_the_argmax_of_each_row() -> None:
    logits = torch.randn(5, 50)
    params = [SamplingParams(temperature=0.0), SamplingParams(top_k=1, temperature=2.0)] * 2 + [
        SamplingParams(temperature=0.0, seed=3)
    ]
    assert sample(logits, params, [None] * 5) == logits.argmax(-1).tolist()


def test_a_seed_gives_the_same_tokens_and_rows_are_independent() -> None:
    logits = torch.randn(3, 100)
    p = SamplingParams(temperature=1.0, seed=123)
    first = [sample(logits[:1], [p], [g])[0] for g in [make_generator(p)] for _ in range(20)]
    g = make_generator(p)
    again = [sample(logits[:1], [p], [g])[0] for _ in range(20)]
    assert first == again
    # the same request in a batch with other rows draws the same tokens
    g, others = make_generator(p), [make_generator(SamplingParams(seed=s)) for s in (1, 2)]
    params = [p, SamplingParams(seed=1), SamplingParams(seed=2)]
    batched = [sample(logits, params, [g, *others])[0] for _ in range(20)]
    assert batched == first
    other_seed = make_generator(SamplingParams(seed=124))
    assert [sample(logits[:1], [p], [other_seed])[0] for _ in range(20)] != first


def test_top_k_and_top_p_restrict_the_support() -> None:
    assert set(_draws(SamplingParams(top_k=2, seed=0))) == {1, 3}
    assert set(_draws(SamplingParams(top_p=0.6, seed=0))) == {1, 3}  # 0.5 < 0.6 <= 0.8
    assert set(_draws(SamplingParams(top_p=0.85, seed=0))) == {1, 3, 2}
    assert set(_draws(SamplingParams(top_p=0.1, seed=0))) == {1}  # the most likely always stays
    assert set(_draws(SamplingParams(top_k=3, top_p=0.6, seed=0))) == {1, 3}
    everything = _draws(SamplingParams(seed=0), n=4000)
    assert set(everything) == {0, 1, 2, 3}
    assert abs(everything[1] / 4000 - 0.5) < 0.05


def test_temperature_sharpens_and_flattens() -> None:
    cold = filtered_logits(LOGITS, SamplingParams(temperature=0.1)).softmax(-1)
    hot = filtered_logits(LOGITS, SamplingParams(temperature=100.0)).softmax(-1)
    assert cold[1] > 0.99 and float(hot.max() - hot.min()) < 0.05


def test_invalid_parameters_are_refused() -> None:
    for bad in ({"temperature": -1.0}, {"top_k": -2}, {"top_p": 0.0}, {"top_p": 1.5}):
        with pytest.raises(InvalidInput, match="invalid sampling"):
            SamplingParams(**bad)
    with pytest.raises(InvalidInput, match="2 rows"):
        sample(torch.zeros(2, 4), [SamplingParams()], [None])


def test_find_stop_gives_the_earliest_stop() -> None:
    assert find_stop("hello world. bye", ["bye", "."]) == StopMatch(11, ".")
    assert find_stop("hello", ["x", ""]) is None
    assert find_stop("ab</s>ab</s>", ["</s>"], start=3) == StopMatch(8, "</s>")
    # text growing chunk by chunk: a stop that straddles two chunks is found from the overlap
    text, checked, stops = "", 0, ["END", "\n\n"]
    found = None
    for chunk in ("the E", "N", "D of it"):
        text += chunk
        found = find_stop(text, stops, start=max(0, checked - 3 + 1))
        checked = len(text)
        if found:
            break
    assert found == StopMatch(4, "END") and text[: found.index] == "the "


def test_streamable_length_holds_back_a_possible_stop_prefix() -> None:
    assert streamable_length("hello wor", ["world!"]) == 6
    assert streamable_length("hello", ["x"]) == 5
    assert streamable_length("abc<", ["</s>", "<|end|>"]) == 3
    assert streamable_length("", ["a"]) == 0


@pytest.mark.parametrize(
    "params",
    [SamplingParams(temperature=5e-324), SamplingParams(temperature=1e-300), SamplingParams(top_p=1e-300)],
)
def test_extreme_parameters_never_fail_a_step(params: SamplingParams) -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, -1.0]])
    picked = sample(logits, [params, params], [make_generator(params), make_generator(params)])
    assert picked == [1, 0]

"""Choosing the next token of each sequence from its logits, and finding stop strings in generated text.

Each sequence has its own ``SamplingParams`` and its own ``torch.Generator``: a seeded request draws the
same tokens whatever else shares its batches. The order of the filters is transformers' (temperature,
then top-k, then top-p).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ptmserve.errors import InvalidInput

MIN_TEMPERATURE = 1e-5  # below this, sampling is greedy (logits / temperature would overflow)


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How one sequence picks its tokens. ``temperature == 0`` is greedy (the other fields then do
    nothing)."""

    temperature: float = 1.0  # 0: greedy; > 0 divides the logits
    top_k: int = 0  # keep the k most likely tokens; 0: all
    top_p: float = 1.0  # keep the fewest most likely tokens whose probability sums to >= top_p
    seed: int | None = None  # None: a random seed per request

    def __post_init__(self) -> None:
        problems = []
        if not self.temperature >= 0:
            problems.append(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if problems:
            raise InvalidInput("invalid sampling parameters: " + "; ".join(problems))

    @property
    def greedy(self) -> bool:
        """Picks the most likely token: temperature 0 (or so small that dividing by it overflows)."""
        return self.temperature < MIN_TEMPERATURE or self.top_k == 1


def make_generator(params: SamplingParams, device: torch.device | str = "cpu") -> torch.Generator:
    """The random stream of one request: seeded by ``params.seed``, or at random when it has none."""
    seed = params.seed if params.seed is not None else secrets.randbits(63)
    return torch.Generator(device=device).manual_seed(seed)


def filtered_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Float32 ``(V,)`` logits divided by the temperature, with the tokens top-k and top-p drop set to
    ``-inf`` (at least the most likely token stays)."""
    x = logits.float() / params.temperature
    if 0 < params.top_k < x.shape[-1]:
        kth = torch.topk(x, params.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        probs = sorted_x.softmax(-1)
        before = probs.cumsum(-1) - probs  # probability of the tokens ranked above each one
        drop = before >= params.top_p  # the first token always stays (nothing ranks above it)
        x = x.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return x


def sample(
    logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]
) -> list[int]:
    """The next token of each of B sequences from ``logits`` ``(B, V)``, row ``b`` with ``params[b]`` and
    ``generators[b]`` (a generator is only used by non-greedy rows; ``None`` uses torch's global one).

    Raises:
        InvalidInput: ``params`` or ``generators`` do not have B entries.
    """
    b = logits.shape[0]
    if len(params) != b or len(generators) != b:
        raise InvalidInput(f"{b} rows of logits, {len(params)} sampling params, {len(generators)} generators")
    greedy = logits.argmax(dim=-1).tolist()
    out = []
    for row, p, g in zip(range(b), params, generators, strict=True):
        if p.greedy:
            out.append(int(greedy[row]))
            continue
        probs = filtered_logits(logits[row], p).softmax(-1)
        if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:  # overflowed: the best one
            out.append(int(greedy[row]))
            continue
        out.append(int(torch.multinomial(probs, 1, generator=g).item()))
    return out


@dataclass(frozen=True, slots=True)
class StopMatch:
    """Where a stop string begins in the text (the output keeps ``text[:index]``)."""

    index: int
    stop: str


def find_stop(text: str, stops: Sequence[str], start: int = 0) -> StopMatch | None:
    """The earliest stop string that begins at or after ``start`` in ``text`` (the first listed wins a
    tie); ``None`` when there is none. Empty stop strings are ignored.

    Checking text as it grows: pass ``start = max(0, checked - longest_stop + 1)``, where ``checked`` is
    the length already checked, to find stops that straddle old and new text without rescanning it.
    """
    best: StopMatch | None = None
    for stop in stops:
        if not stop:
            continue
        i = text.find(stop, start)
        if i >= 0 and (best is None or i < best.index):
            best = StopMatch(i, stop)
    return best


def streamable_length(text: str, stops: Sequence[str]) -> int:
    """How much of ``text`` can be sent now: all of it but a tail that might still grow into a stop
    string (the longest suffix that is a proper prefix of one). Call it on text with no stop in it."""
    hold = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:n]):
                hold = n
                break
    return len(text) - hold

"""The standard multi-model trace: seeded, documented, the same for every policy and for sim and real runs.

What it models (docs/benchmarks.md gives the numbers):

- ``models`` models whose popularity follows Zipf's law: model ``i`` (0-based rank) gets a share
  proportional to ``1 / (i + 1) ** zipf_s`` of the background traffic.
- Background arrivals are a Poisson process of ``rate`` requests/s. Each request is real-time with
  probability ``realtime_share`` (priority 1, timeout ``realtime_timeout_ms``), else batch (priority 2,
  timeout ``batch_timeout_ms``).
- Bursts wake cold models: bursts start as a Poisson process (mean gap ``burst_every_s``); each picks one
  model from the less popular half and adds ``burst_rate`` requests/s for it during ``burst_s`` seconds,
  with the same class mix.
- Text lengths are log-normal tokens (median ``tokens_median``, sigma ``tokens_sigma``), clipped to
  ``[tokens_min, tokens_max]``.

The offered load can be set as the share of the device's time its tokens need (``rate_for_load``), so the
same trace shape stresses devices of any speed (batch overheads and switches come on top).
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from dataclasses import asdict, dataclass, replace

from ptmserve.engine.simulator import Arrival


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    models: int = 16
    duration_s: float = 120.0
    rate: float = 20.0  # background requests/s over all models
    zipf_s: float = 1.0
    realtime_share: float = 0.5
    realtime_timeout_ms: float = 500.0
    batch_timeout_ms: float = 30_000.0
    burst_every_s: float = 20.0
    burst_s: float = 5.0
    burst_rate: float = 10.0  # extra requests/s for the burst's model while it lasts
    tokens_median: float = 24.0
    tokens_sigma: float = 0.6
    tokens_min: int = 4
    tokens_max: int = 128
    seed: int = 0
    prefix: str = "m"

    def __post_init__(self) -> None:
        if self.models < 1 or self.duration_s <= 0 or self.rate < 0 or self.burst_rate < 0:
            raise ValueError(f"invalid workload: {self}")
        if not 0 <= self.realtime_share <= 1 or self.tokens_min < 1 or self.tokens_max < self.tokens_min:
            raise ValueError(f"invalid workload: {self}")

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def model_names(self) -> list[str]:
        """Model names, most popular first."""
        width = len(str(self.models - 1))
        return [f"{self.prefix}{i:0{width}d}" for i in range(self.models)]

    def mean_tokens(self) -> float:
        """Expected tokens per request (of the clipped log-normal, by numerical integration)."""
        lo, hi = math.log(self.tokens_min), math.log(self.tokens_max)
        mu, s = math.log(self.tokens_median), self.tokens_sigma
        n, total, weight = 400, 0.0, 0.0
        for k in range(n):
            z = -6 + 12 * (k + 0.5) / n
            w = math.exp(-z * z / 2)
            x = min(max(mu + s * z, lo), hi)
            total += w * round(math.exp(x))
            weight += w
        return total / weight

    def mean_rate(self) -> float:
        """Expected requests/s, bursts included."""
        return self.rate + self.burst_rate * min(1.0, self.burst_s / self.burst_every_s)


def rate_for_load(spec: WorkloadSpec, load: float, seconds_per_token: float) -> float:
    """The background ``rate`` that makes the mean offered compute (bursts included) ``load`` times what
    the device computes per second at ``seconds_per_token``."""
    tokens_per_s = load / seconds_per_token
    burst = spec.burst_rate * min(1.0, spec.burst_s / spec.burst_every_s)
    return max(tokens_per_s / spec.mean_tokens() - burst, 0.0)


def generate(spec: WorkloadSpec, *, even_bursts: bool = False) -> list[Arrival]:
    """The trace of ``spec``, sorted by time. The same spec (seed included) gives the same trace.

    ``even_bursts`` (the capacity probes): ``round(duration / burst_every_s)`` bursts (at least one),
    evenly spaced, their models and arrivals drawn from generators of their own. A short trace then
    carries its mean share of bursts whatever its rate, and the bursts of two rates differ only in how
    many requests they hold: with Poisson burst starts a 20 s probe holds 0, 1 or 2 bursts by luck, and
    bursts are most of the offered load.
    """
    if even_bursts:
        background = generate(replace(spec, burst_rate=0.0))
        return sorted(background + _even_bursts(spec), key=lambda a: a.time)
    rng = random.Random(spec.seed)
    names = spec.model_names()
    weights = [1.0 / (i + 1) ** spec.zipf_s for i in range(spec.models)]
    cum = list(itertools.accumulate(weights))
    arrivals: list[Arrival] = []

    def add(t: float, model: str) -> None:
        realtime = rng.random() < spec.realtime_share
        z = rng.gauss(math.log(spec.tokens_median), spec.tokens_sigma)
        tokens = int(min(max(round(math.exp(z)), spec.tokens_min), spec.tokens_max))
        timeout_ms = spec.realtime_timeout_ms if realtime else spec.batch_timeout_ms
        arrivals.append(Arrival(t, model, tokens, 1 if realtime else 2, int(timeout_ms * 1000)))

    t = 0.0
    while spec.rate > 0:
        t += rng.expovariate(spec.rate)
        if t >= spec.duration_s:
            break
        add(t, names[bisect.bisect_right(cum, rng.random() * cum[-1])])

    cold = names[spec.models // 2 :] or names
    start = 0.0
    while spec.burst_rate > 0 and spec.burst_every_s > 0:
        start += rng.expovariate(1.0 / spec.burst_every_s)
        if start >= spec.duration_s:
            break
        model = rng.choice(cold)
        t = start
        while True:
            t += rng.expovariate(spec.burst_rate)
            if t >= min(start + spec.burst_s, spec.duration_s):
                break
            add(t, model)
    arrivals.sort(key=lambda a: a.time)
    return arrivals


def _even_bursts(spec: WorkloadSpec) -> list[Arrival]:
    if spec.burst_rate <= 0 or spec.burst_every_s <= 0:
        return []
    n = max(1, round(spec.duration_s / spec.burst_every_s))
    names = spec.model_names()
    cold = names[spec.models // 2 :] or names
    pick = random.Random(spec.seed * 7919 + 1)
    out: list[Arrival] = []
    for k in range(n):
        model = pick.choice(cold)
        start = max(0.0, (k + 0.5) * spec.duration_s / n - spec.burst_s / 2)
        end = min(start + spec.burst_s, spec.duration_s)
        rng = random.Random(spec.seed * 7919 + 2 + k)
        t = start
        while True:
            t += rng.expovariate(spec.burst_rate)
            if t >= end:
                break
            realtime = rng.random() < spec.realtime_share
            z = rng.gauss(math.log(spec.tokens_median), spec.tokens_sigma)
            tokens = int(min(max(round(math.exp(z)), spec.tokens_min), spec.tokens_max))
            timeout_ms = spec.realtime_timeout_ms if realtime else spec.batch_timeout_ms
            out.append(Arrival(t, model, tokens, 1 if realtime else 2, int(timeout_ms * 1000)))
    return out

"""The records that cross a Ray Serve deployment handle between the ingress and the engine replicas.

Every call to a replica carries one ``ReplicaCall``; every answer is an ``Answer`` (a streamed generation
yields ``Started``, then ``GenerationChunk``s, then its ``Answer``). Errors cross as an ``ErrorRecord`` (the
worker pool's: class name and message) and are raised again on the ingress as the same
``ptmserve.errors`` type, so the one error table maps them as it maps an in-process engine's. Every answer
carries the replica's ``ReplicaState``, so the router follows each replica's tiers without waiting for
Ray's periodic routing stats.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ptmserve.engine.api import GenerationParams, InferenceOptions
from ptmserve.engine.pool.messages import ErrorRecord

# Operations a ``ReplicaCall`` may name (``EngineReplica``'s handlers).
EMBED, CLASSIFY, GENERATE = "embed", "classify", "generate"
LOAD, UNLOAD, WARM_UP = "load", "unload", "warm_up"
METRICS, TIERS, STATE = "metrics", "tiers", "state"
WARM_HOST = "warm_host"  # every model into the host tier (benchmarks: they measure device switches)


@dataclass(frozen=True, slots=True)
class ReplicaState:
    """What one replica tells the router about itself (with every answer, and as Ray routing stats)."""

    replica: str  # its Ray Serve replica id (``ReplicaID.unique_id``)
    pid: int
    at: float  # time.time() when it was taken: the newer of two views wins
    device: frozenset[str] = frozenset()  # models its device tier holds
    device_bytes: dict[str, int] = field(default_factory=dict)  # bytes each of them takes there
    device_free: int = -1  # bytes its device budget has left; -1: unknown
    host: frozenset[str] = frozenset()  # models its host tier holds (not on the device)
    in_flight: int = 0  # requests it holds (admitted, not answered)
    seconds_per_request: float = 0.0  # its recent busy seconds per finished request; 0 before any
    load_seconds: float = 0.0  # its mean seconds to bring a model onto the device; 0 before any
    loads: int = 0  # models it brought onto its device so far (switches)
    unavailable: dict[str, str] = field(default_factory=dict)  # models its engine refuses, with the reason

    def to_stats(self) -> dict[str, Any]:
        """As a routing stats dict (Ray passes those through its controller as plain data)."""
        return {
            "replica": self.replica,
            "pid": self.pid,
            "at": self.at,
            "device": sorted(self.device),
            "device_bytes": dict(self.device_bytes),
            "device_free": self.device_free,
            "host": sorted(self.host),
            "in_flight": self.in_flight,
            "seconds_per_request": self.seconds_per_request,
            "load_seconds": self.load_seconds,
            "loads": self.loads,
            "unavailable": dict(self.unavailable),
        }

    @classmethod
    def from_stats(cls, stats: dict[str, Any]) -> ReplicaState | None:
        """The state a ``to_stats`` dict describes; None for an empty or foreign dict."""
        try:
            return cls(
                replica=str(stats["replica"]),
                pid=int(stats["pid"]),
                at=float(stats["at"]),
                device=frozenset(stats.get("device", ())),
                device_bytes={str(k): int(v) for k, v in stats.get("device_bytes", {}).items()},
                device_free=int(stats.get("device_free", -1)),
                host=frozenset(stats.get("host", ())),
                in_flight=int(stats.get("in_flight", 0)),
                seconds_per_request=float(stats.get("seconds_per_request", 0.0)),
                load_seconds=float(stats.get("load_seconds", 0.0)),
                loads=int(stats.get("loads", 0)),
                unavailable=dict(stats.get("unavailable", {})),
            )
        except (KeyError, TypeError, ValueError):
            return None


@dataclass(frozen=True, slots=True)
class ReplicaCall:
    """One call to a replica. The router reads ``model``, ``deadline`` and ``target``."""

    op: str  # one of the operations above
    model: str | None = None  # None for calls about the replica itself (metrics, tiers, warm-up)
    inputs: Any = None  # embed/classify: token id lists; generate: the prompt's token ids
    options: InferenceOptions = InferenceOptions()
    params: GenerationParams | None = None  # generate only
    deadline: float | None = None  # time.time() by which it must finish (the router's slack)
    target: str | None = None  # a replica id: this call goes to that replica only (broadcasts)


@dataclass(frozen=True, slots=True)
class Answer:
    """A replica's answer to one call: ``value``, or ``error`` when it failed."""

    state: ReplicaState
    value: Any = None
    error: ErrorRecord | None = None


@dataclass(frozen=True, slots=True)
class Started:
    """A streamed generation was admitted (the first item of the stream)."""

    prompt_tokens: int
    state: ReplicaState

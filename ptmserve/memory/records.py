"""Records the weight manager hands out: residency, tier usage, and events for metrics."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Residency:
    """Where a model's weights are now."""

    on_device: bool  # every tensor is in the device tier and valid: a request runs without loading
    on_host: bool  # every tensor is in the host tier: a switch needs no disk read
    loading: bool  # a load (to either tier) is in progress


@dataclass(frozen=True, slots=True)
class TierUsage:
    """Accounted bytes of one tier. ``used_bytes <= budget_bytes`` always holds."""

    name: str  # "host" or "device"
    used_bytes: int  # live tensors + free-listed buffers
    budget_bytes: int
    free_list_bytes: int  # buffers kept for reuse by tensors of the same shape and dtype
    allocations: int  # buffers ever taken from the allocator (steady switching adds none)
    # model -> bytes of the tensors it uses (a shared tensor counts for each of its users)
    per_model: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TierStats:
    """Both tiers at one instant."""

    host: TierUsage
    device: TierUsage
    skeletons_built: int  # module structures ever built (one per architecture shape in steady state)


@dataclass(frozen=True, slots=True)
class MemoryEvent:
    """What a listener hears. ``kind``: "load" (``nbytes`` moved into ``tier`` in ``seconds``; a device
    load is a model switch), "evict" (``nbytes`` of ``model`` left ``tier``) or "load_failed"."""

    kind: str  # "load" | "evict" | "load_failed"
    model: str
    tier: str  # "host" | "device"
    nbytes: int = 0
    seconds: float = 0.0
    error: str = ""
    read_bytes: int = (
        0  # of a device load: bytes it read from the repository first (0: all from the host tier)
    )


Listener = Callable[[MemoryEvent], None]


class EventQueue:
    """Events queued by whoever holds the manager's lock, delivered to listeners outside it.

    ``deliver`` returns once every event queued before the call has reached every listener (delivered
    by this thread or by the one that was delivering), in queue order. A failing listener is logged.
    """

    def __init__(self, listeners: Sequence[Listener] = ()) -> None:
        self.listeners = list(listeners)
        self._queued: list[MemoryEvent] = []
        self._queue_lock = threading.Lock()
        self._delivery = threading.RLock()  # one deliverer at a time; a listener may trigger more

    def append(self, event: MemoryEvent) -> None:
        with self._queue_lock:
            self._queued.append(event)

    def deliver(self) -> None:
        with self._delivery:
            with self._queue_lock:
                events, self._queued = self._queued, []
            for event in events:
                for listener in self.listeners:
                    try:
                        listener(event)
                    except Exception:
                        logger.exception("memory event listener failed on %s", event)

"""Requests as the scheduler sees them, their classes and outcomes, and the bounded queues that hold them.

Pure Python: no torch, no threads, no clock of its own (times are seconds from the caller's clock).
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import Enum, IntEnum

from ptmserve.errors import InvalidInput, Overloaded


class RequestClass(IntEnum):
    """Service class. Lower values are served first."""

    REALTIME = 0  # tight deadline: served before any batch-class work
    BATCH = 1  # loose deadline: fills spare capacity, never starved


class Outcome(str, Enum):
    """How a request ended, as metrics count it. Every request ends in exactly one of these."""

    SUCCESS = "success"  # its result was delivered within its deadline
    TIMEOUT = "timeout"  # it could not meet its deadline (failed fast, expired in queue, or finished late)
    REJECTED = "rejected"  # refused at admission: its queue was full
    ERROR = "error"  # execution failed
    CANCELLED = "cancelled"  # the client went away or cancelled it


class RequestStatus(IntEnum):
    """Where a request is in its life. The finished states sort after the live ones (vLLM's way)."""

    WAITING = 0  # queued, not yet scheduled
    RUNNING = 1  # in the running set: scheduled at least once (a split request between its steps too)
    FINISHED = 2  # every input computed (the engine then delivers, or fails it if it came too late)
    CANCELLED = 3  # the client cancelled it or went away
    TIMED_OUT = 4  # its deadline passed before it could finish
    FAILED = 5  # its step failed, or it was dropped (model unloaded, scheduler error)

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED


@dataclass(slots=True, eq=False)
class Request:
    """One unit of work for one model. The scheduler reads every field except ``payload``.

    A request of several inputs whose tokens exceed the batch token limit is split over several steps,
    a prefix of its remaining inputs at a time; ``tokens`` then counts what is still to compute.

    A generation request (``generates``) runs step after step until its last token: ``tokens`` counts
    the tokens it must compute before it can sample its next one (its prompt, or what is left of it,
    then 1 per step).
    """

    id: int  # unique among live requests; the engine assigns it
    model: str  # model name, as the tier view names it
    cls: RequestClass
    arrival: float  # seconds on the scheduler's clock when it was submitted
    deadline: float  # absolute seconds on the same clock; its result is useless after this
    tokens: int  # tokens still to compute (after truncation); >= 1 while it is live
    payload: object = None  # opaque to the scheduler (the simulator keeps its record here)
    inputs: tuple[int, ...] = ()  # tokens of each input, when it may be split; () = one indivisible unit
    done_inputs: int = 0  # inputs computed by earlier steps (a prefix of ``inputs``)
    status: RequestStatus = RequestStatus.WAITING
    generates: bool = False  # a text generation request (continuous batching; see the scheduler)

    def next_span(self, budget: int) -> tuple[int, int]:
        """The inputs ``[start, end)`` its next step computes: as many of the remaining inputs as fit in
        ``budget`` tokens, and at least one."""
        start = self.done_inputs
        if not self.inputs:
            return start, start + 1
        end, used = start, 0
        while end < len(self.inputs) and (end == start or used + self.inputs[end] <= budget):
            used += self.inputs[end]
            end += 1
        return start, end

    def span_tokens(self, span: tuple[int, int]) -> int:
        return sum(self.inputs[span[0] : span[1]]) if self.inputs else self.tokens

    @property
    def total_inputs(self) -> int:
        return len(self.inputs) if self.inputs else 1


# The one source of the default deadlines: the engine's settings and the CLI flags take these.
DEFAULT_REALTIME_TIMEOUT_S = 10.0
DEFAULT_BATCH_TIMEOUT_S = 300.0


@dataclass(frozen=True, slots=True)
class ClassDefaults:
    """What priority 0 and a missing timeout mean, per deployment (or per model)."""

    default_class: RequestClass = RequestClass.REALTIME  # the class of priority 0
    realtime_timeout_s: float = DEFAULT_REALTIME_TIMEOUT_S  # of a real-time request sent without a timeout
    batch_timeout_s: float = DEFAULT_BATCH_TIMEOUT_S  # of a batch request sent without a timeout

    def timeout_s(self, cls: RequestClass) -> float:
        return self.realtime_timeout_s if cls is RequestClass.REALTIME else self.batch_timeout_s


def request_class(priority: int, default: RequestClass = RequestClass.REALTIME) -> RequestClass:
    """Map a Triton ``priority`` to a class: 1 (the highest) is real-time, 2 and above are batch,
    and 0 means the model's default class.

    Raises:
        InvalidInput: ``priority`` is negative or not an int.
    """
    if isinstance(priority, bool) or not isinstance(priority, int) or priority < 0:
        raise InvalidInput(f"priority must be an integer >= 0, got {priority!r}")
    if priority == 0:
        return default
    return RequestClass.REALTIME if priority == 1 else RequestClass.BATCH


def deadline_from(
    timeout_us: int | None, cls: RequestClass, now: float, defaults: ClassDefaults = ClassDefaults()
) -> float:
    """Absolute deadline (seconds) of a request submitted at ``now``: ``now + timeout_us`` when a timeout
    is given, else ``now`` plus the class's default timeout. A timeout of 0 means "not given" (Triton).

    Raises:
        InvalidInput: ``timeout_us`` is negative or not an int.
    """
    if timeout_us is None or timeout_us == 0:
        return now + defaults.timeout_s(cls)
    if isinstance(timeout_us, bool) or not isinstance(timeout_us, int) or timeout_us < 0:
        raise InvalidInput(f"timeout must be an integer number of microseconds >= 0, got {timeout_us!r}")
    return now + timeout_us / 1e6


class ModelQueue:
    """The queued requests of one model and class, in (deadline, submission) order; ``by_arrival`` gives
    submission order."""

    __slots__ = ("_keys", "_reqs", "_by_seq")

    def __init__(self) -> None:
        self._keys: list[tuple[float, int]] = []  # (deadline, seq), sorted
        self._reqs: list[Request] = []  # parallel to _keys
        self._by_seq: dict[int, Request] = {}  # insertion-ordered: submission order, O(1) removal

    def __len__(self) -> int:
        return len(self._reqs)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._reqs)

    def __getitem__(self, i: int) -> Request:
        return self._reqs[i]

    def insert(self, req: Request, seq: int) -> None:
        key = (req.deadline, seq)
        i = bisect.bisect_right(self._keys, key)
        self._keys.insert(i, key)
        self._reqs.insert(i, req)
        self._by_seq[seq] = req

    def remove(self, req: Request, seq: int) -> None:
        i = bisect.bisect_left(self._keys, (req.deadline, seq))
        if i >= len(self._keys) or self._reqs[i] is not req:
            raise KeyError(req.id)
        del self._keys[i], self._reqs[i]
        del self._by_seq[seq]

    def by_arrival(self) -> Iterator[Request]:
        """The queued requests in submission order."""
        return iter(self._by_seq.values())


class RequestQueues:
    """Bounded per-(model, class) queues in deadline order, plus global arrival and deadline indices.

    A request is live from ``push`` until ``remove``; each may happen once per request.
    """

    def __init__(self, max_per_queue: int) -> None:
        if max_per_queue < 1:
            raise ValueError(f"max_per_queue must be >= 1, got {max_per_queue}")
        self.max_per_queue = max_per_queue
        self._queues: dict[tuple[str, RequestClass], ModelQueue] = {}
        self._nonempty: tuple[dict[str, None], dict[str, None]] = ({}, {})  # per class, insertion-ordered
        self._live: dict[int, tuple[Request, int]] = {}  # id -> (request, seq)
        self._seq = 0
        self.max_tokens = 1  # the largest request ever queued (bounds predictions)
        # Lazy-deletion heaps per class: entries of removed requests are skipped when they surface.
        self._by_arrival: tuple[list[tuple[float, int, int]], ...] = ([], [])
        self._by_deadline: tuple[list[tuple[float, int, int]], ...] = ([], [])

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, request_id: int) -> bool:
        return request_id in self._live

    def push(self, req: Request, *, admitted: bool = False) -> None:
        """Queue ``req``. A request ``admitted`` before (the rest of a split request) is never refused.

        Raises:
            Overloaded: its model+class queue already holds ``max_per_queue`` requests.
            ValueError: a live request has the same id.
        """
        if req.id in self._live:
            raise ValueError(f"request id {req.id} is already queued")
        q = self._queues.get((req.model, req.cls))
        if q is None:
            q = self._queues[(req.model, req.cls)] = ModelQueue()
        if len(q) >= self.max_per_queue and not admitted:
            raise Overloaded(
                f"queue for model {req.model!r} ({req.cls.name.lower()}) is full ({self.max_per_queue})"
            )
        self._seq += 1
        seq = self._seq
        self.max_tokens = max(self.max_tokens, req.tokens)
        q.insert(req, seq)
        self._live[req.id] = (req, seq)
        self._nonempty[req.cls][req.model] = None
        heapq.heappush(self._by_arrival[req.cls], (req.arrival, seq, req.id))
        heapq.heappush(self._by_deadline[req.cls], (req.deadline, seq, req.id))

    def get(self, request_id: int) -> Request | None:
        entry = self._live.get(request_id)
        return entry[0] if entry else None

    def remove(self, req: Request) -> None:
        """Take a live request out of its queue. Raises KeyError if it is not live."""
        _, seq = self._live.pop(req.id)
        q = self._queues[(req.model, req.cls)]
        q.remove(req, seq)
        if not q:
            del self._nonempty[req.cls][req.model]

    def queue(self, model: str, cls: RequestClass) -> ModelQueue:
        """The queued requests of ``model`` and ``cls`` in deadline order (read-only view)."""
        return self._queues.get((model, cls)) or _EMPTY

    def in_order(self, model: str, by: str) -> Iterator[Request]:
        """Every queued request of ``model`` (both classes) lazily, by ``"arrival"`` or by ``"deadline"``."""
        qs = [q for c in RequestClass if (q := self._queues.get((model, c)))]
        if by == "arrival":
            return heapq.merge(*(q.by_arrival() for q in qs), key=lambda r: self._live[r.id][1])
        return heapq.merge(*qs, key=lambda r: (r.deadline, self._live[r.id][1]))

    def nonempty(self, cls: RequestClass) -> list[ModelQueue]:
        """The non-empty queues of ``cls``."""
        return [self._queues[(m, cls)] for m in self._nonempty[cls]]

    def models(self, cls: RequestClass) -> Sequence[str]:
        """Models with at least one queued request of ``cls``, in the order their queues became non-empty."""
        return list(self._nonempty[cls])

    def has(self, model: str, cls: RequestClass | None = None) -> bool:
        """True when ``model`` has queued requests (of ``cls``, or of any class)."""
        if cls is not None:
            return model in self._nonempty[cls]
        return model in self._nonempty[0] or model in self._nonempty[1]

    def depth(self, model: str, cls: RequestClass | None = None) -> int:
        classes = (cls,) if cls is not None else tuple(RequestClass)
        return sum(len(self._queues.get((model, c)) or ()) for c in classes)

    def _head(self, heap: list[tuple[float, int, int]]) -> Request | None:
        while heap:
            entry = self._live.get(heap[0][2])
            if entry is not None and entry[1] == heap[0][1]:
                return entry[0]
            heapq.heappop(heap)
        return None

    def oldest(self, cls: RequestClass | None = None) -> Request | None:
        """The live request that arrived first (ties by submission order), in ``cls`` or in any class."""
        return self._first(self._by_arrival, cls, key=lambda r: (r.arrival, self._live[r.id][1]))

    def earliest(self, cls: RequestClass | None = None) -> Request | None:
        """The live request with the earliest deadline (ties by submission order)."""
        return self._first(self._by_deadline, cls, key=lambda r: (r.deadline, self._live[r.id][1]))

    def _first(
        self,
        heaps: tuple[list[tuple[float, int, int]], ...],
        cls: RequestClass | None,
        key: Callable[[Request], tuple[float, int]],
    ) -> Request | None:
        classes = (cls,) if cls is not None else tuple(RequestClass)
        heads = [h for c in classes if (h := self._head(heaps[c])) is not None]
        return min(heads, key=key) if heads else None

    def seq(self, req: Request) -> int:
        """Submission order of a live request (smaller was submitted earlier)."""
        return self._live[req.id][1]


_EMPTY = ModelQueue()

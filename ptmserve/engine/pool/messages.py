"""The messages the front end and its worker processes exchange over one pipe per worker.

Every message is a small dataclass, pickled by ``multiprocessing.connection`` (both ends are our own
processes, so pickle is safe here). A call carries an id; everything the worker sends back about that call
carries the same id. Errors cross as their class name and message and are raised again on the front end
as the same ``ptmserve.errors`` type, so the one error table maps them exactly as it maps an in-process
engine's.

::

    front end -> worker                      worker -> front end
    Call(id, op, args)                       Hello(pid, dtype, device, state)   once, when it can serve
    Cancel(id)                               Started(id, prompt_tokens)         a generation was admitted
    Close(drain_seconds)                     Chunk(id, chunk)                   new text of a generation
                                             Reply(id, value, state)            the call's result
                                             Failure(id, error, state)          the call's error
                                             StartFailed(error)                 the engine could not start

``state`` (``WorkerState``) rides on every reply, so the front end's routing table follows each worker's
device tier without polling.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ptmserve import errors
from ptmserve.engine.api import GenerationChunk


class WorkerError(RuntimeError):
    """A worker failed in a way that is not a ``ptmserve.errors`` type (a bug): answered as a 500."""


# Operations a ``Call`` may name (the worker's handlers, ``process.py``).
EMBED, CLASSIFY, GENERATE = "embed", "classify", "generate"
LOAD, UNLOAD, WARM_UP = "load", "unload", "warm_up"
METRICS, TIERS = "metrics", "tiers"


@dataclass(frozen=True, slots=True)
class ErrorRecord:
    """An exception as it crosses the pipe."""

    kind: str  # the class name: a ``ptmserve.errors`` class, or anything else for an unexpected error
    message: str

    @classmethod
    def of(cls, exc: BaseException) -> ErrorRecord:
        message = exc.message if isinstance(exc, errors.PtmError) else str(exc)
        return cls(type(exc).__name__, message)

    def rebuild(self, worker: str) -> Exception:
        """The same ``ptmserve.errors`` type with the same message; anything else as a ``WorkerError``
        naming ``worker`` (so a 500 in the log says where it came from)."""
        found = getattr(errors, self.kind, None)
        if isinstance(found, type) and issubclass(found, errors.PtmError):
            return found(self.message)
        return WorkerError(f"{worker}: {self.kind}: {self.message}")


@dataclass(frozen=True, slots=True)
class WorkerState:
    """A worker's view of its models, sent with every reply."""

    device_models: frozenset[str]  # models its device tier holds (or is loading)
    # models its engine refuses to serve (over budget, failed load), with the reason; sent with the hello
    # and with the replies to load, unload and warm-up, None on other replies (nothing changed it)
    unavailable: dict[str, str] | None = None


# ------------------------------------------------------------------------------ front end -> worker


@dataclass(frozen=True, slots=True)
class Call:
    id: int
    op: str  # one of the operations above
    args: dict[str, Any] = field(default_factory=dict)  # the engine call's keyword arguments


@dataclass(frozen=True, slots=True)
class Cancel:
    """The caller went away: cancel call ``id`` (a no-op if it finished)."""

    id: int


@dataclass(frozen=True, slots=True)
class Close:
    """Finish what is in flight (up to ``drain_seconds``), close the engine and exit."""

    drain_seconds: float


# ------------------------------------------------------------------------------ worker -> front end


@dataclass(frozen=True, slots=True)
class Hello:
    pid: int
    dtype: str  # the compute dtype's name ("float32"), for the front end's catalog
    device: str  # the torch device, for the logs
    state: WorkerState


@dataclass(frozen=True, slots=True)
class StartFailed:
    """The worker's engine could not start (a bad setting): the pool reports it rather than retrying."""

    error: ErrorRecord


@dataclass(frozen=True, slots=True)
class Started:
    id: int
    prompt_tokens: int  # after truncation


@dataclass(frozen=True, slots=True)
class Chunk:
    id: int
    chunk: GenerationChunk


@dataclass(frozen=True, slots=True)
class Reply:
    id: int
    value: Any  # EmbedResult, ClassifyResult, GenerationResult, metric families, tiers, or None
    state: WorkerState


@dataclass(frozen=True, slots=True)
class Failure:
    id: int
    error: ErrorRecord
    state: WorkerState

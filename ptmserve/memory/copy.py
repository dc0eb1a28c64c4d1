"""Host-to-device copies behind one small interface, and the fences that say when they are done.

``CopyEngine.submit(pairs, fences)`` queues copies ``dst.copy_(src)`` and sets the fences once they
have landed. The CPU implementation runs the copies on one thread of its own, so a loader can read
the next layer from disk while this layer is copied and an earlier one computes. The CUDA one issues
the copies on a side stream and records an event; ``Fence.wait`` then makes the current stream wait
for that event instead of blocking the host.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Sequence
from typing import Protocol

import torch

from ptmserve.errors import PtmError

logger = logging.getLogger(__name__)

CopyPairs = Sequence[tuple[torch.Tensor, torch.Tensor]]  # (dst, src): dst.copy_(src), casting if needed


class Fence:
    """A one-shot completion flag for a set of copies (or reads), carrying the error if they failed."""

    __slots__ = ("_event", "_error", "_cuda_event")

    def __init__(self, done: bool = False) -> None:
        self._event = threading.Event()
        self._error: BaseException | None = None
        self._cuda_event: torch.cuda.Event | None = None
        if done:
            self._event.set()

    def set(self, cuda_event: torch.cuda.Event | None = None) -> None:
        """Mark the work done; on CUDA, done once ``cuda_event`` completes on the device."""
        self._cuda_event = cuda_event
        self._event.set()

    def fail(self, error: BaseException) -> None:
        """Mark the work failed; every ``wait`` raises ``error``. No effect once set or failed."""
        if not self._event.is_set():
            self._error = error
            self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    @property
    def error(self) -> BaseException | None:
        return self._error

    def wait(self, timeout: float | None = None) -> None:
        """Block until the work was issued; raise its error if it failed. On CUDA the current
        stream is made to wait for the copies, so the host does not block on the transfer.

        Raises:
            TimeoutError: not done within ``timeout`` seconds.
        """
        if not self._event.wait(timeout):
            raise TimeoutError("timed out waiting for weights to load")
        if self._error is not None:
            if isinstance(self._error, PtmError):  # a fresh error per waiter: one traceback each
                raise type(self._error)(self._error.message) from self._error
            raise self._error
        if self._cuda_event is not None:
            torch.cuda.current_stream().wait_event(self._cuda_event)

    def synchronize(self, timeout: float | None = None) -> None:
        """Like ``wait`` but blocks the host until the bytes have landed (also on CUDA)."""
        self.wait(timeout)
        if self._cuda_event is not None:
            self._cuda_event.synchronize()


class CopyEngine(Protocol):
    """Moves tensors into the device tier, in submission order."""

    def submit(self, pairs: CopyPairs, fences: Sequence[Fence]) -> None:
        """Queue ``dst.copy_(src)`` for every pair; set ``fences`` when all landed, fail them on error.
        The caller keeps every ``src`` alive and unchanged until the fences are set."""
        ...

    def close(self) -> None:
        """Finish queued copies and release the engine's thread or stream."""
        ...


class ThreadCopyEngine:
    """Copies on one background thread: the CPU implementation (and any device without streams)."""

    def __init__(self, name: str = "ptmserve-copy") -> None:
        self._queue: queue.SimpleQueue[tuple[CopyPairs, Sequence[Fence]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, pairs: CopyPairs, fences: Sequence[Fence]) -> None:
        self._queue.put((pairs, fences))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            pairs, fences = item
            try:
                with torch.inference_mode():
                    for dst, src in pairs:
                        dst.copy_(src)
            except BaseException as exc:  # the waiters must learn about it, whatever it is
                logger.exception("weight copy failed")
                for fence in fences:
                    fence.fail(exc)
            else:
                for fence in fences:
                    fence.set()


class CudaCopyEngine:
    """Asynchronous copies from pinned host memory on a dedicated CUDA stream."""

    def __init__(self, device: torch.device) -> None:
        self._device = device
        self._stream = torch.cuda.Stream(device=device)
        self._lock = threading.Lock()

    def submit(self, pairs: CopyPairs, fences: Sequence[Fence]) -> None:
        try:
            with self._lock, torch.cuda.stream(self._stream), torch.inference_mode():
                # A reused buffer may still be read by kernels queued on the compute stream.
                self._stream.wait_stream(torch.cuda.default_stream(self._device))
                for dst, src in pairs:
                    dst.copy_(src, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self._stream)
        except BaseException as exc:
            for fence in fences:
                fence.fail(exc)
            raise
        for fence in fences:
            fence.set(event)

    def close(self) -> None:
        self._stream.synchronize()


def make_copy_engine(device: torch.device) -> CopyEngine:
    """The copy engine for ``device``: a CUDA stream on CUDA, a copy thread elsewhere."""
    if device.type == "cuda":
        return CudaCopyEngine(device)
    return ThreadCopyEngine()

"""Server-sent event responses for the generation routes (the event format is ``ptmserve.protocol.sse``).

The first event is sent only once the generation's first chunk has come (``DataPlane.stream``), so an
error before it is an ordinary error response with its status. An error after that is one event carrying
the protocol's error body, and the stream ends.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Protocol

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from ptmserve.engine.api import GenerationResult
from ptmserve.protocol import sse
from ptmserve.protocol.errors import error_body
from ptmserve.server.dataplane import GenerationStream
from ptmserve.server.errors import describe

HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of the events


class EventStream(StreamingResponse):
    """A ``text/event-stream`` response over ``events``.

    Whatever ends the response (the last event sent, the client gone, the server draining), ``events`` is
    closed before the response returns, so the generation behind it is cancelled and its KV cache freed at
    once, not whenever the garbage collector finalizes the generator. starlette cancels the sending task
    when the client disconnects (ASGI spec 2.3, what uvicorn reports), which may leave ``events``
    suspended at a ``yield``.
    """

    def __init__(self, events: AsyncGenerator[bytes, None]) -> None:
        super().__init__(events, media_type=sse.MEDIA_TYPE, headers=HEADERS)
        self._events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._events.aclose()


def error_event(exc: BaseException, path: str) -> bytes:
    """The event reporting ``exc`` in the error body of ``path``'s protocol (a bug is logged once)."""
    kind, message = describe(exc)
    return sse.encode_data(error_body(kind, message, path, getattr(exc, "param", None)))


class EventFormat(Protocol):
    """How one protocol spells the events of a generation (each method returns encoded events)."""

    def head(self) -> list[bytes]: ...  # before the first chunk
    def chunk(self, text: str) -> bytes: ...  # new text
    def end(self, result: GenerationResult) -> list[bytes]: ...  # after the last chunk


async def generation_events(
    stream: GenerationStream, fmt: EventFormat, path: str
) -> AsyncGenerator[bytes, None]:
    """The events of ``stream`` in ``fmt``; an error while streaming becomes one error event, the last."""
    try:
        for event in fmt.head():
            yield event
        async with aclosing(stream.chunks()) as chunks:
            async for chunk in chunks:
                if chunk.text:
                    yield fmt.chunk(chunk.text)
        for event in fmt.end(stream.result()):
            yield event
    except Exception as exc:  # not CancelledError or GeneratorExit: those end the stream silently
        yield error_event(exc, path)

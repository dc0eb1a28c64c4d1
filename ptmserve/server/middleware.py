"""The guard every HTTP request passes: API key, body size and time limits, the last-resort error answer,
metrics.

A pure ASGI middleware (no ``BaseHTTPMiddleware``, which would hide client disconnects from the routes).
It reads the whole body up to ``max_body_bytes`` before the route runs, so an oversized body is refused
with 413 without being buffered, a body that does not arrive within ``body_timeout`` gets 408, and the
route's ``receive`` then reports the client's disconnect. A request still running when the server's
drain period ends is cancelled by uvicorn; the guard answers it 503 in the protocol's error format.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ptmserve.errors import NotReady, PayloadTooLarge, PtmError, RequestTimeout, Unauthorized
from ptmserve.server.errors import error_response
from ptmserve.server.settings import ServerSettings

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

HEALTH_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})
# Label values come from this set only, so clients cannot grow the metrics without bound.
_METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"})
_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class HttpMetrics:
    """HTTP-level counters, in a registry of their own (rendered at /metrics after the engine's)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "ptmserve_http_requests",
            "HTTP requests by route template, method and status code (499: the client went away).",
            ["route", "method", "code"],
            registry=self.registry,
        )
        self.seconds = Histogram(
            "ptmserve_http_request_seconds",
            "Time from the request's arrival to the end of its answer.",
            ["route"],
            buckets=_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "ptmserve_http_requests_in_flight", "HTTP requests being served now.", registry=self.registry
        )


class Guard:
    """Auth, body limit, error safety net and HTTP metrics around the FastAPI app."""

    def __init__(self, app: ASGIApp, settings: ServerSettings, metrics: HttpMetrics) -> None:
        self.app = app
        self.settings = settings
        self.metrics = metrics
        self._key = settings.api_key.encode() if settings.api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        state = {"status": 499, "started": False}

        async def send_and_note(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                state["started"] = True
            await send(message)

        path = scope["path"]
        self.metrics.in_flight.inc()
        try:
            self._authorize(scope)
            replay = await self._read_body(scope, receive)
            if replay is not None:
                await self.app(scope, replay, send_and_note)
        except RequestTimeout as exc:  # the rest of the body may still come: do not keep the connection
            if not state["started"]:
                await error_response(exc, path, {"Connection": "close"})(scope, receive, send_and_note)
        except Exception as exc:  # PtmError from here, or a bug in a route: answer once, never crash
            if not state["started"]:
                await error_response(exc, path)(scope, receive, send_and_note)
            elif not isinstance(exc, PtmError):
                error_response(exc, path)  # logs the bug; the client already has a partial answer
        except asyncio.CancelledError:
            # uvicorn cancels the requests still running when the drain period ends (its graceful
            # shutdown timeout); nothing else cancels a request's task. Answer it as the table says.
            if state["started"]:
                raise
            logger.warning(
                "%s %s cancelled at the end of the drain period: answered 503", scope["method"], path
            )
            gone = NotReady("the server is shutting down: the request did not finish within its drain period")
            await error_response(gone, path, {"Connection": "close"})(scope, receive, send_and_note)
        finally:
            self.metrics.in_flight.dec()
            route = scope.get("route")
            template = getattr(route, "path", "unmatched")
            method = scope["method"] if scope["method"] in _METHODS else "OTHER"
            self.metrics.requests.labels(template, method, str(state["status"])).inc()
            self.metrics.seconds.labels(template).observe(time.perf_counter() - start)

    def _authorize(self, scope: Scope) -> None:
        if self._key is None or scope["path"] in HEALTH_PATHS:
            return
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._key):
                    return
                raise Unauthorized("wrong API key")
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")

    async def _read_body(self, scope: Scope, receive: Receive) -> Receive | None:
        """A receive that replays the whole body, then passes on; None if the client left meanwhile.

        Raises ``PayloadTooLarge`` beyond ``max_body_bytes`` and ``RequestTimeout`` when the body has not
        arrived ``body_timeout`` seconds after the headers.
        """
        limit = self.settings.max_body_bytes
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                raise PayloadTooLarge(f"body of {int(value)} bytes exceeds the limit of {limit} bytes")
        chunks: list[bytes] = []
        size = 0
        with _Deadline(self.settings.body_timeout) as deadline:
            while True:
                message = await deadline.wait(receive())
                if message["type"] == "http.disconnect":
                    return None
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"body exceeds the limit of {limit} bytes")
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
        pending: list[Message] = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay() -> Message:
            if pending:
                return pending.pop()
            return await receive()

        return replay


class _Deadline:
    """Cancels the awaits of the current task after ``seconds``, turning that into ``RequestTimeout``.

    ``asyncio.timeout`` does this from Python 3.11 on; this also runs on 3.10. One timer per request,
    no task per await.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.expired = False
        self._handle: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[Any] | None = None

    def __enter__(self) -> _Deadline:
        self._task = asyncio.current_task()
        self._handle = asyncio.get_running_loop().call_later(self.seconds, self._expire)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.cancel()

    def _expire(self) -> None:
        self.expired = True
        if self._task is not None:
            self._task.cancel()

    async def wait(self, awaitable: Awaitable[Message]) -> Message:
        try:
            return await awaitable
        except asyncio.CancelledError:
            if not self.expired:
                raise
            uncancel = getattr(self._task, "uncancel", None)
            if uncancel is not None:  # Python 3.11+: this cancellation is handled, not pending
                uncancel()
            raise RequestTimeout(
                f"the request body did not arrive within {self.seconds:g} s (--body-timeout)"
            ) from None

"""``serve(engine, settings)``: run the app under uvicorn until SIGTERM/SIGINT, then drain and close.

On SIGTERM: readiness turns 503 at once, the listening socket closes, requests in flight finish (up to
``settings.drain_seconds``; those still running then are answered 503 by the guard), then the engine is
closed (finishing its own queued work) and the process exits. uvicorn re-raises the captured signal after
a graceful shutdown, so the process ends as "terminated by SIGTERM", which supervisors expect.

Slow clients: uvicorn has no header timeout, so the HTTP protocol here adds one (``header_timeout``: 408
and close), and a cap on open connections (``max_connections``: 503 in the protocol's error format, where
uvicorn's own ``limit_concurrency`` answers plain text). The body timeout is the guard's
(``ptmserve.server.middleware``); idle keep-alive connections close after ``keep_alive_timeout``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ptmserve.errors import NotReady, RequestTimeout
from ptmserve.protocol.errors import error_body, error_kind
from ptmserve.server.app import create_app
from ptmserve.server.dataplane import DataPlane, EngineLike
from ptmserve.server.errors import error_response
from ptmserve.server.settings import ServerSettings

logger = logging.getLogger(__name__)


class _DrainingServer(uvicorn.Server):
    """A uvicorn server that marks the app as draining as soon as a shutdown signal arrives."""

    def __init__(self, config: uvicorn.Config, plane: DataPlane) -> None:
        super().__init__(config)
        self.plane = plane

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.plane.draining = True
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.plane.draining = True  # also when stopped through ``should_exit`` rather than a signal
        await super().shutdown(sockets)


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header timeout and a cap on open connections.

    ``build_server`` makes a subclass with ``header_timeout`` and ``max_connections`` set from the settings.
    """

    header_timeout: float = 10.0
    max_connections: int = 1000

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._header_timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm_header_timer()  # a connection that never sends a request is closed too

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm_header_timer()

    def on_headers_complete(self) -> None:
        self._disarm_header_timer()
        if len(self.connections) <= self.max_connections:
            super().on_headers_complete()
            return
        app, self.app = self.app, _over_capacity(self.max_connections)  # this request only
        try:
            super().on_headers_complete()
        finally:
            self.app = app

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._on_header_timeout)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _on_header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False  # a response is being sent: close after it instead
            return
        exc = RequestTimeout(f"the request headers did not arrive within {self.header_timeout:g} s")
        body = error_body(error_kind(exc), exc.message, "/")
        head = (
            "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
        )
        self.transport.write(head.encode("ascii") + body)
        self.transport.close()


def _over_capacity(limit: int) -> Any:
    """An ASGI app answering 503 in the protocol's error format: the server holds too many connections."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        busy = NotReady(f"the server has its maximum of {limit} open connections (--max-connections)")
        response = error_response(busy, scope["path"], {"Connection": "close", "Retry-After": "1"})
        await response(scope, receive, send)

    return app


def protocol_class(settings: ServerSettings) -> type[GuardedHttpProtocol]:
    """The HTTP protocol class for uvicorn, with the header timeout and connection cap of ``settings``."""
    attrs = {"header_timeout": settings.header_timeout, "max_connections": settings.max_connections}
    return type("ServerHttpProtocol", (GuardedHttpProtocol,), attrs)


def build_server(engine: EngineLike, settings: ServerSettings, *, owns_engine: bool = True) -> uvicorn.Server:
    """A configured (not yet started) uvicorn server for ``engine``."""
    app = create_app(engine, settings, owns_engine=owns_engine)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        lifespan="on",
        http=protocol_class(settings),
        timeout_keep_alive=settings.keep_alive_timeout,  # type: ignore[arg-type]  # a float works
        timeout_graceful_shutdown=max(settings.drain_seconds, 0.1),
        access_log=False,
    )
    return _DrainingServer(config, app.state.plane)


def serve(engine: EngineLike, settings: ServerSettings) -> None:
    """Serve ``engine`` over HTTP until a shutdown signal; closes the engine after draining.

    Blocks. In the main thread it handles SIGTERM and SIGINT; elsewhere, stop it by setting
    ``should_exit`` on a server from ``build_server`` instead.
    """
    if not settings.is_loopback:
        logger.warning(
            "listening on %s: reachable from other machines%s",
            settings.host,
            "" if settings.api_key else " WITHOUT an API key (--api-key)",
        )
    if threading.current_thread() is not threading.main_thread():
        logger.warning("serve() outside the main thread: signals will not stop it")
    logger.info("serving on http://%s:%d", settings.host, settings.port)
    build_server(engine, settings, owns_engine=True).run()

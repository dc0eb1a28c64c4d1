"""``serve(engine, settings)``: run the app under uvicorn until SIGTERM/SIGINT, then drain and close.

On SIGTERM: readiness turns 503 at once, the listening socket closes, requests in flight finish (up to
``settings.drain_seconds``), then the engine is closed (finishing its own queued work) and the process
exits. uvicorn re-raises the captured signal after a graceful shutdown, so the process ends as
"terminated by SIGTERM", which supervisors expect.
"""

from __future__ import annotations

import logging
import threading
from types import FrameType

import uvicorn

from ptmserve.server.app import create_app
from ptmserve.server.dataplane import DataPlane, EngineLike
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


def build_server(engine: EngineLike, settings: ServerSettings, *, owns_engine: bool = True) -> uvicorn.Server:
    """A configured (not yet started) uvicorn server for ``engine``."""
    app = create_app(engine, settings, owns_engine=owns_engine)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        lifespan="on",
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

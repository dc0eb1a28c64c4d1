"""``ptmserve serve --ray``: start a local Ray instance (or join a cluster), run the application, and
serve until SIGTERM or Ctrl-C; then delete the application and, for a local instance, stop Ray.

A local instance is bounded for a shared machine: the CPUs this process may use, an object store of
``OBJECT_STORE_BYTES`` (requests and answers are small; weights never cross it) and no dashboard.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

from ptmserve.ray.application import RayAppConfig, build

logger = logging.getLogger(__name__)

OBJECT_STORE_BYTES = 512 * 1024**2


def cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def start_ray(address: str | None) -> None:
    """Join the cluster at ``address`` ("auto": the one this machine belongs to), or with None start a
    bounded local instance."""
    import ray

    if address is not None:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
        return
    ray.init(
        num_cpus=cores(),
        object_store_memory=OBJECT_STORE_BYTES,
        include_dashboard=False,
        log_to_driver=False,
    )


def serve_ray(config: RayAppConfig, address: str | None = None) -> None:
    """Run the application on Ray Serve, listening on ``config.server``'s host and port, until a
    shutdown signal (blocks; call from the main thread)."""
    import ray
    from ray import serve

    if not config.server.is_loopback:
        logger.warning(
            "listening on %s: reachable from other machines%s",
            config.server.host,
            "" if config.server.api_key else " WITHOUT an API key (--api-key)",
        )
    stop = threading.Event()
    start_ray(address)
    for sig in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which installs handlers of its own
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": config.server.host, "port": config.server.port})
        serve.run(build(config), name=config.name, route_prefix="/", blocking=False)
        logger.info(
            "serving on http://%s:%d with %d engine replicas on Ray (%s)",
            *(config.server.host, config.server.port, config.replicas, address or "a local instance"),
        )
        stop.wait()
        logger.info("shutting down")
    finally:
        try:
            if address is None:
                serve.shutdown()
            else:
                serve.delete(config.name)
        finally:
            ray.shutdown()

"""ptmserve on Ray Serve: engine replicas routed by where each model's weights are (docs/cluster.md).

``serve run ptmserve.ray:app [repo=DIR replicas=N ...]`` or ``ptmserve serve --ray``. Needs the ``ray``
extra (``pip install 'ptmserve[ray]'``). The names below are imported on first use, so that the pure
parts (``ptmserve.ray.ranking``) import without Ray.
"""

from __future__ import annotations

from typing import Any

__all__ = ["RayAppConfig", "app", "build", "config_from"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from ptmserve.ray import application as module

        return getattr(module, name)
    raise AttributeError(f"module 'ptmserve.ray' has no attribute {name!r}")

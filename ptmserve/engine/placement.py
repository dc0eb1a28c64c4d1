"""The engine's placement: which load groups of each model stay in the host tier (``--placement``).

``Placement(manifest)`` is what the weight manager and the catalog ask. Under ``auto`` it places by the
model's stored profile (``memory/placement.py`` has the rule). A model without a usable profile is
placed like ``host-embeddings`` meanwhile and, once it has been loaded (only models in use are
profiled), profiled on a background thread with the quick profile (half a second for MiniLM on 2
cores, 6 s for SmolLM2), as soon as the engine has nothing to do (or after ``IDLE_WAIT_S``). The
profile is stored in the repository, so later servers start with it; the new placement applies from
the model's next load.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

import torch

from ptmserve.engine.profiling import ensure_profile, manifest_weights_id, stored_profile
from ptmserve.errors import PtmError
from ptmserve.memory.placement import AUTO, DEVICE, ModelProfile, host_groups
from ptmserve.store.manifest import ModelManifest, dtype_name
from ptmserve.store.repository import Repository

logger = logging.getLogger(__name__)

IDLE_WAIT_S = 30.0  # a profile waits this long at most for the engine to have nothing to do


class Placement:
    """Host-placed groups per model under one ``--placement`` mode; thread-safe.

    Args:
        profile_missing: under ``auto``, profile models without a profile on a background thread.
        idle: whether the engine has nothing to do now; a profile waits for that (at most
            ``IDLE_WAIT_S``), so that it takes little from requests being served.
    """

    def __init__(
        self,
        repo: Repository,
        mode: str,
        device: torch.device,
        dtype: torch.dtype,
        *,
        profile_missing: bool = True,
        idle: Callable[[], bool] = lambda: True,
    ) -> None:
        self._idle = idle
        self.mode = mode
        self._repo = repo
        self._device = device
        self._dtype = dtype
        self._profile_missing = profile_missing and mode == AUTO
        self._lock = threading.Lock()
        self._profiles: dict[str, tuple[ModelManifest, ModelProfile | None]] = {}
        self._queued: set[str] = set()
        self._todo: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.profiled: list[str] = []  # models this engine profiled, in order

    def __call__(self, manifest: ModelManifest) -> frozenset[str]:
        """The host-placed groups of ``manifest``'s model (the weight manager and the catalog ask)."""
        if self.mode == DEVICE:
            return frozenset()
        profile = self.profile(manifest) if self.mode == AUTO else None
        return host_groups(self.mode, manifest.group_names(), profile)

    def loaded(self, model: str) -> None:
        """``model`` was loaded onto the device: under ``auto``, profile it if it has no profile yet (only
        the models that are used get profiled). Quick; any thread."""
        if not self._profile_missing:
            return
        with self._lock:
            cached = self._profiles.get(model)
        if cached is None or cached[1] is None:
            self._enqueue(model)

    def profile(self, manifest: ModelManifest) -> ModelProfile | None:
        """The stored profile of ``manifest``'s weights on this device and dtype, or None."""
        with self._lock:
            cached = self._profiles.get(manifest.name)
        if cached is not None and cached[0] is manifest:
            return cached[1]
        found = self._read(manifest)
        with self._lock:
            self._profiles[manifest.name] = (manifest, found)
        return found

    def close(self) -> None:
        """Stop the background profiler after the model it is profiling, if any."""
        if self._thread is not None:
            self._todo.put(None)
            self._thread.join(timeout=30)

    def _read(self, manifest: ModelManifest) -> ModelProfile | None:
        try:
            found = stored_profile(self._repo, manifest.name)
        except PtmError as exc:
            logger.warning("model %s: ignoring its stored profile: %s", manifest.name, exc.message)
            return None
        wanted = (manifest_weights_id(manifest), self._device.type, dtype_name(self._dtype))
        return found if found is not None and found.matches(*wanted) else None

    def _enqueue(self, name: str) -> None:
        with self._lock:
            if name in self._queued:
                return
            self._queued.add(name)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._profile_queued, name="ptmserve-profile", daemon=True
                )
                self._thread.start()
        self._todo.put(name)

    def _wait_until_idle(self) -> None:
        deadline = time.monotonic() + IDLE_WAIT_S
        while not self._idle() and time.monotonic() < deadline:
            time.sleep(0.05)

    def _profile_queued(self) -> None:
        while (name := self._todo.get()) is not None:
            self._wait_until_idle()
            try:
                manifest = self._repo.manifest(name)
                profile = ensure_profile(self._repo, name, device=self._device, dtype=self._dtype)
            except PtmError as exc:
                logger.warning("could not profile model %s: %s", name, exc.message)
                continue
            except Exception:  # a bug must not end profiling for the other models
                logger.exception("could not profile model %s", name)
                continue
            with self._lock:
                self._profiles[name] = (manifest, profile)
                self.profiled.append(name)
            placed = sorted(host_groups(AUTO, manifest.group_names(), profile))
            logger.info("profiled model %s: groups on the host: %s", name, ", ".join(placed) or "none")

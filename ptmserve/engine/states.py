"""Which models may take requests now: one answer for the engine and for the worker pool's front end.

A model is READY unless its manifest is damaged, it failed (a budget it can never fit, a load that
failed), an explicit load of it is in progress (LOADING), or explicit model control has not loaded it.
``ModelStates`` keeps the explicit-control bookkeeping and answers ``state``/``info`` and the checks a
request passes before it is prepared.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable

from ptmserve.engine.api import ModelInfo, ModelKind, ModelState
from ptmserve.engine.catalog import CatalogEntry, ModelCatalog
from ptmserve.errors import InvalidInput, NotReady, PtmError
from ptmserve.models.exits import exits_of

NOT_LOADED = "not loaded (explicit model control)"


class ModelStates:
    """The state of every model of ``catalog`` under ``model_control`` ("auto" or "explicit"); thread-safe.

    Args:
        unavailable: another reason a model cannot serve now, or None (the pool asks its workers).
    """

    def __init__(
        self,
        catalog: ModelCatalog,
        model_control: str,
        unavailable: Callable[[str], str | None] = lambda name: None,
    ) -> None:
        self.catalog = catalog
        self.model_control = model_control
        self._unavailable = unavailable
        self._lock = threading.Lock()
        self._loaded: set[str] = set()  # under explicit control: the models loaded through the API
        self._loading: set[str] = set()  # explicit loads in progress
        self._failed: dict[str, str] = {}  # model -> why it cannot serve (budget, failed load)
        self.accepting = True  # False once closing: every request is refused

    def state(self, name: str) -> tuple[ModelState, str]:
        """``name``'s state and, unless READY, why."""
        damage = self.catalog.damage(name)
        if damage is not None:
            return ModelState.UNAVAILABLE, damage
        with self._lock:
            if name in self._loading:
                return ModelState.LOADING, "an explicit load is in progress"
            if name in self._failed:
                return ModelState.UNAVAILABLE, self._failed[name]
            if self.model_control == "explicit" and name not in self._loaded:
                return ModelState.UNAVAILABLE, NOT_LOADED
        reason = self._unavailable(name)
        if reason is not None:
            return ModelState.UNAVAILABLE, reason
        return ModelState.READY, ""

    def info(self, name: str) -> ModelInfo:
        """What clients see of ``name``. Raises ModelNotFound (InvalidInput for a malformed name)."""
        state, reason = self.state(name)
        info = self.catalog.info(name, state, reason)
        if info.kind is not ModelKind.CLASSIFIER:
            return info
        exits = tuple(e.layer for e in exits_of(self.catalog.entry(name).config))
        return dataclasses.replace(info, exits=exits) if exits else info

    def servable(self, name: str) -> bool:
        """Whether ``name`` may run or be prefetched now (the runner asks before touching its weights)."""
        with self._lock:
            if name in self._failed:
                return False
            return self.model_control != "explicit" or name in self._loaded or name in self._loading

    def ready_entry(self, name: str) -> CatalogEntry:
        """The catalog entry of ``name`` if it can take requests now.

        Raises:
            NotReady (closing, or the model is not READY), ModelNotFound, CorruptData, InvalidInput (a
            malformed name).
        """
        if not self.accepting:
            raise NotReady("the server is shutting down")
        state, reason = self.state(name)  # also rejects a malformed name
        entry = self.catalog.entry(name)
        if state is not ModelState.READY:
            raise NotReady(f"model {name!r} is not ready: {reason}")
        return entry

    def generator(self, name: str) -> CatalogEntry:
        """``ready_entry`` of a text generation model (InvalidInput for any other)."""
        entry = self.ready_entry(name)
        if not entry.generates:
            raise InvalidInput(f"model {name!r} does not generate text; use embeddings or infer")
        return entry

    def load(self, name: str, load_now: Callable[[], None]) -> None:
        """Run ``load_now`` as ``name``'s explicit load: LOADING meanwhile, then loaded (it serves under
        explicit control), or failed with the reason (re-raised)."""
        self.catalog.refresh(force=True)
        self.catalog.entry(name)
        with self._lock:
            self._loading.add(name)
        try:
            load_now()
        except Exception as exc:
            self.fail(name, exc.message if isinstance(exc, PtmError) else str(exc))
            raise
        finally:
            with self._lock:
                self._loading.discard(name)
        with self._lock:
            self._failed.pop(name, None)
            self._loaded.add(name)

    def unload(self, name: str) -> None:
        """``name`` stops serving under explicit control (ModelNotFound if there is no such model)."""
        self.catalog.entry(name)
        with self._lock:
            self._loaded.discard(name)

    def fail(self, name: str, reason: str) -> None:
        """``name`` cannot serve, because of ``reason``, until an explicit load succeeds."""
        with self._lock:
            self._failed[name] = reason

    def loaded(self) -> list[str]:
        """The models loaded (or loading) through the API, sorted."""
        with self._lock:
            return sorted(self._loaded | self._loading)

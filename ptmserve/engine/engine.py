"""The engine: the protocol-neutral API the server and Python users call.

Callers tokenize in their own thread and post a request to the worker, which owns the scheduler and
the weight tiers; they wait on a future. ``embed``/``classify`` are synchronous; ``aembed``/
``aclassify`` are their asyncio twins, and cancelling the awaiting task cancels the queued work.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from ptmserve.engine.api import (
    ClassifyResult,
    EmbedResult,
    InferenceOptions,
    ModelInfo,
    ModelState,
    TierUsage,
)
from ptmserve.engine.catalog import ModelCatalog
from ptmserve.engine.device import dtype_name, resolve_device, resolve_dtype
from ptmserve.engine.metrics import EngineMetrics
from ptmserve.engine.requests import ClassDefaults, Request, deadline_from, request_class
from ptmserve.engine.scheduler import Scheduler, SchedulerLimits
from ptmserve.engine.worker import Work, Worker
from ptmserve.errors import InvalidConfig, InvalidInput, NotReady, PtmError
from ptmserve.memory.manager import WeightManager
from ptmserve.memory.sizes import parse_size
from ptmserve.store.repository import Repository

logger = logging.getLogger(__name__)

Inputs = Sequence[str] | Sequence[Sequence[int]]


@dataclass(frozen=True, slots=True)
class EngineSettings:
    """How one engine runs. Sizes accept bytes or strings such as ``"512MiB"``."""

    device: str = "cpu"
    dtype: str = "auto"  # auto: bfloat16 where the device has bf16 matrix units, else float32
    host_memory: int | str = "8GiB"  # byte budget of the host weight tier
    device_memory: int | str = "2GiB"  # byte budget of the device weight tier
    policy: str = "fastptm"  # fastptm | fifo-lru | edf-lru
    model_control: str = "auto"  # auto: every model loads on demand; explicit: only loaded ones serve
    pipelined: bool = True  # a cold model computes layer i while layer i+1 loads
    truncate: bool = True  # inputs longer than the model's maximum are truncated (else refused)
    max_batch_requests: int = 64
    max_batch_tokens: int = 8192
    max_queue: int = 1024  # per model and class; a full queue rejects with Overloaded
    realtime_timeout_s: float = 10.0  # deadline of a real-time request sent without a timeout
    batch_timeout_s: float = 300.0  # deadline of a batch request sent without a timeout
    verify: bool = True  # check tensors against their checksum when read from disk
    zero_copy: bool = False  # CPU only: compute straight from the host tier (no separate device copy)

    def __post_init__(self) -> None:
        if self.model_control not in ("auto", "explicit"):
            raise InvalidConfig(f"model_control must be 'auto' or 'explicit', got {self.model_control!r}")
        for name in ("realtime_timeout_s", "batch_timeout_s"):
            if getattr(self, name) <= 0:
                raise InvalidConfig(f"{name} must be > 0, got {getattr(self, name)!r}")
        parse_size(self.host_memory)
        parse_size(self.device_memory)


class Engine:
    """Serves every model of a repository under the tiers' byte budgets."""

    def __init__(self, repo: Repository, settings: EngineSettings = EngineSettings()) -> None:
        self.repo = repo
        self.settings = settings
        self.device = resolve_device(settings.device)
        self.dtype = resolve_dtype(settings.dtype, self.device)
        self.metrics = EngineMetrics()
        self.catalog = ModelCatalog(repo, dtype_name(self.dtype), truncate=settings.truncate)
        self._defaults = ClassDefaults(
            realtime_timeout_s=settings.realtime_timeout_s, batch_timeout_s=settings.batch_timeout_s
        )
        self._scheduler = Scheduler(
            settings.policy,
            limits=SchedulerLimits(
                max_batch_requests=settings.max_batch_requests,
                max_batch_tokens=settings.max_batch_tokens,
                max_queue_per_model_class=settings.max_queue,
            ),
        )
        self.weights = WeightManager(
            repo,
            device=self.device,
            dtype=self.dtype,
            host_budget=settings.host_memory,
            device_budget=settings.device_memory,
            pipelined=settings.pipelined,
            verify=settings.verify,
            zero_copy=settings.zero_copy,
        )
        self._worker = Worker(self._scheduler, self.weights, self.catalog, self.metrics, self.device)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._loaded: set[str] = set()  # under explicit control: the models loaded through the API
        self._failed: dict[str, str] = {}  # model -> why its last explicit load failed
        self._accepting = True
        self._refuse_oversized()
        for tier in (stats := self.weights.stats()).host, stats.device:
            self.metrics.budget_bytes.labels(tier.name).set(tier.budget_bytes)
        logger.info(
            "engine on %s computing in %s, policy %s, device budget %s, host budget %s",
            *(
                self.device,
                dtype_name(self.dtype),
                settings.policy,
                settings.device_memory,
                settings.host_memory,
            ),
        )

    def _refuse_oversized(self) -> None:
        """Mark every model that can never fit a tier's budget as unavailable, with the reason."""
        for name in self.catalog.names():
            try:
                self.weights.check_budget(name)
            except PtmError as exc:
                logger.error("model %s cannot be served: %s", name, exc.message)
                self._failed[name] = exc.message

    @classmethod
    def open(cls, repo_dir: str | Path = "models", **settings: object) -> Engine:
        """An engine over the repository at ``repo_dir`` (created if missing)."""
        return cls(Repository(Path(repo_dir)), EngineSettings(**settings))  # type: ignore[arg-type]

    # -- models ---------------------------------------------------------------------------------------

    def models(self) -> list[ModelInfo]:
        return [self.model_info(name) for name in self.catalog.names()]

    def model_info(self, name: str) -> ModelInfo:
        """Raises ModelNotFound (InvalidInput for a malformed name)."""
        state, reason = self._state(name)
        return self.catalog.info(name, state, reason)

    def _state(self, name: str) -> tuple[ModelState, str]:
        with self._lock:
            if name in self._failed:
                return ModelState.UNAVAILABLE, self._failed[name]
            if self.settings.model_control == "explicit" and name not in self._loaded:
                return ModelState.UNAVAILABLE, "not loaded (explicit model control)"
        return ModelState.READY, ""

    def load(self, name: str) -> None:
        """Make ``name`` serve (under explicit control) and bring its weights onto the device now.

        Raises:
            ModelNotFound; CorruptData or NotReady when its weights cannot be loaded.
        """
        self.catalog.forget(name)
        self.catalog.entry(name)

        def load_now() -> None:
            with self.weights.acquire(name) as loaded:
                loaded.wait()

        try:
            self._worker.control(load_now).result()
        except Exception as exc:
            with self._lock:
                self._failed[name] = str(exc)
            raise
        with self._lock:
            self._failed.pop(name, None)
            self._loaded.add(name)

    def unload(self, name: str) -> None:
        """Stop serving ``name`` (under explicit control) and free its device and host bytes."""
        self.catalog.entry(name)
        with self._lock:
            self._loaded.discard(name)
        self._worker.control(lambda: self.weights.evict(name, host=True)).result()

    def warm_up(self) -> None:
        """Load the first servable model and run one request through it, so that the first client does
        not pay for the load and the kernels' first-call set-up. Does nothing for an empty repository."""
        for info in self.models():
            if info.state is ModelState.READY:
                self.embed(info.name, ["warm up"], InferenceOptions(priority=2, timeout_us=300_000_000))
                logger.info("warmed up %s", info.name)
                return

    def ready(self) -> bool:
        return self._accepting

    def tiers(self) -> list[TierUsage]:
        stats = self.weights.stats()
        return [
            TierUsage(t.name, t.used_bytes, t.budget_bytes, dict(t.per_model))
            for t in (stats.host, stats.device)
        ]

    # -- inference ------------------------------------------------------------------------------------

    def embed(
        self, model: str, inputs: Inputs, options: InferenceOptions = InferenceOptions()
    ) -> EmbedResult:
        """Pooled embeddings of ``inputs`` (texts, or token-id lists used as given), one row per input.

        Raises:
            InvalidInput, ModelNotFound, Overloaded, DeadlineExceeded, NotReady, CorruptData.
        """
        return self._submit(model, inputs, options, classify=False).result()

    def classify(
        self, model: str, inputs: Inputs, options: InferenceOptions = InferenceOptions()
    ) -> ClassifyResult:
        """Logits and the argmax label of each input; the model needs a classification head."""
        return self._submit(model, inputs, options, classify=True).result()

    async def aembed(
        self, model: str, inputs: Inputs, options: InferenceOptions = InferenceOptions()
    ) -> EmbedResult:
        return await asyncio.wrap_future(self._submit(model, inputs, options, classify=False))

    async def aclassify(
        self, model: str, inputs: Inputs, options: InferenceOptions = InferenceOptions()
    ) -> ClassifyResult:
        return await asyncio.wrap_future(self._submit(model, inputs, options, classify=True))

    def _submit(self, model: str, inputs: Inputs, options: InferenceOptions, *, classify: bool) -> Future:
        if not self._accepting:
            raise NotReady("the server is shutting down")
        state, reason = self._state(model)  # also rejects a malformed name
        entry = self.catalog.entry(model)  # raises ModelNotFound
        if state is not ModelState.READY:
            raise NotReady(f"model {model!r} is not ready: {reason}")
        if classify and not entry.config.labels:
            raise InvalidInput(f"model {model!r} has no classification head; use embeddings")
        token_ids = self.catalog.tokenize(model, inputs)
        cls = request_class(options.priority, self._defaults.default_class)
        now = self._scheduler.clock()
        work = Work(token_ids, classify)
        request = Request(
            id=next(self._ids),
            model=model,
            cls=cls,
            arrival=now,
            deadline=deadline_from(options.timeout_us, cls, now, self._defaults),
            tokens=sum(len(x) for x in token_ids),
            payload=work,
        )
        self._worker.submit(request)
        return work.future

    # -- lifecycle ------------------------------------------------------------------------------------

    def close(self, drain_seconds: float = 30.0) -> None:
        """Stop accepting requests, finish those in flight (up to ``drain_seconds``), free the tiers."""
        if not self._accepting:
            return
        self._accepting = False
        if not self._worker.stop(drain_seconds):
            logger.warning("requests still running after %.1f s of draining", drain_seconds)
        self.weights.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

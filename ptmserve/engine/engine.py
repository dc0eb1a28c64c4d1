"""The engine: the protocol-neutral API the server and Python users call.

A request is prepared (validated and tokenized) on the caller's thread, or for ``aembed``/``aclassify``
on a small thread pool, never on the event loop; then it is admitted to the scheduler at once (a full
queue raises ``Overloaded`` then and there) and the caller waits on a future. The worker
(``worker.py``) runs the steps; cancelling the awaiting task cancels the request and frees its slot.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ptmserve.engine.api import (
    ClassifyResult,
    EmbedResult,
    Generation,
    GenerationParams,
    InferenceOptions,
    ModelInfo,
    ModelKind,
    ModelState,
    TierUsage,
)
from ptmserve.engine.catalog import ModelCatalog
from ptmserve.engine.device import resolve_device, resolve_dtype
from ptmserve.engine.generation import GenerationRunner, GenerationWork
from ptmserve.engine.metrics import EngineMetrics
from ptmserve.engine.placement import Placement
from ptmserve.engine.prepare import chat_ids, cheap_to_prepare, encoder_ids, prompt_ids
from ptmserve.engine.requests import (
    DEFAULT_BATCH_TIMEOUT_S,
    DEFAULT_REALTIME_TIMEOUT_S,
    ClassDefaults,
    Request,
    deadline_from,
    request_class,
)
from ptmserve.engine.runner import ModelRunner, Work
from ptmserve.engine.scheduler import Scheduler, SchedulerLimits
from ptmserve.engine.states import ModelStates
from ptmserve.engine.worker import Worker
from ptmserve.errors import BudgetExceeded, InvalidConfig, InvalidInput, NotReady, PtmError
from ptmserve.memory.manager import WeightManager
from ptmserve.memory.placement import PLACEMENTS
from ptmserve.memory.policy import RankedPolicy
from ptmserve.memory.records import MemoryEvent
from ptmserve.memory.sizes import parse_size
from ptmserve.models.sampling import SamplingParams
from ptmserve.models.tokenizer import check_ids
from ptmserve.store.manifest import dtype_name
from ptmserve.store.repository import Repository

logger = logging.getLogger(__name__)

Inputs = Sequence[str] | Sequence[Sequence[int]]
_FLOATING = ("float32", "bfloat16", "float16")
KV_TIER = "kv"  # the KV cache's name among the tiers (metrics, ``tiers()``)


@dataclass(frozen=True, slots=True)
class EngineSettings:
    """How one engine runs. Sizes accept bytes or strings such as ``"512MiB"``."""

    device: str = "cpu"
    dtype: str = "auto"  # auto: bfloat16 where the device has bf16 matrix units, else float32
    host_memory: int | str = "8GiB"  # byte budget of the host weight tier
    device_memory: int | str = "2GiB"  # byte budget of the device weight tier
    policy: str = "fastptm"  # fastptm | fifo-lru | edf-lru | fifo-naive
    model_control: str = "auto"  # auto: every model loads on demand; explicit: only loaded ones serve
    pipelined: bool = True  # a cold model computes layer i while layer i+1 loads
    truncate: bool = True  # inputs longer than the model's maximum are truncated (else refused)
    max_batch_requests: int = 64
    max_batch_tokens: int = 8192  # tokens in one step; a longer prompt is prefilled in chunks
    kv_cache_memory: int | str = "1GiB"  # byte budget of the generation models' KV cache
    kv_block_size: int = 16  # token slots per KV cache block
    max_queue: int = 1024  # per model and class; a full queue rejects with Overloaded
    realtime_timeout_s: float = DEFAULT_REALTIME_TIMEOUT_S  # a real-time request sent without timeout
    batch_timeout_s: float = DEFAULT_BATCH_TIMEOUT_S  # a batch request sent without a timeout
    verify: bool = True  # check tensors against their checksum when read from disk
    zero_copy: bool = False  # CPU only: compute straight from the host tier (no separate device copy)
    placement: str = "device"  # auto | device | host-embeddings: load groups left in the host tier
    # a folder on a tmpfs (such as /dev/shm/ptmserve-1234) holding the host tier, so that several engine
    # processes map the same weight bytes; None: the host tier is this process's own memory
    shared_memory: str | None = None

    def __post_init__(self) -> None:
        if self.model_control not in ("auto", "explicit"):
            raise InvalidConfig(f"model_control must be 'auto' or 'explicit', got {self.model_control!r}")
        for name in ("realtime_timeout_s", "batch_timeout_s"):
            if getattr(self, name) <= 0:
                raise InvalidConfig(f"{name} must be > 0, got {getattr(self, name)!r}")
        parse_size(self.host_memory)
        parse_size(self.device_memory)
        parse_size(self.kv_cache_memory)
        if self.placement not in PLACEMENTS:
            raise InvalidConfig(f"placement must be one of {', '.join(PLACEMENTS)}, got {self.placement!r}")
        if self.kv_block_size < 1:
            raise InvalidConfig(f"kv_block_size must be >= 1, got {self.kv_block_size}")


class Engine:
    """Serves every model of a repository under the tiers' byte budgets.

    Raises:
        InvalidConfig: a setting is out of range, or (with ``zero_copy``) a model is stored in another
            dtype than the one the engine computes in.
    """

    def __init__(self, repo: Repository, settings: EngineSettings = EngineSettings()) -> None:
        self.repo = repo
        self.settings = settings
        self.device = resolve_device(settings.device)
        self.dtype = resolve_dtype(settings.dtype, self.device)
        self.metrics = EngineMetrics()
        self.placement = Placement(
            repo, settings.placement, self.device, self.dtype, idle=lambda: not self._scheduler.pending()
        )
        self.catalog = ModelCatalog(
            repo, dtype_name(self.dtype), truncate=settings.truncate, placement=self.placement
        )
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
        self._ids = itertools.count(1)
        self.states = ModelStates(self.catalog, settings.model_control)
        self._refuse_zero_copy_mismatch()
        eviction = RankedPolicy()  # the weight manager evicts in the scheduler's order
        self.weights = WeightManager(
            repo,
            policy=eviction,
            device=self.device,
            dtype=self.dtype,
            host_budget=settings.host_memory,
            device_budget=settings.device_memory,
            pipelined=settings.pipelined,
            verify=settings.verify,
            zero_copy=settings.zero_copy,
            placement=self.placement,
            shared_memory=settings.shared_memory,
        )
        self.weights.add_listener(self._on_load)
        self.generation = GenerationRunner(
            parse_size(settings.kv_cache_memory),
            settings.kv_block_size,
            self.device,
            self.dtype,
            clock=self._scheduler.clock,
        )
        self._runner = ModelRunner(
            self.weights, self.catalog, self.device, self.generation, servable=self.states.servable
        )
        self._worker = Worker(
            self._scheduler, self._runner, self.weights, self.catalog, self.metrics, eviction=eviction
        )
        self._preparers = ThreadPoolExecutor(2, thread_name_prefix="ptmserve-prepare")
        self._refuse_oversized()
        for tier in (stats := self.weights.stats()).host, stats.device:
            self.metrics.budget_bytes.labels(tier.name).set(tier.budget_bytes)
        self.metrics.budget_bytes.labels(KV_TIER).set(self.generation.budget_bytes)
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

    def _on_load(self, event: MemoryEvent) -> None:
        if event.kind == "load" and event.tier == "device":
            self.placement.loaded(event.model)

    def _refuse_zero_copy_mismatch(self) -> None:
        """Zero-copy computes in the stored dtype: a model stored otherwise is a configuration error."""
        if not self.settings.zero_copy:
            return
        serve = dtype_name(self.dtype)
        wrong = []
        for name in self.catalog.names():
            try:
                stored = self.catalog.entry(name).manifest.dtype
            except PtmError:
                continue  # damaged: reported as unavailable
            if stored in _FLOATING and stored != serve:
                wrong.append(f"{name} ({stored})")
        if wrong:
            raise InvalidConfig(
                f"--zero-copy computes in the stored dtype, but the serve dtype is {serve} and these models "
                f"are stored otherwise: {', '.join(wrong)}; pass --dtype to match them or re-import them"
            )

    def _refuse_oversized(self) -> None:
        """Mark every model that can never fit a tier's budget, or cannot be read, as unavailable."""
        for name in self.catalog.names():
            try:
                self.catalog.entry(name)
                self.weights.check_budget(name)
            except PtmError as exc:
                logger.error("model %s cannot be served: %s", name, exc.message)
                self.states.fail(name, exc.message)

    @classmethod
    def open(cls, repo_dir: str | Path = "models", **settings: object) -> Engine:
        """An engine over the repository at ``repo_dir`` (created if missing)."""
        return cls(Repository(Path(repo_dir)), EngineSettings(**settings))  # type: ignore[arg-type]

    # -- models ---------------------------------------------------------------------------------------

    def models(self) -> list[ModelInfo]:
        """Every model in the repository; damaged ones are UNAVAILABLE with the reason."""
        return [self.model_info(name) for name in self.catalog.names()]

    def model_info(self, name: str) -> ModelInfo:
        """Raises ModelNotFound (InvalidInput for a malformed name)."""
        return self.states.info(name)

    def load(self, name: str) -> None:
        """Make ``name`` serve (under explicit control) and bring its weights onto the device now.
        Its state is LOADING meanwhile.

        Raises:
            ModelNotFound; CorruptData or NotReady when its weights cannot be loaded.
        """

        def load_now() -> None:
            self.weights.check_budget(name)
            with self.weights.acquire(name) as loaded:
                loaded.wait()

        self.states.load(name, lambda: self._worker.control(load_now).result())

    def unload(self, name: str) -> None:
        """Stop serving ``name`` (under explicit control): its queued requests fail with NotReady, and its
        device and host bytes are freed. It stays unloaded: nothing reloads or prefetches it."""
        self.states.unload(name)
        if self.settings.model_control == "explicit":
            self._worker.drop(name, NotReady(f"model {name!r} was unloaded"))
        self._worker.control(lambda: self.weights.evict(name, host=True)).result()

    def warm_up(self) -> None:
        """Load the first servable model and run one request through it, so that the first client does
        not pay for the load and the kernels' first-call set-up. A model that fails is marked unavailable
        with the reason and the next one is tried; an empty repository does nothing."""
        for info in self.models():
            if info.state is not ModelState.READY or info.kind is ModelKind.GENERATOR:
                continue
            try:
                self.embed(info.name, ["warm up"], InferenceOptions(priority=2, timeout_us=300_000_000))
            except PtmError as exc:
                logger.error("model %s cannot be served: %s", info.name, exc.message)
                self.states.fail(info.name, exc.message)
                continue
            logger.info("warmed up %s", info.name)
            return

    def ready(self) -> bool:
        """True while the engine accepts requests and its step loop runs."""
        return self.unready_reason() is None

    def unready_reason(self) -> str | None:
        """Why the engine cannot take requests now (for the readiness probe), or None when it can."""
        if not self.states.accepting:
            return "the engine is shutting down"
        if not self._worker.alive():
            return self._worker.failure or "the step loop is not running"
        return None

    def tiers(self) -> list[TierUsage]:
        stats = self.weights.stats()
        tiers = [
            TierUsage(t.name, t.used_bytes, t.budget_bytes, dict(t.per_model))
            for t in (stats.host, stats.device)
        ]
        kv = self.generation
        per_model = {kv.model: kv.used_bytes} if kv.model is not None else {}
        return [*tiers, TierUsage(KV_TIER, kv.used_bytes, kv.budget_bytes, per_model)]

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
        """Logits, the argmax label and the embeddings of each input (one forward pass); the model needs
        a classification head. A model with early exits answers each input at the first exit sure enough
        of it (``options.early_exit=False``: at full depth) and reports where in ``exit_layers``."""
        return self._submit(model, inputs, options, classify=True).result()

    async def aembed(
        self, model: str, inputs: Inputs, options: InferenceOptions = InferenceOptions()
    ) -> EmbedResult:
        return await self._asubmit(model, inputs, options, classify=False)

    async def aclassify(
        self, model: str, inputs: Inputs, options: InferenceOptions = InferenceOptions()
    ) -> ClassifyResult:
        return await self._asubmit(model, inputs, options, classify=True)

    async def _asubmit(self, model: str, inputs: Inputs, options: InferenceOptions, *, classify: bool):  # noqa: ANN202
        """Prepare on the pool, so that tokenizing a large request never blocks the event loop, then
        await the result. A small request whose tokenizer is ready is prepared on the loop itself: two
        thread hand-offs would cost it more (GIL switches) than its tokenizing does. Cancelling the
        caller cancels the request, whichever stage it is in."""
        if cheap_to_prepare(self.catalog, model, inputs):
            return await asyncio.wrap_future(self._submit(model, inputs, options, classify=classify))
        prepared = self._preparers.submit(self._submit, model, inputs, options, classify=classify)
        try:
            result = await asyncio.wrap_future(prepared)
        except asyncio.CancelledError:
            prepared.add_done_callback(
                lambda f: None if f.cancelled() or f.exception() else f.result().cancel()
            )
            raise
        return await asyncio.wrap_future(result)

    def _request(
        self, model: str, options: InferenceOptions, tokens: int, payload: object, **fields: Any
    ) -> Request:
        """A request for ``model`` arriving now, with the class and deadline ``options`` ask for."""
        cls = request_class(options.priority, self._defaults.default_class)
        now = self._scheduler.clock()
        return Request(
            id=next(self._ids),
            model=model,
            cls=cls,
            arrival=now,
            deadline=deadline_from(options.timeout_us, cls, now, self._defaults),
            tokens=tokens,
            payload=payload,
            **fields,
        )

    def _submit(self, model: str, inputs: Inputs, options: InferenceOptions, *, classify: bool) -> Future:
        entry = self.states.ready_entry(model)
        token_ids = encoder_ids(self.catalog, entry, model, inputs, classify=classify)
        lengths = tuple(len(x) for x in token_ids)
        work = Work(token_ids, classify, early_exit=options.early_exit)
        request = self._request(
            model, options, sum(lengths), work, inputs=lengths if len(lengths) > 1 else ()
        )
        self._worker.admit(request)  # raises Overloaded / DeadlineExceeded at once
        return work.future

    # -- text generation ------------------------------------------------------------------------------

    def complete(
        self,
        model: str,
        prompt: str | Sequence[int],
        params: GenerationParams = GenerationParams(),
        options: InferenceOptions = InferenceOptions(),
    ) -> Generation:
        """Start generating a continuation of ``prompt`` (a text, tokenized with the model's special
        tokens, or token ids used as given). Returns at once; iterate the ``Generation`` for its chunks or
        wait for its ``result()``.

        The deadline (``options.timeout_us``, else the class's default) applies to the first token: a
        request that cannot start in time fails with ``DeadlineExceeded``.

        Raises (at once, nothing queued):
            InvalidInput: not a text generation model, an empty prompt, bad parameters, or a prompt longer
                than the model's context when the engine does not truncate (it keeps the prompt's end).
            ModelNotFound, NotReady, Overloaded (its queue is full), DeadlineExceeded.
            BudgetExceeded: the prompt plus ``max_tokens`` can never fit the KV cache budget.
        """
        self.states.generator(model)
        if isinstance(prompt, str):
            ids = prompt_ids(self.catalog, model, prompt)
        else:
            ids = [*prompt] if isinstance(prompt, Sequence) else prompt  # type: ignore[list-item]
            if not isinstance(ids, list) or not ids:
                raise InvalidInput("the prompt must be a text or a non-empty list of token ids")
            check_ids([ids], self.catalog.entry(model).config.vocab_size)
        return self._generate(model, ids, params, options)

    def chat(
        self,
        model: str,
        messages: Sequence[Mapping[str, Any]],
        params: GenerationParams = GenerationParams(),
        options: InferenceOptions = InferenceOptions(),
    ) -> Generation:
        """Start the assistant's reply to ``messages`` (``{"role": ..., "content": ...}`` dicts), rendered
        with the model's own chat template. Raises as ``complete``; also ``InvalidInput`` for malformed
        messages or a model without a chat template."""
        entry = self.states.generator(model)
        return self._generate(model, chat_ids(self.catalog, entry, model, messages), params, options)

    async def acomplete(
        self,
        model: str,
        prompt: str | Sequence[int],
        params: GenerationParams = GenerationParams(),
        options: InferenceOptions = InferenceOptions(),
    ) -> Generation:
        """``complete`` for asyncio: a long prompt is tokenized on a thread pool, not on the loop."""
        if cheap_to_prepare(self.catalog, model, [prompt]):  # type: ignore[list-item]
            return self.complete(model, prompt, params, options)
        return await _prepared(self._preparers.submit(self.complete, model, prompt, params, options))

    async def achat(
        self,
        model: str,
        messages: Sequence[Mapping[str, Any]],
        params: GenerationParams = GenerationParams(),
        options: InferenceOptions = InferenceOptions(),
    ) -> Generation:
        """``chat`` for asyncio (rendered and tokenized on a thread pool)."""
        return await _prepared(self._preparers.submit(self.chat, model, messages, params, options))

    def _generate(
        self, model: str, ids: list[int], params: GenerationParams, options: InferenceOptions
    ) -> Generation:
        entry = self.catalog.entry(model)
        context = entry.max_tokens
        capacity = self.generation.capacity_tokens(entry.config)
        wanted = params.max_tokens or 1
        if len(ids) + wanted > context:
            if not self.settings.truncate or wanted >= context:
                raise InvalidInput(
                    f"the prompt has {len(ids)} tokens and max_tokens is {params.max_tokens}; model "
                    f"{model!r} has a context of {context} tokens"
                )
            ids = ids[len(ids) + wanted - context :]  # keep the prompt's end
        if len(ids) + wanted > capacity:
            raise BudgetExceeded(
                f"{len(ids)} prompt tokens plus max_tokens {params.max_tokens} can never fit the KV cache "
                f"of {capacity} tokens for {model!r}; raise --kv-cache-memory or ask for fewer tokens"
            )
        max_new = min(params.max_tokens or context, context - len(ids), capacity - len(ids))
        sampling = _sampling(params, entry.manifest.generation.get("sampling") or {})
        end_ids = frozenset() if params.ignore_eos else _end_ids(entry.manifest.generation)
        handle = Generation(len(ids))
        work = GenerationWork(ids, params, sampling, max_new, end_ids, handle)
        request = self._request(model, options, len(ids), work, generates=True)
        self._worker.admit(request)  # raises Overloaded / DeadlineExceeded at once
        return handle

        # -- lifecycle ------------------------------------------------------------------------------------

    def close(self, drain_seconds: float = 30.0) -> None:
        """Stop accepting requests, finish those in flight (up to ``drain_seconds``), free the tiers."""
        if not self.states.accepting:
            return
        self.states.accepting = False
        if not self._worker.stop(drain_seconds):
            logger.warning("requests still running after %.1f s of draining", drain_seconds)
        self._preparers.shutdown(wait=False, cancel_futures=True)
        self.placement.close()
        self.weights.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _sampling(params: GenerationParams, defaults: Mapping[str, Any]) -> SamplingParams:
    """The request's sampling parameters; those it leaves out take the model's defaults, else OpenAI's.

    Raises:
        InvalidInput: a parameter is out of range.
    """

    def pick(value: Any, name: str, fallback: Any) -> Any:
        return value if value is not None else defaults.get(name, fallback)

    return SamplingParams(
        temperature=float(pick(params.temperature, "temperature", 1.0)),
        top_k=int(pick(params.top_k, "top_k", 0)),
        top_p=float(pick(params.top_p, "top_p", 1.0)),
        seed=params.seed,
    )


def _end_ids(generation: Mapping[str, Any]) -> frozenset[int]:
    """The tokens that end a model's text: its end-of-sequence token (and end-of-turn, when it has one)."""
    ids = [generation.get(key) for key in ("eos_token_id", "eot_token_id")]
    return frozenset(i for i in ids if isinstance(i, int))


async def _prepared(started: Future) -> Generation:
    """The ``Generation`` a pool thread is starting; should the caller be cancelled meanwhile, the
    generation is cancelled as soon as it exists."""
    try:
        return await asyncio.wrap_future(started)
    except asyncio.CancelledError:
        started.add_done_callback(lambda f: None if f.cancelled() or f.exception() else f.result().cancel())
        raise

"""Protocol-neutral calls shared by the KServe and OpenAI routes: limits, model names, cancellation.

The routes parse their protocol into plain Python (texts or token id lists, ``InferenceOptions``, a
``GenerationRequest``), call ``DataPlane``, and format the result back. Everything that must behave the
same for both protocols lives here: request limits, which kind of model each route serves, cancelling work
whose client went away, and the per-model statistics the KServe statistics extension reports (from the
engine's own counters).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from ptmserve.engine.api import (
    ClassifyResult,
    EmbedResult,
    Generation,
    GenerationChunk,
    GenerationParams,
    GenerationResult,
    InferenceOptions,
    ModelInfo,
    ModelKind,
    ModelState,
    TierUsage,
)
from ptmserve.errors import InvalidInput, ModelNotFound, NotReady, PayloadTooLarge
from ptmserve.protocol.schedule import schedule_value
from ptmserve.server.settings import ServerSettings
from ptmserve.server.statistics import Statistics

logger = logging.getLogger(__name__)

T = TypeVar("T")
Inputs = list[str] | list[list[int]]
Receive = Callable[[], Awaitable[dict[str, Any]]]

# Letters, digits, '.', '_', '-'; starts with a letter or digit (so never '.' or '..'); no '/'.
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MODEL_VERSION = "1"  # a model has one version; "/versions/1" names it explicitly
# Longer timeouts (the protocol allows up to 2**64 - 1 µs) are passed on as this one, about 31 years:
# the same in practice, and within what the engine's timers (threading.TIMEOUT_MAX seconds) can wait.
LONGEST_TIMEOUT_US = 10**15


class EngineLike(Protocol):
    """What the HTTP layer needs from ``ptmserve.engine.engine.Engine`` (see docs/architecture.md)."""

    metrics: Any

    def models(self) -> list[ModelInfo]: ...
    def model_info(self, name: str) -> ModelInfo: ...
    async def aembed(self, model: str, inputs: Inputs, options: InferenceOptions = ...) -> EmbedResult: ...
    async def aclassify(
        self, model: str, inputs: Inputs, options: InferenceOptions = ...
    ) -> ClassifyResult: ...
    async def acomplete(
        self, model: str, prompt: str | Sequence[int], params: GenerationParams, options: InferenceOptions
    ) -> Generation: ...
    async def achat(
        self,
        model: str,
        messages: Sequence[Mapping[str, Any]],
        params: GenerationParams,
        options: InferenceOptions,
    ) -> Generation: ...
    def load(self, name: str) -> None: ...
    def unload(self, name: str) -> None: ...
    def ready(self) -> bool: ...
    def unready_reason(self) -> str | None: ...
    def tiers(self) -> list[TierUsage]: ...
    def close(self, drain_seconds: float = 30.0) -> None: ...


class ClientDisconnected(Exception):
    """The client closed the connection before its answer was ready; its work was cancelled."""


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One text generation request as the routes parse it: a completion's prompt or a chat's messages."""

    params: GenerationParams
    options: InferenceOptions
    prompt: str | list[int] | None = None  # a completion: text, or token ids used as given
    messages: list[dict[str, str]] | None = None  # a chat: {"role", "content"} dicts, in order


class DataPlane:
    """Validated, cancellable engine calls for one app."""

    def __init__(self, engine: EngineLike, settings: ServerSettings) -> None:
        self.engine = engine
        self.settings = settings
        self.draining = False  # set on SIGTERM: readiness answers 503 from then on
        self.stats = Statistics()

    # ------------------------------------------------------------------------------------- models

    def check_name(self, name: str, version: str | None = None) -> str:
        """``name`` if it is a well-formed model name (and ``version`` is ours), else a 4xx error."""
        if not MODEL_NAME.fullmatch(name):
            raise InvalidInput(f"invalid model name {name[:140]!r}: use letters, digits, '.', '_', '-'")
        if version is not None and version not in ("", MODEL_VERSION):
            raise ModelNotFound(f"model {name!r} has no version {version[:40]!r} (only {MODEL_VERSION!r})")
        return name

    def model_info(self, name: str, version: str | None = None) -> ModelInfo:
        """The engine's description of ``name``; ``ModelNotFound`` (404) when there is none."""
        return self.engine.model_info(self.check_name(name, version))

    def ready_model_info(self, name: str, version: str | None = None) -> ModelInfo:
        """``model_info`` of a model that can take requests now; ``NotReady`` (503) otherwise."""
        info = self.model_info(name, version)
        if self.draining:
            raise NotReady("the server is shutting down")
        if info.state is ModelState.UNAVAILABLE:
            raise NotReady(f"model {name!r} is not ready" + (f": {info.reason}" if info.reason else ""))
        return info

    def encoder_info(self, name: str, version: str | None = None) -> ModelInfo:
        """``ready_model_info`` of an embedding or classification model; ``InvalidInput`` for a generator."""
        info = self.ready_model_info(name, version)
        if info.kind is ModelKind.GENERATOR:
            raise InvalidInput(
                f"model {info.name!r} is a text generation model: it has no embeddings or labels; use "
                f"/v1/completions, /v1/chat/completions or /v2/models/{info.name}/generate"
            )
        return info

    def generator_info(self, name: str, version: str | None = None) -> ModelInfo:
        """``ready_model_info`` of a text generation model; ``InvalidInput`` for any other kind."""
        info = self.ready_model_info(name, version)
        if info.kind is not ModelKind.GENERATOR:
            raise InvalidInput(
                f"model {info.name!r} ({info.kind.value}) is not a text generation model: use "
                f"/v1/embeddings or /v2/models/{info.name}/infer"
            )
        return info

    def ready(self) -> bool:
        return self.unready_reason() is None

    def unready_reason(self) -> str | None:
        """Why the server cannot take requests now (the readiness probe says it), or None."""
        if self.draining:
            return "the server is shutting down"
        return self.engine.unready_reason()

    async def load(self, name: str) -> None:
        self.check_name(name)
        await asyncio.to_thread(self.engine.load, name)

    async def unload(self, name: str) -> None:
        self.check_name(name)
        await asyncio.to_thread(self.engine.unload, name)

    # -------------------------------------------------------------------------------------- infer

    def check_count(self, n: int) -> None:
        """``PayloadTooLarge`` (413) when one request carries more than ``max_batch_inputs`` inputs."""
        limit = self.settings.max_batch_inputs
        if n > limit:
            raise PayloadTooLarge(f"{n} inputs in one request; the limit is {limit}")

    def check_length(self, i: int, n: int, what: str) -> None:
        """``PayloadTooLarge`` (413) when input ``i`` has more than ``max_input_length`` ``what``."""
        limit = self.settings.max_input_length
        if n > limit:
            raise PayloadTooLarge(f"input {i} has {n} {what}; the limit is {limit}")

    def check_inputs(self, inputs: Inputs) -> Inputs:
        """Apply the request limits (count, length of each input) and refuse text that is not Unicode
        (a lone surrogate, which JSON can spell as ``\\ud800``); the engine validates the rest."""
        self.check_count(len(inputs))
        for i, item in enumerate(inputs):
            if isinstance(item, str):
                self.check_length(i, len(item), "characters")
                _check_unicode(f"input {i}", item)
            else:
                self.check_length(i, len(item), "token ids")
        return inputs

    def options(
        self, priority: int = 0, timeout_us: int | None = None, early_exit: bool = True
    ) -> InferenceOptions:
        """Engine options from the schedule parameters (each checked by ``schedule_value``) and whether
        inputs may leave at a model's early exits (``InvalidInput`` unless a bool)."""
        priority = schedule_value("priority", priority)
        timeout = schedule_value("timeout", 0 if timeout_us is None else timeout_us)
        timeout = min(timeout, LONGEST_TIMEOUT_US)
        return InferenceOptions(priority=priority, timeout_us=timeout or None, early_exit=early_exit)

    async def embed(
        self, info: ModelInfo, inputs: Inputs, options: InferenceOptions, receive: Receive | None
    ) -> EmbedResult:
        """Embeddings of ``inputs``; the work is cancelled if the client disconnects first."""
        inputs = self.check_inputs(inputs)
        return await self._timed(
            info.name, len(inputs), self.engine.aembed(info.name, inputs, options), receive
        )

    async def classify(
        self, info: ModelInfo, inputs: Inputs, options: InferenceOptions, receive: Receive | None
    ) -> ClassifyResult:
        """Logits, labels and embeddings (and exit layers, for a model with early exits) of ``inputs`` from
        one forward pass; ``InvalidInput`` for a model without a classification head."""
        if not info.labels:
            raise InvalidInput(f"model {info.name!r} has no classification head (no LOGITS or LABEL)")
        inputs = self.check_inputs(inputs)
        work = self.engine.aclassify(info.name, inputs, options)
        return await self._timed(info.name, len(inputs), work, receive)

    # --------------------------------------------------------------------------------- generation

    def check_messages(self, messages: list[dict[str, str]]) -> None:
        """A chat is one prompt: at most ``max_batch_inputs`` messages, ``max_input_length`` characters in
        all (413 beyond either), each Unicode."""
        count, limit = len(messages), self.settings.max_batch_inputs
        if count > limit:
            raise PayloadTooLarge(f"{count} messages in one request; the limit is {limit}")
        chars, limit = sum(len(m["content"]) for m in messages), self.settings.max_input_length
        if chars > limit:
            raise PayloadTooLarge(f"the messages hold {chars} characters; the limit is {limit}")
        for i, m in enumerate(messages):
            _check_unicode(f"message {i}", m["content"])

    async def _start(self, info: ModelInfo, req: GenerationRequest) -> Generation:
        if req.messages is not None:
            self.check_messages(req.messages)
            return await self.engine.achat(info.name, req.messages, req.params, req.options)
        if req.prompt is None:
            raise InvalidInput("a generation request needs a prompt or messages")
        self.check_inputs([req.prompt])
        return await self.engine.acomplete(info.name, req.prompt, req.params, req.options)

    async def generate(
        self, info: ModelInfo, req: GenerationRequest, receive: Receive | None
    ) -> GenerationResult:
        """The whole output of ``req``; the generation is cancelled if the client disconnects first."""

        async def run() -> GenerationResult:
            return await (await self._start(info, req)).aresult()

        return await self._timed(info.name, 1, run(), receive)

    async def stream(
        self, info: ModelInfo, req: GenerationRequest, receive: Receive | None
    ) -> GenerationStream:
        """``req`` started, once its first chunk has come (or it ended without one), so that an error
        before the first token (a deadline, a full KV cache) is raised here, before any byte is sent.
        Cancelled if the client disconnects meanwhile."""
        start = time.perf_counter_ns()

        async def first() -> tuple[Generation, AsyncGenerator[GenerationChunk, None], GenerationChunk | None]:
            generation = await self._start(info, req)
            chunks = generation.__aiter__()
            try:
                return generation, chunks, await chunks.__anext__()
            except StopAsyncIteration:
                return generation, chunks, None

        try:
            generation, chunks, chunk = await until_disconnect(first(), receive)
        except BaseException:
            self.stats.record(info.name, 1, False, time.perf_counter_ns() - start)
            raise

        def on_end(ok: bool) -> None:
            self.stats.record(info.name, 1, ok, time.perf_counter_ns() - start)

        return GenerationStream(generation, chunks, chunk, on_end)

    async def _timed(self, model: str, n: int, work: Coroutine[Any, Any, T], receive: Receive | None) -> T:
        start = time.perf_counter_ns()
        ok = False
        try:
            result = await until_disconnect(work, receive)
            ok = True
            return result
        finally:
            self.stats.record(model, n, ok, time.perf_counter_ns() - start)

    # -------------------------------------------------------------------------------------- stats

    def statistics(self, names: list[str]) -> dict[str, Any]:
        """Triton's statistics extension body for ``names`` (see ``Statistics.body``)."""
        return self.stats.body(names, self.engine.metrics, MODEL_VERSION)


class GenerationStream:
    """A started generation whose first chunk has arrived. Iterate ``chunks()`` once (close it with
    ``contextlib.aclosing``); then ``result()`` is the whole output. Closing it early (the client went
    away, an error) cancels the generation, which frees its KV cache; the plane's statistics count the
    request when it closes."""

    def __init__(
        self,
        generation: Generation,
        chunks: AsyncGenerator[GenerationChunk, None],
        first: GenerationChunk | None,
        on_end: Callable[[bool], None],
    ) -> None:
        self.generation = generation
        self._chunks = chunks
        self._first = first
        self._on_end = on_end

    async def chunks(self) -> AsyncGenerator[GenerationChunk, None]:
        """Every chunk, the first included."""
        ok = False
        try:
            if self._first is not None:
                yield self._first
                async for chunk in self._chunks:
                    yield chunk
            ok = True
        finally:
            self.generation.cancel()  # a no-op once it finished
            await self._chunks.aclose()
            self._on_end(ok)

    def result(self) -> GenerationResult:
        """The whole output, once the iteration ended."""
        return self.generation.result(timeout=0)


def _check_unicode(what: str, text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInput(
            f"{what} is not valid Unicode: a lone surrogate at character {exc.start} "
            "(JSON \\u escapes of surrogates must come in high-low pairs)"
        ) from None


async def until_disconnect(work: Coroutine[Any, Any, T], receive: Receive | None) -> T:
    """Await ``work``, cancelling it (and raising ``ClientDisconnected``) if the client goes away first.

    ``receive`` is the ASGI receive of a request whose body was already read: its next message is
    ``http.disconnect`` when the connection closes.
    """
    task = asyncio.ensure_future(work)
    if receive is None:
        return await task
    watcher = asyncio.ensure_future(_wait_disconnect(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    logger.info("client disconnected; its queued work was cancelled")
    raise ClientDisconnected()


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return

"""What every front end of engine processes answers itself: model listings, and requests prepared here
(tokenized on the loop when cheap, else on tokenizer threads) before one is sent to an engine.

``WorkerPool`` (engine processes on this machine) and ``ptmserve.ray``'s ``RayEngine`` (replicas on Ray
Serve) both mix it in; they provide ``catalog``, ``states``, ``_preparers``, and send prepared requests with
``_send_encoder`` and ``_generate``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from ptmserve.engine.api import (
    ClassifyResult,
    EmbedResult,
    Generation,
    GenerationParams,
    InferenceOptions,
    ModelInfo,
)
from ptmserve.engine.catalog import ModelCatalog
from ptmserve.engine.prepare import chat_ids, cheap_to_prepare, encoder_ids, prompt_ids
from ptmserve.engine.states import ModelStates

T = TypeVar("T")
Inputs = Sequence[str] | Sequence[Sequence[int]]


class FrontEnd:
    """Listings and request preparation shared by the front ends of engine processes."""

    catalog: ModelCatalog
    states: ModelStates
    _preparers: ThreadPoolExecutor

    async def _send_encoder(
        self, model: str, ids: list[list[int]], options: InferenceOptions, *, classify: bool
    ) -> Any:
        """Send a prepared embed (or, with ``classify``, classify) request to an engine; its result."""
        raise NotImplementedError

    async def _generate(
        self, model: str, ids: str | Sequence[int], params: GenerationParams, options: InferenceOptions
    ) -> Generation:
        """Send a prepared generation to an engine; returns once it is admitted."""
        raise NotImplementedError

    async def aembed(
        self, model: str, inputs: Inputs, options: InferenceOptions = InferenceOptions()
    ) -> EmbedResult:
        """Pooled embeddings of ``inputs``, computed by an engine. Raises as ``Engine.embed``."""
        return await self._encode(model, inputs, options, classify=False)

    async def aclassify(
        self, model: str, inputs: Inputs, options: InferenceOptions = InferenceOptions()
    ) -> ClassifyResult:
        """Logits, labels and embeddings of ``inputs`` from an engine. Raises as ``Engine.classify``."""
        return await self._encode(model, inputs, options, classify=True)

    async def _encode(self, model: str, inputs: Inputs, options: InferenceOptions, *, classify: bool) -> Any:
        def prepare() -> list[list[int]]:
            entry = self.states.ready_entry(model)
            return encoder_ids(self.catalog, entry, model, inputs, classify=classify)

        ids = await self._prepared(model, inputs, prepare)
        return await self._send_encoder(model, ids, options, classify=classify)

    def models(self) -> list[ModelInfo]:
        """Every model in the repository; damaged ones are UNAVAILABLE with the reason."""
        return [self.model_info(name) for name in self.catalog.names()]

    def model_info(self, name: str) -> ModelInfo:
        """Raises ModelNotFound (InvalidInput for a malformed name)."""
        return self.states.info(name)

    async def acomplete(
        self,
        model: str,
        prompt: str | Sequence[int],
        params: GenerationParams = GenerationParams(),
        options: InferenceOptions = InferenceOptions(),
    ) -> Generation:
        """Start a completion on a worker; returns once it is admitted. Raises as ``Engine.complete``."""

        def prepare() -> str | Sequence[int]:
            self.states.generator(model)
            return prompt_ids(self.catalog, model, prompt)

        ids = await self._prepared(model, [prompt], prepare)
        return await self._generate(model, ids, params, options)

    async def achat(
        self,
        model: str,
        messages: Sequence[Mapping[str, Any]],
        params: GenerationParams = GenerationParams(),
        options: InferenceOptions = InferenceOptions(),
    ) -> Generation:
        """Start a chat reply on a worker (rendered and tokenized here, on a thread). Raises as
        ``Engine.chat``."""
        ids = await asyncio.wrap_future(
            self._preparers.submit(
                lambda: chat_ids(self.catalog, self.states.generator(model), model, messages)
            )
        )
        return await self._generate(model, ids, params, options)

    async def _prepared(self, model: str, inputs: Sequence[Any], prepare: Callable[[], T]) -> T:
        """``prepare()`` on the loop when it is cheap, else on the tokenizer threads."""
        if cheap_to_prepare(self.catalog, model, inputs):
            return prepare()
        return await asyncio.wrap_future(self._preparers.submit(prepare))

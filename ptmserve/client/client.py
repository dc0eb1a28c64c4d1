"""``Client`` and ``AsyncClient``: typed access to a ptmserve server over httpx.

Embeddings and classification go over KServe v2 with binary tensors; text generation (``complete``,
``chat``) over the OpenAI routes, streamed as server-sent events when asked.

Errors come back as the ``ptmserve.errors`` classes the server raised (``ModelNotFound`` for 404,
``Overloaded`` for 429, ``DeadlineExceeded`` for 504, ...); a 500 or an unknown status raises
``ServerError``. Transport failures (connection refused, client timeout) raise httpx's own errors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import httpx

from ptmserve.client import calls as p
from ptmserve.client import generation as g
from ptmserve.engine.api import ClassifyResult, EmbedResult

if TYPE_CHECKING:
    from typing_extensions import Unpack

DEFAULT_URL = "http://127.0.0.1:8000"


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


class Client:
    """A synchronous client. Use as a context manager, or call ``close()``.

    Args:
        base_url: the server, e.g. ``http://127.0.0.1:8000``.
        api_key: sent as ``Authorization: Bearer <key>`` when the server runs with ``--api-key``.
        timeout: seconds to wait for a response (an httpx timeout, not the server-side deadline).
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        **httpx_kwargs: Any,
    ) -> None:
        self._http = httpx.Client(
            base_url=base_url, headers=_headers(api_key), timeout=timeout, **httpx_kwargs
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, call: p.HttpCall) -> httpx.Response:
        r = self._http.request(call.method, call.path, content=call.body, headers=call.headers)
        p.raise_for_status(r.status_code, r.content)
        return r

    def embed(
        self, model: str, inputs: p.TextOrIds, *, priority: int = 0, timeout_us: int | None = None
    ) -> EmbedResult:
        """Embeddings (B, D) of texts or token id lists; ``priority``/``timeout_us`` as in Triton."""
        r = self._send(p.infer_call(model, inputs, ["EMBEDDING"], priority, timeout_us))
        return p.embed_result(p.parse_infer(r.content, r.headers))

    def classify(
        self,
        model: str,
        inputs: p.TextOrIds,
        *,
        priority: int = 0,
        timeout_us: int | None = None,
        early_exit: bool = True,
    ) -> ClassifyResult:
        """Logits (B, C) and the argmax label of each input; for a model with early exits, the layer each
        input left at (``exit_layers``; ``early_exit=False`` runs every input to full depth)."""
        r = self._send(p.infer_call(model, inputs, None, priority, timeout_us, early_exit))
        return p.classify_result(p.parse_infer(r.content, r.headers))

    def complete(
        self, model: str, prompt: g.Prompt, *, stream: bool = False, **options: Unpack[g.GenerationKwargs]
    ) -> g.Completion | g.CompletionStream:
        """Continue ``prompt`` (a text, or token ids used as given). Returns the ``Completion``, or with
        ``stream=True`` a ``CompletionStream`` of text chunks as they are generated. ``options``:
        ``max_tokens`` (default 16), ``temperature``, ``top_p``, ``top_k``, ``seed``, ``stop``,
        ``ignore_eos``, ``priority``, ``timeout_us``."""
        call = g.generation_call(model, prompt=prompt, stream=stream, options=options)
        return self._generate(call, stream)

    def chat(
        self, model: str, messages: g.Messages, *, stream: bool = False, **options: Unpack[g.GenerationKwargs]
    ) -> g.Completion | g.CompletionStream:
        """The assistant's reply to ``messages`` (``{"role", "content"}``), as ``complete`` returns it;
        without ``max_tokens`` it runs until the end-of-sequence token or the context's end."""
        call = g.generation_call(model, messages=messages, stream=stream, options=options)
        return self._generate(call, stream)

    def _generate(self, call: p.HttpCall, stream: bool) -> g.Completion | g.CompletionStream:
        if not stream:
            return g.completion(self._send(call).json())
        request = self._http.build_request(call.method, call.path, content=call.body, headers=call.headers)
        r = self._http.send(request, stream=True)
        if r.status_code >= 300:
            r.read()
            r.close()
            p.raise_for_status(r.status_code, r.content)
        return g.CompletionStream(r)

    def load(self, model: str) -> None:
        """Load ``model`` (model repository extension; needed under ``--model-control explicit``)."""
        self._send(p.HttpCall("POST", f"/v2/repository/models/{p.model_path(model)}/load"))

    def unload(self, model: str) -> None:
        self._send(p.HttpCall("POST", f"/v2/repository/models/{p.model_path(model)}/unload"))

    def models(self) -> list[p.ModelStatus]:
        """Every repository model with its state (READY, LOADING, UNAVAILABLE) and reason."""
        return p.model_statuses(self._send(p.HttpCall("POST", "/v2/repository/index")).content)

    def metadata(self, model: str) -> dict[str, Any]:
        """The model's KServe metadata (inputs and outputs with datatypes and shapes)."""
        return self._send(p.HttpCall("GET", f"/v2/models/{p.model_path(model)}")).json()

    def health(self) -> p.Health:
        """Liveness and readiness; both False when the server cannot be reached."""
        try:
            live = self._http.get("/v2/health/live").status_code == 200
            ready = self._http.get("/v2/health/ready").status_code == 200
        except httpx.TransportError:
            return p.Health(live=False, ready=False)
        return p.Health(live=live, ready=ready)


class AsyncClient:
    """The asyncio twin of ``Client`` (same methods, awaitable). Use ``async with`` or ``aclose()``."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        **httpx_kwargs: Any,
    ) -> None:
        self._http = httpx.AsyncClient(
            base_url=base_url, headers=_headers(api_key), timeout=timeout, **httpx_kwargs
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, call: p.HttpCall) -> httpx.Response:
        r = await self._http.request(call.method, call.path, content=call.body, headers=call.headers)
        p.raise_for_status(r.status_code, r.content)
        return r

    async def embed(
        self, model: str, inputs: p.TextOrIds, *, priority: int = 0, timeout_us: int | None = None
    ) -> EmbedResult:
        r = await self._send(p.infer_call(model, inputs, ["EMBEDDING"], priority, timeout_us))
        return p.embed_result(p.parse_infer(r.content, r.headers))

    async def classify(
        self,
        model: str,
        inputs: p.TextOrIds,
        *,
        priority: int = 0,
        timeout_us: int | None = None,
        early_exit: bool = True,
    ) -> ClassifyResult:
        r = await self._send(p.infer_call(model, inputs, None, priority, timeout_us, early_exit))
        return p.classify_result(p.parse_infer(r.content, r.headers))

    async def complete(
        self, model: str, prompt: g.Prompt, *, stream: bool = False, **options: Unpack[g.GenerationKwargs]
    ) -> g.Completion | g.AsyncCompletionStream:
        call = g.generation_call(model, prompt=prompt, stream=stream, options=options)
        return await self._generate(call, stream)

    async def chat(
        self, model: str, messages: g.Messages, *, stream: bool = False, **options: Unpack[g.GenerationKwargs]
    ) -> g.Completion | g.AsyncCompletionStream:
        call = g.generation_call(model, messages=messages, stream=stream, options=options)
        return await self._generate(call, stream)

    async def _generate(self, call: p.HttpCall, stream: bool) -> g.Completion | g.AsyncCompletionStream:
        if not stream:
            return g.completion((await self._send(call)).json())
        request = self._http.build_request(call.method, call.path, content=call.body, headers=call.headers)
        r = await self._http.send(request, stream=True)
        if r.status_code >= 300:
            await r.aread()
            await r.aclose()
            p.raise_for_status(r.status_code, r.content)
        return g.AsyncCompletionStream(r)

    async def load(self, model: str) -> None:
        await self._send(p.HttpCall("POST", f"/v2/repository/models/{p.model_path(model)}/load"))

    async def unload(self, model: str) -> None:
        await self._send(p.HttpCall("POST", f"/v2/repository/models/{p.model_path(model)}/unload"))

    async def models(self) -> list[p.ModelStatus]:
        return p.model_statuses((await self._send(p.HttpCall("POST", "/v2/repository/index"))).content)

    async def metadata(self, model: str) -> dict[str, Any]:
        return (await self._send(p.HttpCall("GET", f"/v2/models/{p.model_path(model)}"))).json()

    async def health(self) -> p.Health:
        try:
            live = (await self._http.get("/v2/health/live")).status_code == 200
            ready = (await self._http.get("/v2/health/ready")).status_code == 200
        except httpx.TransportError:
            return p.Health(live=False, ready=False)
        return p.Health(live=live, ready=ready)

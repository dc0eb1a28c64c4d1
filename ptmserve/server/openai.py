"""OpenAI-compatible routes: ``GET /v1/models``, ``GET /v1/models/{model}``, ``POST /v1/embeddings``,
``POST /v1/completions`` and ``POST /v1/chat/completions`` (their bodies: ``completions.py``).

``input`` is a string, a list of strings, one token id list, or a list of token id lists.
``encoding_format`` ``base64`` returns each embedding as base64 of little-endian float32 bytes (what the
``openai`` client decodes; it asks for base64 by default). ``dimensions`` must equal the model's width.
Extensions (send them with the openai client's ``extra_body``): ``priority`` and ``timeout`` (µs), with the
meaning of KServe's schedule policy parameters.

The routes parse their bodies themselves (whatever the ``Content-Type``, so ``curl -d`` works); the
embeddings route counts the inputs before validating them, so an oversized list is refused before
pydantic builds it. A generation with ``stream: true`` answers server-sent events (``sse.py``).
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr
from starlette.requests import Request
from starlette.responses import Response

from ptmserve.engine.api import ModelState
from ptmserve.errors import InvalidInput
from ptmserve.protocol import codecs
from ptmserve.protocol.schedule import MAX_SCHEDULE_VALUE
from ptmserve.server.completions import ChatRequest, CompletionRequest, Reply, refuse_unsupported
from ptmserve.server.dataplane import DataPlane, Inputs
from ptmserve.server.schemas import M, validated
from ptmserve.server.sse import EventStream, generation_events

OWNER = "ptmserve"


class EmbeddingRequest(BaseModel):
    """The body of ``POST /v1/embeddings`` (strict types: no silent coercion of numbers and strings)."""

    model_config = ConfigDict(extra="ignore")

    model: StrictStr = Field(max_length=256)
    input: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = None
    user: StrictStr | None = None
    priority: StrictInt = Field(default=0, ge=0, le=MAX_SCHEDULE_VALUE)  # ptmserve extension: Triton's
    timeout: StrictInt | None = Field(default=None, ge=0, le=MAX_SCHEDULE_VALUE)  # extension: deadline, µs


def _json(obj: Any, status: int = 200) -> Response:
    return Response(json.dumps(obj).encode(), status_code=status, media_type="application/json")


class OpenAIRoutes:
    """Endpoints of the OpenAI API (models, embeddings, completions, chat) over one ``DataPlane``."""

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane
        self.created = int(time.time())

    def _card(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": self.created, "owned_by": OWNER}

    async def models(self) -> Response:
        """Models that can serve now (under explicit control, the loaded ones)."""
        ready = [m.name for m in self.plane.engine.models() if m.state is ModelState.READY]
        return _json({"object": "list", "data": [self._card(n) for n in ready]})

    async def model(self, model: str) -> Response:
        return _json(self._card(self.plane.model_info(model).name))

    async def embeddings(self, request: Request) -> Response:
        body = self.parse(await request.body())
        info = self.plane.encoder_info(body.model)
        if body.dimensions is not None and body.dimensions != info.dim:
            raise InvalidInput(
                f"dimensions={body.dimensions} is not supported: model {info.name!r} returns {info.dim}"
            )
        options = self.plane.options(priority=body.priority, timeout_us=body.timeout)
        result = await self.plane.embed(info, _inputs(body.input), options, request.receive)
        emb = np.asarray(result.embeddings, dtype="<f4")
        if body.encoding_format == "base64":
            vectors: list[Any] = [base64.b64encode(row.tobytes()).decode("ascii") for row in emb]
        else:
            vectors = emb.tolist()
        data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]
        usage = {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}
        return _json({"object": "list", "data": data, "model": info.name, "usage": usage})

    def parse(self, raw: bytes) -> EmbeddingRequest:
        """The request body, its input count and length checked before pydantic validates each input."""
        obj, _ = codecs.split_body(raw, None)
        items = obj.get("input")
        if isinstance(items, list) and items:
            if isinstance(items[0], int) and not isinstance(items[0], bool):  # one token id list
                self.plane.check_length(0, len(items), "token ids")
            else:
                self.plane.check_count(len(items))
        return validated(EmbeddingRequest, obj)

    async def completions(self, request: Request) -> Response:
        body = self._generation_body(CompletionRequest, await request.body())
        return await self._generate(request, body, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        body = self._generation_body(ChatRequest, await request.body())
        return await self._generate(request, body, chat=True)

    def _generation_body(self, model: type[M], raw: bytes) -> M:
        obj, _ = codecs.split_body(raw, None)
        refuse_unsupported(obj)
        return validated(model, obj)

    async def _generate(
        self, request: Request, body: CompletionRequest | ChatRequest, chat: bool
    ) -> Response:
        info = self.plane.generator_info(body.model)
        req = body.generation(self.plane)
        reply = Reply.new(info.name, chat=chat, include_usage=body.include_usage)
        if body.stream:
            stream = await self.plane.stream(info, req, request.receive)
            return EventStream(generation_events(stream, reply, request.url.path))
        return _json(reply.whole(await self.plane.generate(info, req, request.receive)))


def _inputs(raw: str | list[str] | list[int] | list[list[int]]) -> Inputs:
    """The request's ``input`` as a list of texts or a list of token id lists."""
    if isinstance(raw, str):
        return [raw]
    if raw and isinstance(raw[0], int):
        return [raw]  # type: ignore[list-item]  # one tokenized input
    return raw  # type: ignore[return-value]

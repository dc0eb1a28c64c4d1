"""OpenAI-compatible routes: ``GET /v1/models``, ``GET /v1/models/{model}``, ``POST /v1/embeddings``.

``input`` is a string, a list of strings, one token id list, or a list of token id lists.
``encoding_format`` ``base64`` returns each embedding as base64 of little-endian float32 bytes (what the
``openai`` client decodes; it asks for base64 by default). ``dimensions`` must equal the model's width.
Extensions (send them with the openai client's ``extra_body``): ``priority`` and ``timeout`` (µs), with the
meaning of KServe's schedule policy parameters.

The route parses its body itself (whatever the ``Content-Type``, so ``curl -d`` works) and counts the
inputs before validating them, so an oversized list is refused before pydantic builds it.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError
from starlette.requests import Request
from starlette.responses import Response

from ptmserve.engine.api import ModelState
from ptmserve.errors import InvalidInput
from ptmserve.protocol.schedule import MAX_SCHEDULE_VALUE
from ptmserve.server.dataplane import DataPlane, Inputs
from ptmserve.server.errors import invalid_input_from

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


def embedding_request_schema() -> dict[str, Any]:
    """The OpenAPI ``requestBody`` of ``POST /v1/embeddings`` (the route parses the body itself)."""
    schema = EmbeddingRequest.model_json_schema()
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _json(obj: Any, status: int = 200) -> Response:
    return Response(json.dumps(obj).encode(), status_code=status, media_type="application/json")


class OpenAIRoutes:
    """Endpoints of the OpenAI embeddings API over one ``DataPlane``."""

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
        info = self.plane.ready_model_info(body.model)
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
        try:
            obj = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise InvalidInput(f"body is not valid JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise InvalidInput("body must be a JSON object")
        items = obj.get("input")
        if isinstance(items, list) and items:
            if isinstance(items[0], int) and not isinstance(items[0], bool):  # one token id list
                self.plane.check_length(0, len(items), "token ids")
            else:
                self.plane.check_count(len(items))
        try:
            return EmbeddingRequest.model_validate(obj)
        except ValidationError as exc:
            raise invalid_input_from(exc.errors()) from None


def _inputs(raw: str | list[str] | list[int] | list[list[int]]) -> Inputs:
    """The request's ``input`` as a list of texts or a list of token id lists."""
    if isinstance(raw, str):
        return [raw]
    if raw and isinstance(raw[0], int):
        return [raw]  # type: ignore[list-item]  # one tokenized input
    return raw  # type: ignore[return-value]

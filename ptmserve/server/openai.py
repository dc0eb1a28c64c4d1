"""OpenAI-compatible routes: ``GET /v1/models``, ``GET /v1/models/{model}``, ``POST /v1/embeddings``.

``input`` is a string, a list of strings, one token id list, or a list of token id lists.
``encoding_format`` ``base64`` returns each embedding as base64 of little-endian float32 bytes (what the
``openai`` client decodes; it asks for base64 by default). ``dimensions`` must equal the model's width.
Extensions (send them with the openai client's ``extra_body``): ``priority`` and ``timeout`` (µs), with the
meaning of KServe's schedule policy parameters.
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
from ptmserve.server.dataplane import DataPlane, Inputs

OWNER = "ptmserve"


class EmbeddingRequest(BaseModel):
    """The body of ``POST /v1/embeddings`` (strict types: no silent coercion of numbers and strings)."""

    model_config = ConfigDict(extra="ignore")

    model: StrictStr = Field(max_length=256)
    input: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = None
    user: StrictStr | None = None
    priority: StrictInt = Field(default=0, ge=0)  # ptmserve extension: Triton's priority
    timeout: StrictInt | None = Field(default=None, ge=0)  # ptmserve extension: deadline in µs


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

    async def embeddings(self, body: EmbeddingRequest, request: Request) -> Response:
        info = self.plane.servable(body.model)
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


def _inputs(raw: str | list[str] | list[int] | list[list[int]]) -> Inputs:
    """The request's ``input`` as a list of texts or a list of token id lists."""
    if isinstance(raw, str):
        return [raw]
    if raw and isinstance(raw[0], int):
        return [raw]  # type: ignore[list-item]  # one tokenized input
    return raw  # type: ignore[return-value]

"""Triton's generate extension: ``POST /v2/models/{m}[/versions/{v}]/generate`` and ``.../generate_stream``.

Body: ``{"text_input": "...", "parameters": {"max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
"ignore_eos", "priority", "timeout"}}``. Triton's backends differ in where the sampling fields go (vLLM's in
``parameters``, TensorRT-LLM's ensemble at the top level, as inputs), so both are accepted; a field given
in both places with different values is refused. ``max_tokens`` defaults to 16.

``generate`` answers ``{"model_name", "model_version", "text_output", "finish_reason", "prompt_tokens",
"completion_tokens"}``. ``generate_stream`` answers server-sent events, each ``{"model_name",
"model_version", "text_output": <new text>}``; the last one has an empty ``text_output`` and the
``finish_reason`` and token counts. Errors use KServe's body ``{"error": "message"}`` (in a stream that
already began, as its last event).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from ptmserve.engine.api import GenerationResult, ModelInfo
from ptmserve.errors import InvalidInput
from ptmserve.protocol import codecs, sse
from ptmserve.server.dataplane import MODEL_VERSION, DataPlane, GenerationRequest
from ptmserve.server.sampling import SamplingFields
from ptmserve.server.schemas import validated
from ptmserve.server.sse import EventStream, generation_events

GENERATE_MAX_TOKENS = 16  # as vLLM's Triton backend


class GenerateRequest(SamplingFields):
    """The body of ``generate``/``generate_stream``, ``parameters`` merged into the top level."""

    text_input: str


@dataclass(frozen=True, slots=True)
class TritonReply:
    """The bodies of one answer; as a stream, an ``EventFormat``."""

    model: str

    def _body(self, text: str) -> dict[str, Any]:
        return {"model_name": self.model, "model_version": MODEL_VERSION, "text_output": text}

    def whole(self, result: GenerationResult) -> dict[str, Any]:
        return self._body(result.text) | _ending(result)

    def head(self) -> list[bytes]:
        return []

    def chunk(self, text: str) -> bytes:
        return sse.encode_event(self._body(text))

    def end(self, result: GenerationResult) -> list[bytes]:
        return [sse.encode_event(self._body("") | _ending(result))]


def _ending(result: GenerationResult) -> dict[str, Any]:
    return {
        "finish_reason": result.finish_reason,
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
    }


class GenerateRoutes:
    """Triton's generate extension over one ``DataPlane``. Each endpoint serves the unversioned and the
    versioned path (``version`` is None on the first)."""

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    async def generate(self, request: Request, model: str, version: str | None = None) -> Response:
        info, req = self._parse(model, version, await request.body())
        result = await self.plane.generate(info, req, request.receive)
        return Response(json.dumps(TritonReply(info.name).whole(result)), media_type="application/json")

    async def generate_stream(self, request: Request, model: str, version: str | None = None) -> Response:
        info, req = self._parse(model, version, await request.body())
        stream = await self.plane.stream(info, req, request.receive)
        return EventStream(generation_events(stream, TritonReply(info.name), request.url.path))

    def _parse(self, model: str, version: str | None, raw: bytes) -> tuple[ModelInfo, GenerationRequest]:
        info = self.plane.generator_info(model, version)
        obj, _ = codecs.split_body(raw, None)
        body = validated(GenerateRequest, merged_parameters(obj))
        return info, body.request(self.plane, GENERATE_MAX_TOKENS, prompt=body.text_input)


def merged_parameters(obj: dict[str, Any]) -> dict[str, Any]:
    """The body's fields with those of its ``parameters`` object; ``InvalidInput`` on a conflict."""
    params = obj.get("parameters")
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise InvalidInput("'parameters' must be a JSON object")
    merged = {k: v for k, v in obj.items() if k != "parameters"}
    for key, value in params.items():
        if key in merged and merged[key] != value:
            raise InvalidInput(
                f"{key!r} is given twice, at the top level and in 'parameters', with two values"
            )
        merged[key] = value
    return merged

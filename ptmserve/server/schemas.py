"""OpenAPI descriptions of the request bodies that routes parse themselves.

The infer route reads raw bytes (JSON, optionally followed by binary tensor data), so FastAPI cannot
derive its schema from a pydantic model; these hand-written schemas document it in ``/openapi.json``
(and give fuzzers something to generate). They describe the JSON form only. Routes that validate their
JSON body with a pydantic model themselves (OpenAI's, Triton's generate) take it from the model.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from ptmserve.server.errors import invalid_input_from

M = TypeVar("M", bound=BaseModel)

_PARAMETERS: dict[str, Any] = {"type": "object", "additionalProperties": True}

_TENSOR: dict[str, Any] = {
    "type": "object",
    "required": ["name", "datatype", "shape"],
    "properties": {
        "name": {"type": "string", "enum": ["TEXT", "INPUT_IDS", "ATTENTION_MASK"]},
        "datatype": {"type": "string", "enum": ["BYTES", "INT64", "INT32", "FP32", "BOOL"]},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 8}, "maxItems": 3},
        "data": {"type": "array", "maxItems": 16},
        "parameters": _PARAMETERS,
    },
}

INFER_REQUEST_SCHEMA: dict[str, Any] = {
    "schema": {
        "type": "object",
        "required": ["inputs"],
        "properties": {
            "id": {"type": "string"},
            "parameters": {
                "type": "object",
                "properties": {
                    "priority": {"type": "integer", "minimum": 0},
                    "timeout": {"type": "integer", "minimum": 0},
                    "binary_data_output": {"type": "boolean"},
                    "early_exit": {"type": "boolean"},
                },
            },
            "inputs": {"type": "array", "items": _TENSOR, "maxItems": 3},
            "outputs": {
                "type": "array",
                "maxItems": 4,
                "items": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {
                        "name": {"type": "string", "enum": ["EMBEDDING", "LOGITS", "LABEL", "EXIT_LAYER"]},
                        "parameters": {"type": "object", "properties": {"binary_data": {"type": "boolean"}}},
                    },
                },
            },
        },
    }
}

REPOSITORY_INDEX_SCHEMA: dict[str, Any] = {
    "schema": {"type": "object", "properties": {"ready": {"type": "boolean"}}}
}


def model_request_schema() -> dict[str, Any]:
    """Body of repository load/unload: optional ``parameters`` (Triton's; mostly ignored here)."""
    return {"schema": {"type": "object", "properties": {"parameters": _PARAMETERS}}}


def request_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI ``requestBody`` of a route that validates its JSON body with ``model`` itself."""
    schema = model.model_json_schema()
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def validated(model: type[M], obj: dict[str, Any]) -> M:
    """The JSON object ``obj`` as ``model``; ``InvalidInput`` (400) naming what is wrong, not the values."""
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        raise invalid_input_from(exc.errors()) from None

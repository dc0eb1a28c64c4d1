"""Pure request builders and response parsers shared by the sync and async clients (no I/O).

The client speaks KServe v2 with binary tensor data: inputs go as ``TEXT`` or ``INPUT_IDS`` (+
``ATTENTION_MASK`` for ragged token lists), outputs come back as binary FP32/BYTES tensors. The wire
format and the error table are ``ptmserve.protocol``'s, as the server's are; nothing here imports the server.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import numpy as np

from ptmserve.engine.api import ClassifyResult, EmbedResult
from ptmserve.errors import InvalidInput, PtmError
from ptmserve.protocol import codecs
from ptmserve.protocol.errors import error_message, status_to_error

TextOrIds = str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]]


class ServerError(PtmError):
    """The server answered with a status outside the error table (500: a bug on the server)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class ModelStatus:
    """One row of the repository index."""

    name: str
    version: str
    state: str  # READY | LOADING | UNAVAILABLE
    reason: str


@dataclass(frozen=True, slots=True)
class Health:
    live: bool
    ready: bool


@dataclass(frozen=True, slots=True)
class HttpCall:
    method: str
    path: str
    body: bytes | None = None
    headers: dict[str, str] | None = None


def model_path(model: str) -> str:
    return quote(model, safe="")


def infer_call(
    model: str,
    inputs: TextOrIds,
    outputs: Sequence[str] | None,
    priority: int,
    timeout_us: int | None,
    early_exit: bool = True,
) -> HttpCall:
    """The infer request asking ``model`` for ``outputs`` (None: the model's default outputs), as binary
    tensors, of ``inputs``; ``early_exit=False`` asks a model with early exits for full depth."""
    params: dict[str, Any] = {}
    if priority:
        params["priority"] = priority
    if timeout_us is not None:
        params["timeout"] = timeout_us
    if not early_exit:
        params["early_exit"] = False
    if outputs is None:
        params["binary_data_output"] = True
    req = codecs.InferRequest(
        inputs=input_tensors(inputs),
        outputs=None if outputs is None else [codecs.RequestedOutput(name, binary=True) for name in outputs],
        parameters=params,
    )
    body, header_length = codecs.encode_infer_request(req, binary_inputs=True)
    headers = {"Content-Type": "application/octet-stream"}
    if header_length is not None:
        headers[codecs.HEADER_LENGTH] = str(header_length)
    return HttpCall("POST", f"/v2/models/{model_path(model)}/infer", body, headers)


def input_tensors(inputs: TextOrIds) -> list[codecs.Tensor]:
    """``TEXT`` for strings; ``INPUT_IDS`` + ``ATTENTION_MASK`` (right padding with 0) for token ids."""
    if isinstance(inputs, str):
        return [codecs.bytes_tensor("TEXT", [inputs])]
    items = list(inputs)
    if not items:
        raise InvalidInput("the input list is empty")
    if all(isinstance(x, str) for x in items):
        return [codecs.bytes_tensor("TEXT", items)]
    if all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in items):
        items = [items]  # one tokenized input
    rows = [list(map(int, r)) for r in items]
    width = max(len(r) for r in rows)
    ids = np.zeros((len(rows), width), dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return [codecs.Tensor("INPUT_IDS", "INT64", ids), codecs.Tensor("ATTENTION_MASK", "INT64", mask)]


def parse_infer(body: bytes, headers: Any) -> codecs.InferResponse:
    return codecs.decode_infer_response(body, headers.get(codecs.HEADER_LENGTH))


def embed_result(resp: codecs.InferResponse) -> EmbedResult:
    emb = np.asarray(resp.output("EMBEDDING"), dtype=np.float32)
    return EmbedResult(embeddings=emb, prompt_tokens=int(resp.parameters.get("prompt_tokens", 0)))


def classify_result(resp: codecs.InferResponse) -> ClassifyResult:
    """The classification in a response to the model's default outputs (``infer_call(outputs=None)``):
    ``exit_layers`` when the model has early exits (its ``EXIT_LAYER``), else None.

    Raises:
        InvalidInput: the model is not a classifier (it answered without ``LOGITS``).
    """
    names = {t.name for t in resp.outputs}
    if "LOGITS" not in names:
        raise InvalidInput(f"model {resp.model_name!r} has no classification head (no LOGITS or LABEL)")
    logits = np.asarray(resp.output("LOGITS"), dtype=np.float32)
    labels = [b.decode("utf-8") for b in resp.output("LABEL").ravel()]
    exits = np.asarray(resp.output("EXIT_LAYER"), dtype=np.int32) if "EXIT_LAYER" in names else None
    return ClassifyResult(
        logits=logits,
        labels=labels,
        prompt_tokens=int(resp.parameters.get("prompt_tokens", 0)),
        exit_layers=exits,
    )


def model_statuses(body: bytes) -> list[ModelStatus]:
    return [
        ModelStatus(
            str(m["name"]), str(m.get("version", "")), str(m.get("state", "")), str(m.get("reason", ""))
        )
        for m in json.loads(body)
    ]


def raise_for_status(status: int, body: bytes) -> None:
    """Raise the ``ptmserve.errors`` class the server's error table maps ``status`` from."""
    if 200 <= status < 300:
        return
    message = error_message(body) or f"HTTP {status}"
    cls = status_to_error(status)
    if cls is None:
        raise ServerError(message, status)
    raise cls(message)

"""The one error table: ``ptmserve.errors`` classes <-> HTTP status codes and protocol error bodies.

Both sides read it: the server turns a raised error into a status and a body, the client turns a status
back into the error class. KServe v2 / Triton routes answer ``{"error": "message"}``; OpenAI routes
answer ``{"error": {"message", "type", "param", "code"}}``. The status is the same for both protocols.
Anything that is not a ``PtmError`` is a bug, answered 500 with ``INTERNAL_MESSAGE``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ptmserve import errors


@dataclass(frozen=True, slots=True)
class ErrorKind:
    """One row of the table: the HTTP status and OpenAI's error ``type`` and ``code`` for an error class."""

    status: int
    openai_type: str  # OpenAI's error "type"
    openai_code: str  # OpenAI's error "code"


# The table. Order matters only for subclasses (none today); first match wins. ``status_to_error`` maps a
# status back to the first class with it, so each status's first row is the one clients raise.
ERROR_TABLE: tuple[tuple[type[errors.PtmError], ErrorKind], ...] = (
    (errors.InvalidInput, ErrorKind(400, "invalid_request_error", "invalid_input")),
    (errors.Unauthorized, ErrorKind(401, "authentication_error", "invalid_api_key")),
    (errors.ModelNotFound, ErrorKind(404, "invalid_request_error", "model_not_found")),
    (errors.RequestTimeout, ErrorKind(408, "invalid_request_error", "request_timeout")),
    (errors.PayloadTooLarge, ErrorKind(413, "invalid_request_error", "payload_too_large")),
    (errors.Overloaded, ErrorKind(429, "rate_limit_error", "overloaded")),
    (errors.NotReady, ErrorKind(503, "server_error", "not_ready")),
    # A model whose stored bytes are corrupt, or that cannot fit any tier, cannot serve: not ready.
    (errors.CorruptData, ErrorKind(503, "server_error", "corrupt_data")),
    (errors.BudgetExceeded, ErrorKind(503, "server_error", "budget_exceeded")),
    (errors.InvalidCheckpoint, ErrorKind(503, "server_error", "invalid_checkpoint")),
    (errors.DeadlineExceeded, ErrorKind(504, "timeout_error", "deadline_exceeded")),
    (errors.InvalidConfig, ErrorKind(400, "invalid_request_error", "invalid_config")),
)
INTERNAL = ErrorKind(500, "server_error", "internal_error")
INTERNAL_MESSAGE = "internal server error (logged on the server)"

# Status codes the router itself produces (unknown route, wrong method) keep their status.
_ROUTER_KINDS = {
    404: ErrorKind(404, "invalid_request_error", "not_found"),
    405: ErrorKind(405, "invalid_request_error", "method_not_allowed"),
}


def error_kind(exc: BaseException) -> ErrorKind:
    """The table's row for ``exc``; ``INTERNAL`` (500) for anything that is not a ``PtmError``."""
    for cls, kind in ERROR_TABLE:
        if isinstance(exc, cls):
            return kind
    return INTERNAL


def router_error_kind(status: int) -> ErrorKind:
    """The row for a status code the router produced (404 no such route, 405 wrong method)."""
    return _ROUTER_KINDS.get(status, ErrorKind(status, "invalid_request_error", "http_error"))


def status_to_error(status: int) -> type[errors.PtmError] | None:
    """The ``PtmError`` class a client raises for ``status`` (None: not in the table)."""
    for cls, kind in ERROR_TABLE:
        if kind.status == status:
            return cls
    return None


def code_to_error(code: Any) -> type[errors.PtmError] | None:
    """The ``PtmError`` class of an OpenAI error ``code`` (an error event in a stream has no status)."""
    for cls, kind in ERROR_TABLE:
        if kind.openai_code == code:
            return cls
    return None


def is_openai_path(path: str) -> bool:
    """True for the OpenAI routes (``/v1/...``), whose error body differs from KServe's."""
    return path == "/v1" or path.startswith("/v1/")


def error_body(kind: ErrorKind, message: str, path: str, param: str | None = None) -> bytes:
    """The JSON error body of the protocol that ``path`` belongs to."""
    body: dict[str, Any]
    if is_openai_path(path):
        body = {
            "error": {"message": message, "type": kind.openai_type, "param": param, "code": kind.openai_code}
        }
    else:
        body = {"error": message}
    return json.dumps(body).encode()


def error_message(body: bytes) -> str:
    """The message of an error body of either protocol (or the start of a body that is not one)."""
    try:
        err = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return body[:200].decode("utf-8", errors="replace")
    if isinstance(err, dict):  # OpenAI style
        return str(err.get("message", ""))
    return str(err or "")

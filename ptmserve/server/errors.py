"""The one table that turns ``ptmserve.errors`` into HTTP status codes and protocol error bodies.

KServe v2 / Triton routes answer ``{"error": "message"}``; OpenAI routes answer
``{"error": {"message", "type", "param", "code"}}``. The status is the same for both protocols.
Anything that is not a ``PtmError`` is a bug: it is logged once (with its traceback, server side) and
answered 500 with a generic message.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from starlette.responses import Response

from ptmserve import errors

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ErrorKind:
    status: int
    openai_type: str  # OpenAI's error "type"
    openai_code: str  # OpenAI's error "code"


# The table. Order matters only for subclasses (none today); first match wins.
ERROR_TABLE: tuple[tuple[type[errors.PtmError], ErrorKind], ...] = (
    (errors.InvalidInput, ErrorKind(400, "invalid_request_error", "invalid_input")),
    (errors.Unauthorized, ErrorKind(401, "authentication_error", "invalid_api_key")),
    (errors.ModelNotFound, ErrorKind(404, "invalid_request_error", "model_not_found")),
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


def kind_of(exc: BaseException) -> ErrorKind:
    """The row of the table for ``exc``; ``INTERNAL`` for anything that is not a ``PtmError``."""
    for cls, kind in ERROR_TABLE:
        if isinstance(exc, cls):
            return kind
    return INTERNAL


def router_kind(status: int) -> ErrorKind:
    """The kind for a status code the router produced (404 no such route, 405 wrong method)."""
    return _ROUTER_KINDS.get(status, ErrorKind(status, "invalid_request_error", "http_error"))


def is_openai_path(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


def error_body(kind: ErrorKind, message: str, path: str, param: str | None = None) -> bytes:
    """The JSON error body of the protocol that ``path`` belongs to."""
    if is_openai_path(path):
        body: dict = {
            "error": {"message": message, "type": kind.openai_type, "param": param, "code": kind.openai_code}
        }
    else:
        body = {"error": message}
    return json.dumps(body).encode()


def describe(exc: BaseException) -> tuple[ErrorKind, str]:
    """Status row and client-safe message for ``exc``; logs a non-``PtmError`` once, with traceback."""
    kind = kind_of(exc)
    if kind is INTERNAL:
        logger.error("unhandled error while serving a request", exc_info=exc)
        return kind, INTERNAL_MESSAGE
    assert isinstance(exc, errors.PtmError)
    return kind, exc.message


def status_to_error(status: int) -> type[errors.PtmError] | None:
    """The ``PtmError`` class a client should raise for ``status`` (None: not in the table)."""
    for cls, kind in ERROR_TABLE:
        if kind.status == status:
            return cls
    return None


def error_response(exc: BaseException, path: str, headers: dict[str, str] | None = None) -> Response:
    """The HTTP response for ``exc`` in the protocol of ``path`` (logs it once if it is a bug)."""
    kind, message = describe(exc)
    body = error_body(kind, message, path, getattr(exc, "param", None))
    if kind.status == 401:
        headers = {"WWW-Authenticate": "Bearer", **(headers or {})}
    return Response(body, status_code=kind.status, media_type="application/json", headers=headers)

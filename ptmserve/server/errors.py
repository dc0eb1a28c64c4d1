"""Errors as HTTP responses: the table of ``ptmserve.protocol.errors`` applied to a raised exception.

Anything that is not a ``PtmError`` is a bug: it is logged once (with its traceback, server side) and
answered 500 with a generic message.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from starlette.responses import Response

from ptmserve import errors
from ptmserve.protocol.errors import INTERNAL, INTERNAL_MESSAGE, ErrorKind, error_body, error_kind

logger = logging.getLogger(__name__)


def describe(exc: BaseException) -> tuple[ErrorKind, str]:
    """Status row and client-safe message for ``exc``; logs a non-``PtmError`` once, with traceback."""
    kind = error_kind(exc)
    if kind is INTERNAL:
        logger.error("unhandled error while serving a request", exc_info=exc)
        return kind, INTERNAL_MESSAGE
    assert isinstance(exc, errors.PtmError)
    return kind, exc.message


def error_response(exc: BaseException, path: str, headers: dict[str, str] | None = None) -> Response:
    """The HTTP response for ``exc`` in the protocol of ``path`` (logs it once if it is a bug)."""
    kind, message = describe(exc)
    body = error_body(kind, message, path, getattr(exc, "param", None))
    if kind.status == 401:
        headers = {"WWW-Authenticate": "Bearer", **(headers or {})}
    return Response(body, status_code=kind.status, media_type="application/json", headers=headers)


def invalid_input_from(problems: Iterable[Any], limit: int = 3) -> errors.InvalidInput:
    """A short ``InvalidInput`` from pydantic's (or FastAPI's) validation errors; never echoes the values.

    A union field (OpenAI's ``input``) fails once per member; it is reported once, in words. The first
    field in error becomes the error's ``param`` (OpenAI's error body carries it).
    """
    fields: dict[str, str] = {}
    for err in problems:
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        field = loc[0] if loc else "body"
        if field in fields:
            continue
        if field == "input" and err.get("type") != "missing":
            fields[field] = (
                "input: must be a string, a list of strings, or token ids (list of int or list of lists)"
            )
        else:
            fields[field] = f"{'.'.join(loc) or 'body'}: {err.get('msg', 'invalid')}"
    parts = list(fields.values())
    more = len(parts) - limit
    out = errors.InvalidInput(
        "invalid request: " + "; ".join(parts[:limit]) + (f" (and {more} more)" if more > 0 else "")
    )
    out.param = next(iter(fields), None)  # type: ignore[attr-defined]  # OpenAI's error "param"
    return out

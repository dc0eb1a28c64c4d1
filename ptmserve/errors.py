"""Typed errors raised by core code.

Core code raises these; exactly one table in ``ptmserve.protocol.errors`` turns them into HTTP
status codes and protocol bodies (and back, for the client). Nothing here knows about HTTP.
"""

from __future__ import annotations


class PtmError(Exception):
    """Base of every error ptmserve raises on purpose. ``message`` is safe to show a client."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(PtmError):
    """The request is malformed: wrong type, shape, datatype, empty input, bad parameter."""


class Unauthorized(PtmError):
    """Missing or wrong API key."""


class ModelNotFound(PtmError):
    """No model of that name in the repository."""


class RequestTimeout(PtmError):
    """The client took too long to send its request (headers or body)."""


class PayloadTooLarge(PtmError):
    """The request body or batch exceeds a configured limit."""


class Overloaded(PtmError):
    """A bounded queue is full; the client should retry later."""


class NotReady(PtmError):
    """The server or the model cannot serve now (unloaded, load failed, draining)."""


class DeadlineExceeded(PtmError):
    """The request could not complete within its deadline; it was not run late."""


class CorruptData(PtmError):
    """Stored bytes do not match their checksum, or a stored file is truncated or missing."""


class InvalidCheckpoint(PtmError):
    """A checkpoint folder cannot be imported (missing files, unsupported architecture)."""


class BudgetExceeded(PtmError):
    """A model does not fit a memory tier's byte budget even when that tier is empty."""


class InvalidConfig(PtmError):
    """A setting is out of range or malformed; the message quotes the value."""

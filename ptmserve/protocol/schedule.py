"""The schedule policy parameters, ``priority`` and ``timeout`` (µs), as both routes accept them.

KServe / Triton carry them as unsigned 64-bit integers; the OpenAI route takes the same two fields in its
body. 0 means "the model's default class" for ``priority`` and "no deadline" for ``timeout``.
"""

from __future__ import annotations

from typing import Any

from ptmserve.errors import InvalidInput

MAX_SCHEDULE_VALUE = 2**64 - 1  # uint64, as in Triton's schedule policy extension


def schedule_value(key: str, value: Any) -> int:
    """``value`` as a ``priority`` or ``timeout``; ``InvalidInput`` unless it is an integer in range."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_SCHEDULE_VALUE:
        return value
    shown = repr(value)
    if len(shown) > 40:
        shown = shown[:37] + "..."
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        raise InvalidInput(f"parameter {key!r} must be at most {MAX_SCHEDULE_VALUE} (uint64), got {shown}")
    raise InvalidInput(f"parameter {key!r} must be a non-negative integer, got {shown}")

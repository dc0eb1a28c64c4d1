"""Server-sent events as the generation routes send them: one ``data: <json>`` line per event.

OpenAI's streams end with ``data: [DONE]``; Triton's ``generate_stream`` simply ends. An error after the
stream began is one event ``{"error": ...}`` in the protocol's error body, and then the stream ends.
Both the server (``encode_event``) and ``ptmserve.client`` (``decode_line``) use this module.
"""

from __future__ import annotations

import json
from typing import Any

DONE = b"data: [DONE]\n\n"
MEDIA_TYPE = "text/event-stream"


class Done:
    """The ``[DONE]`` marker (``decode_line`` returns this class)."""


def encode_event(obj: Any) -> bytes:
    """One event carrying ``obj`` as compact JSON."""
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def encode_data(payload: bytes) -> bytes:
    """One event carrying ``payload`` (already JSON) as it is."""
    return b"data: " + payload + b"\n\n"


def decode_line(line: str) -> dict[str, Any] | type[Done] | None:
    """The event of one line of a stream: its JSON object, ``Done``, or None for a line that carries no
    data (blank lines between events, comments, ``event:``/``id:`` fields).

    Raises:
        ValueError: a ``data:`` line that is not a JSON object.
    """
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if data == "[DONE]":
        return Done
    obj = json.loads(data)
    if not isinstance(obj, dict):
        raise ValueError(f"event data is not a JSON object: {data[:80]!r}")
    return obj

"""Text generation over the server's OpenAI routes: request bodies, answers, and streams of text chunks.

``CompletionStream`` (sync) and ``AsyncCompletionStream`` read the server-sent events of an httpx response
opened with ``stream=True``; everything else here is pure. The event format is ``ptmserve.protocol.sse``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

import httpx

from ptmserve.client.calls import HttpCall, ServerError
from ptmserve.errors import PtmError
from ptmserve.protocol import sse
from ptmserve.protocol.errors import code_to_error

Prompt = str | Sequence[int]
Messages = Sequence[Mapping[str, str]]


class GenerationKwargs(TypedDict, total=False):
    """Sampling and scheduling options of ``complete`` and ``chat`` (None or absent: the server's default)."""

    max_tokens: int | None  # new tokens at most (server default: 16 for complete, the context for chat)
    temperature: float  # 0: greedy
    top_p: float
    top_k: int  # 0: no top-k filter
    seed: int | None  # the same seed gives the same text
    stop: str | Sequence[str] | None  # the text ends before the first of these
    ignore_eos: bool  # generate past the end-of-sequence token
    priority: int  # 0: the model's default class, 1: real-time, 2 and more: batch
    timeout_us: int | None  # the request must start generating within this, or fail with 504


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@dataclass(frozen=True, slots=True)
class Completion:
    """The whole answer of a request without streaming."""

    text: str
    finish_reason: str  # "stop" (end-of-sequence token or a stop string) or "length"
    usage: Usage


def generation_call(
    model: str,
    *,
    prompt: Prompt | None = None,
    messages: Messages | None = None,
    stream: bool,
    options: GenerationKwargs,
) -> HttpCall:
    """``POST /v1/completions`` (``prompt``) or ``/v1/chat/completions`` (``messages``)."""
    body: dict[str, Any] = {"model": model}
    if messages is not None:
        body["messages"] = [dict(m) for m in messages]
    else:
        body["prompt"] = prompt if isinstance(prompt, str) else [int(t) for t in prompt or ()]
    for key, value in options.items():
        if value is None:
            continue
        if key == "stop" and not isinstance(value, str):
            value = list(value)
        body["timeout" if key == "timeout_us" else key] = value
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    path = "/v1/chat/completions" if messages is not None else "/v1/completions"
    return HttpCall("POST", path, json.dumps(body).encode(), {"Content-Type": "application/json"})


def completion(body: Mapping[str, Any]) -> Completion:
    """The ``Completion`` of a completions or chat answer."""
    choice = body["choices"][0]
    text = choice["message"]["content"] if "message" in choice else choice["text"]
    return Completion(text or "", choice["finish_reason"], _usage(body["usage"]))


def _usage(raw: Mapping[str, Any]) -> Usage:
    return Usage(int(raw["prompt_tokens"]), int(raw["completion_tokens"]), int(raw["total_tokens"]))


def stream_error(err: Any) -> PtmError:
    """The error an ``{"error": ...}`` event reports, as the class of the server's error table."""
    if not isinstance(err, Mapping):
        return ServerError(str(err), 500)
    message = str(err.get("message", "error while streaming"))
    cls = code_to_error(err.get("code"))
    return ServerError(message, 500) if cls is None else cls(message)


class _Events:
    """The state of a stream: what has been read so far, and the reading of one line."""

    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self.finish_reason: str | None = None  # set by the last chunk
        self.usage: Usage | None = None  # set after the last chunk
        self.done = False

    def _text(self, line: str) -> str:
        """The new text a line of the stream carries ("" for none); raises the error an event reports."""
        event = sse.decode_line(line)
        if event is sse.Done:
            self.done = True
        if not isinstance(event, dict):
            return ""
        if "error" in event:
            raise stream_error(event["error"])
        if event.get("usage"):
            self.usage = _usage(event["usage"])
        text = ""
        for choice in event.get("choices") or ():
            self.finish_reason = choice.get("finish_reason") or self.finish_reason
            text += (choice["delta"].get("content") if "delta" in choice else choice.get("text")) or ""
        return text


class CompletionStream(_Events):
    """The text chunks of a streamed answer, as they arrive (iterate it once). Then ``finish_reason`` and
    ``usage`` are set. ``close()`` (or leaving a ``with`` block) before the end stops the generation."""

    def __iter__(self) -> Iterator[str]:
        try:
            for line in self._response.iter_lines():
                text = self._text(line)
                if text:
                    yield text
                if self.done:
                    return
        finally:
            self.close()

    def close(self) -> None:
        self._response.close()

    def __enter__(self) -> CompletionStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncCompletionStream(_Events):
    """``CompletionStream`` for asyncio: ``async for``, ``aclose()``, ``async with``."""

    async def __aiter__(self) -> AsyncIterator[str]:
        try:
            async for line in self._response.aiter_lines():
                text = self._text(line)
                if text:
                    yield text
                if self.done:
                    return
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        await self._response.aclose()

    async def __aenter__(self) -> AsyncCompletionStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

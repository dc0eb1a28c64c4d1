"""OpenAI's text generation bodies: ``POST /v1/completions`` and ``POST /v1/chat/completions``.

Requests are validated strictly (no coercion of numbers and strings). What ptmserve does not implement
is refused with a 400 naming it (``n`` > 1, ``best_of``, ``echo``, ``logprobs``, ``suffix``, tools,
``logit_bias``, penalties, a JSON ``response_format``) rather than silently ignored; unknown fields are
ignored. Answers and stream chunks carry OpenAI's ``id`` (``cmpl-...``/``chatcmpl-...``), ``object``,
``created``, ``model``, ``choices`` and ``usage``.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
)

from ptmserve.engine.api import GenerationResult
from ptmserve.errors import InvalidInput
from ptmserve.protocol import sse
from ptmserve.server.dataplane import DataPlane, GenerationRequest
from ptmserve.server.sampling import SamplingFields

COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; a chat runs to the context's end

# Fields ptmserve does not implement: (the values that mean "not used", what the refusal says). A field
# that is absent or null is never refused.
_UNSUPPORTED: dict[str, tuple[tuple[Any, ...], str]] = {
    "n": ((1,), "n must be 1: ptmserve returns one choice per request (send several requests instead)"),
    "best_of": ((1,), "best_of is not supported (only 1)"),
    "echo": ((False,), "echo=true is not supported"),
    "logprobs": ((False,), "logprobs are not supported"),
    "top_logprobs": ((0,), "top_logprobs are not supported"),
    "suffix": (("",), "suffix is not supported"),
    "tools": (([],), "tools (function calling) are not supported"),
    "functions": (([],), "functions (function calling) are not supported"),
    "logit_bias": (({},), "logit_bias is not supported"),
    "presence_penalty": ((0, 0.0), "presence_penalty is not supported (only 0)"),
    "frequency_penalty": ((0, 0.0), "frequency_penalty is not supported (only 0)"),
    "response_format": (({"type": "text"},), "response_format is not supported (only {'type': 'text'})"),
}


def refuse_unsupported(body: dict[str, Any]) -> None:
    """``InvalidInput`` (with OpenAI's ``param``) for the first field of ``_UNSUPPORTED`` that is used."""
    for name, (unused, message) in _UNSUPPORTED.items():
        value = body.get(name)
        if value is None or any(type(value) is type(u) and value == u for u in unused):
            continue
        err = InvalidInput(message)
        err.param = name  # type: ignore[attr-defined]  # OpenAI's error "param"
        raise err


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    include_usage: bool = False  # one more chunk before [DONE], with empty choices and the usage


class _Generation(SamplingFields):
    model: str = Field(max_length=256)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # ignored

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Generation):
    """The body of ``POST /v1/completions``: one prompt (a string, a list of one string, token ids)."""

    prompt: str | list[str] | list[int] | list[list[int]]

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _one_prompt(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> str | list[int]:
        try:
            value = handler(value)
        except ValidationError:
            raise ValueError("must be a string, a list of one string, or a list of token ids") from None
        if isinstance(value, str) or not value or isinstance(value[0], int):
            return value
        if len(value) != 1:
            raise ValueError(f"one prompt per request, got {len(value)}: send several requests")
        return value[0]

    def generation(self, plane: DataPlane) -> GenerationRequest:
        """The request in protocol-neutral form (``max_tokens`` 16 unless given, as OpenAI's)."""
        prompt: str | list[int] = self.prompt  # type: ignore[assignment]  # one prompt, see _one_prompt
        return self.request(plane, COMPLETION_MAX_TOKENS, prompt=prompt)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def plain(self) -> dict[str, str]:
        """``{"role", "content"}`` with the text parts joined."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": self.role, "content": text}


class ChatRequest(_Generation):
    """The body of ``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # OpenAI's newer name of max_tokens

    def generation(self, plane: DataPlane) -> GenerationRequest:
        """The request in protocol-neutral form (no ``max_tokens``: until the context's end)."""
        limit = self.max_completion_tokens
        if limit is not None and self.max_tokens is not None and limit != self.max_tokens:
            raise InvalidInput("max_tokens and max_completion_tokens differ: give one of them")
        return self.request(plane, limit, messages=[m.plain() for m in self.messages])


@dataclass(frozen=True, slots=True)
class Reply:
    """The bodies of one answer (all share its ``id``, ``created`` and ``model``); ``chat`` picks the chat
    shapes. As a stream it is an ``EventFormat``: a role chunk first (chat), text chunks, a chunk with the
    ``finish_reason``, the usage chunk when asked for, then ``[DONE]``."""

    id: str
    created: int
    model: str
    chat: bool
    include_usage: bool = False

    @classmethod
    def new(cls, model: str, *, chat: bool, include_usage: bool = False) -> Reply:
        prefix = "chatcmpl-" if chat else "cmpl-"
        return cls(prefix + uuid.uuid4().hex, int(time.time()), model, chat, include_usage)

    def _body(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def whole(self, result: GenerationResult) -> dict[str, Any]:
        """The answer to a request without ``stream``."""
        choice: dict[str, Any] = {"index": 0}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": result.text}
        else:
            choice["text"] = result.text
        choice |= {"logprobs": None, "finish_reason": result.finish_reason}
        body = self._body("chat.completion" if self.chat else "text_completion", [choice])
        return body | {"usage": usage(result)}

    def _chunk(self, delta: dict[str, str], text: str, finish_reason: str | None) -> bytes:
        choice: dict[str, Any] = {"index": 0}
        choice |= {"delta": delta} if self.chat else {"text": text}
        choice |= {"logprobs": None, "finish_reason": finish_reason}
        body = self._body("chat.completion.chunk" if self.chat else "text_completion", [choice])
        if self.include_usage:
            body["usage"] = None
        return sse.encode_event(body)

    def head(self) -> list[bytes]:
        return [self._chunk({"role": "assistant", "content": ""}, "", None)] if self.chat else []

    def chunk(self, text: str) -> bytes:
        return self._chunk({"content": text}, text, None)

    def end(self, result: GenerationResult) -> list[bytes]:
        events = [self._chunk({}, "", result.finish_reason)]
        if self.include_usage:
            obj = "chat.completion.chunk" if self.chat else "text_completion"
            events.append(sse.encode_event(self._body(obj, []) | {"usage": usage(result)}))
        return [*events, sse.DONE]


def usage(result: GenerationResult) -> dict[str, int]:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }

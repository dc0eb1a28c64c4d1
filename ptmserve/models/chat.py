"""Chat messages to a prompt with the model's own chat template (a Jinja template, as in Hugging Face's
``tokenizer_config.json`` and GGUF's ``tokenizer.chat_template``), rendered in Jinja's sandbox."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ptmserve.errors import InvalidInput

ROLES = ("system", "user", "assistant", "tool")


def _raise(message: str) -> None:
    raise InvalidInput(f"the chat template refused the messages: {message}")


@lru_cache(maxsize=16)
def _compile(template: str) -> Any:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.globals["raise_exception"] = _raise
    return env.from_string(template)


def check_messages(messages: object) -> list[dict[str, str]]:
    """``messages`` as plain dicts, each with a known ``role`` and a string ``content``.

    Raises:
        InvalidInput: naming the first malformed message.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise InvalidInput("messages must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise InvalidInput(f"messages[{i}] must be an object with a role and a content")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise InvalidInput(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise InvalidInput(f"messages[{i}].content must be a string")
        out.append({"role": role, "content": content})
    return out


def render_chat(template: str, messages: object, special_tokens: Mapping[str, Any]) -> str:
    """The prompt text of ``messages`` followed by the assistant's turn, with ``bos_token`` and
    ``eos_token`` from ``special_tokens`` (the model's generation settings).

    Raises:
        InvalidInput: malformed messages, or the template fails on them.
    """
    checked = check_messages(messages)
    try:
        return _compile(template).render(
            messages=checked,
            add_generation_prompt=True,
            bos_token=special_tokens.get("bos_token") or "",
            eos_token=special_tokens.get("eos_token") or "",
        )
    except TemplateError as exc:
        raise InvalidInput(f"the model's chat template failed: {exc}") from None

"""Preparing a request: check it and turn its text into token ids, before any compute.

``Engine`` prepares its own requests with these functions; with ``serve --workers N`` the front end
(``pool/``) prepares them and sends token ids, which a worker's engine takes as given (``Engine.embed``,
``classify`` and ``complete`` all accept them), so the workers only compute. One set of checks and
messages: a request is refused alike by one process or by the front end. The worker checks the ids again
(cheaply) and applies what only it knows (the KV cache capacity, its queues).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ptmserve.engine.catalog import CatalogEntry, ModelCatalog
from ptmserve.errors import InvalidInput
from ptmserve.models.chat import render_chat

# Requests up to this size are prepared on the caller's event loop: characters or token ids in all, with
# the tokenizer already parsed. Larger ones go to a thread (two thread hand-offs would cost a small
# request more, in GIL switches, than its tokenizing does).
INLINE_INPUTS = 32
INLINE_UNITS = 2048


def cheap_to_prepare(catalog: ModelCatalog, model: str, inputs: Sequence[Any]) -> bool:
    """Small enough to check and tokenize in well under a millisecond, with the tokenizer parsed."""
    if isinstance(inputs, (str, bytes)) or not isinstance(inputs, Sequence) or len(inputs) > INLINE_INPUTS:
        return False
    size = 0
    for x in inputs:
        if not isinstance(x, (str, Sequence)):
            return False
        size += len(x)
    return size <= INLINE_UNITS and catalog.has_tokenizer(model)


def encoder_ids(
    catalog: ModelCatalog, entry: CatalogEntry, model: str, inputs: Sequence[Any], *, classify: bool
) -> list[list[int]]:
    """Token ids of an embedding or classification request (texts tokenized, ids checked).

    Raises:
        InvalidInput: a text generation model, no classification head, or malformed inputs.
    """
    if entry.generates:
        raise InvalidInput(
            f"model {model!r} is a text generation model: it has no embeddings or labels; "
            "use completions or chat"
        )
    if classify and not entry.config.labels:
        raise InvalidInput(f"model {model!r} has no classification head; use embeddings")
    return catalog.tokenize(model, inputs)


def prompt_ids(catalog: ModelCatalog, model: str, prompt: str | Sequence[int]) -> str | Sequence[int]:
    """A completion's prompt as token ids: a text is tokenized with the model's special tokens; token ids
    go on as given (the worker's engine checks them, with the same messages).

    Raises:
        InvalidInput: an empty text.
    """
    if not isinstance(prompt, str):
        return prompt
    if not prompt:
        raise InvalidInput("the prompt is empty")
    return catalog.tokenizer(model).encode_prompt(prompt)


def chat_ids(
    catalog: ModelCatalog, entry: CatalogEntry, model: str, messages: Sequence[Mapping[str, Any]]
) -> list[int]:
    """A chat rendered with the model's own template, as token ids.

    Raises:
        InvalidInput: no chat template, or malformed messages.
    """
    settings = entry.manifest.generation
    template = settings.get("chat_template")
    if not template:
        raise InvalidInput(f"model {model!r} has no chat template; use completions")
    text = render_chat(template, messages, settings)
    return catalog.tokenizer(model).encode_prompt(text, special_tokens=False)

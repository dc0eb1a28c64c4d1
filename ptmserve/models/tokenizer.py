"""Text to token ids with a checkpoint's ``tokenizer.json`` (the ``tokenizers`` library).

Padding is always off (batches are packed) and truncation is always at ``max_length`` tokens, special
tokens included, whatever the file says (all-MiniLM-L6-v2's file pads and truncates to 128).
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral

from tokenizers import Tokenizer

from ptmserve.errors import InvalidCheckpoint, InvalidInput


class TextTokenizer:
    """Encodes texts into unpadded token-id lists no longer than ``max_length``."""

    def __init__(self, tokenizer: Tokenizer, max_length: int) -> None:
        if max_length <= 0:
            raise InvalidCheckpoint(f"max_length must be positive, got {max_length}")
        tokenizer.no_padding()
        self._whole = Tokenizer.from_str(tokenizer.to_str())  # prompts: never truncated, nor padded
        self._whole.no_truncation()
        tokenizer.enable_truncation(max_length)
        self._tok = tokenizer
        self.max_length = max_length

    @classmethod
    def from_json(cls, data: bytes, max_length: int) -> TextTokenizer:
        """A tokenizer from the bytes of a ``tokenizer.json``.

        Raises:
            InvalidCheckpoint: the bytes are not a valid tokenizer file.
        """
        try:
            tok = Tokenizer.from_str(data.decode("utf-8"))
        except (UnicodeDecodeError, Exception) as exc:  # tokenizers raises a bare Exception
            raise InvalidCheckpoint(f"invalid tokenizer.json: {exc}") from exc
        return cls(tok, max_length)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, special tokens added, truncated at ``max_length``.

        Raises:
            InvalidInput: an item is not a string.
        """
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise InvalidInput(f"input {i} is a {type(text).__name__}, expected a string")
        if not texts:
            return []
        return [enc.ids for enc in self._tok.encode_batch(list(texts), add_special_tokens=True)]

    def encode_prompt(self, text: str, *, special_tokens: bool = True) -> list[int]:
        """Token ids of a whole prompt, not truncated (generation keeps a long prompt's end, or refuses
        it). ``special_tokens=False`` for text that spells its special tokens out (a rendered chat)."""
        if not isinstance(text, str):
            raise InvalidInput(f"the prompt is a {type(text).__name__}, expected a string")
        return self._whole.encode(text, add_special_tokens=special_tokens).ids

    def decode(self, ids: Sequence[int]) -> str:
        """The text of generated token ids, special tokens left out."""
        return self._whole.decode(list(ids), skip_special_tokens=True)


def check_ids(ids: Sequence[Sequence[int]], vocab_size: int, max_length: int | None = None) -> None:
    """Check pre-tokenised input: each sequence non-empty, ids integers in ``[0, vocab_size)``, and at
    most ``max_length`` long when given.

    Raises:
        InvalidInput: naming the first offending sequence and value.
    """
    for i, seq in enumerate(ids):
        if len(seq) == 0:
            raise InvalidInput(f"input {i} has no tokens")
        if max_length is not None and len(seq) > max_length:
            raise InvalidInput(f"input {i} has {len(seq)} tokens; the model takes at most {max_length}")
        for tok in seq:
            if isinstance(tok, bool) or not isinstance(tok, Integral) or not 0 <= tok < vocab_size:
                raise InvalidInput(
                    f"input {i} holds token id {tok!r}; ids must be integers in [0, {vocab_size})"
                )

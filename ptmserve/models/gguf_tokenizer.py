"""A ``tokenizers`` tokenizer built from a GGUF file's metadata (llama.cpp's ``tokenizer.*`` keys).

A GGUF file has no ``tokenizer.json``: it stores the vocabulary, the merges, the token types and the
special token ids as metadata. Only byte-level BPE (``tokenizer.ggml.model == "gpt2"``) is built
here. How text is split before the merges (``tokenizer.ggml.pre``) follows llama.cpp for the splits
listed in ``PRE_TOKENIZERS``; any other is refused rather than guessed, since a wrong split gives
plausible but wrong token ids.

Control tokens (type 3, such as ``<|im_start|>``) become special added tokens, so that they are matched
whole in text and skipped when decoding; user-defined tokens (type 4) are matched whole but stay
ordinary, as llama.cpp and ``transformers``' GGUF loader do.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from ptmserve.errors import InvalidCheckpoint

log = logging.getLogger(__name__)

TOKENIZER_MODELS = ("gpt2",)  # tokenizer.ggml.model values we build
CONTROL = 3  # llama.cpp token types
USER_DEFINED = 4

# llama.cpp's split for its "llama-bpe" pre-tokenizer (LLaMA 3), applied before byte-level BPE.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gpt2_split() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _smollm_split() -> pre_tokenizers.PreTokenizer:
    # SmolLM's own tokenizer.json: every digit alone, then GPT-2's split (llama.cpp's "smollm").
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2_split()])


def _llama3_split() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


# tokenizer.ggml.pre -> (pre-tokenizer, whether a word found whole in the vocabulary skips the merges)
PRE_TOKENIZERS = {
    "default": (_gpt2_split, False),
    "gpt2": (_gpt2_split, False),
    "smollm": (_smollm_split, False),
    "llama-bpe": (_llama3_split, True),
    "llama3": (_llama3_split, True),
    "llama-v3": (_llama3_split, True),
}


def tokenizer_from_gguf(meta: Mapping[str, Any]) -> tuple[bytes, dict[str, Any]]:
    """The tokenizer JSON and the generation settings described by GGUF metadata.

    Args:
        meta: the file's metadata, key -> value (``gguf.read_metadata``).

    Returns:
        ``(tokenizer_json, generation)``: the bytes of a ``tokenizers`` JSON file, and ``chat_template``
        (when the file has one), ``bos_token_id``, ``eos_token_id``, ``bos_token``, ``eos_token`` and
        ``add_bos_token`` / ``add_eos_token`` (when the file says).

    Raises:
        InvalidCheckpoint: another tokenizer model or pre-tokenizer, or malformed tokenizer metadata.
    """
    kind = meta.get("tokenizer.ggml.model")
    if kind not in TOKENIZER_MODELS:
        raise InvalidCheckpoint(
            f"GGUF tokenizer model {kind!r} is not supported; supported: {list(TOKENIZER_MODELS)} "
            "(byte-level BPE)"
        )
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise InvalidCheckpoint(
            f"GGUF pre-tokenizer {pre!r} is not supported; supported: {sorted(PRE_TOKENIZERS)}"
        )
    tokens = _strings(meta, "tokenizer.ggml.tokens")
    merges = _strings(meta, "tokenizer.ggml.merges")
    types = _ints(meta, "tokenizer.ggml.token_type", default=[1] * len(tokens))
    if len(types) != len(tokens):
        raise InvalidCheckpoint(f"GGUF tokenizer has {len(tokens)} tokens but {len(types)} token types")
    generation = _generation(meta, tokens)
    split, ignore_merges = PRE_TOKENIZERS[pre]
    tokenizer = _byte_level_bpe(tokens, merges, ignore_merges)
    tokenizer.pre_tokenizer = split()
    tokenizer.decoder = decoders.ByteLevel()
    _add_tokens(tokenizer, tokens, types)
    tokenizer.post_processor = _post_processor(generation)
    return tokenizer.to_str().encode("utf-8"), generation


@functools.cache
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the spelling of every byte-level BPE vocabulary.

    Printable Latin-1 bytes stand for themselves; the others (controls, space, ...) take the characters
    from U+0100 on, in byte order.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + n)
    return table


def _spelled(token: str) -> str:
    """``token`` in the byte alphabet (a token stored as raw text, e.g. with a space, is respelled)."""
    alphabet = _byte_alphabet()
    if set(token) <= set(alphabet.values()):
        return token
    return "".join(alphabet[b] for b in token.encode("utf-8"))


def _byte_level_bpe(tokens: Sequence[str], merges: Sequence[str], ignore_merges: bool) -> Tokenizer:
    vocab = {_spelled(token): i for i, token in enumerate(tokens)}
    pairs = []
    for merge in merges:
        parts = merge.split(" ")
        if len(parts) != 2:
            raise InvalidCheckpoint(f"GGUF tokenizer merge {merge!r} is not two tokens separated by a space")
        pairs.append((parts[0], parts[1]))
    try:
        model = models.BPE(
            vocab=vocab,
            merges=pairs,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            ignore_merges=ignore_merges,
        )
    except Exception as exc:  # tokenizers raises a bare Exception for merges outside the vocabulary
        raise InvalidCheckpoint(f"GGUF tokenizer vocabulary and merges do not fit: {exc}") from exc
    return Tokenizer(model)


def _add_tokens(tokenizer: Tokenizer, tokens: Sequence[str], types: Sequence[int]) -> None:
    """Control tokens as special added tokens, user-defined ones as plain added tokens.

    A control token spelled outside the byte alphabet is not in the BPE vocabulary under its own text,
    so adding it would give it a new id past the model's vocabulary: it is skipped (llama.cpp files
    sometimes mislabel such tokens; ``transformers`` skips them too).
    """
    alphabet = set(_byte_alphabet().values())
    special, plain, skipped = [], [], []
    for token, kind in zip(tokens, types, strict=True):
        if kind not in (CONTROL, USER_DEFINED):
            continue
        if kind == CONTROL and not set(token) <= alphabet:
            skipped.append(token)
            continue
        added = AddedToken(token, special=kind == CONTROL, normalized=False)
        (special if kind == CONTROL else plain).append(added)
    if skipped:
        log.warning("skipped %d control tokens spelled outside the byte alphabet: %s", len(skipped), skipped)
    tokenizer.add_special_tokens(special)
    tokenizer.add_tokens(plain)


def _generation(meta: Mapping[str, Any], tokens: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    template = meta.get("tokenizer.chat_template")
    if template is not None:
        if not isinstance(template, str):
            raise InvalidCheckpoint("GGUF metadata 'tokenizer.chat_template' is not a string")
        out["chat_template"] = template
    for role in ("bos", "eos"):
        token_id = meta.get(f"tokenizer.ggml.{role}_token_id")
        if token_id is None:
            continue
        if isinstance(token_id, bool) or not isinstance(token_id, int) or not 0 <= token_id < len(tokens):
            raise InvalidCheckpoint(
                f"GGUF {role} token id {token_id!r} is not a token of the vocabulary of {len(tokens)}"
            )
        out[f"{role}_token_id"] = token_id
        out[f"{role}_token"] = tokens[token_id]
    for flag in ("add_bos_token", "add_eos_token"):
        value = meta.get(f"tokenizer.ggml.{flag}")
        if value is not None:
            out[flag] = bool(value)
    return out


def _post_processor(generation: Mapping[str, Any]) -> processors.PostProcessor | None:
    """BOS / EOS around every text when the file asks for them (``add_special_tokens=True``)."""
    bos = generation.get("bos_token") if generation.get("add_bos_token") else None
    eos = generation.get("eos_token") if generation.get("add_eos_token") else None
    if bos is None and eos is None:
        return None
    head = [bos] if bos is not None else []
    tail = [eos] if eos is not None else []
    single = " ".join([*head, "$A", *tail])
    pair = " ".join([*head, "$A", *tail, *[f"{t}:1" for t in head], "$B:1", *[f"{t}:1" for t in tail]])
    ids = {t: generation[f"{role}_token_id"] for t, role in ((bos, "bos"), (eos, "eos")) if t is not None}
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=list(ids.items()))


def _strings(meta: Mapping[str, Any], key: str) -> list[str]:
    value = meta.get(key)
    if value is None:
        raise InvalidCheckpoint(f"GGUF metadata has no {key!r}")
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidCheckpoint(f"GGUF metadata {key!r} is not a list of strings")
    return value


def _ints(meta: Mapping[str, Any], key: str, default: list[int]) -> list[int]:
    value = meta.get(key)
    if value is None:
        return default
    if not isinstance(value, list) or not all(isinstance(v, int) for v in value):
        raise InvalidCheckpoint(f"GGUF metadata {key!r} is not a list of integers")
    return value

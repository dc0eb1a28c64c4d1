"""Checkpoint-name translation: one table per family, Hugging Face module path -> our module path.

Our names start with their group (``embeddings.*``, ``layers.{i}.*``, ``head.*``); see ``encoder.py``.
Tables hold module paths; ``.weight``/``.bias`` (and TF-era LayerNorm ``.gamma``/``.beta``) are
appended here. Base-model keys may carry the architecture's prefix (``bert.``, ``roberta.``,
``distilbert.``) or none; head keys of ``...ForSequenceClassification`` sit at the top level.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

_BERT_BODY = {
    "embeddings.word_embeddings": "embeddings.word",
    "embeddings.position_embeddings": "embeddings.position",
    "embeddings.token_type_embeddings": "embeddings.token_type",
    "embeddings.LayerNorm": "embeddings.norm",
    "encoder.layer.{i}.attention.self.query": "layers.{i}.q",
    "encoder.layer.{i}.attention.self.key": "layers.{i}.k",
    "encoder.layer.{i}.attention.self.value": "layers.{i}.v",
    "encoder.layer.{i}.attention.output.dense": "layers.{i}.o",
    "encoder.layer.{i}.attention.output.LayerNorm": "layers.{i}.attn_norm",
    "encoder.layer.{i}.intermediate.dense": "layers.{i}.up",
    "encoder.layer.{i}.output.dense": "layers.{i}.down",
    "encoder.layer.{i}.output.LayerNorm": "layers.{i}.ffn_norm",
}
_DISTILBERT_BODY = {
    "embeddings.word_embeddings": "embeddings.word",
    "embeddings.position_embeddings": "embeddings.position",
    "embeddings.LayerNorm": "embeddings.norm",
    "transformer.layer.{i}.attention.q_lin": "layers.{i}.q",
    "transformer.layer.{i}.attention.k_lin": "layers.{i}.k",
    "transformer.layer.{i}.attention.v_lin": "layers.{i}.v",
    "transformer.layer.{i}.attention.out_lin": "layers.{i}.o",
    "transformer.layer.{i}.sa_layer_norm": "layers.{i}.attn_norm",
    "transformer.layer.{i}.ffn.lin1": "layers.{i}.up",
    "transformer.layer.{i}.ffn.lin2": "layers.{i}.down",
    "transformer.layer.{i}.output_layer_norm": "layers.{i}.ffn_norm",
}


@dataclass(frozen=True, slots=True)
class FamilyNames:
    """How one family's checkpoint names map to ours."""

    prefix: str  # base-model prefix in ...For* checkpoints
    body: dict[str, str]  # names after stripping the prefix
    head: dict[str, str]  # classification head; matched on the full name (prefix not stripped)
    ignored: tuple[str, ...]  # regexes (on the full name) of keys we knowingly drop
    ignored_without_head: tuple[str, ...] = ()  # dropped only when the model has no head


_COMMON_IGNORED = (
    r"(\w+\.)?embeddings\.position_ids",  # a buffer in older checkpoints
    r"(\w+\.)?embeddings\.token_type_ids",  # a buffer in some versions
)

TABLES: dict[str, FamilyNames] = {
    "bert": FamilyNames(
        prefix="bert.",
        body=_BERT_BODY,
        head={"bert.pooler.dense": "head.dense", "classifier": "head.out"},
        ignored=(*_COMMON_IGNORED, r"cls\..*"),  # MLM / NSP heads
        ignored_without_head=(r"(bert\.)?pooler\..*",),  # BertModel's pooler feeds nothing we serve
    ),
    "roberta": FamilyNames(
        prefix="roberta.",
        body=_BERT_BODY,
        head={"classifier.dense": "head.dense", "classifier.out_proj": "head.out"},
        ignored=(*_COMMON_IGNORED, r"lm_head\..*", r"(roberta\.)?pooler\..*"),  # the RoBERTa head skips it
    ),
    "distilbert": FamilyNames(
        prefix="distilbert.",
        body=_DISTILBERT_BODY,
        head={"pre_classifier": "head.dense", "classifier": "head.out"},
        ignored=(*_COMMON_IGNORED, r"vocab_(transform|layer_norm|projector)\..*"),  # MLM head
    ),
}

_PARAM_SUFFIX = {"weight": "weight", "bias": "bias", "gamma": "weight", "beta": "bias"}


@dataclass(slots=True)
class Translation:
    """The outcome of translating a checkpoint's key list."""

    names: dict[str, str] = field(default_factory=dict)  # checkpoint name -> our name
    ignored: list[str] = field(default_factory=list)  # known-unused checkpoint keys
    unexpected: list[str] = field(default_factory=list)  # keys no table entry or ignore rule covers
    duplicates: list[str] = field(default_factory=list)  # our names claimed by several checkpoint keys


def _compile(table: dict[str, str], prefix: str) -> list[tuple[re.Pattern[str], str]]:
    rules = []
    for theirs, ours in table.items():
        pattern = re.escape(prefix + theirs).replace(r"\{i\}", r"(?P<i>\d+)")
        rules.append((re.compile(pattern + r"\.(?P<p>weight|bias|gamma|beta)"), ours))
    return rules


def translate_names(family: str, checkpoint_names: Iterable[str], *, with_head: bool) -> Translation:
    """Map each checkpoint key of a ``family`` model to our parameter name.

    Keys that match neither the body table (with or without the family prefix), nor the head table
    (when ``with_head``), nor an ignore rule are reported in ``unexpected``; the caller decides (the
    importer refuses). Missing names are found by comparing ``names.values()`` with the encoder's.
    """
    table = TABLES[family]
    rules = _compile(table.body, "") + _compile(table.body, table.prefix)
    if with_head:
        rules += _compile(table.head, "")
    ignored = [re.compile(p) for p in table.ignored]
    if not with_head:
        ignored += [re.compile(p) for p in table.ignored_without_head]
    out = Translation()
    claimed: dict[str, str] = {}
    for key in sorted(checkpoint_names):
        ours = _match(rules, key)
        if ours is None:
            (out.ignored if any(p.fullmatch(key) for p in ignored) else out.unexpected).append(key)
        elif ours in claimed:
            out.duplicates.append(f"{ours} <- {claimed[ours]}, {key}")
        else:
            claimed[ours] = key
            out.names[key] = ours
    return out


def _match(rules: list[tuple[re.Pattern[str], str]], key: str) -> str | None:
    for pattern, ours in rules:
        m = pattern.fullmatch(key)
        if m:
            name = ours.replace("{i}", m.group("i")) if "{i}" in ours else ours
            return f"{name}.{_PARAM_SUFFIX[m.group('p')]}"
    return None

"""Checkpoint-name translation: a table per family, checkpoint module path -> our module path, with an
optional transform hook per entry (transpose, split one fused tensor into several, and so on).

Our names start with their load group (``embeddings.*``, ``layers.{i}.*``, ``head.*``). Tables hold module
paths; ``.weight``/``.bias`` (and TF-era LayerNorm ``.gamma``/``.beta``) are appended here. Base-model keys
may carry the architecture's prefix (``bert.``, ``transformer.`` ...) or none; head keys match on the full
name.

A table entry is either our module path (a plain rename) or a ``Hook``: one checkpoint tensor becomes one
or several of ours through a function, as nano-vllm's per-parameter ``weight_loader`` does. GPT-2's fused
``c_attn`` is the typical case: ``Hook(("layers.{i}.q", "layers.{i}.k", "layers.{i}.v"), split_in_three)``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch

from ptmserve.errors import InvalidCheckpoint

# fn(tensor, param) -> one tensor per target; ``param`` is "weight" or "bias".
TransformFn = Callable[[torch.Tensor, str], "torch.Tensor | tuple[torch.Tensor, ...]"]


@dataclass(frozen=True, slots=True)
class Hook:
    """A table entry that transforms: the checkpoint tensor becomes ``targets`` through ``fn``."""

    targets: str | tuple[str, ...]  # our module path(s); ``{i}`` is the layer index
    fn: TransformFn

    @property
    def paths(self) -> tuple[str, ...]:
        return (self.targets,) if isinstance(self.targets, str) else self.targets


Entry = str | Hook


@dataclass(frozen=True, slots=True)
class NameTable:
    """How one family's checkpoint names map to ours."""

    prefix: str  # base-model prefix in ...For* checkpoints ("" when there is none)
    body: Mapping[str, Entry]  # names after stripping the prefix
    head: Mapping[str, Entry] = field(default_factory=dict)  # matched on the full name, only with a head
    ignored: tuple[str, ...] = ()  # regexes (on the full name) of keys we knowingly drop
    ignored_without_head: tuple[str, ...] = ()  # dropped only when the model has no head

    def translate(self, checkpoint_names: Iterable[str], *, with_head: bool) -> Translation:
        """Map each checkpoint key to our parameter name(s).

        Keys that match neither the body table (with or without the prefix), nor the head table (when
        ``with_head``), nor an ignore rule are reported in ``unexpected``; the caller decides.
        """
        rules = _compile(self.body, "") + (_compile(self.body, self.prefix) if self.prefix else [])
        if with_head:
            rules += _compile(self.head, "")
        ignored = [re.compile(p) for p in self.ignored]
        if not with_head:
            ignored += [re.compile(p) for p in self.ignored_without_head]
        out = Translation()
        claimed: dict[str, str] = {}
        for key in sorted(checkpoint_names):
            match = _match(rules, key)
            if match is None:
                (out.ignored if any(p.fullmatch(key) for p in ignored) else out.unexpected).append(key)
                continue
            ours, fn, param = match
            clash = [f"{o} <- {claimed[o]}, {key}" for o in ours if o in claimed]
            if clash:
                out.duplicates.extend(clash)
                continue
            claimed.update(dict.fromkeys(ours, key))
            out.names[key] = ours[0] if len(ours) == 1 and fn is None else ours
            if fn is not None:
                out.hooks[key] = (ours, fn, param)
        return out

    def convert(
        self, raw: Mapping[str, torch.Tensor], *, with_head: bool, family: str
    ) -> dict[str, torch.Tensor]:
        """Our tensors (contiguous) from a checkpoint's ``raw`` tensors.

        Raises:
            InvalidCheckpoint: unexpected or duplicated keys, or a hook that returns the wrong count.
        """
        tr = self.translate(raw, with_head=with_head)
        if tr.unexpected or tr.duplicates:
            raise InvalidCheckpoint(
                f"checkpoint keys that a {family} model does not have: unexpected {tr.unexpected}, "
                f"duplicated {tr.duplicates}"
            )
        out: dict[str, torch.Tensor] = {}
        for theirs, ours in tr.names.items():
            hook = tr.hooks.get(theirs)
            if hook is None:
                out[ours] = raw[theirs].contiguous()  # type: ignore[index]
                continue
            targets, fn, param = hook
            made = fn(raw[theirs], param)
            made = (made,) if isinstance(made, torch.Tensor) else tuple(made)
            if len(made) != len(targets):
                raise InvalidCheckpoint(f"{theirs}: its hook made {len(made)} tensors for {list(targets)}")
            out.update({name: t.contiguous() for name, t in zip(targets, made, strict=True)})
        return out


@dataclass(slots=True)
class Translation:
    """The outcome of translating a checkpoint's key list."""

    # checkpoint name -> our name (a tuple when a hook makes several, or transforms one)
    names: dict[str, str | tuple[str, ...]] = field(default_factory=dict)
    hooks: dict[str, tuple[tuple[str, ...], TransformFn, str]] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)  # known-unused checkpoint keys
    unexpected: list[str] = field(default_factory=list)  # keys no table entry or ignore rule covers
    duplicates: list[str] = field(default_factory=list)  # our names claimed by several checkpoint keys


_PARAM_SUFFIX = {"weight": "weight", "bias": "bias", "gamma": "weight", "beta": "bias"}
_Rule = tuple[re.Pattern[str], tuple[str, ...], "TransformFn | None"]


def _compile(table: Mapping[str, Entry], prefix: str) -> list[_Rule]:
    rules = []
    for theirs, entry in table.items():
        pattern = re.escape(prefix + theirs).replace(r"\{i\}", r"(?P<i>\d+)")
        paths, fn = ((entry,), None) if isinstance(entry, str) else (entry.paths, entry.fn)
        rules.append((re.compile(pattern + r"\.(?P<p>weight|bias|gamma|beta)"), paths, fn))
    return rules


def _match(rules: list[_Rule], key: str) -> tuple[tuple[str, ...], TransformFn | None, str] | None:
    for pattern, paths, fn in rules:
        m = pattern.fullmatch(key)
        if m:
            param = _PARAM_SUFFIX[m.group("p")]
            index = m.groupdict().get("i")
            ours = tuple(f"{p.replace('{i}', index) if index is not None else p}.{param}" for p in paths)
            return ours, fn, param
    return None

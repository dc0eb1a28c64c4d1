"""The architecture registry: a model family is one file in ``families/`` plus one ``register`` call.

A ``Family`` declares everything the layers above need to store, load and run its models without
knowing which family they are:

- its config type, built from a Hugging Face ``config.json`` and round-tripping through the manifest;
- its checkpoint name table, with transform hooks per tensor (``names.NameTable``);
- its module construction (the layers above call ``build`` on the meta device to make skeletons);
- its load groups, in execution order.

The module ``build`` returns is a ``StagedModel``: it runs a batch as a list of stages, one per load
group, so that one runner (``runner.run_stages``) serves plain forwards, pipelined loading and, later,
early exits.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from torch import nn

from ptmserve.errors import InvalidCheckpoint
from ptmserve.models.names import NameTable


class ModelConfig(Protocol):
    """What the layers above read from any family's config."""

    @property
    def architecture(self) -> str:
        """The registry name of the family (stored in the manifest)."""

    @property
    def labels(self) -> tuple[str, ...]:
        """Class names in logit order; empty for a model without a classification head."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def hidden_size(self) -> int:
        """Width of the pooled embedding."""

    @property
    def max_tokens(self) -> int:
        """The longest input, special tokens included."""

    @property
    def position_offset(self) -> int:
        """The first position id of every sequence (what ``packed.pack`` numbers from)."""

    def to_dict(self) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class Family:
    """One model family: how to read, store, build and group its models."""

    name: str  # the architecture name stored in manifests, e.g. "bert"
    hf_model_types: tuple[str, ...]  # config.json ``model_type`` values this family reads
    config_from_hf: Callable[[dict[str, Any]], ModelConfig]  # raises InvalidCheckpoint
    config_from_dict: Callable[[dict[str, Any]], ModelConfig]  # inverse of ``config.to_dict()``
    names: NameTable  # checkpoint names -> ours, with transform hooks
    build: Callable[[Any], nn.Module]  # the module of a config; call it under ``torch.device("meta")``
    group_names: Callable[[Any], list[str]]  # load groups of a config, in execution order
    generates: bool = False  # a text generation model (its module runs ``step_stages``), not an encoder
    # groups whose weights a later group reads too (a tied LM head reads the embedding table): placement
    # never leaves them on the host, where the device group could not reach them
    tied_groups: Callable[[Any], frozenset[str]] = lambda config: frozenset()
    # its LM head projects through ``quant.project``, so a tied word embedding may be stored quantized
    # (encoders always may: their word embedding is only looked up)
    quantized_head: bool = False
    weights: str = "fp"  # the weight format of the modules ``module`` builds (``quant.WEIGHT_FORMATS``)

    def with_weights(self, weights: str) -> Family:
        """This family building its modules in weight format ``weights`` (``fp``, ``int8``, ``int4``).

        Raises:
            InvalidInput: an unknown format.
        """
        from ptmserve.models import quant

        quant.check_format(weights)
        return self if weights == self.weights else dataclasses.replace(self, weights=weights)

    @property
    def quantizes_embeddings(self) -> bool:
        """Whether a quantized model of this family stores its word embedding quantized too."""
        return not self.generates or self.quantized_head

    def module(self, config: ModelConfig) -> nn.Module:
        """``build(config)`` with its linears (and word embedding) in this family's weight format; call it
        under ``torch.device("meta")`` as ``build``."""
        from ptmserve.models import quant

        return quant.quantize_module(self.build(config), self.weights, embeddings=self.quantizes_embeddings)

    def shape_key(self, config: ModelConfig) -> str:
        """Models whose configs and weight formats give the same key share skeletons (label names do
        not matter)."""
        import json

        data = config.to_dict()
        data["labels"] = len(config.labels)
        return json.dumps({"architecture": self.name, "weights": self.weights, **data}, sort_keys=True)


_lock = threading.Lock()
_families: dict[str, Family] = {}
_builtins_loaded = False


def register(family: Family) -> Family:
    """Add ``family`` to the registry (replacing one of the same name). Returns it."""
    with _lock:
        _families[family.name] = family
    return family


def unregister(name: str) -> None:
    """Remove a family (tests that add a toy family clean up with this)."""
    with _lock:
        _families.pop(name, None)


def families() -> Mapping[str, Family]:
    """Every registered family by name."""
    _load_builtins()
    with _lock:
        return dict(_families)


def get(name: str, weights: str = "fp") -> Family:
    """The family called ``name``, building its modules in weight format ``weights``.

    Raises:
        InvalidCheckpoint: no family of that name is registered.
        InvalidInput: an unknown weight format.
    """
    found = families().get(name)
    if found is None:
        raise InvalidCheckpoint(f"unknown architecture {name!r}; known: {sorted(families())}")
    return found.with_weights(weights)


def for_hf(config_json: Mapping[str, Any]) -> Family:
    """The family that reads a Hugging Face ``config.json`` of this ``model_type``.

    Raises:
        InvalidCheckpoint: no registered family reads it.
    """
    model_type = str(config_json.get("model_type"))
    for family in families().values():
        if model_type in family.hf_model_types:
            return family
    known = sorted(t for f in families().values() for t in f.hf_model_types)
    raise InvalidCheckpoint(f"unsupported model_type {model_type!r}; supported: {known}")


def config_from_dict(architecture: str, data: dict[str, Any]) -> ModelConfig:
    """A stored config back as its family's config object."""
    return get(architecture).config_from_dict(data)


def check_tensors(model: nn.Module, tensors: Mapping[str, Any]) -> None:
    """Assert ``tensors`` has exactly ``model``'s parameter names and shapes.

    Raises:
        InvalidCheckpoint: listing missing, unexpected and mis-shaped names.
    """
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(
        f"{n}: {tuple(tensors[n].shape)} != {expected[n]}"
        for n in set(expected) & set(tensors)
        if tuple(tensors[n].shape) != expected[n]
    )
    if missing or unexpected or wrong:
        raise InvalidCheckpoint(
            f"tensors do not match the model: missing {missing}, unexpected {unexpected}, "
            f"wrong shapes {wrong}"
        )


def _load_builtins() -> None:
    """Import the built-in family files once; each registers itself."""
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    import ptmserve.models.families  # noqa: F401 - registers the built-in families

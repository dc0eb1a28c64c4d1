"""Skeletons: the module structure of an architecture shape, built once, bound to weights on demand.

A skeleton is its family's module (``Family.module``: with quantized linears for an int8 or int4 model)
built on the meta device (no storage, no random init). Binding points each of its parameters at a tensor
the device tier already holds (a dict assignment per parameter, no data copied); unbinding points them
back at the meta placeholders, so a skeleton never keeps device memory alive after its model was
released. Models with the same architecture shape (same config apart from the label names, and the same
weight format) share skeletons; the pool builds another skeleton of a shape only when more models of that
shape are acquired at once than it has, so steady-state switching builds no modules.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping

import torch
from torch import nn

from ptmserve import errors
from ptmserve.models.registry import Family, ModelConfig
from ptmserve.models.runner import StagedModel

logger = logging.getLogger(__name__)


class Skeleton:
    """One meta-device module of a family and the slots its parameters live in."""

    def __init__(self, family: Family, config: ModelConfig) -> None:
        with torch.device("meta"):
            self.module: nn.Module = family.module(config).eval()
        self.key = family.shape_key(config)
        # name -> (owning module, attribute): binding is a dict store per parameter.
        self._slots: dict[str, tuple[nn.Module, str]] = {}
        for name, _ in self.module.named_parameters():
            owner, _, attr = name.rpartition(".")
            self._slots[name] = (self.module.get_submodule(owner), attr)
        self._meta = {name: mod._parameters[attr] for name, (mod, attr) in self._slots.items()}
        self.shapes = {name: tuple(p.shape) for name, p in self._meta.items()}
        self.bound_to: str | None = None

    def check(self, model: str, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Raise CorruptData unless ``shapes`` names exactly this skeleton's parameters and shapes."""
        missing = sorted(set(self.shapes) - set(shapes))
        unexpected = sorted(set(shapes) - set(self.shapes))
        wrong = sorted(n for n in set(shapes) & set(self.shapes) if tuple(shapes[n]) != self.shapes[n])
        if missing or unexpected or wrong:
            raise errors.CorruptData(
                f"model {model!r}: stored tensors do not match its architecture: missing {missing}, "
                f"unexpected {unexpected}, wrong shapes {wrong}"
            )

    def bind(self, model: str, params: Mapping[str, nn.Parameter]) -> StagedModel:
        """Point every parameter at ``params[name]`` (names as checked by ``check``)."""
        for name, (module, attr) in self._slots.items():
            module._parameters[attr] = params[name]
        self.bound_to = model
        return self.module  # type: ignore[return-value]

    def unbind(self) -> None:
        """Point every parameter back at its meta placeholder."""
        for name, (module, attr) in self._slots.items():
            module._parameters[attr] = self._meta[name]
        self.bound_to = None


class SkeletonPool:
    """Free skeletons by shape key; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: dict[str, list[Skeleton]] = {}
        self.built = 0  # skeletons ever constructed

    def checkout(self, family: Family, config: ModelConfig) -> Skeleton:
        """A free skeleton of ``config``'s shape, built (on the meta device) only if none is free."""
        key = family.shape_key(config)
        with self._lock:
            free = self._free.get(key)
            if free:
                return free.pop()
            self.built += 1
        logger.debug("building a skeleton for %s", key)
        return Skeleton(family, config)

    def checkin(self, skeleton: Skeleton) -> None:
        """Unbind ``skeleton`` and make it available again."""
        skeleton.unbind()
        with self._lock:
            self._free.setdefault(skeleton.key, []).append(skeleton)

    def count(self) -> int:
        with self._lock:
            return sum(len(v) for v in self._free.values())

"""The one group-by-group runner: a model runs a batch as a list of stages, one per load group.

Plain forwards call ``run_stages`` without a hook. Pipelined loading passes a hook that waits for the
group's weights just before it computes. An encoder's early exits (``exits.py``) are stages of their own
that take finished rows out of ``Activations.batch``. No model repeats this loop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from ptmserve.models.packed import PackedBatch


@dataclass(slots=True)
class Activations:
    """What flows through the stages of one batch of B inputs (T tokens)."""

    batch: PackedBatch
    hidden: torch.Tensor | None = None  # (T, H) token states between stages
    embeddings: torch.Tensor | None = None  # (B, H) float32 pooled, set by the last stage
    logits: torch.Tensor | None = None  # (B, C) float32, set by the head stage when asked for


def move_activations(acts: Activations, device: torch.device, dtype: torch.dtype) -> None:
    """Move ``acts`` to ``device`` and its token states to ``dtype``: what crosses between a stage that
    computes from the host tier and one on the device (nothing is copied when both already match)."""
    if acts.batch.input_ids.device != device:
        acts.batch = acts.batch.to(device)  # type: ignore[assignment]
    if acts.hidden is not None:
        acts.hidden = acts.hidden.to(device, dtype)
    for name in ("embeddings", "logits"):
        value = getattr(acts, name)
        if value is not None:
            setattr(acts, name, value.to(device))


@dataclass(frozen=True, slots=True)
class Stage:
    """One step of a forward pass: ``run`` needs the weights of load group ``group``."""

    group: str  # a load group name; stages that need no weights name a group the model does not have
    run: Callable[[Activations], None]  # reads and updates the activations in place

    def elsewhere(
        self, device: torch.device, dtype: torch.dtype, back: tuple[torch.device, torch.dtype]
    ) -> Stage:
        """This stage computed on ``device`` in ``dtype`` (where its weights are), its activations moved
        there before and back to ``back`` (device, dtype) after."""

        def run(acts: Activations) -> None:
            batch = acts.batch
            move_activations(acts, device, dtype)
            moved = acts.batch
            self.run(acts)
            if acts.batch is moved:
                acts.batch = batch  # unchanged: keep the device batch and what it has cached
            move_activations(acts, *back)

        return Stage(self.group, run)


# hook(group, activations) runs before each stage: the pipelining wait, or an early exit.
StageHook = Callable[[str, Activations], None]


class StagedModel(Protocol):
    """What ``Family.build`` returns: a module that splits a forward pass into stages."""

    def stages(self, *, classify: bool, pooling: object) -> Sequence[Stage]:
        """The stages of one forward pass, in order; logits only when ``classify``."""


def run_stages(stages: Sequence[Stage], acts: Activations, before: StageHook | None = None) -> Activations:
    """Run ``stages`` over ``acts``, calling ``before(stage.group, acts)`` ahead of each one."""
    with torch.inference_mode():
        for stage in stages:
            if before is not None:
                before(stage.group, acts)
            stage.run(acts)
    return acts

"""What ``WeightManager.acquire`` returns: one model pinned for computing, run load group by group."""

from __future__ import annotations

import time
from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING

import torch

from ptmserve import errors
from ptmserve.memory.loader import LoadJob, ModelRecord
from ptmserve.memory.skeleton import Skeleton
from ptmserve.models.config import Pooling
from ptmserve.models.exits import EarlyExit
from ptmserve.models.packed import PackedBatch
from ptmserve.models.paged import KVCache, StepBatch
from ptmserve.models.registry import ModelConfig
from ptmserve.models.runner import Activations, Stage, StagedModel, StageHook, run_stages
from ptmserve.store.manifest import ModelManifest, torch_dtype

if TYPE_CHECKING:
    from ptmserve.memory.manager import WeightManager


class LoadedModel:
    """A model acquired for computing; release it (or leave the ``with`` block) when done.

    ``module`` is a skeleton bound to this model's device tensors for as long as it is acquired; with
    pipelining its later groups may still be loading (``run`` waits per group; ``wait`` waits for all).
    """

    def __init__(self, manager: WeightManager, record: ModelRecord, job: LoadJob, skeleton: Skeleton) -> None:
        self.name = record.name
        self.manifest: ModelManifest = record.manifest
        self.config: ModelConfig = record.config
        self.pooling: Pooling = record.pooling  # the model's own pooling, used when run() gets none
        self._manager = manager
        self._record = record
        self._job = job
        self._skeleton: Skeleton | None = skeleton
        self.waited_seconds = 0.0  # time ``run`` spent waiting for weights still loading

    @property
    def module(self) -> StagedModel:
        if self._skeleton is None:
            raise errors.NotReady(f"model {self.name!r} was released")
        return self._skeleton.module  # type: ignore[return-value]

    def wait(self) -> None:
        """Block until every tensor is on the device. Raises the load's error if it failed."""
        self._job.done.wait()

    def run(
        self,
        batch: PackedBatch,
        pooling: Pooling | None = None,
        *,
        classify: bool = False,
        before: StageHook | None = None,
        early_exit: EarlyExit | None = None,
    ) -> Activations:
        """Compute ``batch`` stage by stage, each as soon as its load group is on the device.

        Returns the same values as a plain forward of a freshly loaded model: ``embeddings``, and
        ``logits`` only when ``classify``. ``before(group, activations)`` runs after the group's weights
        arrived and before it computes.

        A model with early exits classifies through them (``models/exits.py``): ``early_exit.allowed``
        says which rows may leave early (without ``early_exit``: every row may) and the run sets
        ``early_exit.layers``. Once every row has left, the later stages wait for no weights (the load
        goes on in the background).

        Raises:
            errors.InvalidInput: ``classify`` on a model without a classification head.
            errors.CorruptData / errors.NotReady: the load of this model failed.
        """
        if classify and not self.config.labels:
            raise errors.InvalidInput(f"model {self.name!r} has no classification head")
        pooling = pooling or self.pooling
        if early_exit is None:
            stages = self.module.stages(classify=classify, pooling=pooling)
        else:
            stages = self.module.stages(classify=classify, pooling=pooling, early_exit=early_exit)  # type: ignore[call-arg]
        return run_stages(self._placed(stages), Activations(batch), self._waiting(before))

    def step(self, batch: StepBatch, cache: KVCache, *, before: StageHook | None = None) -> torch.Tensor:
        """Run one decoding step of a text generation model: the new tokens of ``batch`` (prefills,
        chunks of prefills, decodes), each layer as soon as its weights are on the device, writing the
        keys and values into ``cache``. Returns float32 logits ``(B, V)`` of each sequence's last new
        token.

        Raises:
            errors.InvalidInput: the model does not generate text, or a position is past its context.
            errors.CorruptData / errors.NotReady: the load of this model failed.
        """
        step_stages = getattr(self.module, "step_stages", None)
        if step_stages is None:
            raise errors.InvalidInput(f"model {self.name!r} is not a text generation model")
        stages = self._placed(step_stages(batch, cache))
        acts = run_stages(stages, Activations(batch), self._waiting(before))  # type: ignore[arg-type]
        assert acts.logits is not None
        return acts.logits

    def _placed(self, stages: Sequence[Stage]) -> Sequence[Stage]:
        """``stages`` with those of host-placed groups computed where their weights are: on the host, in
        the stored dtype. On a CPU whose serve dtype is the stored one nothing moves: they compute from
        the host tier in place."""
        record = self._record
        if not record.host_groups:
            return stages
        manager = self._manager
        host = torch.device("cpu")
        stored = torch_dtype(record.manifest.dtype)  # floating tensors are stored in the model's dtype
        serve = manager.dtype or stored
        if manager.device == host and stored == serve:
            return stages  # the host copy is used in place: nothing moves
        back = (manager.device, serve)
        return [s.elsewhere(host, stored, back) if s.group in record.host_groups else s for s in stages]

    def _waiting(self, before: StageHook | None) -> StageHook:
        """A stage hook that waits for the group's weights (counting the wait), then calls ``before``."""
        job = self._job

        def wait_then(group: str, acts: Activations) -> None:
            if acts.batch.num_seqs:  # every row left at an early exit: nothing will use these weights
                t0 = time.perf_counter()
                job.wait_group(group)
                self.waited_seconds += time.perf_counter() - t0
            if before is not None:
                before(group, acts)

        return wait_then

    def release(self) -> None:
        """End this acquisition; the model becomes evictable when nobody else holds it. Idempotent."""
        skeleton, self._skeleton = self._skeleton, None
        if skeleton is not None:
            self._manager._release(self._record, skeleton)

    def __enter__(self) -> LoadedModel:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

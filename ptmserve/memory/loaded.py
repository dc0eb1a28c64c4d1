"""What ``WeightManager.acquire`` returns: one model pinned for computing, run layer group by group."""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING

import torch

from ptmserve import errors
from ptmserve.memory.loader import LoadJob, ModelRecord
from ptmserve.memory.skeleton import Skeleton
from ptmserve.models.config import Pooling
from ptmserve.models.encoder import GROUP_EMBEDDINGS, GROUP_HEAD, Encoder, EncoderOutput
from ptmserve.models.packed import PackedBatch
from ptmserve.store.manifest import ModelManifest

if TYPE_CHECKING:
    from ptmserve.memory.manager import WeightManager


class LoadedModel:
    """A model acquired for computing; release it (or leave the ``with`` block) when done.

    ``encoder`` is a skeleton bound to this model's device tensors for as long as it is acquired;
    with pipelining its later groups may still be loading (``run`` waits per group; ``wait`` waits
    for all).
    """

    def __init__(self, manager: WeightManager, record: ModelRecord, job: LoadJob, skeleton: Skeleton) -> None:
        self.name = record.name
        self.manifest: ModelManifest = record.manifest
        self.pooling: Pooling = record.pooling  # the model's own pooling, used when run() gets none
        self._manager = manager
        self._record = record
        self._job = job
        self._skeleton: Skeleton | None = skeleton

    @property
    def encoder(self) -> Encoder:
        if self._skeleton is None:
            raise errors.NotReady(f"model {self.name!r} was released")
        return self._skeleton.encoder

    def wait(self) -> None:
        """Block until every tensor is on the device. Raises the load's error if it failed."""
        self._job.done.wait()

    def run(
        self, batch: PackedBatch, pooling: Pooling | None = None, *, classify: bool = False
    ) -> EncoderOutput:
        """Compute ``batch`` group by group, each as soon as its weights are on the device.

        Returns the same values as ``Encoder.forward`` on a freshly loaded model; logits only when
        ``classify``.

        Raises:
            errors.InvalidInput: ``classify`` on a model without a classification head.
            errors.CorruptData / errors.NotReady: the load of this model failed.
        """
        enc = self.encoder
        if classify and enc.head is None:
            raise errors.InvalidInput(f"model {self.name!r} has no classification head")
        job = self._job
        with torch.inference_mode():
            job.wait_group(GROUP_EMBEDDINGS)
            hidden = enc.embed(batch)  # (T, H)
            for i in range(len(enc.layers)):
                job.wait_group(f"layers.{i}")
                hidden = enc.run_layer(i, hidden, batch)
            logits = None
            if classify:
                job.wait_group(GROUP_HEAD)
                logits = enc.classify(hidden, batch)  # (B, C)
            embeddings = enc.pool(hidden, batch, pooling or self.pooling)  # (B, H)
        return EncoderOutput(embeddings=embeddings, logits=logits)

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

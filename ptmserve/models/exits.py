"""Early exits at run time: the exit decision and the bookkeeping of rows that leave a packed batch.

An encoder with exits (``EncoderConfig.exits``) classifies a batch layer by layer: after each layer that
has an exit, the rows that are sure enough (and allowed to) leave with that exit's logits, and the others
go on in a smaller batch (``PackedBatch.select``). ``ExitRun`` remembers which original row each running
row is and what every row that left gave; ``ExitRun.results`` puts everything back in the original order.

The exit layer convention, used everywhere (results, the metric, the server's ``EXIT_LAYER``): the
0-based index of the last encoder layer a row computed. A row that left at the exit after layer ``i``
reports ``i``; a row classified by the final classifier (an exit after the last layer, or the native
head) reports ``num_layers - 1``. So a row computed ``exit_layer + 1`` layers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ptmserve.errors import InvalidInput
from ptmserve.models.config import ExitSpec

LeaveHook = Callable[[torch.Tensor, int, torch.Tensor, torch.Tensor], None]
"""``on_leave(rows, layer, logits, embeddings)``: the original indices ``(k,)`` (host int64) of rows that
just left at ``layer``, with their float32 ``logits (k, C)`` and ``embeddings (k, H)``."""


@dataclass(slots=True)
class EarlyExit:
    """Early exit for one batch of B inputs: what the caller allows (in) and where each row left (out).

    Pass one to ``Encoder.stages(..., early_exit=)`` / ``LoadedModel.run(..., early_exit=)`` together
    with ``classify=True``; the run fills ``layers``.
    """

    allowed: Sequence[bool] | None = None  # (B,) rows that may leave early; None: every row may
    layers: torch.Tensor | None = None  # (B,) int32 on the host, set by the run: each row's exit layer
    # called as rows leave at an exit before the end (not by the final classifier), while the run goes on
    on_leave: LeaveHook | None = None


def exits_of(config: Any) -> tuple[ExitSpec, ...]:
    """The early exits of a model's config (empty for families and models without any)."""
    return tuple(getattr(config, "exits", ()))


def confidence(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """Per row of float32 ``logits (n, C)``: the top softmax probability (``max_prob``) or the softmax's
    entropy in nats (``entropy``), ``(n,)`` float32."""
    logp = F.log_softmax(logits.float(), dim=-1)  # (n, C)
    if kind == "max_prob":
        return logp.max(dim=-1).values.exp()
    return -(logp.exp() * logp).sum(dim=-1)


def triggers(spec: ExitSpec, logits: torch.Tensor) -> torch.Tensor:
    """``(n,)`` bool: which rows of ``logits (n, C)`` are sure enough to leave at ``spec``'s exit
    (``max_prob >= threshold``, or ``entropy <= threshold``)."""
    conf = confidence(logits, spec.confidence)
    return conf >= spec.threshold if spec.confidence == "max_prob" else conf <= spec.threshold


@dataclass(slots=True)
class _Left:
    """Rows that left the batch together."""

    rows: torch.Tensor  # (k,) their original indices, host int64, increasing
    layer: int
    logits: torch.Tensor  # (k, C) float32
    embeddings: torch.Tensor  # (k, H) float32


class ExitRun:
    """The rows of one batch still running, and the logits, embeddings and exit layers of those that left.

    Args:
        allowed: ``(B,)`` which rows may leave early (None: all); the final classifier takes the others.
        on_leave: told about rows as they leave early (``EarlyExit.on_leave``).
    """

    def __init__(self, allowed: Sequence[bool] | None = None, on_leave: LeaveHook | None = None) -> None:
        self._on_leave = on_leave
        self.num_rows = 0
        self.running = torch.arange(0)  # (n,) original index of each running row, host int64
        self._allowed = None if allowed is None else torch.tensor(list(allowed), dtype=torch.bool)
        self._left: list[_Left] = []

    def start(self, num_rows: int) -> None:
        """Begin a batch of ``num_rows`` rows, all running.

        Raises:
            InvalidInput: the permissions do not have ``num_rows`` entries.
        """
        if self._allowed is not None and len(self._allowed) != num_rows:
            raise InvalidInput(
                f"early exit permissions for {len(self._allowed)} rows in a batch of {num_rows}"
            )
        self.num_rows = num_rows
        self.running = torch.arange(num_rows)
        self._left = []

    @property
    def done(self) -> bool:
        """Whether every row has left (nothing is left to compute)."""
        return len(self.running) == 0

    @property
    def may_leave(self) -> bool:
        """Whether any running row may leave early (if none, the exits need not be computed)."""
        if self._allowed is None:
            return not self.done
        return bool(self._allowed[self.running].any())

    def leave(
        self, layer: int, sure: torch.Tensor, logits: torch.Tensor, embeddings: torch.Tensor
    ) -> list[int]:
        """The running rows that are ``sure`` ``(n,)`` and allowed leave at ``layer`` with their rows of
        ``logits (n, C)`` and ``embeddings (n, H)``. Returns the positions (among the running rows) of the
        rows that go on, in order; all of them when none left."""
        go = sure.cpu()
        if self._allowed is not None:
            go &= self._allowed[self.running]
        if not bool(go.any()):
            return list(range(len(self.running)))
        out = go.nonzero().squeeze(1)
        self._record(out, layer, logits, embeddings)
        stay = (~go).nonzero().squeeze(1)
        self.running = self.running[stay]
        return stay.tolist()

    def finish(self, layer: int, logits: torch.Tensor, embeddings: torch.Tensor) -> None:
        """Every running row leaves at ``layer`` (the final classifier) with ``logits`` and ``embeddings``."""
        self._left.append(_Left(self.running, layer, logits, embeddings))
        self.running = self.running[:0]

    def _record(self, positions: torch.Tensor, layer: int, logits: torch.Tensor, emb: torch.Tensor) -> None:
        index = positions.to(logits.device)
        left = _Left(
            self.running[positions], layer, logits.index_select(0, index), emb.index_select(0, index)
        )
        self._left.append(left)
        if self._on_leave is not None:
            self._on_leave(left.rows, layer, left.logits, left.embeddings)

    def results(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``logits (B, C)`` float32, ``embeddings (B, H)`` float32 and exit layers ``(B,)`` int32 (on the
        host) in the original row order, once every row has left."""
        if not self.done:
            raise RuntimeError(f"{len(self.running)} rows have not reached a classifier")
        layers = torch.empty(self.num_rows, dtype=torch.int32)
        for left in self._left:
            layers[left.rows] = left.layer
        if len(self._left) == 1:  # every row left together: already in order
            return self._left[0].logits, self._left[0].embeddings, layers
        logits = self._gather([x.logits for x in self._left])
        return logits, self._gather([x.embeddings for x in self._left]), layers

    def _gather(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """``parts`` (one block per group of rows that left) as one ``(B, ...)`` tensor in row order."""
        rows = torch.cat([x.rows for x in self._left]).to(parts[0].device)
        out = parts[0].new_empty((self.num_rows, parts[0].shape[1]))
        return out.index_copy_(0, rows, torch.cat(parts))

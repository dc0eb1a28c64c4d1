"""Padding-free batches: every real token of every input in one flat row, as text-embeddings-inference
packs them. Sequence ``b`` owns rows ``cu_seqlens[b]:cu_seqlens[b+1]``."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ptmserve.errors import InvalidInput


@dataclass(slots=True)
class PackedBatch:
    """A batch of B token sequences of total length T, without padding."""

    input_ids: torch.Tensor  # (T,) int64
    position_ids: torch.Tensor  # (T,) int64, each sequence counts from the model's position offset
    token_type_ids: torch.Tensor  # (T,) int64
    seq_ids: torch.Tensor  # (T,) int64, the sequence each token belongs to
    cu_seqlens: torch.Tensor  # (B+1,) int32, cumulative lengths starting at 0
    lengths: tuple[int, ...]  # B host-side lengths (no device sync needed to slice)
    max_seqlen: int
    _plan: AttentionPlan | None = field(default=None, repr=False, compare=False)

    @property
    def num_seqs(self) -> int:
        return len(self.lengths)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    def spans(self) -> list[tuple[int, int]]:
        """``[(start, end), ...]`` row range of each sequence, computed on the host."""
        ends = list(itertools.accumulate(self.lengths))
        return [(e - n, e) for e, n in zip(ends, self.lengths, strict=True)]

    def attention_plan(self) -> AttentionPlan:
        """Sequences grouped by length for padded attention (built once per batch, then cached)."""
        if self._plan is None:
            self._plan = make_plan(self.lengths, self.input_ids.device)
        return self._plan

    def select(self, keep: Sequence[int]) -> tuple[PackedBatch, torch.Tensor]:
        """The sub-batch of sequences ``keep`` (indices into this batch, increasing), and the token rows
        ``(T',)`` int64 they occupy here, so that ``hidden.index_select(0, rows)`` follows the sub-batch.

        Sequence ``keep[j]`` becomes sequence ``j``: ``cu_seqlens``, ``seq_ids``, ``lengths`` and
        ``max_seqlen`` are rebuilt and the attention plan is built anew on first use; ids, positions and
        token types are those rows' own. ``keep`` may be empty (no sequence left).
        """
        device = self.input_ids.device
        chosen = torch.tensor(list(keep), dtype=torch.int64)
        old_starts = torch.tensor([0, *itertools.accumulate(self.lengths)][:-1], dtype=torch.int64)
        lengths = tuple(self.lengths[i] for i in keep)
        lens = torch.tensor(lengths, dtype=torch.int64)
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int64)
        torch.cumsum(lens, 0, out=cu[1:])
        seq_ids = torch.repeat_interleave(torch.arange(len(lengths)), lens)  # (T',)
        rows = (old_starts[chosen][seq_ids] + torch.arange(int(cu[-1])) - cu[:-1][seq_ids]).to(device)
        sub = PackedBatch(
            input_ids=self.input_ids.index_select(0, rows),
            position_ids=self.position_ids.index_select(0, rows),
            token_type_ids=self.token_type_ids.index_select(0, rows),
            seq_ids=seq_ids.to(device),
            cu_seqlens=cu.to(torch.int32).to(device),
            lengths=lengths,
            max_seqlen=max(lengths, default=0),
        )
        return sub, rows

    def to(self, device: torch.device | str) -> PackedBatch:
        """The same batch with its tensors on ``device``."""
        return PackedBatch(
            input_ids=self.input_ids.to(device),
            position_ids=self.position_ids.to(device),
            token_type_ids=self.token_type_ids.to(device),
            seq_ids=self.seq_ids.to(device),
            cu_seqlens=self.cu_seqlens.to(device),
            lengths=self.lengths,
            max_seqlen=self.max_seqlen,
        )


@dataclass(slots=True)
class Bucket:
    """Sequences of similar length padded to ``width``: one attention call over padded slots
    ``offset : offset + count * width`` of the plan (row ``r`` holds sequence ``members[r]``)."""

    members: tuple[int, ...]  # sequence indices, shortest first
    width: int  # the longest member's length
    offset: int  # first padded slot of this bucket
    mask: torch.Tensor | None  # (count, 1, 1, width) bool, True on real keys; None when no padding


@dataclass(slots=True)
class AttentionPlan:
    """How to run attention on padded buckets and come back to packed rows.

    ``rows.index_select(0, gather)`` lays packed rows out as padded slots (padding slots repeat a real
    row of the same sequence: any finite values do, the mask hides them as keys and their outputs are
    dropped); ``padded.index_select(0, unpad)`` brings padded slots back to packed order;
    ``out.index_copy_(0, scatter[a:b], padded[a:b])`` into ``out`` of ``T + 1`` rows does the same one
    bucket at a time (padding slots all land in the spare row ``T``).
    """

    buckets: list[Bucket]
    gather: torch.Tensor  # (S,) int64 packed row of each padded slot
    unpad: torch.Tensor  # (T,) int64 padded slot of each packed row
    scatter: torch.Tensor  # (S,) int64 packed row of each padded slot, T for padding slots
    _additive: dict[torch.dtype, list[torch.Tensor | None]] = field(default_factory=dict, repr=False)

    def additive_masks(self, dtype: torch.dtype) -> list[torch.Tensor | None]:
        """Per bucket, ``mask`` as 0 / -inf in ``dtype`` (cached: SDPA would convert a bool mask on every
        call of every layer)."""
        if dtype not in self._additive:
            self._additive[dtype] = [
                None
                if b.mask is None
                else torch.zeros(b.mask.shape, dtype=dtype, device=b.mask.device).masked_fill_(
                    ~b.mask, float("-inf")
                )
                for b in self.buckets
            ]
        return self._additive[dtype]


MAX_BUCKETS = 8
"""Attention buckets per batch: sequences sorted by length, equal counts per bucket. Measured on 2 CPU
cores with BERT-base heads and 64 lengths uniform in 8..256 (docs/benchmarks.md): padding all to the
longest wastes ~2x attention FLOPs; one call per sequence pays SDPA's per-call cost 64 times per layer,
which hurts most when other processes share the cores; 4..16 buckets sit between."""


def make_plan(
    lengths: Sequence[int], device: torch.device | str, max_buckets: int = MAX_BUCKETS
) -> AttentionPlan:
    """Split the sequences, sorted by length, into at most ``max_buckets`` buckets of equal count."""
    starts = [0, *itertools.accumulate(lengths)][:-1]
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n = len(order)
    count = min(max_buckets, n)
    total = sum(lengths)
    buckets, gather, unpad, scatter = [], [], [0] * total, []
    for j in range(count):
        members = tuple(order[j * n // count : (j + 1) * n // count])
        width = max(lengths[i] for i in members)
        offset = len(gather)
        for r, i in enumerate(members):
            seq_rows = range(starts[i], starts[i] + lengths[i])
            slot = offset + r * width
            unpad[starts[i] : starts[i] + lengths[i]] = range(slot, slot + lengths[i])
            gather.extend(seq_rows)
            gather.extend([starts[i]] * (width - lengths[i]))
            scatter.extend(seq_rows)
            scatter.extend([total] * (width - lengths[i]))
        mask = None
        if any(lengths[i] != width for i in members):
            lens = torch.tensor([lengths[i] for i in members])
            mask = (torch.arange(width)[None, :] < lens[:, None])[:, None, None, :].to(device)
        buckets.append(Bucket(members=members, width=width, offset=offset, mask=mask))
    return AttentionPlan(
        buckets=buckets,
        gather=torch.tensor(gather, dtype=torch.int64).to(device),
        unpad=torch.tensor(unpad, dtype=torch.int64).to(device),
        scatter=torch.tensor(scatter, dtype=torch.int64).to(device),
    )


def pack(
    token_ids: Sequence[Sequence[int]],
    *,
    position_offset: int,
    device: torch.device | str = "cpu",
    token_type_ids: Sequence[Sequence[int]] | None = None,
) -> PackedBatch:
    """Pack ``token_ids`` (one list per input, already truncated) into a ``PackedBatch`` on ``device``.

    Positions of every sequence run ``position_offset, position_offset + 1, ...``; token types are 0
    unless ``token_type_ids`` (same shape as ``token_ids``) is given.

    Raises:
        InvalidInput: no sequences, an empty sequence, or token types whose shape does not match.
    """
    lengths = tuple(len(seq) for seq in token_ids)
    if not lengths:
        raise InvalidInput("a batch needs at least one input")
    if min(lengths) == 0:
        raise InvalidInput(f"input {lengths.index(0)} has no tokens")
    flat = torch.tensor(list(itertools.chain.from_iterable(token_ids)), dtype=torch.int64)
    total = int(flat.shape[0])
    lens = torch.tensor(lengths, dtype=torch.int64)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    torch.cumsum(lens, 0, out=cu[1:])
    seq_ids = torch.repeat_interleave(torch.arange(len(lengths)), lens)  # (T,)
    positions = torch.arange(total) - cu[:-1][seq_ids] + position_offset  # (T,)
    if token_type_ids is None:
        types = torch.zeros(total, dtype=torch.int64)
    else:
        if tuple(len(t) for t in token_type_ids) != lengths:
            raise InvalidInput("token_type_ids must have the same lengths as token_ids")
        types = torch.tensor(list(itertools.chain.from_iterable(token_type_ids)), dtype=torch.int64)
    return PackedBatch(
        input_ids=flat.to(device),
        position_ids=positions.to(device),
        token_type_ids=types.to(device),
        seq_ids=seq_ids.to(device),
        cu_seqlens=cu.to(torch.int32).to(device),
        lengths=lengths,
        max_seqlen=max(lengths),
    )

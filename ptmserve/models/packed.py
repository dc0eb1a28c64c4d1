"""Padding-free batches: every real token of every input in one flat row, as text-embeddings-inference
packs them. Sequence ``b`` owns rows ``cu_seqlens[b]:cu_seqlens[b+1]``."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

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

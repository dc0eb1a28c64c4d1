"""Bucketed padded attention equals exact per-sequence attention, whatever the bucketing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ptmserve.models.encoder import packed_attention
from ptmserve.models.packed import make_plan, pack


def _reference(q, k, v, batch):
    out = []
    for s, e in batch.spans():
        scores = q[s:e].transpose(0, 1) @ k[s:e].permute(1, 2, 0) / q.shape[-1] ** 0.5  # (nh, L, L)
        out.append((scores.softmax(-1) @ v[s:e].transpose(0, 1)).transpose(0, 1))
    return torch.cat(out).flatten(1)  # (T, H)


@pytest.mark.parametrize("lengths", [[5], [3, 3, 3], [1, 9, 4, 4, 17, 2, 30, 8, 8], [12, 1]])
@pytest.mark.parametrize("max_buckets", [1, 2, 4, 16])
def test_bucketed_attention_is_exact(lengths, max_buckets):
    gen = torch.Generator().manual_seed(len(lengths) * 31 + max_buckets)
    batch = pack([[0] * n for n in lengths], position_offset=0)
    batch._plan = make_plan(batch.lengths, "cpu", max_buckets=max_buckets)
    q, k, v = (torch.randn(batch.num_tokens, 3, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    with torch.inference_mode():
        got = packed_attention(q, k, v, batch)
    assert got.shape == (batch.num_tokens, 24)
    assert (got - _reference(q, k, v, batch)).abs().max().item() < 1e-12


def test_plan_covers_every_token_once():
    lengths = [7, 1, 30, 2, 2, 9, 15]
    plan = make_plan(lengths, "cpu", max_buckets=3)
    assert sorted(i for b in plan.buckets for i in b.members) == list(range(len(lengths)))
    assert [len(b.members) for b in plan.buckets] == [2, 2, 3]
    assert [b.width for b in plan.buckets] == [2, 7, 30]
    assert [b.offset for b in plan.buckets] == [0, 4, 18]
    assert plan.gather.shape == (18 + 3 * 30,)
    # every packed row goes to a slot that gathers that same row
    assert torch.equal(plan.gather[plan.unpad], torch.arange(sum(lengths)))
    assert len(set(plan.unpad.tolist())) == sum(lengths)
    # scatter sends each padded slot to the row it gathered from; padding slots to the spare row T
    real = plan.scatter < sum(lengths)
    assert torch.equal(plan.scatter[real], plan.gather[real]) and int(real.sum()) == sum(lengths)
    assert torch.equal(plan.scatter[plan.unpad], torch.arange(sum(lengths)))
    assert plan.buckets[0].mask is not None  # lengths 1 and 2
    assert plan.buckets[2].mask is not None and plan.buckets[2].mask.shape == (3, 1, 1, 30)
    (same,) = make_plan([4, 4, 4], "cpu", max_buckets=1).buckets
    assert same.mask is None  # equal lengths need no mask


def test_bf16_attention_close():
    gen = torch.Generator().manual_seed(0)
    batch = pack([[0] * n for n in (40, 3, 17)], position_offset=0)
    q, k, v = (torch.randn(batch.num_tokens, 4, 16, generator=gen) for _ in range(3))
    with torch.inference_mode():
        got = packed_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), batch).float()
    ref = _reference(q.double(), k.double(), v.double(), batch).float()
    assert F.cosine_similarity(got, ref, dim=-1).min().item() > 0.999

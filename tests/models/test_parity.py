"""Parity of our packed encoder with ``transformers`` on tiny random checkpoints of every family."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ptmserve.models.config import Pooling
from ptmserve.models.encoder import Encoder
from ptmserve.models.hf import read_checkpoint
from ptmserve.models.packed import pack
from tests.models.hf_ref import load_hf, random_ids, run_hf

FAMILIES = ("bert", "roberta", "xlm-roberta", "distilbert")


def _ours(folder, ids, dtype=torch.float32, pooling=Pooling()):
    ck = read_checkpoint(folder)
    model = Encoder.from_tensors(ck.config, ck.tensors, dtype=dtype)
    batch = pack(ids, position_offset=ck.config.position_offset, device="cpu")
    with torch.inference_mode():
        hidden = model.embed(batch)
        for i in range(ck.config.num_layers):
            hidden = model.run_layer(i, hidden, batch)
        out = model(batch, pooling)
    return ck, hidden.float(), out, batch


@pytest.mark.parametrize("with_head", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_matches_transformers(tiny_checkpoint, family, with_head):
    folder = tiny_checkpoint(family, with_head)
    ck, hidden, out, batch = _ours(folder, ids := random_ids(7, 150, seed=1, max_len=60))
    ref = run_hf(load_hf(folder, with_head=with_head), ids, ck.config.pad_token_id)
    ref_hidden = torch.cat(ref.hidden)  # (T, H) in packed order
    assert hidden.shape == ref_hidden.shape
    assert (hidden - ref_hidden).abs().max().item() <= 1e-4
    assert (out.embeddings - ref.mean_pooled()).abs().max().item() <= 1e-4
    if with_head:
        assert out.logits is not None and out.logits.shape == (7, 3)
        assert (out.logits - ref.logits).abs().max().item() <= 1e-4
        assert ck.config.labels == ("label_0", "label_1", "label_2")
    else:
        assert out.logits is None


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_close_to_fp32_transformers(tiny_checkpoint, family):
    folder = tiny_checkpoint(family, True)
    ck, hidden, out, _ = _ours(folder, ids := random_ids(5, 150, seed=2), dtype=torch.bfloat16)
    ref = run_hf(load_hf(folder, with_head=True), ids, ck.config.pad_token_id)
    assert out.embeddings.dtype == torch.float32
    assert F.cosine_similarity(hidden, torch.cat(ref.hidden), dim=-1).min().item() >= 0.999
    assert F.cosine_similarity(out.embeddings, ref.mean_pooled(), dim=-1).min().item() >= 0.999
    assert F.cosine_similarity(out.logits, ref.logits, dim=-1).min().item() >= 0.999


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_cls_pooling_and_normalize(tiny_checkpoint, family):
    folder = tiny_checkpoint(family, False, st_pooling="cls", normalize=True)
    ck = read_checkpoint(folder)
    assert ck.pooling == Pooling(mode="cls", normalize=True)
    _, _, out, _ = _ours(folder, ids := random_ids(4, 150, seed=3), pooling=ck.pooling)
    ref = run_hf(load_hf(folder, with_head=False), ids, ck.config.pad_token_id)
    expected = F.normalize(ref.cls_pooled(), dim=-1)
    assert (out.embeddings - expected).abs().max().item() <= 1e-5
    assert torch.allclose(out.embeddings.norm(dim=-1), torch.ones(4), atol=1e-5)


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_batch_equals_one_at_a_time(tiny_checkpoint, family):
    folder = tiny_checkpoint(family, True)
    ids = random_ids(6, 150, seed=4, max_len=50)
    _, _, batched, _ = _ours(folder, ids)
    for row, seq in enumerate(ids):
        _, _, single, _ = _ours(folder, [seq])
        assert torch.allclose(batched.embeddings[row], single.embeddings[0], atol=1e-5)
        assert torch.allclose(batched.logits[row], single.logits[0], atol=1e-5)


def test_meta_construction_then_assign(tiny_checkpoint):
    ck = read_checkpoint(tiny_checkpoint("bert", True))
    with torch.device("meta"):
        model = Encoder(ck.config)
    assert all(p.is_meta for p in model.parameters())
    assert list(model.buffers()) == []
    model.to_empty(device="cpu")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(ck.tensors[name])
    ref = Encoder.from_tensors(ck.config, ck.tensors)
    batch = pack(random_ids(3, 150, seed=5), position_offset=0)
    with torch.inference_mode():
        a, b = model.eval()(batch, Pooling()), ref(batch, Pooling())
    assert torch.equal(a.embeddings, b.embeddings) and torch.equal(a.logits, b.logits)


def test_parameters_read_at_call_time(tiny_checkpoint):
    ck = read_checkpoint(tiny_checkpoint("bert"))
    model = Encoder.from_tensors(ck.config, ck.tensors)
    batch = pack(random_ids(2, 150, seed=6), position_offset=0)
    with torch.inference_mode():
        before = model(batch, Pooling()).embeddings
        model.layers[1].down.weight = torch.nn.Parameter(torch.zeros_like(model.layers[1].down.weight))
        after = model(batch, Pooling()).embeddings
    assert (before - after).abs().max().item() > 1e-3


def test_group_names_and_tensor_group(tiny_checkpoint):
    from ptmserve.errors import InvalidInput
    from ptmserve.models import registry
    from ptmserve.store.manifest import tensor_group

    ck = read_checkpoint(tiny_checkpoint("distilbert", True))
    model = Encoder.from_tensors(ck.config, ck.tensors)
    assert model.group_names() == ["embeddings", "layers.0", "layers.1", "head"]
    assert registry.get(ck.architecture).group_names(ck.config) == model.group_names()
    groups = {tensor_group(name) for name, _ in model.named_parameters()}
    assert groups == set(model.group_names())
    assert tensor_group("layers.12.q.weight") == "layers.12"
    with pytest.raises(InvalidInput):
        tensor_group("layers.x.q")

"""The oneDNN path of the encoder (plain ``nn.Linear`` layers on the CPU: fused bias, activation and
residual epilogues) computes what the module path computes, and is taken only where it applies."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from ptmserve.models import encoder as enc
from ptmserve.models.config import Pooling
from ptmserve.models.encoder import Encoder
from ptmserve.models.hf import read_checkpoint
from ptmserve.models.packed import pack
from tests.models.hf_ref import random_ids

pytestmark = pytest.mark.skipif(not enc._ONEDNN, reason="this torch has no oneDNN linear")


def _model(folder, dtype=torch.float32, hidden_act=None):
    ck = read_checkpoint(folder)
    config = ck.config if hidden_act is None else dataclasses.replace(ck.config, hidden_act=hidden_act)
    return Encoder.from_tensors(config, ck.tensors, dtype=dtype), ck.config


def _hidden(model, batch):
    with torch.inference_mode():
        hidden = model.embed(batch)
        for i in range(model.config.num_layers):
            hidden = model.run_layer(i, hidden, batch)
    return hidden.float()


@pytest.mark.parametrize("family", ["bert", "distilbert"])
@pytest.mark.parametrize("hidden_act", ["gelu", "relu", "gelu_new"])
def test_onednn_layers_equal_module_layers(tiny_checkpoint, family, hidden_act):
    model, cfg = _model(tiny_checkpoint(family), hidden_act=hidden_act)
    ids = random_ids(5, cfg.vocab_size, seed=3)
    batch = pack(ids, position_offset=cfg.position_offset)
    with torch.inference_mode():
        assert model._fuses(model.layers[0], torch.empty(1, cfg.hidden_size))
    fused = _hidden(model, batch)
    model.onednn = False
    plain = _hidden(model, batch)
    assert (fused - plain).abs().max().item() < 1e-5


def test_onednn_bf16_close_to_module_path(tiny_checkpoint):
    model, cfg = _model(tiny_checkpoint("bert"), dtype=torch.bfloat16)
    batch = pack(random_ids(3, cfg.vocab_size, seed=1), position_offset=cfg.position_offset)
    fused = _hidden(model, batch)
    model.onednn = False
    plain = _hidden(model, batch)
    assert torch.nn.functional.cosine_similarity(fused, plain, dim=-1).min().item() > 0.999


class _Wrapped(nn.Module):
    """Any module that is not a plain ``nn.Linear`` (as a quantized linear would be)."""

    def __init__(self, inner: nn.Linear) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.inner(x)


def test_other_linear_modules_keep_their_call(tiny_checkpoint):
    model, cfg = _model(tiny_checkpoint("bert"))
    batch = pack(random_ids(2, cfg.vocab_size, seed=2), position_offset=cfg.position_offset)
    pooling = Pooling(mode="mean", normalize=True)
    with torch.inference_mode():
        before = model(batch, pooling).embeddings
    wrapped = _Wrapped(model.layers[0].up)
    model.layers[0].up = wrapped
    with torch.inference_mode():
        assert not model._fuses(model.layers[0], torch.empty(1, cfg.hidden_size))
        assert model._fuses(model.layers[1], torch.empty(1, cfg.hidden_size))
        after = model(batch, pooling).embeddings
    assert wrapped.calls == 1
    assert torch.allclose(before, after, atol=1e-6)


def test_no_onednn_path_with_autograd_on(tiny_checkpoint):
    model, cfg = _model(tiny_checkpoint("bert"))
    with torch.enable_grad():
        assert not model._fuses(model.layers[0], torch.empty(1, cfg.hidden_size))
    with torch.inference_mode():
        assert not model._fuses(model.layers[0], torch.empty(1, cfg.hidden_size, dtype=torch.float16))

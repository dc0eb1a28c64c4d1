"""read_checkpoint: files, formats, name translation strictness, sentence-transformers settings."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from ptmserve.errors import InvalidCheckpoint
from ptmserve.models import registry
from ptmserve.models.config import Pooling
from ptmserve.models.hf import read_checkpoint
from tests.models.tiny import make_tiny_checkpoint


def _copy(src, tmp_path, name="copy"):
    return shutil.copytree(src, tmp_path / name)


def _edit_weights(folder, edit):
    state = load_file(folder / "model.safetensors")
    save_file(edit(dict(state)), folder / "model.safetensors")


def test_defaults_without_sentence_transformers_files(tiny_checkpoint):
    ck = read_checkpoint(tiny_checkpoint("roberta"))
    assert ck.pooling == Pooling(mode="mean", normalize=False)
    assert ck.max_length == ck.config.max_tokens == 64
    assert ck.tokenizer_json.startswith(b"{")
    assert all(name.split(".")[0] in ("embeddings", "layers") for name in ck.tensors)
    assert "embeddings.token_type.weight" in ck.tensors


def test_sentence_transformers_files(tiny_checkpoint):
    ck = read_checkpoint(tiny_checkpoint("bert", st_pooling="mean", normalize=True, max_seq_length=20))
    assert ck.pooling == Pooling(mode="mean", normalize=True) and ck.max_length == 20
    capped = read_checkpoint(tiny_checkpoint("distilbert", st_pooling="cls", max_seq_length=1000))
    assert capped.pooling == Pooling(mode="cls", normalize=False) and capped.max_length == 64


def test_unsupported_st_module_and_pooling(tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint("bert", st_pooling="mean"), tmp_path)
    modules = json.loads((folder / "modules.json").read_text())
    (folder / "modules.json").write_text(
        json.dumps(modules + [{"type": "sentence_transformers.models.Dense"}])
    )
    with pytest.raises(InvalidCheckpoint, match="Dense"):
        read_checkpoint(folder)
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_max_tokens": True}))
    with pytest.raises(InvalidCheckpoint, match="pooling"):
        read_checkpoint(folder)


def test_bin_checkpoint_loads_with_weights_only(tmp_path):
    folder = make_tiny_checkpoint(tmp_path, "distilbert", with_head=True, fmt="bin")
    assert not (folder / "model.safetensors").exists()
    ck = read_checkpoint(folder)
    assert ck.tensors["head.out.weight"].shape == (3, 32)
    # A pickle that is more than tensors is refused (weights_only=True), not executed.
    torch.save({"x": torch.zeros(1), "evil": Pooling()}, folder / "pytorch_model.bin")
    with pytest.raises(InvalidCheckpoint, match="cannot read the weights"):
        read_checkpoint(folder)


def test_missing_files(tiny_checkpoint, tmp_path):
    with pytest.raises(InvalidCheckpoint, match="does not exist"):
        read_checkpoint(tmp_path / "nope")
    folder = _copy(tiny_checkpoint("bert"), tmp_path)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(InvalidCheckpoint, match="tokenizer.json"):
        read_checkpoint(folder)
    (folder / "config.json").unlink()
    with pytest.raises(InvalidCheckpoint, match="config.json"):
        read_checkpoint(folder)
    folder = _copy(tiny_checkpoint("bert"), tmp_path, "noweights")
    (folder / "model.safetensors").unlink()
    with pytest.raises(InvalidCheckpoint, match="no weights"):
        read_checkpoint(folder)


def test_unsupported_architecture(tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint("bert"), tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "architectures": ["BertForTokenClassification"]}))
    with pytest.raises(InvalidCheckpoint, match="BertForTokenClassification"):
        read_checkpoint(folder)


def test_missing_unexpected_and_misshaped_keys(tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint("bert", True), tmp_path)
    _edit_weights(
        folder, lambda s: {k: v for k, v in s.items() if k != "bert.encoder.layer.1.output.dense.bias"}
    )
    with pytest.raises(InvalidCheckpoint, match=r"missing \['layers.1.down.bias'\]"):
        read_checkpoint(folder)
    folder = _copy(tiny_checkpoint("bert", True), tmp_path, "extra")
    _edit_weights(folder, lambda s: {**s, "bert.encoder.layer.0.mystery.weight": torch.zeros(2)})
    with pytest.raises(InvalidCheckpoint, match="mystery"):
        read_checkpoint(folder)
    folder = _copy(tiny_checkpoint("bert", True), tmp_path, "shape")
    _edit_weights(folder, lambda s: {**s, "classifier.weight": torch.zeros(5, 32)})
    with pytest.raises(InvalidCheckpoint, match=r"head.out.weight: \(5, 32\) != \(3, 32\)"):
        read_checkpoint(folder)


def test_mlm_checkpoint_with_prefix_and_legacy_names(tiny_checkpoint, tmp_path):
    """A BertForMaskedLM-style file: ``bert.`` prefix, MLM head, position_ids buffer, gamma/beta."""
    folder = _copy(tiny_checkpoint("bert"), tmp_path)
    base = read_checkpoint(folder)

    def to_mlm(state):
        out = {"bert." + k.replace("LayerNorm.weight", "LayerNorm.gamma"): v for k, v in state.items()}
        out["cls.predictions.bias"] = torch.zeros(3)
        out["bert.embeddings.position_ids"] = torch.arange(64)[None]
        return out

    _edit_weights(folder, to_mlm)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "architectures": ["BertForMaskedLM"]}))
    ck = read_checkpoint(folder)
    assert ck.config.labels == ()
    assert ck.tensors.keys() == base.tensors.keys()
    assert all(torch.equal(ck.tensors[k], base.tensors[k]) for k in base.tensors)


def test_translation_reports_ignored_and_duplicates():
    tr = registry.get("roberta").names.translate(
        [
            "roberta.pooler.dense.weight",
            "lm_head.bias",
            "embeddings.word_embeddings.weight",
            "roberta.embeddings.word_embeddings.weight",
            "classifier.out_proj.weight",
        ],
        with_head=False,
    )
    assert tr.ignored == ["lm_head.bias", "roberta.pooler.dense.weight"]
    assert tr.unexpected == ["classifier.out_proj.weight"]  # a head on a model declared headless
    assert len(tr.duplicates) == 1 and "embeddings.word.weight" in tr.duplicates[0]

from __future__ import annotations

import json

import pytest

from ptmserve.errors import InvalidCheckpoint
from ptmserve.models.config import EncoderConfig, Pooling


def _hf(folder):
    return json.loads((folder / "config.json").read_text())


@pytest.mark.parametrize(
    ("family", "ours", "offset", "types"),
    [
        ("bert", "bert", 0, 2),
        ("minilm", "bert", 0, 2),
        ("roberta", "roberta", 2, 1),
        ("xlm-roberta", "roberta", 2, 1),
        ("distilbert", "distilbert", 0, 0),
    ],
)
def test_from_hf_families(tiny_checkpoint, family, ours, offset, types):
    cfg = EncoderConfig.from_hf(_hf(tiny_checkpoint(family)))
    assert (cfg.family, cfg.hidden_size, cfg.num_layers, cfg.num_heads) == (ours, 32, 2, 4)
    assert cfg.intermediate_size == 64 and cfg.head_dim == 8
    assert cfg.position_offset == offset and cfg.type_vocab_size == types
    assert cfg.max_tokens == 64  # make_tiny_checkpoint's default, whatever the offset
    assert cfg.labels == ()  # a base model has no head even though config.json has id2label


def test_labels_from_id2label_and_json_round_trip(tiny_checkpoint):
    cfg = EncoderConfig.from_hf(_hf(tiny_checkpoint("roberta", True, num_labels=4)))
    assert cfg.labels == ("label_0", "label_1", "label_2", "label_3")
    again = EncoderConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and isinstance(again.labels, tuple)


def test_unsupported_model_type_and_architecture():
    base = {
        "model_type": "bert",
        "vocab_size": 10,
        "hidden_size": 8,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 16,
        "max_position_embeddings": 16,
    }
    assert EncoderConfig.from_hf(base).family == "bert"
    with pytest.raises(InvalidCheckpoint, match="model_type 'gpt2'"):
        EncoderConfig.from_hf({**base, "model_type": "gpt2"})
    with pytest.raises(InvalidCheckpoint, match="BertForQuestionAnswering"):
        EncoderConfig.from_hf({**base, "architectures": ["BertForQuestionAnswering"]})
    with pytest.raises(InvalidCheckpoint, match="relative_key"):
        EncoderConfig.from_hf({**base, "position_embedding_type": "relative_key"})
    with pytest.raises(InvalidCheckpoint, match="hidden_act"):
        EncoderConfig.from_hf({**base, "hidden_act": "swish"})
    with pytest.raises(InvalidCheckpoint, match="num_hidden_layers"):
        EncoderConfig.from_hf({k: v for k, v in base.items() if k != "num_hidden_layers"})
    with pytest.raises(InvalidCheckpoint, match="divisible"):
        EncoderConfig.from_hf({**base, "num_attention_heads": 3})
    with pytest.raises(InvalidCheckpoint):
        EncoderConfig.from_dict({"family": "bert"})


def test_pooling_round_trip_and_validation():
    p = Pooling(mode="cls", normalize=True)
    assert Pooling.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    with pytest.raises(InvalidCheckpoint):
        Pooling(mode="max")

from __future__ import annotations

import numpy as np
import pytest

from ptmserve.errors import InvalidCheckpoint, InvalidInput
from ptmserve.models.tokenizer import TextTokenizer, check_ids
from tests.models.tiny import TINY_TEXTS, tiny_tokenizer


def test_encode_adds_specials_and_never_pads():
    tok = TextTokenizer.from_json(tiny_tokenizer("bert").to_str().encode(), max_length=64)
    ids = tok.encode(list(TINY_TEXTS))
    assert [len(s) for s in ids] == [6, 5, 17, 5, 3]
    assert all(s[0] == 2 and s[-1] == 3 for s in ids)  # [CLS] ... [SEP]
    assert ids[3][1:-1] == [1, 1, 1]  # unknown words -> [UNK]
    assert tok.encode([]) == []


def test_truncation_keeps_special_tokens():
    tok = TextTokenizer.from_json(tiny_tokenizer("roberta").to_str().encode(), max_length=5)
    (ids,) = tok.encode(["the man said hello to them all"])
    assert len(ids) == 5 and ids[0] == 0 and ids[-1] == 2  # <s> ... </s>


def test_padding_in_the_file_is_turned_off():
    raw = tiny_tokenizer("bert")
    raw.enable_padding(length=32)
    raw.enable_truncation(8)
    tok = TextTokenizer.from_json(raw.to_str().encode(), max_length=16)
    assert [len(s) for s in tok.encode(["one", TINY_TEXTS[2]])] == [3, 16]


def test_bad_inputs():
    tok = TextTokenizer.from_json(tiny_tokenizer("bert").to_str().encode(), max_length=8)
    with pytest.raises(InvalidInput, match="input 1"):
        tok.encode(["ok", 3])
    with pytest.raises(InvalidCheckpoint):
        TextTokenizer.from_json(b"{not json", max_length=8)


def test_check_ids():
    check_ids([[1, 2], [np.int64(3)]], vocab_size=10, max_length=4)
    for bad, match in (
        ([[1], []], "no tokens"),
        ([[1, 10]], "10"),
        ([[-1]], "-1"),
        ([[1.0]], "1.0"),
        ([[True]], "True"),
        ([[1] * 5], "at most 4"),
    ):
        with pytest.raises(InvalidInput, match=match):
            check_ids(bad, vocab_size=10, max_length=4)

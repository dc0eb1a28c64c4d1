from __future__ import annotations

import pytest
import torch

from ptmserve.errors import InvalidInput
from ptmserve.models.packed import pack


def test_pack_layout():
    b = pack([[7, 8, 9], [4], [5, 6]], position_offset=2, device="cpu")
    assert b.input_ids.tolist() == [7, 8, 9, 4, 5, 6]
    assert b.position_ids.tolist() == [2, 3, 4, 2, 2, 3]
    assert b.token_type_ids.tolist() == [0] * 6
    assert b.seq_ids.tolist() == [0, 0, 0, 1, 2, 2]
    assert b.cu_seqlens.dtype == torch.int32 and b.cu_seqlens.tolist() == [0, 3, 4, 6]
    assert b.lengths == (3, 1, 2) and b.max_seqlen == 3
    assert (b.num_seqs, b.num_tokens) == (3, 6)
    assert b.spans() == [(0, 3), (3, 4), (4, 6)]


def test_pack_token_types_and_errors():
    b = pack([[1, 2], [3]], position_offset=0, token_type_ids=[[0, 1], [1]])
    assert b.token_type_ids.tolist() == [0, 1, 1]
    with pytest.raises(InvalidInput):
        pack([], position_offset=0)
    with pytest.raises(InvalidInput, match="input 1"):
        pack([[1], []], position_offset=0)
    with pytest.raises(InvalidInput):
        pack([[1, 2]], position_offset=0, token_type_ids=[[0]])


def test_to_device_keeps_values():
    b = pack([[1, 2], [3]], position_offset=0).to("cpu")
    assert b.input_ids.tolist() == [1, 2, 3] and b.lengths == (2, 1)

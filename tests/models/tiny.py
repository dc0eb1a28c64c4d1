"""Tiny random Hugging Face checkpoints for tests (no downloads, a few hundred KB each).

Other layers' tests import this helper::

    from tests.models.tiny import make_tiny_checkpoint, TINY_TEXTS

    folder = make_tiny_checkpoint(tmp_path, "bert", with_head=True)

The folder looks like a checkpoint saved by ``transformers``' ``save_pretrained``: ``config.json``,
``model.safetensors`` (or ``pytorch_model.bin``), a ``tokenizer.json`` built with ``tokenizers`` from a
tiny word vocab, and optionally the sentence-transformers files (``modules.json``,
``1_Pooling/config.json``, ``sentence_bert_config.json``).

Families: ``"bert"``, ``"minilm"`` (a BERT), ``"roberta"``, ``"xlm-roberta"``, ``"distilbert"``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

FAMILIES = ("bert", "minilm", "roberta", "xlm-roberta", "distilbert")

_WORDS_TEXT = """
the a an of to and in is it that was for on are with as he she they be at one have this from or
had by hot word but what some we can out other were all there when up use your how said each
which do their time if will way about many then them write would like so these her long make
thing see him two has look more day could go come did number sound no most people my over know
water than call first who may down side been now find any new work part take get place made live
where after back little only round man year came show every good me give our under name very
through just form sentence great think say help low line differ turn cause much mean before move
right boy old too same tell does set three want air well also play small end put home read hand
port large spell add even land here must big high such follow act why ask men change went light
kind off need house picture try us again animal
"""
WORDS = tuple(_WORDS_TEXT.split())
"""The tiny vocabulary (after the five special tokens)."""

TINY_TEXTS = (
    "the man said hello",
    "a new day",
    "they would like to make a long sentence about the water and the land here",
    "zzz unknown qqq",
    "one",
)
"""A few texts the tiny tokenizers cover (unknown words become the unk token)."""

_BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_ROBERTA_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")

_ARCH = {
    ("bert", False): ("BertModel", "bert"),
    ("bert", True): ("BertForSequenceClassification", "bert"),
    ("roberta", False): ("RobertaModel", "roberta"),
    ("roberta", True): ("RobertaForSequenceClassification", "roberta"),
    ("xlm-roberta", False): ("XLMRobertaModel", "xlm-roberta"),
    ("xlm-roberta", True): ("XLMRobertaForSequenceClassification", "xlm-roberta"),
    ("distilbert", False): ("DistilBertModel", "distilbert"),
    ("distilbert", True): ("DistilBertForSequenceClassification", "distilbert"),
}


def tiny_tokenizer(family: str) -> Tokenizer:
    """A WordPiece tokenizer over ``WORDS`` with the family's special tokens (no padding, no truncation)."""
    roberta_like = family in ("roberta", "xlm-roberta")
    specials = _ROBERTA_SPECIALS if roberta_like else _BERT_SPECIALS
    vocab = {tok: i for i, tok in enumerate(specials + WORDS)}
    unk = "<unk>" if roberta_like else "[UNK]"
    cls, sep = ("<s>", "</s>") if roberta_like else ("[CLS]", "[SEP]")
    tok = Tokenizer(models.WordPiece(vocab, unk_token=unk))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}",
        pair=f"{cls} $A {sep} $B:1 {sep}:1",
        special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])],
    )
    return tok


def tiny_vocab_size(family: str) -> int:
    """Vocabulary size of ``tiny_tokenizer(family)``."""
    return len(_BERT_SPECIALS) + len(WORDS)


def _hf_model(family: str, with_head: bool, num_labels: int, max_tokens: int) -> torch.nn.Module:
    import transformers

    fam = "bert" if family == "minilm" else family
    arch, model_type = _ARCH[(fam, with_head)]
    vocab = tiny_vocab_size(fam)
    labels = {i: f"label_{i}" for i in range(num_labels)}
    common = dict(vocab_size=vocab, id2label=labels, label2id={v: k for k, v in labels.items()})
    if fam == "distilbert":
        cfg = transformers.DistilBertConfig(
            dim=32,
            n_layers=2,
            n_heads=4,
            hidden_dim=64,
            max_position_embeddings=max_tokens,
            pad_token_id=0,
            **common,
        )
    elif fam == "bert":
        cfg = transformers.BertConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=max_tokens,
            type_vocab_size=2,
            pad_token_id=0,
            **common,
        )
    else:
        cls = transformers.XLMRobertaConfig if fam == "xlm-roberta" else transformers.RobertaConfig
        cfg = cls(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=max_tokens + 2,
            type_vocab_size=1,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            **common,
        )
    assert cfg.model_type == model_type
    model = getattr(transformers, arch)(cfg).eval()
    with torch.no_grad():  # make every parameter (LayerNorm and biases included) non-trivial
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def make_tiny_checkpoint(
    tmp_path: Path,
    family: str = "bert",
    *,
    with_head: bool = False,
    num_labels: int = 3,
    fmt: str = "safetensors",
    st_pooling: str | None = None,
    normalize: bool = False,
    max_seq_length: int | None = None,
    max_tokens: int = 64,
    seed: int = 0,
    name: str | None = None,
) -> Path:
    """Write a tiny random checkpoint of ``family`` under ``tmp_path`` and return its folder.

    Args:
        tmp_path: parent folder (pytest's ``tmp_path``).
        family: one of ``FAMILIES``.
        with_head: save the ``...ForSequenceClassification`` model (``num_labels`` labels ``label_i``).
        fmt: ``"safetensors"`` (``model.safetensors``) or ``"bin"`` (``pytorch_model.bin``, a plain
            ``torch.save`` of the state dict).
        st_pooling: ``"mean"`` or ``"cls"`` writes sentence-transformers files (``modules.json``,
            ``1_Pooling/config.json``, ``sentence_bert_config.json``); ``None`` writes none.
        normalize: with ``st_pooling``, add the ST Normalize module to ``modules.json``.
        max_seq_length: ``sentence_bert_config.json``'s value (default ``max_tokens // 2``).
        max_tokens: longest input the position table allows (2 layers, hidden 32, 4 heads, ffn 64).
        seed: torch seed for the random weights: the same seed gives the same weights.
        name: folder name (default ``f"{family}-{'cls' if with_head else 'base'}-{seed}"``).
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; expected one of {FAMILIES}")
    torch.manual_seed(seed)
    model = _hf_model(family, with_head, num_labels, max_tokens)
    folder = Path(tmp_path) / (name or f"{family}-{'cls' if with_head else 'base'}-{seed}")
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    if fmt == "bin":
        (folder / "model.safetensors").unlink()
        state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        torch.save(state, folder / "pytorch_model.bin")
    elif fmt != "safetensors":
        raise ValueError(f"fmt must be 'safetensors' or 'bin', got {fmt!r}")
    tiny_tokenizer("bert" if family == "minilm" else family).save(str(folder / "tokenizer.json"))
    if st_pooling is not None:
        _write_st_files(folder, st_pooling, normalize, max_seq_length or max_tokens // 2)
    return folder


def _write_st_files(folder: Path, pooling: str, normalize: bool, max_seq_length: int) -> None:
    if pooling not in ("mean", "cls"):
        raise ValueError(f"st_pooling must be 'mean' or 'cls', got {pooling!r}")
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append(
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
        )
    (folder / "modules.json").write_text(json.dumps(modules, indent=2))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    pool_cfg = {
        "word_embedding_dimension": 32,
        "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pool_cfg, indent=2))
    sbc = {"max_seq_length": max_seq_length, "do_lower_case": False}
    (folder / "sentence_bert_config.json").write_text(json.dumps(sbc))

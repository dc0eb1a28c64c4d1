"""The placement section of ``ptmserve bench switch`` (issue 12): what leaving load groups in the host tier
saves in device bytes and costs in time, against every group on the device, in the same run.

For one stored model and its twin (same shape, other weights), per serve dtype, under ``device`` (every
group on the device: the baseline), ``host-embeddings`` and ``auto`` (placed by a quick profile measured
now with ``engine.profiling.profile_model``, as the engine's lazy ``ensure_profile`` would; skipped, and
said so, where that module is missing), each on a weight manager of its own:

- **device bytes** per model as placed (``WeightManager.placed_bytes``, checked against the device tier's
  ``stats().device.per_model`` while the model is resident) and the saving against ``device``;
- **models per budget**: how many models as placed fit a device budget of ``BUDGET_MODELS`` full models;
- **warm switch**: the model from the host tier onto the device, its twin evicted (the device budget holds
  one model as placed), to the first result of a 1 x 16 request: fewer bytes to copy;
- **time per request** on the resident model: the same batches under each placement, the runs interleaved
  (the order rotates every round, so drift and other jobs hit every placement alike); median and best,
  and their ratios to ``device``.

Placements that put the same groups on the host (``auto`` usually chooses ``host-embeddings``' groups)
are measured once and reported under each name.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ptmserve.memory.manager import WeightManager
from ptmserve.memory.placement import AUTO, DEVICE, HOST_EMBEDDINGS, host_groups
from ptmserve.models.packed import PackedBatch, pack
from ptmserve.store.repository import Repository

PLACEMENTS = (DEVICE, HOST_EMBEDDINGS, AUTO)
BUDGET_MODELS = 4  # the device budget of "models per budget", in full (every group on the device) models
SAVING_TARGETS = {"minilm": 0.45, "bert-base": 0.20}  # device bytes saved by host-embeddings (issue 12)
TIME_RATIO_TARGET = 1.05  # time per request, placed / device (median of interleaved runs)
SWITCH_BATCH = (1, 16)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the placement section."""
    parser.add_argument(
        "--placement",
        choices=("on", "off", "only"),
        default="on",
        help="the placement section (issue 12): on (default), off, or only it (skips the switch sections)",
    )
    parser.add_argument(
        "--placement-dtypes",
        default="float32,bfloat16",
        help="serve dtypes of the placement section (comma-separated; --quick: float32)",
    )
    parser.add_argument(
        "--placement-runs", type=int, default=20, help="interleaved timed runs per placement (default 20)"
    )
    parser.add_argument(
        "--placement-batches",
        default="1x16,8x64",
        help="inputs x tokens of the timed batches (comma-separated; --quick: 1x16)",
    )


def parse_batches(text: str) -> list[tuple[int, int]]:
    """``"1x16,8x64"`` -> ``[(1, 16), (8, 64)]``."""
    out = []
    for part in text.split(","):
        n, _, length = part.strip().partition("x")
        out.append((int(n), int(length)))
    return out


def measure(
    repo: Repository, label: str, name: str, twin: str, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """The section's rows for stored model ``name`` (and ``twin``): one per serve dtype and placement."""
    quick = bool(getattr(args, "quick", False))
    dtypes = ["float32"] if quick else [d.strip() for d in args.placement_dtypes.split(",") if d.strip()]
    batches = [SWITCH_BATCH] if quick else parse_batches(args.placement_batches)
    runs = 3 if quick else max(1, args.placement_runs)
    rows: list[dict[str, Any]] = []
    for dtype in dtypes:
        rows += _measure_dtype(repo, label, name, twin, getattr(torch, dtype), batches, runs)
    return rows


def _measure_dtype(
    repo: Repository,
    label: str,
    name: str,
    twin: str,
    dtype: torch.dtype,
    batches: Sequence[tuple[int, int]],
    runs: int,
) -> list[dict[str, Any]]:
    manifest = repo.manifest(name)
    groups = manifest.group_names()
    placed: dict[str, frozenset[str] | None] = {p: host_groups(p, groups) for p in (DEVICE, HOST_EMBEDDINGS)}
    auto_note, profile_s = _auto_groups(repo, name, dtype)
    placed[AUTO] = auto_note if isinstance(auto_note, frozenset) else None
    distinct = list(dict.fromkeys(g for g in placed.values() if g is not None))  # device's first
    sizes = {g: _placed_bytes(repo, dtype, g, name) for g in distinct}
    host_budget = int(1.1 * sum(e.nbytes for n in (name, twin) for e in repo.manifest(n).tensors))
    managers = {g: _manager(repo, dtype, g, int(1.02 * sizes[g]), host_budget) for g in distinct}
    vocab = int(manifest.config["vocab_size"])
    try:
        m = _Measured(sizes, _time_switches(managers, name, twin, _batch(*SWITCH_BATCH, vocab), runs))
        m.times, m.stats_bytes, m.diff = _time_resident(
            managers, name, [(b, _batch(*b, vocab)) for b in batches], runs
        )
    finally:
        for manager in managers.values():
            manager.close()
    common = {"model": label, "name": name, "dtype": str(dtype).removeprefix("torch.")}
    rows = [_row(common, p, g, m) for p, g in placed.items() if g is not None]
    if placed[AUTO] is None:
        rows.append({**common, "placement": AUTO, "skipped": auto_note})
    else:
        next(r for r in rows if r["placement"] == AUTO)["profile_seconds"] = profile_s
    return rows


@dataclass(slots=True)
class _Measured:
    """One serve dtype's measurements, per set of host-placed groups."""

    sizes: dict[frozenset[str], int]  # device bytes as placed
    switches: dict[frozenset[str], list[float]]  # warm switch seconds
    times: dict[frozenset[str], dict[str, list[float]]] = field(default_factory=dict)  # per batch shape
    stats_bytes: dict[frozenset[str], int] = field(default_factory=dict)  # the device tier's count
    diff: dict[frozenset[str], float] = field(default_factory=dict)  # max |embeddings - device's|


def _row(common: Mapping[str, Any], placement: str, g: frozenset[str], m: _Measured) -> dict[str, Any]:
    base: frozenset[str] = frozenset()
    full, placed, switches = m.sizes[base], m.sizes[g], m.switches[g]
    row: dict[str, Any] = {
        **common,
        "placement": placement,
        "host_groups": sorted(g),
        "bytes": placed,
        "full_bytes": full,
        "stats_bytes": m.stats_bytes[g],
        "saving": 1 - placed / full,
        "budget_models": BUDGET_MODELS,
        "models_per_budget": (BUDGET_MODELS * full) // placed,
        "warm_switch_s": min(switches),
        "warm_switch_median_s": statistics.median(switches),
        "warm_switch_ratio": min(switches) / min(m.switches[base]),
        "max_abs_diff": m.diff[g],
        "times": {},
    }
    for shape, t in m.times[g].items():
        b = m.times[base][shape]
        row["times"][shape] = {
            "median_s": statistics.median(t),
            "best_s": min(t),
            "ratio_median": statistics.median(t) / statistics.median(b),
            "ratio_best": min(t) / min(b),
        }
    row["targets_met"] = _targets(row, common["name"])
    return row


def _targets(row: Mapping[str, Any], name: str) -> dict[str, bool]:
    if row["placement"] == DEVICE:
        return {}
    out = {"time_ratio": all(t["ratio_median"] <= TIME_RATIO_TARGET for t in row["times"].values())}
    if name in SAVING_TARGETS:
        out["saving"] = row["saving"] >= SAVING_TARGETS[name]
    return out


def _auto_groups(repo: Repository, name: str, dtype: torch.dtype) -> tuple[frozenset[str] | str, float]:
    """``auto``'s host groups for ``name`` by a quick profile measured now, and the profile's seconds;
    or why auto is skipped."""
    try:
        from ptmserve.engine.profiling import profile_model
    except ImportError as exc:
        return f"skipped: ptmserve.engine.profiling is not available ({exc})", 0.0
    t0 = time.perf_counter()
    profile = profile_model(repo, name, device="cpu", dtype=dtype, quick=True)
    seconds = time.perf_counter() - t0
    return host_groups(AUTO, repo.manifest(name).group_names(), profile), seconds


def _manager(
    repo: Repository,
    dtype: torch.dtype,
    groups: frozenset[str],
    device_budget: int,
    host_budget: int = 1 << 40,
) -> WeightManager:
    return WeightManager(
        repo,
        device="cpu",
        dtype=dtype,
        host_budget=host_budget,
        device_budget=device_budget,
        placement=lambda manifest: groups & frozenset(manifest.group_names()),
    )


def _placed_bytes(repo: Repository, dtype: torch.dtype, groups: frozenset[str], name: str) -> int:
    manager = _manager(repo, dtype, groups, 1 << 40)  # reads the manifest only
    try:
        return manager.placed_bytes(name)
    finally:
        manager.close()


def _time_switches(
    managers: Mapping[frozenset[str], WeightManager], name: str, twin: str, batch: PackedBatch, runs: int
) -> dict[frozenset[str], list[float]]:
    """Warm switches onto each manager's device (its budget holds one model as placed), interleaved."""
    out: dict[frozenset[str], list[float]] = {g: [] for g in managers}
    for m in managers.values():  # warm-up: both models in the host tier, kernels chosen
        first_result_seconds(m, twin, batch)
        first_result_seconds(m, name, batch)
    keys = list(managers)
    for i in range(runs):
        for g in keys[i % len(keys) :] + keys[: i % len(keys)]:
            first_result_seconds(managers[g], twin, batch)  # evicts the model; it stays in the host tier
            out[g].append(first_result_seconds(managers[g], name, batch))
    return out


def _time_resident(
    managers: Mapping[frozenset[str], WeightManager],
    name: str,
    batches: Sequence[tuple[tuple[int, int], PackedBatch]],
    runs: int,
) -> tuple[
    dict[frozenset[str], dict[str, list[float]]], dict[frozenset[str], int], dict[frozenset[str], float]
]:
    """Seconds per batch on the resident model under each placement (interleaved), the device tier's
    bytes of the model, and the largest difference of its embeddings from the first placement's."""
    loaded = {g: m.acquire(name) for g, m in managers.items()}
    try:
        for m in loaded.values():
            m.wait()
        stats = {g: managers[g].stats().device.per_model.get(name, 0) for g in managers}
        want = None
        diff: dict[frozenset[str], float] = {}
        for g, m in loaded.items():  # also the warm-up run of every batch
            for _, batch in batches:
                got = m.run(batch).embeddings.float()
            want = got if want is None else want
            diff[g] = float((got - want).abs().max())
        times: dict[frozenset[str], dict[str, list[float]]] = {g: {} for g in loaded}
        keys = list(loaded)
        for i in range(runs):
            for (n, length), batch in batches:
                for g in keys[i % len(keys) :] + keys[: i % len(keys)]:
                    t0 = time.perf_counter()
                    loaded[g].run(batch).embeddings.sum().item()
                    times[g].setdefault(f"{n}x{length}", []).append(time.perf_counter() - t0)
    finally:
        for m in loaded.values():
            m.release()
    return times, stats, diff


def first_result_seconds(manager: WeightManager, name: str, batch: PackedBatch) -> float:
    """Seconds from ``acquire`` to the first result; then waits (untimed) for the load to settle."""
    start = time.perf_counter()
    with manager.acquire(name) as loaded:
        loaded.run(batch).embeddings.sum().item()
        seconds = time.perf_counter() - start
        loaded.wait()
    return seconds


def _batch(n: int, length: int, vocab: int) -> PackedBatch:
    """Seeded word-piece ids between [CLS] and [SEP] (any ids below 3 stand in on a tiny vocabulary)."""
    gen = torch.Generator().manual_seed(0)
    real = vocab > 2000
    ids = torch.randint(1000 if real else 3, vocab, (n, length), generator=gen)
    ids[:, 0], ids[:, -1] = (101, 102) if real else (1, 2)
    return pack(ids.tolist(), position_offset=0)


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The section as Markdown tables."""
    shapes = list(dict.fromkeys(s for r in rows for s in r.get("times", {})))
    lines = [
        f"Placement (issue 12): device bytes per model as placed; models per a budget of {BUDGET_MODELS} "
        "full models; warm switch (best); time per request on the resident model (median of interleaved "
        "runs) and its ratio to device:",
        "",
        "| model | dtype | placement | host groups | device MB | saved | models per budget | warm switch ms "
        "| switch ratio | " + " | ".join(f"{s} ms | {s} ratio" for s in shapes) + " | targets |",
        "|---|---|---|---|---:|---:|---:|---:|---:|" + "---:|---:|" * len(shapes) + "---|",
    ]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['model']} | {r['dtype']} | {r['placement']} | {r['skipped']} |")
            continue
        cells = []
        for s in shapes:
            t = r["times"].get(s)
            cells += ["", ""] if t is None else [f"{t['median_s'] * 1e3:.2f}", f"{t['ratio_median']:.3f}"]
        met = ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in r["targets_met"].items()) or "baseline"
        lines.append(
            f"| {r['model']} | {r['dtype']} | {r['placement']} | {', '.join(r['host_groups']) or '-'} "
            f"| {r['bytes'] / 1e6:.1f} | {r['saving']:.1%} | {r['models_per_budget']} "
            f"| {r['warm_switch_s'] * 1e3:.1f} | {r['warm_switch_ratio']:.2f} | "
            + " | ".join(cells)
            + f" | {met} |"
        )
    return "\n".join(lines)


def targets_summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The issue's targets and whether each placed row met them."""
    met = {
        f"{r['name']} {r['dtype']} {r['placement']}": r["targets_met"] for r in rows if r.get("targets_met")
    }
    return {"saving": SAVING_TARGETS, "time_ratio": TIME_RATIO_TARGET, "met": met, "all_met": _all(met)}


def _all(met: Mapping[str, Mapping[str, bool]]) -> bool:
    return bool(met) and all(v for d in met.values() for v in d.values())

"""``ptmserve bench exits NAME --data FILE.csv``: early exit against full depth, on one in-process engine
in one run, on labelled data the model was not trained on.

The model is an encoder classifier with exits (``ptmserve train-exits``). Both modes are the same
``Engine.classify`` calls; only ``InferenceOptions(early_exit=...)`` differs:

- **quality**: every row of the data, ``max(--batch-sizes)`` rows per call, in both modes: accuracy
  against the labels, agreement of early exit with full depth (same label), and the exit histogram
  (inputs per exit layer, with the accuracy of the inputs that left there);
- **speed**: at each batch size ``b`` (a batch is one ``classify`` call with ``b`` texts, calls back to
  back), about ``--requests`` inputs per mode drawn from the data (seeded, cycling), after one
  warm-up call per mode. The two modes alternate call by call on the same texts (early, full, then
  full, early: ABBA), so machine noise and cache warmth hit both alike. Inputs/s is the inputs of a
  mode over the sum of its own calls' times; p50 and p99 are per call.

Held-out data, two ways:

- ``--data FILE``: every row of FILE, e.g. the ``--test-out`` file of ``ptmserve datasets bbc`` or of
  ``python -m ptmserve.bench.exit_datasets spam``, which neither the heads nor the thresholds saw. This
  is the measurement the targets are judged on.
- ``--holdout-of TRAIN.csv``: the validation rows of the file the model was trained on, split again
  as ``train-exits`` split it (``training.data.stratified_split`` with the ``val_fraction`` and ``seed``
  stored in the model's ``calibration``, or ``--val-fraction``/``--seed``). The heads never saw them,
  but the threshold search did, so its accuracy delta is optimistic.

Columns default to those the model was trained with (its calibration), else ``text`` and ``label``.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from ptmserve.errors import InvalidInput

MODES = ("early", "full")  # early: the model's exits; full: InferenceOptions(early_exit=False)
DEFAULT_BATCH_SIZES = "1,8,32"
DEFAULT_REQUESTS = 512  # inputs per mode and batch size: about 2.5 minutes in all for MiniLM on BBC, 2 cores
TARGET_THROUGHPUT = (32, 1.6)  # (batch size, early/full inputs/s at least)
TARGET_LATENCY = (1, 1.5)  # (batch size, full/early p50 latency at least)
TARGET_ACCURACY_POINTS = 1.0  # early exit's accuracy at most this many points below full depth


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``ptmserve bench exits``."""
    parser.add_argument("name", metavar="NAME", help="a classifier with early exits (ptmserve train-exits)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", metavar="FILE", help="held-out labelled CSV: every row is measured")
    source.add_argument(
        "--holdout-of",
        metavar="FILE",
        help="the CSV the model was trained on: measure its validation rows, split again as train-exits did",
    )
    parser.add_argument("--text-column", help="default: the model's training column, else 'text'")
    parser.add_argument("--label-column", help="default: the model's training column, else 'label'")
    parser.add_argument("--val-fraction", type=float, help="with --holdout-of (default: the model's)")
    parser.add_argument("--seed", type=int, help="with --holdout-of: the split's seed (default: the model's)")
    parser.add_argument("--repo", default="models", help="model repository folder (default %(default)s)")
    parser.add_argument(
        "--batch-sizes", default=DEFAULT_BATCH_SIZES, help="texts per call (default %(default)s)"
    )
    parser.add_argument(
        "--requests",
        default=str(DEFAULT_REQUESTS),
        help="inputs timed per mode at each batch size: one number or one per batch size "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--dtype", default="auto", choices=("auto", "float32", "bfloat16"), help="as `ptmserve serve`"
    )
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument(
        "--weights",
        default="fp",
        choices=("fp", "int8", "int4"),
        help="measure the model as `serve --weights` serves it, exit heads quantized too (default fp)",
    )
    parser.add_argument("--order-seed", type=int, default=0, help="seed of the timed inputs' order")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")


@dataclass(frozen=True, slots=True)
class Dataset:
    """The labelled rows measured."""

    texts: tuple[str, ...]
    y: np.ndarray  # (N,) int64 index into the model's labels
    about: dict[str, Any]  # where the rows come from (file, columns, split), for the report


@dataclass(slots=True)
class ModeRun:
    """One mode's answers over the whole dataset."""

    pred: np.ndarray  # (N,) int64 predicted label index
    exit_layers: np.ndarray  # (N,) int32
    tokens: int = 0  # tokens computed by the embeddings (after truncation)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark, print progress, the tables, ratios and targets; return the results (the CLI
    writes them to ``--json``).

    Raises:
        InvalidInput: the model has no exits or no labels, bad options, or bad data.
        ModelNotFound: no model NAME in the repository.
    """
    import torch

    from ptmserve.bench.generate_report import cpu_model
    from ptmserve.engine.engine import Engine, EngineSettings
    from ptmserve.errors import InvalidCheckpoint
    from ptmserve.models.config import EncoderConfig
    from ptmserve.store.repository import Repository

    batch_sizes = _ints(args.batch_sizes, "--batch-sizes")
    requests = _ints(args.requests, "--requests")
    requests = requests * len(batch_sizes) if len(requests) == 1 else requests
    if len(requests) != len(batch_sizes):
        raise InvalidInput(f"--requests needs one number or one per batch size ({len(batch_sizes)})")
    repo = Repository(args.repo, create=False)
    repo.manifest(args.name)  # ModelNotFound before any conversion
    if args.weights != "fp":
        from ptmserve.store.variants import sync_variant

        repo = sync_variant(repo, args.weights)
    manifest = repo.manifest(args.name)
    try:
        config = EncoderConfig.from_dict(manifest.config)
    except InvalidCheckpoint:
        raise InvalidInput(f"{args.name} is not an encoder classifier with early exits") from None
    if not config.exits or not config.labels:
        raise InvalidInput(f"{args.name} has no early exits: make one with `ptmserve train-exits`")
    data = load_data(args, list(config.labels), manifest.calibration)
    load_before = os.getloadavg()
    result: dict[str, Any] = {
        "bench": "exits",
        "command": _command(args),
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "model": args.name,
        "weights": manifest.weights,
        "num_layers": config.num_layers,
        "exits": [
            {"layer": e.layer, "threshold": e.threshold, "confidence": e.confidence} for e in config.exits
        ],
        "labels": list(config.labels),
        "data": data.about,
        "calibration": _calibration_summary(manifest.calibration),
    }
    settings = EngineSettings(device=args.device, dtype=args.dtype)
    with Engine(repo, settings) as engine:
        result["dtype"] = engine.model_info(args.name).dtype
        _progress(f"{args.name} ({result['dtype']}): {len(data.texts)} rows of {data.about['file']}")
        runs = _quality_runs(engine, args.name, data, list(config.labels), max(batch_sizes))
        result["quality"] = quality(runs, data.y, config.num_layers)
        result["speed"] = [
            _speed(engine, args.name, data, b, n, args.order_seed)
            for b, n in zip(batch_sizes, requests, strict=True)
        ]
    result["loadavg_1m_before_after"] = [load_before[0], os.getloadavg()[0]]
    result["ratios"] = ratios(result)
    result["targets"] = targets(result)
    print(format_report(result))
    return result


# ------------------------------------------------------------------------------------------------- data


def load_data(args: argparse.Namespace, labels: list[str], calibration: dict[str, Any]) -> Dataset:
    """The rows to measure, from ``--data`` or ``--holdout-of`` (see the module docstring).

    Raises:
        InvalidInput: a bad file or column, a class the model does not know, or no split to reproduce.
    """
    from ptmserve.training.data import read_csv, stratified_split

    trained = calibration.get("settings", {}) if isinstance(calibration, dict) else {}
    text_column = args.text_column or trained.get("text_column") or "text"
    label_column = args.label_column or trained.get("label_column") or "label"
    path = args.data or args.holdout_of
    data = read_csv(path, text_column, label_column, labels=labels)
    about: dict[str, Any] = {"file": path, "text_column": text_column, "label_column": label_column}
    if args.data:
        about["rows"] = "all"
        return Dataset(data.texts, data.y, about)
    val_fraction = args.val_fraction if args.val_fraction is not None else trained.get("val_fraction")
    seed = args.seed if args.seed is not None else trained.get("seed")
    if val_fraction is None or seed is None:
        raise InvalidInput(
            f"{args.name} stores no training split: give --val-fraction and --seed with --holdout-of"
        )
    if trained.get("data") and trained["data"] != data.source:
        _progress(f"note: {args.name} was trained on {trained['data']!r}, not {data.source!r}")
    val = stratified_split(data, float(val_fraction), int(seed)).val
    about.update(rows="validation split", val_fraction=float(val_fraction), seed=int(seed))
    return Dataset(tuple(data.texts[i] for i in val), data.y[val], about)


def _calibration_summary(calibration: dict[str, Any]) -> dict[str, Any]:
    """What ``train-exits`` predicted (validation metrics, placement speedups), to set beside the
    measurement; empty for a model without calibration."""
    if not calibration:
        return {}
    return {
        "settings": calibration.get("settings", {}),
        "chosen": calibration.get("chosen", {}),
        "placement": calibration.get("placement", {}),
    }


# ---------------------------------------------------------------------------------------------- quality


def _quality_runs(engine: Any, name: str, data: Dataset, labels: list[str], batch: int) -> dict[str, ModeRun]:
    """Both modes' answers for every row, ``batch`` rows per call, the modes alternating."""
    from ptmserve.engine.api import InferenceOptions

    index = {label: i for i, label in enumerate(labels)}
    n = len(data.texts)
    runs = {m: ModeRun(np.zeros(n, np.int64), np.zeros(n, np.int32)) for m in MODES}
    start = time.perf_counter()
    for k, lo in enumerate(range(0, n, batch)):
        texts = list(data.texts[lo : lo + batch])
        for mode in MODES if k % 2 == 0 else MODES[::-1]:
            out = engine.classify(name, texts, InferenceOptions(early_exit=mode == "early"))
            run = runs[mode]
            run.pred[lo : lo + len(texts)] = [index[label] for label in out.labels]
            run.exit_layers[lo : lo + len(texts)] = out.exit_layers
            run.tokens += out.prompt_tokens
    _progress(f"quality: {n} rows in both modes, {batch} per call, {time.perf_counter() - start:.1f} s")
    return runs


def quality(runs: dict[str, ModeRun], y: np.ndarray, num_layers: int) -> dict[str, Any]:
    """Accuracy of each mode, agreement, and early exit's histogram, from both modes' answers."""
    early, full = runs["early"], runs["full"]
    n = len(y)
    histogram = []
    for layer, count in sorted(Counter(early.exit_layers.tolist()).items()):
        rows = early.exit_layers == layer
        histogram.append(
            {
                "layer": int(layer),
                "inputs": int(count),
                "share": count / n,
                "accuracy": float((early.pred[rows] == y[rows]).mean()),
                "agreement": float((early.pred[rows] == full.pred[rows]).mean()),
            }
        )
    acc = {m: float((runs[m].pred == y).mean()) for m in MODES}
    return {
        "rows": n,
        "tokens_per_input": full.tokens / n,
        "accuracy": acc,
        "accuracy_delta_points": 100.0 * (acc["early"] - acc["full"]),
        "agreement": float((early.pred == full.pred).mean()),
        "exit_histogram": histogram,
        "full_depth_exit_layers": sorted({int(x) for x in full.exit_layers}),
        "mean_layers_computed": float(early.exit_layers.mean()) + 1.0,
        "num_layers": num_layers,
    }


# ------------------------------------------------------------------------------------------------ speed


def _speed(engine: Any, name: str, data: Dataset, batch: int, inputs: int, seed: int) -> dict[str, Any]:
    """Both modes at one batch size: inputs/s and per-call latency, the calls alternating ABBA."""
    from ptmserve.engine.api import InferenceOptions

    calls = max(1, math.ceil(inputs / batch))
    order = np.random.default_rng(seed + batch).permutation(len(data.texts))
    order = np.resize(order, (calls + 1) * batch)  # cycles through the rows when there are few
    batches = [[data.texts[i] for i in order[k * batch : (k + 1) * batch]] for k in range(calls + 1)]
    options = {m: InferenceOptions(early_exit=m == "early") for m in MODES}
    for mode in MODES:  # warm-up on a batch that is not timed
        engine.classify(name, batches[-1], options[mode])
    seconds: dict[str, list[float]] = {m: [] for m in MODES}
    for k in range(calls):
        for mode in MODES if k % 2 == 0 else MODES[::-1]:
            t0 = time.perf_counter()
            engine.classify(name, batches[k], options[mode])
            seconds[mode].append(time.perf_counter() - t0)
    row: dict[str, Any] = {"batch_size": batch, "calls": calls, "inputs": calls * batch}
    for mode in MODES:
        s = np.array(seconds[mode])
        row[mode] = {
            "inputs_per_s": calls * batch / float(s.sum()),
            "p50_ms": float(np.percentile(s, 50)) * 1e3,
            "p99_ms": float(np.percentile(s, 99)) * 1e3,
            "mean_ms": float(s.mean()) * 1e3,
            "seconds": float(s.sum()),
        }
    row["throughput_early_over_full"] = row["early"]["inputs_per_s"] / row["full"]["inputs_per_s"]
    row["p50_full_over_early"] = row["full"]["p50_ms"] / row["early"]["p50_ms"]
    row["p99_full_over_early"] = row["full"]["p99_ms"] / row["early"]["p99_ms"]
    _progress(
        f"batch {batch}: {calls} calls per mode, early {row['early']['inputs_per_s']:.1f} inputs/s, "
        f"full {row['full']['inputs_per_s']:.1f} inputs/s ({row['throughput_early_over_full']:.2f}x)"
    )
    return row


# ----------------------------------------------------------------------------------------------- report


def ratios(result: dict[str, Any]) -> dict[str, Any]:
    """The derived figures: inputs/s early/full per batch size, p50 full/early at batch 1 and the
    accuracy delta in points."""
    by_b = {r["batch_size"]: r for r in result["speed"]}
    lat_b = TARGET_LATENCY[0]
    return {
        "throughput_early_over_full": {str(b): r["throughput_early_over_full"] for b, r in by_b.items()},
        f"p50_full_over_early_batch_{lat_b}": by_b[lat_b]["p50_full_over_early"] if lat_b in by_b else None,
        "accuracy_delta_points": result["quality"]["accuracy_delta_points"],
    }


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 11's targets, each with its measured value and whether it is met (None: not measured at
    this run's batch sizes)."""
    by_b = {r["batch_size"]: r for r in result["speed"]}
    (tb, tx), (lb, lx) = TARGET_THROUGHPUT, TARGET_LATENCY
    through = by_b[tb]["throughput_early_over_full"] if tb in by_b else None
    latency = by_b[lb]["p50_full_over_early"] if lb in by_b else None
    delta = result["quality"]["accuracy_delta_points"]
    return [
        {
            "target": f">= {tx}x inputs/s at batch {tb} (early/full)",
            "value": through,
            "met": None if through is None else through >= tx,
        },
        {
            "target": f">= {lx}x lower p50 latency at batch {lb} (full/early)",
            "value": latency,
            "met": None if latency is None else latency >= lx,
        },
        {
            "target": f"accuracy within {TARGET_ACCURACY_POINTS:g} point of full depth "
            f"(early - full >= -{TARGET_ACCURACY_POINTS:g}; above full depth counts as within)",
            "value": delta,
            "met": delta >= -TARGET_ACCURACY_POINTS,
        },
    ]


def format_report(result: dict[str, Any]) -> str:
    """The results as Markdown tables (the form docs/benchmarks.md uses), ratios and PASS/MISS lines."""
    q = result["quality"]
    lines = [
        f"\n{result['model']} ({result['dtype']}, {result['num_layers']} layers, exits after "
        f"{[e['layer'] for e in result['exits']]}) on {q['rows']} rows of {result['data']['file']} "
        f"({result['data']['rows']}), {q['tokens_per_input']:.0f} tokens per input; {result['cpu']}",
        "",
        "| mode | accuracy | agreement with full depth | mean layers computed |",
        "|---|---:|---:|---:|",
        f"| early exit | {q['accuracy']['early']:.2%} | {q['agreement']:.2%} | "
        f"{q['mean_layers_computed']:.2f} |",
        f"| full depth | {q['accuracy']['full']:.2%} | 100.00% | {q['num_layers']:.2f} |",
        "",
        "| exit layer (0-based) | inputs | share | accuracy there | agreement there |",
        "|---:|---:|---:|---:|---:|",
    ]
    for h in q["exit_histogram"]:
        lines.append(
            f"| {h['layer']} | {h['inputs']} | {h['share']:.1%} | {h['accuracy']:.2%} "
            f"| {h['agreement']:.2%} |"
        )
    lines += [
        "",
        "| batch | calls | early inputs/s | full inputs/s | early/full | early p50 ms | full p50 ms "
        "| early p99 ms | full p99 ms | p50 full/early |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["speed"]:
        e, f = r["early"], r["full"]
        lines.append(
            f"| {r['batch_size']} | {r['calls']} | {e['inputs_per_s']:.1f} | {f['inputs_per_s']:.1f} "
            f"| {r['throughput_early_over_full']:.2f}x | {e['p50_ms']:.1f} | {f['p50_ms']:.1f} "
            f"| {e['p99_ms']:.1f} | {f['p99_ms']:.1f} | {r['p50_full_over_early']:.2f}x |"
        )
    lines.append("")
    for r in result["speed"]:
        lines.append(
            f"inputs/s early/full at batch {r['batch_size']}: {r['throughput_early_over_full']:.2f}x"
        )
    predicted = result["calibration"].get("placement", {}).get("speedup", {})
    if predicted:  # train-exits' placement: expected batch time, full depth over exits
        shown = ", ".join(f"b={b} {x:.2f}x" for b, x in predicted.items())
        lines.append(f"speedup expected by train-exits' placement (model time only): {shown}")
    lat = result["ratios"].get(f"p50_full_over_early_batch_{TARGET_LATENCY[0]}")
    if lat is not None:
        lines.append(f"p50 latency full/early at batch {TARGET_LATENCY[0]}: {lat:.2f}x")
    lines.append(f"accuracy early - full: {q['accuracy_delta_points']:+.2f} points")
    load = result.get("loadavg_1m_before_after")
    if load:
        lines.append(f"load average (1 min) before/after: {load[0]:.2f} / {load[1]:.2f}")
    lines.append("")
    for t in result["targets"]:
        verdict = {True: "PASS", False: "MISS", None: "not measured"}[t["met"]]
        value = "-" if t["value"] is None else f"{t['value']:.2f}"
        lines.append(f"{verdict}: {t['target']}: {value}")
    return "\n".join(lines)


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces this run (every option that changes what is measured)."""
    source = f"--data {args.data}" if args.data else f"--holdout-of {args.holdout_of}"
    parts = [f"ptmserve bench exits {args.name} {source} --repo {args.repo}"]
    for option in ("text_column", "label_column", "val_fraction", "seed"):
        if getattr(args, option) is not None:
            parts.append(f"--{option.replace('_', '-')} {getattr(args, option)}")
    parts.append(f"--batch-sizes {args.batch_sizes} --requests {args.requests} --dtype {args.dtype}")
    return " ".join(parts)


def _ints(text: str, option: str) -> list[int]:
    try:
        values = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise InvalidInput(f"{option} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise InvalidInput(f"{option} must be integers >= 1, got {text!r}")
    return values


def _progress(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)

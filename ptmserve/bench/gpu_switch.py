"""Warm model switch on an accelerator, next to the host-to-device copy limit (for ``scripts/gpu-check``).

    python -m ptmserve.bench.gpu_switch --device cuda --json gpu-switch.json

Two random BERT-base-shaped models (twins: same shapes, other weights) are imported into a temporary
repository in the dtype they are served in, so nothing is cast on the way. The host tier (pinned
memory on CUDA) holds both; the device tier holds one. Alternating between them makes every request a
warm switch: the model's weights are copied from the host tier to the device while, with pipelining,
earlier layers already compute. Times run from ``acquire`` to the first result of a 1 x 16-token
request (device synchronised). A switch's **overhead** is that time minus the same request on the
resident model: the figure PipeSwitch (OSDI '20) reports as 3.6-6.6 ms. The limit is the model's bytes
over the measured pinned host-to-device copy bandwidth.

``ptmserve bench switch`` measures the same and more on the CPU; this module exists because that
benchmark has no device option yet.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

PIPESWITCH_OVERHEAD_MS = (3.6, 6.6)  # PipeSwitch (Bai et al., OSDI 2020): total overhead of a switch
BERT_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
SMALL = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512)
TOKENS = 16


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cuda", help="torch device (default cuda)")
    p.add_argument("--runs", type=int, default=9, help="switches per measurement (default 9)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated (default float32,bfloat16)")
    p.add_argument("--weights", default="fp", help="comma-separated: fp, int8, int4 (default fp)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    p.add_argument("--workdir", type=Path, help="folder for the temporary repository (default: system temp)")
    p.add_argument("--small", action="store_true", help="a 2-layer, 128-wide model instead (a smoke run)")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _write_twins(work: Path, shape: dict[str, int]) -> list[Path]:
    """Two random BERT-base checkpoints (seeds 0 and 1) with a small tokenizer (the requests send ids)."""
    import transformers

    from ptmserve.bench.soak_models import tokenizer_json

    transformers.utils.logging.disable_progress_bar()
    folders = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = transformers.BertModel(transformers.BertConfig(**shape)).eval()
        folder = work / f"bert-base-{seed}"
        model.save_pretrained(folder)
        (folder / "tokenizer.json").write_text(tokenizer_json("bert"))
        folders.append(folder)
    return folders


def copy_bandwidth(nbytes: int, device: torch.device, runs: int = 5) -> float:
    """Best bytes/s of one ``copy_`` of ``nbytes`` from pinned host memory to ``device``."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
    src.fill_(1)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    best = float("inf")
    for _ in range(runs + 1):  # the first is a warm-up
        _sync(device)
        t = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return nbytes / best


def _first_result(manager: Any, name: str, batch: Any, device: torch.device) -> tuple[float, torch.Tensor]:
    """Seconds from ``acquire`` to the first result on the host; the load is finished before return."""
    _sync(device)
    t = time.perf_counter()
    with manager.acquire(name) as loaded:
        out = loaded.run(batch).embeddings.cpu()  # .cpu() waits for the device
        seconds = time.perf_counter() - t
        loaded.wait()
    return seconds, out


def measure(
    repo: Any, names: list[str], dtype: str, pipelined: bool, device: torch.device, runs: int
) -> dict[str, Any]:
    """Resident and warm-switch times of alternating between the two ``names`` (see the module doc)."""
    from ptmserve.memory.manager import WeightManager
    from ptmserve.models.packed import pack

    nbytes = repo.manifest(names[0]).total_bytes  # stored in ``dtype``: both tiers hold these bytes
    manager = WeightManager(
        repo,
        device=device,
        dtype=dtype,
        host_budget=int(2.2 * nbytes),  # both models
        device_budget=int(1.05 * nbytes),  # one model
        pipelined=pipelined,
    )
    batch = pack([[101, *range(1000, 1000 + TOKENS - 2), 102]], position_offset=0, device=device)
    resident, warm, same = [], [], True
    try:
        for name in (*names, *names):  # both into the host tier, kernels warmed up
            _first_result(manager, name, batch, device)
        current = names[1]  # on the device now
        for _ in range(runs):
            current = names[0] if current == names[1] else names[1]
            seconds, switched = _first_result(manager, current, batch, device)  # a warm switch
            warm.append(seconds)
            seconds, again = _first_result(manager, current, batch, device)  # now resident
            resident.append(seconds)
            same = same and torch.equal(switched, again)
    finally:
        manager.close()
    res_ms, warm_ms = statistics.median(resident) * 1e3, statistics.median(warm) * 1e3
    return {
        "dtype": dtype,
        "pipelined": pipelined,
        "bytes": nbytes,
        "resident_ms": res_ms,
        "warm_ms": warm_ms,
        "overhead_ms": warm_ms - res_ms,
        "overhead_best_ms": (min(warm) - min(resident)) * 1e3,
        "switched_equals_resident": same,  # a switched-in model answers exactly as when resident
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the measurement, print a table, write ``args.json`` if set; return the results."""
    from ptmserve.store.importer import import_checkpoint
    from ptmserve.store.repository import Repository

    device = torch.device(args.device)
    rows = []
    with tempfile.TemporaryDirectory(prefix="ptmserve-gpu-switch-", dir=args.workdir) as tmp:
        repo = Repository(Path(tmp) / "repo")
        folders = _write_twins(Path(tmp), SMALL if args.small else BERT_BASE)
        dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
        formats = [w.strip() for w in args.weights.split(",") if w.strip()]
        for dtype, weights in itertools.product(dtypes, formats):
            names = [f"{f.name}-{dtype}-{weights}" for f in folders]
            for folder, name in zip(folders, names, strict=True):  # imported in the serve dtype: no casts
                import_checkpoint(repo, folder, name, dtype=dtype, weights=weights)
            for pipelined in (True, False):
                row = measure(repo, names, dtype, pipelined, device, max(1, args.runs))
                row["weights"] = weights
                gbps = copy_bandwidth(row["bytes"], device) / 1e9
                row.update(h2d_gbps=gbps, limit_ms=row["bytes"] / (gbps * 1e9) * 1e3)
                row["overhead_vs_limit"] = row["overhead_ms"] / row["limit_ms"]
                rows.append(row)
    result = {
        "command": "python -m ptmserve.bench.gpu_switch",
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "torch": torch.__version__,
        "model": "small (random)" if args.small else "bert-base (random)",
        "first_batch": [1, TOKENS],
        "runs": args.runs,
        "rows": rows,
        "pipeswitch_overhead_ms": list(PIPESWITCH_OVERHEAD_MS),
    }
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def format_table(result: dict[str, Any]) -> str:
    lo, hi = result["pipeswitch_overhead_ms"]
    lines = [
        f"Warm switch (host tier -> {result['device_name']}) of {result['model']}, to the first result of a "
        f"1 x {result['first_batch'][1]} request; medians of {result['runs']}:",
        "",
        "| dtype | weights | pipelined | MB | resident ms | warm ms | overhead ms | H2D GB/s | limit ms "
        "| overhead / limit |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['dtype']} | {r.get('weights', 'fp')} | {'yes' if r['pipelined'] else 'no'} "
            f"| {r['bytes'] / 1e6:.0f} "
            f"| {r['resident_ms']:.2f} "
            f"| {r['warm_ms']:.2f} | {r['overhead_ms']:.2f} | {r['h2d_gbps']:.1f} | {r['limit_ms']:.2f} "
            f"| {r['overhead_vs_limit']:.2f} |"
        )
    lines.append(f"\nPipeSwitch (OSDI '20) reports a switch overhead of {lo}-{hi} ms.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ptmserve.bench.gpu_switch", description=__doc__)
    add_arguments(parser)
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

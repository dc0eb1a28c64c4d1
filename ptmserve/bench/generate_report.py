"""The figures of ``ptmserve bench generate`` as text: tables, ratios, and the targets as PASS / MISS."""

from __future__ import annotations

import re
import subprocess
from typing import Any

SYSTEMS = ("ours", "static", "transformers", "llama.cpp")
LLAMA_CPP_C1 = 0.7  # issue 14: ours in a quantized weight format at 1 client >= 0.7x llama.cpp's tokens/s


def ours_system(weights: str) -> str:
    """The system name of ours in weight format ``weights``: ``ours`` (fp) or ``ours-int8`` ..."""
    return "ours" if weights == "fp" else f"ours-{weights}"


def _systems(level: dict[str, Any]) -> list[str]:
    """The systems a level holds, in report order (ours in each weight format right after ours)."""
    quantized = [k for k in level if k.startswith("ours-")]  # in the order of --weights
    return [s for s in ("ours", *quantized, *SYSTEMS[1:]) if s in level]


def ratios(level: dict[str, Any]) -> dict[str, Any]:
    """Our tokens/s over transformers' and over the static ablation's at one level (None if missing)."""

    def ratio(a: str, b: str) -> float | None:
        x, y = level.get(a, {}).get("tokens_per_s"), level.get(b, {}).get("tokens_per_s")
        return round(x / y, 3) if x and y else None

    return {
        "ours_over_transformers": ratio("ours", "transformers"),
        "ours_over_static": ratio("ours", "static"),
    }


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with its measured ratio and whether it is met (None: not measurable).

    The concurrency targets are evaluated at the run's lowest and highest levels (1 and 16 by default);
    the parity target is defined in float32 (another dtype's parity is reported, not judged).
    """
    out: list[dict[str, Any]] = []
    levels = result["workload"]["concurrency"]
    lo, hi = min(levels), max(levels)

    def add(model: str, text: str, ratio: float | None, limit: float, most: bool = False) -> None:
        met = None if ratio is None else (ratio <= limit if most else ratio >= limit)
        out.append({"model": model, "target": text, "ratio": ratio, "limit": limit, "met": met})

    for row in result["models"]:
        by_c = {lv["concurrency"]: lv for lv in row["levels"]}
        name, low, high = row["model"], by_c[lo], by_c[hi]
        add(
            name, f"ours >= 2x transformers tokens/s at concurrency {hi}", high["ours_over_transformers"], 2.0
        )
        add(
            name,
            f"ours >= 1.2x transformers tokens/s at concurrency {lo}",
            low["ours_over_transformers"],
            1.2,
        )
        llama = row.get("llama_cpp", {})
        if "skipped" not in llama:
            ours_hi, theirs = high.get("ours", {}).get("tokens_per_s"), llama.get("tokens_per_s")
            ratio = round(ours_hi / theirs, 3) if ours_hi and theirs else None
            add(name, f"ours at concurrency {hi} >= 2x llama.cpp (sequential) tokens/s", ratio, 2.0)
        p99, p50 = high.get("ours", {}).get("ttft_p99_ms"), low.get("ours", {}).get("ttft_p50_ms")
        ratio = round(p99 / p50, 3) if p99 and p50 else None
        add(name, f"TTFT p99 at concurrency {hi} <= 3x TTFT p50 at concurrency {lo}", ratio, 3.0, most=True)
        if "parity" in row:
            text = "greedy tokens identical to transformers on >= 95% of prompts"
            add(name, text, row["parity"]["share"], 0.95)
            if result.get("dtype") != "float32":
                out[-1]["met"] = None
        theirs = llama.get("tokens_per_s")
        for system in (s for s in _systems(low) if s.startswith("ours-")):
            ours = low[system].get("tokens_per_s")
            ratio = round(ours / theirs, 3) if ours and theirs else None
            text = f"{system} at concurrency {lo} >= {LLAMA_CPP_C1}x llama.cpp (sequential) tokens/s"
            add(name, text, ratio, LLAMA_CPP_C1)
    return out


def format_report(result: dict[str, Any]) -> str:
    """The results as Markdown tables, the ratios and the targets (PASS / MISS)."""
    w = result["workload"]
    lines = [
        f"ptmserve bench generate: {result['dtype']}, {result['threads']} threads, {result['cpus']} x "
        f"{result['cpu']}; prompts "
        f"{w['prompt_tokens'][0]}-{w['prompt_tokens'][1]} tokens, {w['generated_tokens'][0]}-"
        f"{w['generated_tokens'][1]} generated, closed loop"
    ]
    for row in result["models"]:
        lines += ["", f"{row['model']}:", ""]
        lines += [
            "| clients | system | requests | tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms |",
            "|---:|---|---:|---:|---:|---:|---:|---:|",
        ]
        entries = [(lv["concurrency"], s, lv[s]) for lv in row["levels"] for s in _systems(lv)]
        llama = row.get("llama_cpp", {})
        if "tokens_per_s" in llama:
            entries.append((1, "llama.cpp (sequential)", llama))
        for c, s, f in entries:
            errors = f" ({f['errors']} failed)" if f.get("errors") else ""
            figures = [
                f[k] for k in ("tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms")
            ]
            lines.append(f"| {c} | {s} | {f['requests']}{errors} | " + " | ".join(map(num, figures)) + " |")
        for lv in row["levels"]:
            lines.append(
                f"concurrency {lv['concurrency']}: ours/transformers {num(lv['ours_over_transformers'])}x, "
                f"ours/static (continuous vs static batching) {num(lv['ours_over_static'])}x"
            )
        if "skipped" in llama:
            lines.append(f"llama.cpp: skipped ({llama['skipped']})")
        if "parity" in row:
            p = row["parity"]
            same = f"{p['identical']}/{p['prompts']}"
            lines.append(f"greedy parity: {same} prompts identical over {p['new_tokens']} tokens")
        if "weights" in row:
            lines += ["", *_weights_table(row)]
    lines.append("")
    for t in result["targets"]:
        verdict = {True: "PASS", False: "MISS", None: "n/a"}[t["met"]]
        lines.append(f"{verdict} {t['model']}: {t['target']}: {num(t['ratio'])}")
    return "\n".join(lines)


def _weights_table(row: dict[str, Any]) -> list[str]:
    """Per weight format: tokens/s at the lowest concurrency, against llama.cpp, and accuracy against fp."""
    low = min(row["levels"], key=lambda lv: lv["concurrency"])
    theirs = row.get("llama_cpp", {}).get("tokens_per_s")
    lines = [
        f"| weights | tok/s at {low['concurrency']} client(s) | ITL p50 ms | vs llama.cpp | perplexity "
        "| greedy identical to fp | agreement before the first difference |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for w, acc in row["weights"].items():
        f = low.get(ours_system(w), {})
        ours = f.get("tokens_per_s")
        vs = f"{ours / theirs:.2f}x" if ours and theirs else "-"
        lines.append(
            f"| {w} | {num(ours)} | {num(f.get('itl_p50_ms'))} | {vs} | {acc['perplexity']:.3f} "
            f"| {acc['identical_to_fp']}/{acc['prompts']} | {acc['prefix_agreement']:.1%} |"
        )
    first = next(iter(row["weights"].values()))
    lines.append(
        f"perplexity over {first['perplexity_tokens']} tokens of fixed text; greedy agreement over "
        f"{first['prompts']} prompts x {first['new_tokens']} tokens"
    )
    return lines


def cpu_model() -> str:
    """The CPU's model name (``lscpu``), or what the platform says."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = dict(re.findall(r"^([^:\n]+):\s*(.+)$", out, re.MULTILINE))
        if "Model name" in fields:
            family, model = fields.get("CPU family", "?"), fields.get("Model", "?")
            return f"{fields['Model name'].strip()} (family {family}, model {model})"
    except (OSError, subprocess.SubprocessError):
        pass
    import platform

    return platform.processor() or platform.machine()


def brief(f: dict[str, Any]) -> str:
    errors = f", {f['errors']} failed" if f["errors"] else ""
    return (
        f"{f['requests']} requests in {f['wall_s']:.1f} s, {num(f['tokens_per_s'])} tok/s, "
        f"TTFT p50 {num(f['ttft_p50_ms'])} ms{errors}"
    )


def num(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.2f}"

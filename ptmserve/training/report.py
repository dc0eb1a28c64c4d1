"""``train-exits``'s printed report: per-exit metrics, the chosen thresholds, both matrices, the speedup."""

from __future__ import annotations

from ptmserve.training.train import TrainResult


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def fmt(r: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )

    return [fmt(header), *(fmt(r) for r in rows)]


def format_report(result: TrainResult, name: str) -> str:
    """The report as text (one table per section)."""
    lines: list[str] = []
    final = result.final
    source = "the base model's own head" if final.weight_decay is None else "a linear head, trained"
    lines.append(f"heads on the validation part (final classifier after layer {final.layer}: {source})")
    rows = [
        [f"exit {m.layer}", f"{m.accuracy:.4f}", f"{m.agreement:.4f}", f"{m.weight_decay:g}"]
        for m in result.candidates
    ]
    rows.append(
        [
            f"final {final.layer}",
            f"{final.accuracy:.4f}",
            "1.0000",
            "-" if final.weight_decay is None else f"{final.weight_decay:g}",
        ]
    )
    lines += _table(["head", "accuracy", "agreement", "l2"], rows)

    cascade = result.cascade
    lines.append("")
    lines.append(f"chosen exits {list(result.chosen)} ({result.placement.method} placement)")
    shares = cascade.shares()
    conf = {e.layer: e for e in result.config.exits}
    rows = [
        [f"exit {layer}", f"{conf[layer].confidence}", _threshold(conf[layer].threshold), f"{shares[j]:.3f}"]
        for j, layer in enumerate(result.chosen)
    ]
    rows.append([f"final {final.layer}", "-", "-", f"{shares[-1]:.3f}"])
    lines += _table(["exit", "confidence", "threshold", "leaves here"], rows)
    lines.append(
        f"validation accuracy {cascade.accuracy:.4f} (final classifier {cascade.final_accuracy:.4f}), "
        f"agreement with the final classifier {cascade.agreement:.4f}"
    )

    layers = result.times.num_layers
    lines.append("")
    lines.append("batching-pattern matrix: share of a batch still running at each layer")
    lines += _table(
        ["exit set", *(f"L{i}" for i in range(layers))],
        [[k, *(f"{v:.3f}" for v in r)] for k, r in result.patterns.items()],
    )

    t = result.times
    lines.append("")
    lines.append("inference-time matrix: ms for a packed batch of b rows (measured here)")
    rows = [
        [
            str(b),
            f"{t.embed[k] * 1e3:.3f}",
            *(f"{t.layers[k, i] * 1e3:.3f}" for i in range(layers)),
            f"{t.exit_head[k] * 1e3:.3f}",
            f"{t.final_head[k] * 1e3:.3f}",
        ]
        for k, b in enumerate(t.batch_sizes)
    ]
    lines += _table(["b", "embed", *(f"L{i}" for i in range(layers)), "exit", "final"], rows)

    lines.append("")
    placed = result.placement
    lines.append(
        f"expected batch time at b={t.batch_sizes[-1]}: {placed.seconds * 1e3:.2f} ms with exits, "
        f"{placed.full_seconds * 1e3:.2f} ms at full depth: {placed.speedup:.2f}x"
    )
    lines.append(
        "expected speedup by batch size: " + ", ".join(f"b={b} {s:.2f}x" for b, s in result.speedups.items())
    )
    m = result.manifest
    lines.append(f"stored {name}: {len(m.tensors)} tensors, exits {[e.layer for e in result.config.exits]}")
    return "\n".join(lines)


def _threshold(value: float) -> str:
    return f"{value:.4f}"

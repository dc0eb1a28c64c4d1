"""The inference-time matrix, measured on this machine with the real encoder (``placement.TimeMatrix``).

For each batch size ``b``, a packed batch of ``b`` validation inputs (drawn with the seed) runs through
the embeddings and every layer, each stage timed on its own; then one exit as the served encoder runs it
(``Encoder.pool`` without normalisation, the linear head, ``exits.triggers``, and half of the rows
taken out of the batch with ``PackedBatch.select``) and the final classifier (the native head, or an
exit head after the last layer). One warm-up pass, then the median of several timed passes (more for
small batches, whose stages take microseconds).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from ptmserve.models.config import ExitSpec
from ptmserve.models.exits import triggers
from ptmserve.models.packed import PackedBatch, pack
from ptmserve.training.features import Backbone
from ptmserve.training.placement import TimeMatrix
from ptmserve.training.progress import Progress

MIN_REPEATS = 3
ROW_BUDGET = 96  # timed passes per batch size: max(MIN_REPEATS, ROW_BUDGET // b)


def batch_sizes_up_to(batch_size: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to ``batch_size``, and ``batch_size`` itself."""
    sizes = {batch_size}
    b = 1
    while b < batch_size:
        sizes.add(b)
        b *= 2
    return tuple(sorted(sizes))


def measure(
    backbone: Backbone,
    token_ids: Sequence[Sequence[int]],
    batch_sizes: Sequence[int],
    *,
    num_classes: int,
    seed: int = 0,
    show_progress: bool = True,
) -> TimeMatrix:
    """Seconds per stage for each of ``batch_sizes``, over inputs drawn from ``token_ids``."""
    rng = np.random.default_rng(seed)
    cfg = backbone.config
    gen = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(cfg.hidden_size, num_classes).to(backbone.device)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * 0.05)
    rows: dict[str, list[list[float]]] = {"embed": [], "layers": [], "exit": [], "final": []}
    bar = Progress("timing", len(batch_sizes), unit="batch sizes") if show_progress else None
    for b in batch_sizes:
        picks = rng.choice(len(token_ids), size=b, replace=len(token_ids) < b)
        batch = pack(
            [list(token_ids[i]) for i in picks], position_offset=cfg.position_offset, device=backbone.device
        )
        passes = [_one_pass(backbone, batch, head) for _ in range(1 + max(MIN_REPEATS, ROW_BUDGET // b))]
        med = np.median(np.array(passes[1:]), axis=0)  # (L + 3,) the warm-up pass dropped
        rows["embed"].append([med[0]])
        rows["layers"].append(list(med[1 : 1 + cfg.num_layers]))
        rows["exit"].append([med[-2]])
        rows["final"].append([med[-1]])
        if bar is not None:
            bar.advance()
    if bar is not None:
        bar.close()
    return TimeMatrix(
        batch_sizes=tuple(int(b) for b in batch_sizes),
        embed=np.array(rows["embed"])[:, 0],
        layers=np.array(rows["layers"]),
        exit_head=np.array(rows["exit"])[:, 0],
        final_head=np.array(rows["final"])[:, 0],
    )


def _one_pass(backbone: Backbone, batch: PackedBatch, head: torch.nn.Linear) -> list[float]:
    """Seconds of: the embeddings, each layer, one exit (on the last layer's output), the final head."""
    enc, pooling = backbone.encoder, backbone.exit_pooling
    spec = ExitSpec(0, 0.5, "max_prob")
    with torch.inference_mode():
        x, spent = _timed(lambda: enc.embed(batch), backbone.device)
        out = [spent]
        for layer in range(backbone.config.num_layers):
            x, spent = _timed(lambda layer=layer, x=x: enc.run_layer(layer, x, batch), backbone.device)
            out.append(spent)
        stay = list(range(0, batch.num_seqs, 2))  # half of the rows go on

        def exit_step() -> torch.Tensor:
            logits = head(enc.pool(x, batch, pooling))  # (B, C)
            triggers(spec, logits).cpu()  # the decision reaches the host
            sub, rows = batch.select(stay)
            sub.attention_plan()
            return x.index_select(0, rows)

        out.append(_timed(exit_step, backbone.device)[1])
        if backbone.has_head:
            out.append(_timed(lambda: enc.classify(x, batch), backbone.device)[1])
        else:
            out.append(_timed(lambda: head(enc.pool(x, batch, pooling)), backbone.device)[1])
    return out


def _timed(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[torch.Tensor, float]:
    if device.type == "cuda":  # pragma: no cover - no GPU in tests
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    result = fn()
    if device.type == "cuda":  # pragma: no cover
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - started

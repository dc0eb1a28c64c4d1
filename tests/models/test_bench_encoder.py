"""Fast checks of the encoder benchmark's arithmetic (the benchmark itself takes minutes)."""

from __future__ import annotations

import argparse

import torch

from ptmserve.bench import encoder as bench
from ptmserve.bench.peak import matmul_peak_flops
from ptmserve.models.config import EncoderConfig


def test_peak_is_a_positive_rate():
    assert matmul_peak_flops(torch.float32, "cpu", seconds=0.01, sizes=(64,)) > 1e6


def test_useful_flops_counts_real_tokens_only():
    cfg = EncoderConfig("bert", 100, 8, 2, 2, 16, 64, 2, 1e-12, 0)
    # per layer: 2 * T * (4 H^2 + 2 H I) + sum 4 L^2 H, with T = 5, lengths 2 and 3
    per_layer = 2 * 5 * (4 * 64 + 2 * 8 * 16) + 4 * (4 + 9) * 8
    assert bench._useful_flops(cfg, [2, 3]) == 2 * per_layer


def test_inputs_are_seeded_and_in_range():
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--min-len", "8", "--max-len", "20"])
    a, b = bench._inputs(args, 10, 30522), bench._inputs(args, 10, 30522)
    assert a == b and len(a) == 10
    assert all(8 <= len(s) <= 20 and s[0] == 101 and s[-1] == 102 for s in a)
    assert all(1000 <= t < 30522 for s in a for t in s[1:-1])


def test_format_table_reports_targets():
    row = dict(
        model="m",
        dtype="bf16",
        ours_tokens_per_s=10.0,
        hf_tokens_per_s=5.0,
        speedup=2.0,
        speedup_best=2.1,
        ours_gflops=50.0,
        peak_gflops=100.0,
        share_of_peak=0.5,
        hf_attn="sdpa",
        max_cosine_gap=1e-6,
    )
    text = bench.format_table({"rows": [row], "targets": {"x": True, "y": False}, "attention_options": []})
    assert "| m | bf16 | 10 | 5 | 2.00x | 2.10x | 50 | 100 | 50% | sdpa |" in text
    assert "target x: met" in text and "target y: NOT met" in text

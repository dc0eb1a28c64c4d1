"""Fast checks of the encoder benchmark's arithmetic (the benchmark itself takes minutes)."""

from __future__ import annotations

import argparse

import pytest
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


TINY_BERT = dict(
    vocab_size=1200, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
)


def test_measure_against_onnxruntime_on_a_tiny_bert():
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from ptmserve.bench import encoder_ort

    ours, hf, cfg = bench._bert_base(torch.float32, torch.device("cpu"), TINY_BERT)
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    ids = bench._inputs(parser.parse_args(["--min-len", "3", "--max-len", "40"]), 11, cfg.vocab_size)
    rows = []
    for graph in encoder_ort.GRAPHS:
        ort = encoder_ort.export(hf, cfg.pad_token_id, graph=graph)
        with torch.inference_mode():  # bucketed keeps the input order
            assert torch.allclose(ort.embed(ids, 1), ort.embed(ids, encoder_ort.BUCKETS), atol=1e-5)
        row = bench._measure(ours, hf, cfg, ids, 1, torch.device("cpu"), ort)
        assert row["ort_max_cosine_gap"] < 1e-5 and row["max_cosine_gap"] < 1e-5
        assert row["ort_bucketed_tokens_per_s"] > 0 and row["ort_padded_tokens_per_s"] > 0
        rows.append(dict(row, model=graph, dtype="fp32"))
    bf16 = dict(rows[0], dtype="bf16")  # a row of the same model where ORT did not run
    for key in [k for k in bf16 if k.startswith("ort_")]:
        del bf16[key]
    rows.append(bf16)
    bench._compare_with_ort(rows)
    assert rows[-1]["vs_ort_bucketed"] == rows[0]["ort_bucketed_s"] / rows[-1]["ours_s"]
    for r in rows:
        r.update(peak_gflops=1.0, share_of_peak=0.5)
    text = bench.format_table({"rows": rows, "targets": {}, "attention_options": []})
    assert "ours/ORT-bucketed (median)" in text and "fp32 ORT run" in text


def test_onnxruntime_comparison_is_skipped_without_it(monkeypatch):
    from ptmserve.bench import encoder_ort

    monkeypatch.setattr(encoder_ort.importlib.util, "find_spec", lambda name: None)
    assert not encoder_ort.available()


def test_measure_weights_on_a_tiny_bert():
    ours, _, cfg = bench._bert_base(torch.float32, torch.device("cpu"), dict(TINY_BERT, hidden_size=64))
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    ids = bench._inputs(parser.parse_args(["--min-len", "3", "--max-len", "40"]), 9, cfg.vocab_size)
    rows = bench._measure_weights(ours, cfg, ids, ["int8"], 1, torch.device("cpu"))
    assert [r["weights"] for r in rows] == ["fp32", "int8", "int8 (bf16 activations)"]
    assert rows[0]["min_cosine"] > 0.9999 and rows[0]["vs_fp32"] == 1.0
    assert all(0.9 < r["min_cosine"] <= 1.0 and r["tokens_per_s"] > 0 for r in rows[1:])
    text = bench.format_table(
        {"rows": [], "weight_rows": [dict(r, model="m") for r in rows], "attention_options": []}
    )
    assert "| m | int8 |" in text

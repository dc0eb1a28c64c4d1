"""Tiny state dicts with our parameter names, for repository tests that need no checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ptmserve.store import Repository

HIDDEN = 16
CONFIG: dict[str, Any] = {"family": "bert", "hidden_size": HIDDEN, "num_layers": 2}
POOLING: dict[str, Any] = {"mode": "mean", "normalize": True}
TOKENIZER = b'{"version": "1.0", "model": {"type": "WordPiece"}}'


def backbone(seed: int, dtype: torch.dtype = torch.float32, layers: int = 2) -> dict[str, torch.Tensor]:
    """Embeddings and encoder layers; the same seed gives the same bytes."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype)

    h = HIDDEN
    t = {
        "embeddings.word.weight": rnd(40, h),
        "embeddings.position.weight": rnd(24, h),
        "embeddings.norm.weight": rnd(h),
        "embeddings.norm.bias": rnd(h),
    }
    for i in range(layers):
        p = f"layers.{i}"
        t |= {
            f"{p}.attn.qkv.weight": rnd(3 * h, h),
            f"{p}.attn.qkv.bias": rnd(3 * h),
            f"{p}.attn.out.weight": rnd(h, h),
            f"{p}.ffn.in.weight": rnd(4 * h, h),
            f"{p}.ffn.out.weight": rnd(h, 4 * h),
            f"{p}.norm.weight": rnd(h),
        }
    return t


def head(seed: int, dtype: torch.dtype = torch.float32, labels: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + seed)
    return {
        "head.dense.weight": torch.randn(HIDDEN, HIDDEN, generator=g).to(dtype),
        "head.out.weight": torch.randn(labels, HIDDEN, generator=g).to(dtype),
        "head.out.bias": torch.randn(labels, generator=g).to(dtype),
    }


def model(
    seed: int, head_seed: int | None = None, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """A backbone of ``seed`` plus a head of ``head_seed`` (default: same seed)."""
    return backbone(seed, dtype) | head(seed if head_seed is None else head_seed, dtype)


def add(repo: Repository, name: str, tensors: dict[str, torch.Tensor], dtype: str = "float32", **kw: Any):
    return repo.add_model(
        name,
        config=kw.get("config", CONFIG),
        pooling=POOLING,
        tokenizer_json=kw.get("tokenizer", TOKENIZER),
        dtype=dtype,
        tensors=tensors,
    )


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact equality (dtype, shape and every byte)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)
    )


def read_all(repo: Repository, name: str, **kw: Any) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for g in repo.manifest(name).group_names():
        out |= repo.read_group(name, g, **kw)
    return out


def assert_model(repo: Repository, name: str, expected: dict[str, torch.Tensor]) -> None:
    got = read_all(repo, name)
    assert sorted(got) == sorted(expected)
    bad = [k for k in expected if not same_bytes(got[k], expected[k])]
    assert not bad, f"tensors differ: {bad}"


def files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}

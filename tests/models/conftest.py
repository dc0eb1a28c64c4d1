"""Shared fixtures: tiny checkpoints are built once per session (building one takes ~0.2 s)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.models.tiny import make_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``tiny_checkpoint(family, with_head=False, **kw)``: a cached tiny checkpoint folder."""
    cache: dict[tuple, Path] = {}
    root = tmp_path_factory.mktemp("tiny")

    def get(family: str, with_head: bool = False, **kw: object) -> Path:
        key = (family, with_head, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = make_tiny_checkpoint(root / str(len(cache)), family, with_head=with_head, **kw)
        return cache[key]

    return get

"""Fixtures for the ``ptmserve`` command's tests: tiny checkpoints, and the command run in-process or not.

``cli`` calls ``ptmserve.cli.main.main`` in this process (fast: torch is imported once); ``run_cli``
runs ``python -m ptmserve.cli.main`` as a subprocess (what a user runs, a few seconds each).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.server.conftest import ROOT, clean_env


@dataclass
class Run:
    code: int
    out: str
    err: str


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random checkpoint folders: ``emb`` (BERT, mean pooling) and ``cls`` (BERT classifier)."""
    from tests.models.tiny import make_tiny_checkpoint

    src = tmp_path_factory.mktemp("cli-ckpt")
    return {
        "emb": make_tiny_checkpoint(src, "bert", st_pooling="mean", normalize=True, seed=1, name="emb"),
        "cls": make_tiny_checkpoint(src, "bert", with_head=True, seed=2, name="cls"),
    }


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., Run]:
    """``cli("models", "--repo", R)``: the command's exit status and output, run in this process.

    argparse errors (and ``--help``) end in ``SystemExit``; its code is returned like a status.
    """
    from ptmserve.cli.main import main

    def call(*args: str | Path) -> Run:
        capsys.readouterr()
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        out = capsys.readouterr()
        return Run(code, out.out, out.err)

    return call


def run_cli(*args: str | Path, timeout: float = 180) -> Run:
    """``python -m ptmserve.cli.main ARGS...`` as a subprocess."""
    proc = subprocess.run(
        [sys.executable, "-m", "ptmserve.cli.main", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=clean_env(),
    )
    return Run(proc.returncode, proc.stdout, proc.stderr)

"""Run an import that SIGKILLs itself at a chosen point (used by test_crash.py in a subprocess).

Usage: python -m tests.store.crash_import ROOT NAME SEED MODE N

MODE "rename": die just before the N-th durable rename (1-based; segments, then the tokenizer blob,
then the manifest, which is the commit). MODE "write": die halfway through writing the N-th temp file.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from ptmserve.store import Repository, fsio
from tests.store import tensors as T


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    root, name, seed, mode, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
    calls = {"rename": 0, "write": 0}
    real_rename, real_write = fsio.rename_durable, fsio.write_temp

    def rename(src: Path, dst: Path) -> None:
        calls["rename"] += 1
        if mode == "rename" and calls["rename"] == n:
            _die()
        real_rename(src, dst)

    def write(tmp_dir: Path, chunks, suffix: str = ".tmp") -> Path:
        calls["write"] += 1
        if mode == "write" and calls["write"] == n:
            data = b"".join(bytes(c) for c in chunks)
            with open(tmp_dir / f"partial{suffix}", "wb") as f:
                f.write(data[: len(data) // 2])
                f.flush()
                _die()
        return real_write(tmp_dir, chunks, suffix)

    repo = Repository(root)
    fsio.rename_durable, fsio.write_temp = rename, write
    T.add(repo, name, T.model(seed), tokenizer=f'{{"seed": {seed}}}'.encode())
    print("completed", calls, flush=True)


if __name__ == "__main__":
    main()

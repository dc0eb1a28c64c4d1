"""The worker pool's shared-memory folder: a folder left by a server that was killed is removed."""

from __future__ import annotations

import os
from pathlib import Path

from ptmserve.engine.pool.pool import _remove_abandoned


def test_folders_of_dead_servers_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    dead = tmp_path / "ptmserve-999999999-abc123"
    dead.mkdir()
    (dead / "tensor").write_bytes(b"left behind")
    live = tmp_path / f"ptmserve-{os.getpid()}-def456"
    live.mkdir()
    other = tmp_path / "ptmserve-notapid-x"
    other.mkdir()
    _remove_abandoned(tmp_path)
    assert not dead.exists()
    assert live.exists() and other.exists()

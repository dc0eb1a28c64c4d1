"""Freed weight buffers go back to the OS once the thresholds are pinned (measured in a subprocess,
since the setting is process-wide)."""

from __future__ import annotations

import subprocess
import sys

import pytest

_PROBE = r"""
import gc, sys, torch
from ptmserve.memory.allocator import return_freed_memory_to_os

def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

if sys.argv[1] == "pinned":
    assert return_freed_memory_to_os()

def churn(rounds: int) -> None:
    # Buffers of many sizes, half freed each round, as switching models of different shapes does.
    kept = []
    for r in range(rounds):
        held = [torch.empty(((i % 7) + 1) * (1 << 20) + r * 4096, dtype=torch.uint8) for i in range(24)]
        for t in held:
            t.fill_(1)
        del held[::2]
        kept = held
    del kept
    gc.collect()


torch.empty(32 << 20, dtype=torch.uint8).fill_(1)  # one large free raises glibc's dynamic threshold
churn(3)  # first-use costs (kernels, the interpreter's own heap) before the baseline
before = rss()
churn(30)
print((rss() - before) / 2**20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_pinned_thresholds_keep_rss_flat_under_buffer_churn() -> None:
    def grown(mode: str) -> float:
        out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True)
        return float(out.stdout.strip().splitlines()[-1])

    pinned = grown("pinned")
    assert pinned < 8, f"RSS grew {pinned:.1f} MiB with the thresholds pinned"

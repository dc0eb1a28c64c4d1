"""Freed weight buffers go back to the OS when the heap is trimmed (measured in a subprocess: the heap is
process-wide), and the trimmer keeps to its rate."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ptmserve.memory.allocator import HeapTrimmer

_PROBE = r"""
import gc, sys, torch
from ptmserve.memory.allocator import trim_heap

def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


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
if sys.argv[1] == "trim":
    assert trim_heap()
print((rss() - before) / 2**20)
"""


def _grown(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_trimming_returns_the_pages_that_churn_left_in_the_heap() -> None:
    kept, trimmed = _grown("keep"), _grown("trim")
    assert trimmed < 8, f"RSS grew {trimmed:.1f} MiB after trimming"
    assert trimmed < kept / 4, f"trimming freed little: {kept:.1f} MiB kept, {trimmed:.1f} after"


def test_the_trimmer_trims_only_after_frees_and_at_most_once_an_interval() -> None:
    now = [0.0]
    trimmer = HeapTrimmer(min_interval=1.0, clock=lambda: now[0])
    assert not trimmer.maybe_trim()  # nothing freed
    trimmer.freed()
    expected = sys.platform.startswith("linux")
    assert trimmer.maybe_trim() is expected
    trimmer.freed()
    now[0] = 0.5
    assert not trimmer.maybe_trim()  # too soon: the pages wait for the next trim
    now[0] = 1.2
    assert trimmer.maybe_trim() is expected

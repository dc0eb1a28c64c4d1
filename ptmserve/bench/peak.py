"""Measured matmul peak: the FLOP rate this machine reaches on large square matmuls."""

from __future__ import annotations

import time

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_flops(
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    *,
    seconds: float = 2.0,
    sizes: tuple[int, ...] | None = None,
) -> float:
    """The best FLOP/s measured for ``n x n @ n x n`` matmuls of ``dtype`` on ``device``.

    Each size is warmed up, then timed repeatedly for about ``seconds / len(sizes)``; the fastest single
    call over all sizes gives the peak (a peak, so the best run, not the median). Default sizes are
    1024..4096 on CPU and 4096..8192 on accelerators.
    """
    device = torch.device(device)
    if sizes is None:
        sizes = (1024, 2048, 4096) if device.type == "cpu" else (4096, 8192)
    best = 0.0
    gen = torch.Generator(device=device).manual_seed(0)
    for n in sizes:
        a = torch.randn(n, n, device=device, generator=gen).to(dtype)
        b = torch.randn(n, n, device=device, generator=gen).to(dtype)
        out = torch.empty(n, n, device=device, dtype=dtype)
        with torch.inference_mode():
            for _ in range(2):  # warm-up: kernel selection, weight packing, caches
                torch.matmul(a, b, out=out)
            _sync(device)
            deadline = time.perf_counter() + seconds / len(sizes)
            runs = 0
            while runs < 3 or time.perf_counter() < deadline:
                start = time.perf_counter()
                torch.matmul(a, b, out=out)
                _sync(device)
                best = max(best, 2.0 * n**3 / (time.perf_counter() - start))
                runs += 1
    return best

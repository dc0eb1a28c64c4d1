"""Device and dtype choice: the only place that asks what the hardware can do."""

from __future__ import annotations

import functools
import logging

import torch

from ptmserve.errors import InvalidConfig

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@functools.cache
def _cpu_has_bf16_matrix_units() -> bool:
    """True when the CPU computes bf16 matmuls natively (AVX512-BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool({"avx512_bf16", "amx_bf16"} & flags)
    except OSError:
        pass
    return False


def resolve_device(name: str) -> torch.device:
    """Parse a device name, refusing one this machine does not have."""
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise InvalidConfig(f"unknown device {name!r}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidConfig(f"device {name!r} requested but CUDA is not available on this machine")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """Map a dtype name to a torch dtype; ``auto`` picks the fastest accurate one for ``device``.

    ``auto`` is bfloat16 where the device has bf16 matrix units (CUDA with bf16 support, CPUs with
    AVX512-BF16 or AMX), otherwise float32.
    """
    if name != "auto":
        if name not in DTYPES:
            raise InvalidConfig(f"dtype {name!r} is not one of auto, {', '.join(DTYPES)}")
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and _cpu_has_bf16_matrix_units():
        return torch.bfloat16
    return torch.float32

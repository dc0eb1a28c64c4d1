"""Byte sizes as people write them on a command line: ``123``, ``512MiB``, ``2GB``, ``1.5 GiB``."""

from __future__ import annotations

import re

from ptmserve.errors import InvalidConfig

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


def parse_size(value: str | int) -> int:
    """Parse a byte count: plain bytes or a number with a decimal (kB, MB, GB, TB) or binary
    (KiB, MiB, GiB, TiB) suffix, case-insensitive. Returns a non-negative int of bytes.

    Raises:
        InvalidConfig: the value is not of that form (the message quotes it).
    """
    if isinstance(value, bool):
        raise InvalidConfig(f"invalid size {value!r}: expected bytes, e.g. 123, 512MiB or 2GB")
    if isinstance(value, int):
        if value < 0:
            raise InvalidConfig(f"invalid size {value!r}: must not be negative")
        return value
    match = _SIZE.match(str(value))
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise InvalidConfig(f"invalid size {value!r}: expected bytes, e.g. 123, 512MiB or 2GB")
    number = match.group(1)
    if "." in number:
        return int(float(number) * _UNITS[unit])
    return int(number) * _UNITS[unit]


def format_size(nbytes: int) -> str:
    """A short human form of ``nbytes`` with a binary suffix, e.g. ``87.4MiB``."""
    size = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.0f}{unit}" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1024
    return f"{size:.1f}GiB"  # pragma: no cover

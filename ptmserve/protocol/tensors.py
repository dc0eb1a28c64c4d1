"""The records of KServe v2 tensors and inference bodies, and the BYTES element layout.

``Tensor.data`` is a numpy array of the tensor's shape; BYTES tensors hold an object array of ``bytes``.
BYTES elements travel as a 4-byte little-endian length followed by that many bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ptmserve.errors import InvalidInput

# KServe datatype -> little-endian numpy dtype. BYTES is held as an object array of ``bytes``.
NUMERIC_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
DATATYPES = (*NUMERIC_DTYPES, "BYTES")
MAX_DIMS = 8
# The most elements a shape may describe, zero dimensions counted as 1: numpy refuses larger shapes even
# for an empty array, and no tensor of this protocol comes near it.
MAX_ELEMENTS = 2**32


@dataclass(slots=True)
class Tensor:
    """One named tensor. ``data`` has ``shape``; for BYTES it is an object array of ``bytes``."""

    name: str
    datatype: str
    data: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.data.shape)


@dataclass(frozen=True, slots=True)
class RequestedOutput:
    name: str
    binary: bool | None = None  # None: follow the request's ``binary_data_output``


@dataclass(slots=True)
class InferRequest:
    inputs: list[Tensor]
    outputs: list[RequestedOutput] | None = None  # None: every output of the model
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def binary_default(self) -> bool:
        return self.parameters.get("binary_data_output") is True


@dataclass(slots=True)
class InferResponse:
    model_name: str
    outputs: list[Tensor]
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)

    def output(self, name: str) -> np.ndarray:
        for t in self.outputs:
            if t.name == name:
                return t.data
        raise KeyError(name)


def serialize_bytes(items: np.ndarray | list[bytes]) -> bytes:
    """BYTES elements in row-major order as (4-byte LE length, bytes) pairs."""
    flat = items.ravel() if isinstance(items, np.ndarray) else items
    parts: list[bytes] = []
    for item in flat:
        b = item.encode() if isinstance(item, str) else bytes(item)
        parts.append(len(b).to_bytes(4, "little"))
        parts.append(b)
    return b"".join(parts)


def deserialize_bytes(buf: bytes | memoryview, count: int, name: str) -> np.ndarray:
    """Exactly ``count`` length-prefixed BYTES elements filling ``buf``; a 1-D object array."""
    view = memoryview(buf)
    if count * 4 > len(view):  # every element has a 4-byte length: refuse before allocating
        raise InvalidInput(f"input {name!r}: {len(view)} bytes cannot hold {count} BYTES elements")
    out = np.empty(count, dtype=object)
    pos = 0
    for i in range(count):
        if pos + 4 > len(view):
            raise InvalidInput(f"input {name!r}: binary BYTES data ends inside element {i} of {count}")
        n = int.from_bytes(view[pos : pos + 4], "little")
        pos += 4
        if pos + n > len(view):
            raise InvalidInput(f"input {name!r}: BYTES element {i} claims {n} bytes past the end of the data")
        out[i] = bytes(view[pos : pos + n])
        pos += n
    if pos != len(view):
        raise InvalidInput(f"input {name!r}: {len(view) - pos} bytes left over after {count} BYTES elements")
    return out


def bytes_tensor(name: str, items: list[str] | list[bytes]) -> Tensor:
    """A 1-D BYTES tensor from strings (UTF-8 encoded) or bytes."""
    arr = np.empty(len(items), dtype=object)
    for i, x in enumerate(items):
        arr[i] = x.encode() if isinstance(x, str) else bytes(x)
    return Tensor(name=name, datatype="BYTES", data=arr)

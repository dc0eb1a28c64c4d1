"""KServe v2 inference bodies, JSON and the binary tensor data extension, in both directions.

Pure functions over bytes and numpy (no HTTP server, no torch), shared by the server and
``ptmserve.client``.
Binary layout (Triton's ``binary_tensor_data`` extension): the JSON header, then each binary tensor's
bytes in the order the tensors appear in the JSON; the ``Inference-Header-Content-Length`` HTTP header
gives the JSON part's length. Numbers are little-endian, row-major; a BYTES element is a 4-byte
little-endian length followed by that many bytes.

Every malformed body raises ``InvalidInput`` with a message naming the offending field.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np

from ptmserve.errors import InvalidInput, PayloadTooLarge
from ptmserve.protocol.tensors import (
    DATATYPES,
    MAX_DIMS,
    MAX_ELEMENTS,
    NUMERIC_DTYPES,
    InferRequest,
    InferResponse,
    RequestedOutput,
    Tensor,
    bytes_tensor,
    deserialize_bytes,
    serialize_bytes,
)

__all__ = [
    "DATATYPES",
    "HEADER_LENGTH",
    "ShapeCheck",
    "NUMERIC_DTYPES",
    "InferRequest",
    "InferResponse",
    "RequestedOutput",
    "Tensor",
    "bytes_tensor",
    "decode_infer_request",
    "decode_infer_response",
    "decompress",
    "deserialize_bytes",
    "encode_infer_request",
    "encode_infer_response",
    "serialize_bytes",
    "split_body",
]

HEADER_LENGTH = "Inference-Header-Content-Length"

# Called with (tensor name, datatype, shape) once a tensor's shape is read, before its data is decoded:
# a receiver refuses shapes beyond its limits here, before allocating anything for them.
ShapeCheck = Callable[[str, str, tuple[int, ...]], None]

# --------------------------------------------------------------------------------------------- decode


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """Undo a request's ``Content-Encoding`` (gzip or deflate), refusing output above ``limit`` bytes."""
    if not encoding or encoding.strip().lower() == "identity":
        return body
    enc = encoding.strip().lower()
    if enc not in ("gzip", "deflate"):
        raise InvalidInput(f"Content-Encoding {encoding!r} is not supported (gzip, deflate)")
    d = zlib.decompressobj(wbits=31 if enc == "gzip" else 15)
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error as exc:
        raise InvalidInput(f"body is not valid {enc} data: {exc}") from None
    if len(out) > limit:
        raise PayloadTooLarge(f"decompressed body exceeds the limit of {limit} bytes")
    return out


def split_body(body: bytes, header_length: str | int | None) -> tuple[dict[str, Any], memoryview]:
    """The JSON object and the binary tail of a body, per ``Inference-Header-Content-Length``."""
    if header_length is None or header_length == "":
        n = len(body)
    else:
        try:
            n = int(header_length)
        except ValueError:
            raise InvalidInput(f"{HEADER_LENGTH} {header_length!r} is not an integer") from None
        if not 0 <= n <= len(body):
            raise InvalidInput(f"{HEADER_LENGTH} {n} is outside the body's {len(body)} bytes")
    try:
        obj = json.loads(bytes(body[:n]))
    except (ValueError, RecursionError) as exc:
        raise InvalidInput(f"body is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise InvalidInput("body must be a JSON object")
    return obj, memoryview(body)[n:]


def decode_infer_request(
    body: bytes, header_length: str | int | None = None, check_shape: ShapeCheck | None = None
) -> InferRequest:
    """Parse a KServe v2 inference request (JSON, optionally followed by binary tensor data).

    ``check_shape`` sees each input's name, datatype and shape before its data is decoded.
    """
    obj, tail = split_body(body, header_length)
    raw_inputs = obj.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidInput("'inputs' must be a non-empty list of tensors")
    reader = _TailReader(tail)
    inputs: list[Tensor] = []
    seen: set[str] = set()
    for raw in raw_inputs:
        t = _decode_tensor(raw, reader, "input", check_shape)
        if t.name in seen:  # checked as we go, so a body of many tensors stops at the first repeat
            raise InvalidInput(f"input names must be unique: {t.name!r} appears twice")
        seen.add(t.name)
        inputs.append(t)
    reader.finish()
    outputs = None
    if "outputs" in obj and obj["outputs"] is not None:
        outputs = _decode_requested_outputs(obj["outputs"])
    return InferRequest(
        inputs=inputs, outputs=outputs, id=_optional_id(obj), parameters=_parameters(obj, "request")
    )


def decode_infer_response(body: bytes, header_length: str | int | None = None) -> InferResponse:
    """Parse a KServe v2 inference response (used by the client)."""
    obj, tail = split_body(body, header_length)
    raw_outputs = obj.get("outputs")
    if not isinstance(raw_outputs, list):
        raise InvalidInput("response has no 'outputs' list")
    reader = _TailReader(tail)
    outputs = [_decode_tensor(t, reader, "output") for t in raw_outputs]
    reader.finish()
    version = obj.get("model_version")
    return InferResponse(
        model_name=str(obj.get("model_name", "")),
        outputs=outputs,
        model_version=None if version is None else str(version),
        id=_optional_id(obj),
        parameters=_parameters(obj, "response"),
    )


class _TailReader:
    """Hands out consecutive slices of the binary part of a body."""

    def __init__(self, tail: memoryview) -> None:
        self.tail = tail
        self.pos = 0

    def take(self, n: int, name: str) -> memoryview:
        if self.pos + n > len(self.tail):
            raise InvalidInput(
                f"tensor {name!r} needs {n} bytes of binary data but only {len(self.tail) - self.pos} remain"
            )
        chunk = self.tail[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def finish(self) -> None:
        if self.pos != len(self.tail):
            raise InvalidInput(
                f"{len(self.tail) - self.pos} bytes of binary data are not claimed by any tensor"
            )


def _decode_tensor(raw: Any, reader: _TailReader, what: str, check_shape: ShapeCheck | None = None) -> Tensor:
    if not isinstance(raw, dict):
        raise InvalidInput(f"each {what} must be a JSON object")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidInput(f"each {what} needs a non-empty string 'name'")
    datatype = raw.get("datatype")
    if datatype not in DATATYPES:
        raise InvalidInput(f"{what} {name!r}: datatype {datatype!r} is not one of {', '.join(DATATYPES)}")
    shape = _shape(raw.get("shape"), name)
    if check_shape is not None:
        check_shape(name, datatype, shape)
    count = math.prod(shape)
    params = _parameters(raw, f"{what} {name!r}")
    size = params.get("binary_data_size")
    if size is not None:
        if not _is_int(size) or size < 0:
            raise InvalidInput(f"{what} {name!r}: binary_data_size must be a non-negative integer")
        if "data" in raw:
            raise InvalidInput(f"{what} {name!r}: give either 'data' or binary_data_size, not both")
        flat = _from_binary(reader.take(size, name), datatype, count, name)
    else:
        if "data" not in raw:
            raise InvalidInput(f"{what} {name!r}: no 'data' and no binary_data_size")
        flat = _from_json(raw["data"], datatype, count, name)
    return Tensor(name=name, datatype=datatype, data=flat.reshape(shape))


def _shape(raw: Any, name: str) -> tuple[int, ...]:
    if not isinstance(raw, list) or len(raw) > MAX_DIMS or not all(_is_int(d) and d >= 0 for d in raw):
        raise InvalidInput(
            f"tensor {name!r}: shape must be a list of at most {MAX_DIMS} non-negative integers"
        )
    # Zero dimensions count as 1: an empty tensor of shape [0, 2**63] still cannot be built.
    if math.prod(max(d, 1) for d in raw) > MAX_ELEMENTS:
        shown = str(raw) if len(str(raw)) <= 120 else str(raw)[:117] + "..."
        raise InvalidInput(
            f"tensor {name!r}: shape {shown} is too large (its dimensions, zeros counted as 1, "
            f"multiply to more than {MAX_ELEMENTS})"
        )
    return tuple(raw)


def _from_binary(chunk: memoryview, datatype: str, count: int, name: str) -> np.ndarray:
    if datatype == "BYTES":
        return deserialize_bytes(chunk, count, name)
    dtype = NUMERIC_DTYPES[datatype]
    if len(chunk) != count * dtype.itemsize:
        raise InvalidInput(
            f"tensor {name!r}: {len(chunk)} bytes of binary data for {count} {datatype} elements "
            f"({count * dtype.itemsize} expected)"
        )
    return np.frombuffer(chunk, dtype=dtype).copy()


def _from_json(data: Any, datatype: str, count: int, name: str) -> np.ndarray:
    flat = _flatten(data, name, count)
    if len(flat) > count:
        raise InvalidInput(f"tensor {name!r}: more data elements than the {count} its shape holds")
    if len(flat) < count:
        raise InvalidInput(f"tensor {name!r}: {len(flat)} data elements for a shape of {count} elements")
    if datatype == "BYTES":
        if not all(isinstance(x, str) for x in flat):
            raise InvalidInput(f"tensor {name!r}: BYTES data in JSON must be strings")
        out = np.empty(count, dtype=object)
        for i, x in enumerate(flat):
            out[i] = x.encode("utf-8", errors="surrogatepass")
        return out
    if datatype == "BOOL":
        ok = all(isinstance(x, bool) for x in flat)
    elif datatype.startswith(("INT", "UINT")):
        ok = all(_is_int(x) for x in flat)
    else:
        ok = all(_is_number(x) for x in flat)
    if not ok:
        raise InvalidInput(f"tensor {name!r}: data elements do not match datatype {datatype}")
    try:
        return np.array(flat, dtype=NUMERIC_DTYPES[datatype]).reshape(count)
    except (OverflowError, ValueError):
        raise InvalidInput(f"tensor {name!r}: a data element is out of range for {datatype}") from None


def _flatten(data: Any, name: str, count: int) -> list[Any]:
    """Row-major elements of a (possibly nested) JSON list; a scalar counts as one element.

    Stops after ``count + 1`` elements: the caller refuses any other number, so the work stays bounded
    by the declared shape, not by the data sent.
    """
    if not isinstance(data, list):
        return [data]
    if len(data) > count:
        return data[: count + 1]
    out: list[Any] = []
    stack: list[Any] = [iter(data)]
    while stack:
        item = next(stack[-1], _END)
        if item is _END:
            stack.pop()
        elif isinstance(item, list):
            if len(stack) >= MAX_DIMS:
                raise InvalidInput(f"tensor {name!r}: data is nested deeper than {MAX_DIMS} levels")
            stack.append(iter(item))
        else:
            out.append(item)
            if len(out) > count:
                break
    return out


_END = object()


def _decode_requested_outputs(raw: Any) -> list[RequestedOutput]:
    if not isinstance(raw, list):
        raise InvalidInput("'outputs' must be a list")
    outs = []
    for o in raw:
        if not isinstance(o, dict) or not isinstance(o.get("name"), str):
            raise InvalidInput("each requested output must be an object with a string 'name'")
        params = _parameters(o, f"output {o['name']!r}")
        if "classification" in params:
            raise InvalidInput("the 'classification' output parameter is not supported; ask for LABEL")
        binary = params.get("binary_data")
        if binary is not None and not isinstance(binary, bool):
            raise InvalidInput(f"output {o['name']!r}: binary_data must be true or false")
        outs.append(RequestedOutput(name=o["name"], binary=binary))
    _no_duplicates([o.name for o in outs], "output")
    return outs


def _parameters(obj: dict[str, Any], what: str) -> dict[str, Any]:
    params = obj.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise InvalidInput(f"{what} 'parameters' must be a JSON object")
    return params


def _optional_id(obj: dict[str, Any]) -> str | None:
    rid = obj.get("id")
    if rid is None:
        return None
    if not isinstance(rid, str):
        raise InvalidInput("'id' must be a string")
    return rid


def _no_duplicates(names: list[str], what: str) -> None:
    if len(set(names)) != len(names):
        raise InvalidInput(f"{what} names must be unique, got {names}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# --------------------------------------------------------------------------------------------- encode


def encode_tensor(t: Tensor, binary: bool) -> tuple[dict[str, Any], bytes | None]:
    """The JSON description of ``t`` and, when ``binary``, the bytes that follow the JSON."""
    head: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
    if binary:
        if t.datatype == "BYTES":
            raw = serialize_bytes(t.data)
        else:
            raw = np.ascontiguousarray(t.data, dtype=NUMERIC_DTYPES[t.datatype]).tobytes()
        head["parameters"] = {"binary_data_size": len(raw)}
        return head, raw
    if t.datatype == "BYTES":
        head["data"] = [
            b.decode("utf-8", errors="replace") if isinstance(b, bytes) else b for b in t.data.ravel()
        ]
    else:
        head["data"] = t.data.ravel().tolist()
    return head, None


def encode_body(header: dict[str, Any], chunks: list[bytes]) -> tuple[bytes, int | None]:
    """JSON header plus binary chunks; the JSON length to send as ``HEADER_LENGTH`` (None: no chunks)."""
    head = json.dumps(header, separators=(",", ":")).encode()
    if not chunks:
        return head, None
    return b"".join([head, *chunks]), len(head)


def encode_infer_response(resp: InferResponse, binary: dict[str, bool]) -> tuple[bytes, int | None]:
    """Serialise a response; ``binary[name]`` says whether that output goes as binary data."""
    header: dict[str, Any] = {"model_name": resp.model_name}
    if resp.model_version is not None:
        header["model_version"] = resp.model_version
    if resp.id is not None:
        header["id"] = resp.id
    if resp.parameters:
        header["parameters"] = resp.parameters
    outs, chunks = [], []
    for t in resp.outputs:
        head, raw = encode_tensor(t, binary.get(t.name, False))
        outs.append(head)
        if raw is not None:
            chunks.append(raw)
    header["outputs"] = outs
    return encode_body(header, chunks)


def encode_infer_request(req: InferRequest, binary_inputs: bool = True) -> tuple[bytes, int | None]:
    """Serialise a request (used by the client); inputs go as binary data when ``binary_inputs``."""
    header: dict[str, Any] = {}
    if req.id is not None:
        header["id"] = req.id
    if req.parameters:
        header["parameters"] = req.parameters
    ins, chunks = [], []
    for t in req.inputs:
        head, raw = encode_tensor(t, binary_inputs)
        ins.append(head)
        if raw is not None:
            chunks.append(raw)
    header["inputs"] = ins
    if req.outputs is not None:
        header["outputs"] = [
            {"name": o.name, **({} if o.binary is None else {"parameters": {"binary_data": o.binary}})}
            for o in req.outputs
        ]
    return encode_body(header, chunks)

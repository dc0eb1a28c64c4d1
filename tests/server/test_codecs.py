"""The KServe body codecs and the error table of ``ptmserve.protocol``, without a server."""

from __future__ import annotations

import gzip
import json
import zlib

import numpy as np
import pytest

from ptmserve import errors
from ptmserve.protocol import codecs
from ptmserve.protocol.errors import ERROR_TABLE, INTERNAL, error_body, error_kind, status_to_error


def _request(inputs: list[codecs.Tensor], binary: bool) -> codecs.InferRequest:
    req = codecs.InferRequest(
        inputs=inputs, outputs=[codecs.RequestedOutput("EMBEDDING", binary=True)], id="r1"
    )
    body, hlen = codecs.encode_infer_request(req, binary_inputs=binary)
    return codecs.decode_infer_request(body, hlen)


@pytest.mark.parametrize("binary", [True, False])
def test_request_roundtrip_numeric_and_bytes(binary: bool) -> None:
    ids = np.array([[101, 7, 0], [101, 8, 9]], dtype=np.int64)
    fp = np.array([[0.5, -1.25]], dtype=np.float32)
    text = codecs.bytes_tensor("TEXT", ["héllo", "", "x" * 300])
    got = _request([codecs.Tensor("INPUT_IDS", "INT64", ids), codecs.Tensor("F", "FP32", fp), text], binary)
    assert got.id == "r1"
    assert got.outputs == [codecs.RequestedOutput("EMBEDDING", binary=True)]
    by_name = {t.name: t for t in got.inputs}
    np.testing.assert_array_equal(by_name["INPUT_IDS"].data, ids)
    assert by_name["INPUT_IDS"].data.dtype == np.int64
    np.testing.assert_array_equal(by_name["F"].data, fp)
    assert list(by_name["TEXT"].data) == ["héllo".encode(), b"", b"x" * 300]


def test_binary_layout_matches_triton() -> None:
    """BYTES elements are a 4-byte little-endian length then the bytes; numbers little-endian."""
    assert codecs.serialize_bytes([b"ab", b""]) == b"\x02\x00\x00\x00ab\x00\x00\x00\x00"
    t = codecs.Tensor("X", "INT32", np.array([1, 256], dtype=np.int32))
    head, raw = codecs.encode_tensor(t, binary=True)
    assert raw == b"\x01\x00\x00\x00\x00\x01\x00\x00"
    assert head["parameters"] == {"binary_data_size": 8}


def test_response_roundtrip_mixed_binary_and_json() -> None:
    emb = np.arange(6, dtype=np.float32).reshape(2, 3)
    resp = codecs.InferResponse(
        model_name="m",
        model_version="1",
        outputs=[codecs.Tensor("EMBEDDING", "FP32", emb), codecs.bytes_tensor("LABEL", ["a", "b"])],
        parameters={"prompt_tokens": 4},
    )
    body, hlen = codecs.encode_infer_response(resp, {"EMBEDDING": True, "LABEL": False})
    assert hlen is not None and json.loads(body[:hlen])["outputs"][1]["data"] == ["a", "b"]
    back = codecs.decode_infer_response(body, hlen)
    np.testing.assert_array_equal(back.output("EMBEDDING"), emb)
    assert list(back.output("LABEL")) == [b"a", b"b"]
    assert back.parameters == {"prompt_tokens": 4} and back.model_version == "1"
    body, hlen = codecs.encode_infer_response(resp, {})
    assert hlen is None and json.loads(body)["outputs"][0]["data"] == emb.ravel().tolist()


def _body(obj: object) -> bytes:
    return json.dumps(obj).encode()


BAD_BODIES = [
    (b"not json", None, "not valid JSON"),
    (b"[1, 2]", None, "JSON object"),
    (b"[" * 5000 + b"]" * 5000, None, "not valid JSON"),
    (_body({"inputs": []}), None, "non-empty list"),
    (_body({"inputs": [{"name": "T", "datatype": "STRING", "shape": [1], "data": ["a"]}]}), None, "datatype"),
    (_body({"inputs": [{"name": "T", "datatype": "INT64", "shape": [2], "data": [1]}]}), None, "shape of 2"),
    (
        _body({"inputs": [{"name": "T", "datatype": "INT64", "shape": [1], "data": [1.5]}]}),
        None,
        "match datatype",
    ),
    (_body({"inputs": [{"name": "T", "datatype": "INT64", "shape": [1], "data": [True]}]}), None, "match"),
    (
        _body({"inputs": [{"name": "T", "datatype": "INT8", "shape": [1], "data": [300]}]}),
        None,
        "out of range",
    ),
    (_body({"inputs": [{"name": "T", "datatype": "BYTES", "shape": [1], "data": [3]}]}), None, "strings"),
    (_body({"inputs": [{"name": "T", "datatype": "INT64", "shape": [-1], "data": [1]}]}), None, "shape"),
    (_body({"inputs": [{"name": "T", "datatype": "INT64", "shape": "1", "data": [1]}]}), None, "shape"),
    (_body({"inputs": [{"name": "T", "datatype": "INT64", "shape": [1]}]}), None, "no 'data'"),
    (_body({"inputs": [{"datatype": "INT64", "shape": [1], "data": [1]}]}), None, "'name'"),
    (_body({"inputs": [{"name": "T", "datatype": "INT64", "shape": [1], "data": [1]}] * 2}), None, "unique"),
    (
        _body({"inputs": [{"name": "T", "datatype": "INT64", "shape": [1], "data": [1]}], "id": 3}),
        None,
        "'id'",
    ),
    (
        _body(
            {"inputs": [{"name": "T", "datatype": "INT64", "shape": [1], "data": [1]}], "outputs": [{"x": 1}]}
        ),
        None,
        "requested output",
    ),
    (b"{}", "99", "outside the body"),
    (b"{}", "x", "not an integer"),
]


@pytest.mark.parametrize(("body", "hlen", "words"), BAD_BODIES)
def test_bad_requests_raise_invalid_input(body: bytes, hlen: str | None, words: str) -> None:
    with pytest.raises(errors.InvalidInput, match=words):
        codecs.decode_infer_request(body, hlen)


def _binary_body(tensor: dict, tail: bytes) -> tuple[bytes, int]:
    head = _body({"inputs": [tensor]})
    return head + tail, len(head)


@pytest.mark.parametrize(
    ("tensor", "tail", "words"),
    [
        (
            {"name": "T", "datatype": "INT64", "shape": [2], "parameters": {"binary_data_size": 8}},
            b"\0" * 8,
            "16",
        ),
        (
            {"name": "T", "datatype": "INT64", "shape": [1], "parameters": {"binary_data_size": 8}},
            b"\0" * 4,
            "remain",
        ),
        (
            {"name": "T", "datatype": "INT64", "shape": [1], "parameters": {"binary_data_size": 8}},
            b"\0" * 9,
            "claimed",
        ),
        (
            {"name": "T", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 5}},
            b"\x09\0\0\0a",
            "past",
        ),
        (
            {"name": "T", "datatype": "BYTES", "shape": [10**9], "parameters": {"binary_data_size": 0}},
            b"",
            "hold",
        ),
        (
            {"name": "T", "datatype": "BYTES", "shape": [10**12], "parameters": {"binary_data_size": 0}},
            b"",
            "too large",
        ),
        (  # an empty tensor whose other dimension numpy cannot represent
            {"name": "T", "datatype": "INT64", "shape": [0, 2**63], "parameters": {"binary_data_size": 0}},
            b"",
            "too large",
        ),
        (
            {"name": "T", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 6}},
            b"\1\0\0\0ab",
            "left",
        ),
        (
            {"name": "T", "datatype": "INT64", "shape": [1], "parameters": {"binary_data_size": -1}},
            b"",
            "negative",
        ),
    ],
)
def test_bad_binary_data_raises_invalid_input(tensor: dict, tail: bytes, words: str) -> None:
    body, hlen = _binary_body(tensor, tail)
    with pytest.raises(errors.InvalidInput, match=words):
        codecs.decode_infer_request(body, hlen)


def test_shape_check_runs_before_the_data_is_decoded() -> None:
    """A receiver's limits see the declared shape first: nothing is built for a shape it refuses."""
    seen: list[tuple[str, str, tuple[int, ...]]] = []

    def check(name: str, datatype: str, shape: tuple[int, ...]) -> None:
        seen.append((name, datatype, shape))
        if shape[0] > 4:
            raise errors.PayloadTooLarge(f"{shape[0]} rows")

    ok = _body({"inputs": [{"name": "A", "datatype": "INT64", "shape": [2, 0], "data": []}]})
    assert codecs.decode_infer_request(ok, check_shape=check).inputs[0].shape == (2, 0)
    big = _body({"inputs": [{"name": "A", "datatype": "INT64", "shape": [10**7, 0], "data": []}]})
    with pytest.raises(errors.PayloadTooLarge, match="10000000 rows"):
        codecs.decode_infer_request(big, check_shape=check)
    assert seen == [("A", "INT64", (2, 0)), ("A", "INT64", (10**7, 0))]


def test_json_data_beyond_the_shape_is_refused_without_reading_it_all() -> None:
    data = [[1] * 1000 for _ in range(1000)]  # a million elements for a shape of two
    body = _body({"inputs": [{"name": "A", "datatype": "INT64", "shape": [2], "data": data}]})
    with pytest.raises(errors.InvalidInput, match="more data elements than the 2"):
        codecs.decode_infer_request(body)
    flat = _body({"inputs": [{"name": "A", "datatype": "BYTES", "shape": [2], "data": [""] * 10**6}]})
    with pytest.raises(errors.InvalidInput, match="more data elements than the 2"):
        codecs.decode_infer_request(flat)


def test_decompress_gzip_deflate_and_limit() -> None:
    raw = b"x" * 1000
    assert codecs.decompress(gzip.compress(raw), "gzip", 2000) == raw
    assert codecs.decompress(zlib.compress(raw), "deflate", 2000) == raw
    assert codecs.decompress(raw, None, 10) == raw
    with pytest.raises(errors.PayloadTooLarge):
        codecs.decompress(gzip.compress(raw), "gzip", 999)
    with pytest.raises(errors.InvalidInput):
        codecs.decompress(b"not gzip", "gzip", 2000)
    with pytest.raises(errors.InvalidInput):
        codecs.decompress(raw, "br", 2000)


def test_error_table_statuses() -> None:
    expected = {
        errors.InvalidInput: 400,
        errors.Unauthorized: 401,
        errors.ModelNotFound: 404,
        errors.PayloadTooLarge: 413,
        errors.Overloaded: 429,
        errors.NotReady: 503,
        errors.DeadlineExceeded: 504,
    }
    for cls, status in expected.items():
        assert error_kind(cls("x")).status == status
        assert status_to_error(status) is cls
    assert error_kind(RuntimeError("bug")) is INTERNAL and INTERNAL.status == 500
    assert {cls for cls, _ in ERROR_TABLE} >= set(expected)


def test_error_bodies_per_protocol() -> None:
    kind = error_kind(errors.ModelNotFound("no model 'x'"))
    assert json.loads(error_body(kind, "no model 'x'", "/v2/models/x/infer")) == {"error": "no model 'x'"}
    body = json.loads(error_body(kind, "no model 'x'", "/v1/embeddings", param="model"))
    assert body == {
        "error": {
            "message": "no model 'x'",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }

"""``tritonclient.http`` end to end against the real server over the real engine (tiny random models)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException  # noqa: E402

from tests.models.tiny import TINY_TEXTS  # noqa: E402
from tests.server.conftest import CLS, EMB, open_engine, running_server  # noqa: E402

TEXTS = list(TINY_TEXTS)


def _client(url: str) -> Any:
    return httpclient.InferenceServerClient(url.removeprefix("http://"), network_timeout=30)


@pytest.fixture(scope="module")
def triton(real_url: str) -> Iterator[Any]:
    client = _client(real_url)
    yield client
    client.close()


def _text_input(texts: list[str], binary: bool = True) -> Any:
    inp = httpclient.InferInput("TEXT", [len(texts)], "BYTES")
    inp.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object), binary_data=binary)
    return inp


def test_server_metadata_health_and_extensions(triton: Any) -> None:
    assert triton.is_server_live() and triton.is_server_ready()
    meta = triton.get_server_metadata()
    assert meta["name"] == "ptmserve"
    assert set(meta["extensions"]) >= {"binary_tensor_data", "schedule_policy", "model_repository"}


def test_model_metadata_states_the_tensor_contract(triton: Any, real_engine: Any) -> None:
    dim = real_engine.model_info(EMB).dim
    meta = triton.get_model_metadata(EMB)
    assert meta["name"] == EMB and meta["versions"] == ["1"]
    assert meta["inputs"] == [
        {"name": "TEXT", "datatype": "BYTES", "shape": [-1]},
        {"name": "INPUT_IDS", "datatype": "INT64", "shape": [-1, -1]},
        {"name": "ATTENTION_MASK", "datatype": "INT64", "shape": [-1, -1]},
    ]
    assert meta["outputs"] == [{"name": "EMBEDDING", "datatype": "FP32", "shape": [-1, dim]}]
    cls_meta = triton.get_model_metadata(CLS, model_version="1")
    assert [o["name"] for o in cls_meta["outputs"]] == ["EMBEDDING", "LOGITS", "LABEL"]
    assert cls_meta["outputs"][1] == {"name": "LOGITS", "datatype": "FP32", "shape": [-1, 3]}
    assert cls_meta["outputs"][2] == {"name": "LABEL", "datatype": "BYTES", "shape": [-1]}
    assert triton.is_model_ready(EMB) and triton.is_model_ready(CLS, "1")


def test_model_config(triton: Any, real_engine: Any) -> None:
    cfg = triton.get_model_config(CLS)
    assert cfg["name"] == CLS and cfg["max_batch_size"] == 0
    assert [i["name"] for i in cfg["input"]] == ["TEXT", "INPUT_IDS", "ATTENTION_MASK"]
    assert cfg["input"][0]["data_type"] == "TYPE_STRING"
    assert [o["name"] for o in cfg["output"]] == ["EMBEDDING", "LOGITS", "LABEL"]
    params = {k: v["string_value"] for k, v in cfg["parameters"].items()}
    assert params["kind"] == "classifier"
    assert params["labels"] == '["label_0", "label_1", "label_2"]'
    assert int(params["max_tokens"]) == real_engine.model_info(CLS).max_tokens


@pytest.mark.parametrize("binary", [True, False])
def test_infer_text_equals_python_api(triton: Any, real_engine: Any, binary: bool) -> None:
    out = httpclient.InferRequestedOutput("EMBEDDING", binary_data=binary)
    result = triton.infer(EMB, [_text_input(TEXTS, binary)], outputs=[out], request_id="abc")
    got = result.as_numpy("EMBEDDING")
    want = real_engine.embed(EMB, TEXTS).embeddings
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert result.get_response()["id"] == "abc"


def test_infer_without_outputs_returns_binary_defaults(triton: Any, real_engine: Any) -> None:
    result = triton.infer(CLS, [_text_input(TEXTS)], model_version="1")
    want = real_engine.classify(CLS, TEXTS)
    np.testing.assert_allclose(result.as_numpy("LOGITS"), want.logits, rtol=1e-5, atol=1e-6)
    assert [b.decode() for b in result.as_numpy("LABEL")] == want.labels
    assert result.as_numpy("EMBEDDING") is None  # not asked for, not computed
    assert all("binary_data_size" in o["parameters"] for o in result.get_response()["outputs"])


def test_infer_token_ids_with_attention_mask(triton: Any, real_engine: Any) -> None:
    rows = [[2, 10, 11, 12, 3], [2, 20, 3]]
    ids = np.zeros((2, 5), dtype=np.int64)
    mask = np.zeros((2, 5), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    inputs = [
        httpclient.InferInput("INPUT_IDS", [2, 5], "INT64"),
        httpclient.InferInput("ATTENTION_MASK", [2, 5], "INT64"),
    ]
    inputs[0].set_data_from_numpy(ids)
    inputs[1].set_data_from_numpy(mask, binary_data=False)
    result = triton.infer(
        CLS,
        inputs,
        outputs=[httpclient.InferRequestedOutput("EMBEDDING"), httpclient.InferRequestedOutput("LOGITS")],
    )
    np.testing.assert_allclose(
        result.as_numpy("EMBEDDING"), real_engine.embed(CLS, rows).embeddings, rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        result.as_numpy("LOGITS"), real_engine.classify(CLS, rows).logits, rtol=1e-5, atol=1e-6
    )


def test_priority_and_timeout(triton: Any, real_engine: Any) -> None:
    for priority in (1, 2):
        result = triton.infer(EMB, [_text_input(TEXTS[:2])], priority=priority, timeout=10_000_000)
        np.testing.assert_allclose(
            result.as_numpy("EMBEDDING"), real_engine.embed(EMB, TEXTS[:2]).embeddings, rtol=1e-5, atol=1e-6
        )
    with pytest.raises(InferenceServerException) as err:
        triton.infer(EMB, [_text_input(TEXTS[:2])], timeout=1)
    assert err.value.status() == "504"


def test_unknown_model_is_404_and_wrong_datatype_is_400(triton: Any) -> None:
    with pytest.raises(InferenceServerException) as err:
        triton.infer("no-such-model", [_text_input(["a"])])
    assert err.value.status() == "404"
    with pytest.raises(InferenceServerException) as err:
        triton.get_model_metadata("no-such-model")
    assert err.value.status() == "404"
    bad = httpclient.InferInput("TEXT", [1], "FP32")
    bad.set_data_from_numpy(np.array([1.0], dtype=np.float32))
    with pytest.raises(InferenceServerException) as err:
        triton.infer(EMB, [bad])
    assert err.value.status() == "400" and "BYTES" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        triton.infer(EMB, [_text_input(["a"])], model_version="7")
    assert err.value.status() == "404"


def test_statistics_count_served_requests(triton: Any) -> None:
    before = triton.get_inference_statistics(EMB)["model_stats"][0]
    triton.infer(EMB, [_text_input(TEXTS[:3])])
    after = triton.get_inference_statistics(EMB)["model_stats"][0]
    assert after["inference_count"] == before["inference_count"] + 3
    assert after["inference_stats"]["success"]["count"] == before["inference_stats"]["success"]["count"] + 1


def _engine_count(engine: Any, name: str, labels: dict[str, str]) -> float:
    return engine.metrics.registry.get_sample_value(name, labels) or 0.0


def test_embedding_and_logits_come_from_one_forward_pass(triton: Any, real_engine: Any) -> None:
    """Asking a classifier for EMBEDDING and LOGITS (and LABEL) is one engine request and one batch."""
    requests = ("ptmserve_requests_total", {"model": CLS, "outcome": "success"})
    batches = ("ptmserve_compute_seconds_count", {"model": CLS})
    before = [_engine_count(real_engine, *requests), _engine_count(real_engine, *batches)]
    outputs = [httpclient.InferRequestedOutput(n) for n in ("EMBEDDING", "LOGITS", "LABEL")]
    result = triton.infer(CLS, [_text_input(TEXTS)], outputs=outputs)
    after = [_engine_count(real_engine, *requests), _engine_count(real_engine, *batches)]
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 1]
    want = real_engine.classify(CLS, TEXTS)
    np.testing.assert_allclose(result.as_numpy("LOGITS"), want.logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.as_numpy("EMBEDDING"), want.embeddings, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        result.as_numpy("EMBEDDING"), real_engine.embed(CLS, TEXTS).embeddings, rtol=1e-5, atol=1e-6
    )
    assert [b.decode() for b in result.as_numpy("LABEL")] == want.labels


def test_statistics_report_the_engine_queue_and_compute_times(tiny_repo: Any) -> None:
    """A fresh engine: after 3 sequential requests of 2 inputs, every figure is non-zero and consistent."""
    engine = open_engine(tiny_repo)
    try:
        with running_server(engine) as url:
            client = _client(url)
            for i in range(3):
                client.infer(EMB, [_text_input(TEXTS[i : i + 2])])
            stats = client.get_inference_statistics(EMB)["model_stats"][0]
            everything = client.get_inference_statistics()["model_stats"]
            client.close()
    finally:
        engine.close(drain_seconds=5)
    inf = stats["inference_stats"]
    assert stats["inference_count"] == 6 and inf["success"]["count"] == 3 and inf["fail"]["count"] == 0
    assert inf["queue"]["count"] == 3 and inf["queue"]["ns"] > 0  # one queue wait per request
    assert stats["execution_count"] == inf["compute_infer"]["count"] == 3  # one batch each: sequential
    assert inf["compute_infer"]["ns"] > 0
    # Each request's latency holds its queue wait and its batch's compute.
    assert inf["queue"]["ns"] + inf["compute_infer"]["ns"] <= inf["success"]["ns"]
    assert stats["batch_stats"] == [
        {
            "batch_size": 1,
            "compute_input": {"count": 0, "ns": 0},
            "compute_infer": {"count": 3, "ns": 0},
            "compute_output": {"count": 0, "ns": 0},
        }
    ]
    assert stats["last_inference"] > 0
    by_name = {m["name"]: m for m in everything}
    assert set(by_name) == {EMB, CLS}
    assert by_name[EMB]["inference_stats"] == inf
    assert by_name[CLS]["execution_count"] == 0 and by_name[CLS]["batch_stats"] == []


def test_repository_index_load_unload_under_explicit_control(tiny_repo: Any) -> None:
    engine = open_engine(tiny_repo, model_control="explicit")
    try:
        with running_server(engine) as url:
            client = _client(url)
            states = {m["name"]: m["state"] for m in client.get_model_repository_index()}
            assert states == {EMB: "UNAVAILABLE", CLS: "UNAVAILABLE"}
            assert not client.is_model_ready(EMB)
            with pytest.raises(InferenceServerException) as err:
                client.infer(EMB, [_text_input(["a"])])
            assert err.value.status() == "503"
            client.load_model(EMB)
            assert client.is_model_ready(EMB) and not client.is_model_ready(CLS)
            index = {m["name"]: m for m in client.get_model_repository_index()}
            assert index[EMB]["state"] == "READY" and index[EMB]["version"] == "1"
            result = client.infer(EMB, [_text_input(TEXTS)])
            np.testing.assert_allclose(
                result.as_numpy("EMBEDDING"), engine.embed(EMB, TEXTS).embeddings, rtol=1e-5, atol=1e-6
            )
            client.unload_model(EMB)
            assert not client.is_model_ready(EMB)
            with pytest.raises(InferenceServerException) as err:
                client.load_model("no-such-model")
            assert err.value.status() == "404"
            client.close()
    finally:
        engine.close(drain_seconds=5)

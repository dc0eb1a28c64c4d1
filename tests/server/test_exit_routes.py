"""Models with early exits over a real server on 127.0.0.1: ``EXIT_LAYER`` in the metadata, the config and
the answers (tritonclient, httpx, ``ptmserve.client``), ``parameters.early_exit: false``, and the metric."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from ptmserve.client import Client
from ptmserve.store.repository import Repository
from tests.models.tiny import TINY_TEXTS
from tests.models.tiny_exits import store_exit_suite
from tests.server.conftest import open_engine, running_server

TEXTS = [*TINY_TEXTS, "the water is hot", "we can make a new house", "big animal"]
LAST = 3  # the tiny models have 4 layers


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, list[bool]]]:
    """The server's URL and which of TEXTS leave ``half`` at layer 2."""
    root: Path = tmp_path_factory.mktemp("repo")
    leaves = store_exit_suite(Repository(root), TEXTS)
    engine = open_engine(root)
    try:
        with running_server(engine) as url:
            yield url, leaves
    finally:
        engine.close(drain_seconds=5)


@pytest.fixture(scope="module")
def triton(served: tuple[str, list[bool]]) -> Iterator[Any]:
    client = httpclient.InferenceServerClient(served[0].removeprefix("http://"), network_timeout=30)
    yield client
    client.close()


def text_input(texts: list[str]) -> Any:
    inp = httpclient.InferInput("TEXT", [len(texts)], "BYTES")
    inp.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object), binary_data=True)
    return inp


def expected(leaves: list[bool]) -> list[int]:
    return [2 if x else LAST for x in leaves]


def test_metadata_and_config_list_exit_layer(triton: Any) -> None:
    outputs = triton.get_model_metadata("half")["outputs"]
    assert [o["name"] for o in outputs] == ["EMBEDDING", "LOGITS", "LABEL", "EXIT_LAYER"]
    assert outputs[3] == {"name": "EXIT_LAYER", "datatype": "INT32", "shape": [-1]}
    config = triton.get_model_config("half")
    assert {"name": "EXIT_LAYER", "data_type": "TYPE_INT32", "dims": [-1]} in config["output"]
    assert json.loads(config["parameters"]["exits"]["string_value"]) == [1, 2]
    assert config["parameters"]["kind"]["string_value"] == "classifier"
    base = triton.get_model_metadata("base")["outputs"]
    assert "EXIT_LAYER" not in [o["name"] for o in base]


def test_tritonclient_gets_exit_layers_and_can_force_full_depth(
    triton: Any, served: tuple[str, list[bool]]
) -> None:
    leaves = served[1]
    result = triton.infer("half", [text_input(TEXTS)])  # no outputs asked: the defaults
    layers = result.as_numpy("EXIT_LAYER")
    assert layers.dtype == np.int32 and layers.tolist() == expected(leaves)
    assert result.as_numpy("LOGITS").shape == (len(TEXTS), 3)
    asked = [httpclient.InferRequestedOutput("EXIT_LAYER", binary_data=False)]
    only = triton.infer("half", [text_input(TEXTS)], outputs=asked)
    assert only.as_numpy("EXIT_LAYER").tolist() == expected(leaves) and only.as_numpy("LOGITS") is None
    forced = triton.infer("half", [text_input(TEXTS)], parameters={"early_exit": False})
    assert forced.as_numpy("EXIT_LAYER").tolist() == [LAST] * len(TEXTS)
    plain = triton.infer("base", [text_input(TEXTS)])
    np.testing.assert_array_equal(forced.as_numpy("LOGITS"), plain.as_numpy("LOGITS"))
    with pytest.raises(InferenceServerException, match="no output 'EXIT_LAYER'"):
        triton.infer("base", [text_input(TEXTS)], outputs=asked)


@pytest.mark.parametrize("value", ["no", 0, 1, None, [False], {"x": 1}])
def test_early_exit_must_be_a_bool(served: tuple[str, list[bool]], value: object) -> None:
    body = {
        "inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1], "data": ["one"]}],
        "parameters": {"early_exit": value},
    }
    r = httpx.post(f"{served[0]}/v2/models/half/infer", json=body, timeout=30)
    assert r.status_code == 400 and "early_exit" in r.json()["error"]


def test_json_answers_carry_exit_layer(served: tuple[str, list[bool]]) -> None:
    url, leaves = served
    body = {"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [len(TEXTS)], "data": TEXTS}]}
    r = httpx.post(f"{url}/v2/models/half/infer", json=body, timeout=30)
    assert r.status_code == 200
    outputs = {o["name"]: o for o in r.json()["outputs"]}
    assert list(outputs) == ["LOGITS", "LABEL", "EXIT_LAYER"]
    assert outputs["EXIT_LAYER"]["datatype"] == "INT32" and outputs["EXIT_LAYER"]["data"] == expected(leaves)
    forced = httpx.post(
        f"{url}/v2/models/base/infer", json={**body, "parameters": {"early_exit": False}}, timeout=30
    )
    assert forced.status_code == 200  # a model without exits accepts and ignores it


def test_python_client_returns_exit_layers(served: tuple[str, list[bool]]) -> None:
    url, leaves = served
    with Client(url) as c:
        got = c.classify("half", TEXTS)
        assert got.exit_layers is not None and got.exit_layers.tolist() == expected(leaves)
        assert got.logits.shape == (len(TEXTS), 3) and len(got.labels) == len(TEXTS)
        forced = c.classify("half", TEXTS, early_exit=False)
        assert forced.exit_layers is not None and forced.exit_layers.tolist() == [LAST] * len(TEXTS)
        assert c.classify("base", TEXTS).exit_layers is None
        assert c.classify("all1", TEXTS[:2]).labels == ["blue", "blue"]  # its exit is sure of label 2


def test_metrics_count_exits(served: tuple[str, list[bool]]) -> None:
    url, leaves = served
    with Client(url) as c:
        c.classify("half", TEXTS)
    text = httpx.get(f"{url}/metrics", timeout=30).text
    counted = {}
    for line in text.splitlines():
        if line.startswith("ptmserve_exits_total{"):
            labels, value = line.removeprefix("ptmserve_exits_total{").split("} ")
            counted[tuple(sorted(labels.split(",")))] = float(value)
    assert counted[('layer="2"', 'model="half"')] >= sum(leaves)
    assert counted[('layer="3"', 'model="half"')] >= len(leaves) - sum(leaves)

"""The ``openai`` client end to end, and issue 2's bad-input list, against the real engine."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from tests.models.tiny import TINY_TEXTS  # noqa: E402
from tests.server.conftest import CLS, EMB  # noqa: E402

TEXTS = list(TINY_TEXTS)


@pytest.fixture(scope="module")
def oai(real_url: str) -> Iterator[Any]:
    client = openai.OpenAI(base_url=f"{real_url}/v1", api_key="unused", max_retries=0, timeout=30)
    yield client
    client.close()


def test_models(oai: Any) -> None:
    ids = sorted(m.id for m in oai.models.list())
    assert ids == sorted([EMB, CLS])
    assert oai.models.retrieve(EMB).id == EMB


@pytest.mark.parametrize("encoding_format", ["float", "base64", None])
def test_embeddings_equal_python_api(oai: Any, real_engine: Any, encoding_format: str | None) -> None:
    kwargs = {} if encoding_format is None else {"encoding_format": encoding_format}
    resp = oai.embeddings.create(model=EMB, input=TEXTS, **kwargs)
    want = real_engine.embed(EMB, TEXTS)
    assert [d.index for d in resp.data] == list(range(len(TEXTS)))
    if encoding_format == "base64":  # the client hands base64 back as the server sent it
        got = np.stack(
            [np.frombuffer(__import__("base64").b64decode(d.embedding), dtype="<f4") for d in resp.data]
        )
    else:  # "float", or None: the client asks for base64 and decodes it itself
        got = np.array([d.embedding for d in resp.data], dtype=np.float32)
    np.testing.assert_allclose(got, want.embeddings, rtol=1e-5, atol=1e-6)
    assert resp.model == EMB
    assert resp.usage.prompt_tokens == resp.usage.total_tokens == want.prompt_tokens


def test_embeddings_of_one_string_and_of_token_ids(oai: Any, real_engine: Any) -> None:
    one = oai.embeddings.create(model=EMB, input=TEXTS[0], encoding_format="float")
    np.testing.assert_allclose(
        one.data[0].embedding, real_engine.embed(EMB, TEXTS[:1]).embeddings[0], rtol=1e-5, atol=1e-6
    )
    ids = [[2, 10, 11, 3], [2, 40, 3]]
    many = oai.embeddings.create(model=EMB, input=ids, encoding_format="float")
    np.testing.assert_allclose(
        [d.embedding for d in many.data], real_engine.embed(EMB, ids).embeddings, rtol=1e-5, atol=1e-6
    )
    single = oai.embeddings.create(model=EMB, input=ids[0], encoding_format="float")
    np.testing.assert_allclose(single.data[0].embedding, many.data[0].embedding, rtol=1e-5, atol=1e-6)


def test_typed_errors(oai: Any) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        oai.embeddings.create(model="no-such-model", input="a")
    assert err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as err:
        oai.embeddings.create(model=EMB, input="a", dimensions=7)
    assert "dimensions" in err.value.body["message"]


# Issue 2: bad input gets a clear 4xx and the server stays up.
@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"model": EMB, "input": []}, 400, "non-empty"),
        ({"model": EMB, "input": ""}, 400, "empty string"),
        ({"model": "no-such-model", "input": "a"}, 404, "no-such-model"),
        ({"model": EMB, "input": {"text": "a"}}, 400, "input"),
        ({"model": EMB, "input": [1.5, 2]}, 400, "input"),
        ({"model": EMB, "input": [[2, 10**9]]}, 400, "token id"),
        ({"model": ["x"], "input": "a"}, 400, "model"),
        ({"model": EMB, "input": "a", "encoding_format": 1}, 400, "encoding_format"),
    ],
)
def test_bad_input_is_a_clear_4xx(real_url: str, body: dict, status: int, words: str) -> None:
    r = httpx.post(f"{real_url}/v1/embeddings", json=body, timeout=30)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"]
    assert httpx.get(f"{real_url}/v2/health/ready").status_code == 200


def test_text_far_longer_than_the_maximum_is_truncated(real_url: str, real_engine: Any) -> None:
    max_tokens = real_engine.model_info(EMB).max_tokens
    long_text = " ".join(["water"] * (20 * max_tokens))
    r = httpx.post(
        f"{real_url}/v1/embeddings", json={"model": EMB, "input": [long_text, "a new day"]}, timeout=30
    )
    assert r.status_code == 200, r.text
    short = real_engine.embed(EMB, ["a new day"])
    assert r.json()["usage"]["prompt_tokens"] == max_tokens + short.prompt_tokens
    prefix = " ".join(
        ["water"] * (max_tokens - 2)
    )  # the same first max_tokens tokens, [CLS] and [SEP] included
    np.testing.assert_allclose(
        r.json()["data"][0]["embedding"], real_engine.embed(EMB, [prefix]).embeddings[0], rtol=1e-4, atol=1e-5
    )


def test_curl_style_body_without_json_content_type(real_url: str) -> None:
    """``curl -d '{...}'`` labels the JSON as a form; the README's example must still work."""
    body = json.dumps({"model": EMB, "input": "hello"})
    for headers in ({"content-type": "application/x-www-form-urlencoded"}, {}):
        r = httpx.post(f"{real_url}/v1/embeddings", content=body, headers=headers)
        assert r.status_code == 200, r.text
        assert len(r.json()["data"][0]["embedding"]) > 0

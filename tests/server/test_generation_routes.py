"""Text generation over HTTP: the OpenAI routes with the ``openai`` client unchanged, Triton's generate
extension, streaming, bad input, and a client that leaves mid-stream, against the real engine.

The repository holds a tiny random LLaMA-style decoder (``tests/models/tiny_decoder.py``, with a chat
template) and a tiny BERT embedding model. One server serves the module.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ptmserve.engine.api import Generation, GenerationChunk
from ptmserve.errors import DeadlineExceeded
from ptmserve.protocol import sse
from ptmserve.server.completions import Reply
from ptmserve.server.dataplane import GenerationStream
from ptmserve.server.sse import generation_events
from tests.server.conftest import live_server, open_engine, wait_for

GEN, EMB = "tiny-llama", "tiny-emb"
PROMPT = "the man said hello"
MESSAGES = [{"role": "system", "content": "be short"}, {"role": "user", "content": "a new day"}]
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def gen_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with ``tiny-llama`` (context 512) and ``tiny-emb``."""
    from ptmserve.store.importer import import_checkpoint
    from ptmserve.store.repository import Repository
    from tests.models.tiny import make_tiny_checkpoint
    from tests.models.tiny_decoder import make_tiny_decoder

    root = tmp_path_factory.mktemp("generation")
    repo = Repository(root / "repo")
    folder, _ = make_tiny_decoder(root / "llama", "llama-gqa-untied", context=512)
    import_checkpoint(repo, folder, name=GEN)
    import_checkpoint(repo, make_tiny_checkpoint(root / "emb", "bert", st_pooling="mean"), name=EMB)
    return root / "repo"


@pytest.fixture(scope="module")
def gen_engine(gen_repo: Path) -> Iterator[Any]:
    engine = open_engine(gen_repo, kv_cache_memory="4MiB")
    yield engine
    engine.close(drain_seconds=5)


@pytest.fixture(scope="module")
def gen_url(gen_engine: Any) -> Iterator[str]:
    with live_server(gen_engine) as live:
        yield live.url


@pytest.fixture(scope="module")
def oai(gen_url: str) -> Iterator[Any]:
    client = openai.OpenAI(base_url=f"{gen_url}/v1", api_key="unused", max_retries=0, timeout=60)
    yield client
    client.close()


def metric(url: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` on /metrics whose labels include ``labels``."""
    total = 0.0
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for s in family.samples:
            if s.name == name and labels.items() <= s.labels.items():
                total += s.value
    return total


def kv_blocks_in_use(url: str) -> float:
    return metric(url, "ptmserve_kv_blocks_in_use")


# ------------------------------------------------------------------------------------ the openai client


def test_completion_with_the_openai_client(oai: Any) -> None:
    r = oai.completions.create(model=GEN, prompt=PROMPT, max_tokens=8, **GREEDY)
    assert r.id.startswith("cmpl-") and r.object == "text_completion" and r.model == GEN
    assert r.created > 0 and len(r.choices) == 1
    assert r.choices[0].finish_reason == "length" and r.choices[0].text.strip()
    assert r.usage.completion_tokens == 8 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + 8
    default = oai.completions.create(model=GEN, prompt=PROMPT, **GREEDY)  # OpenAI's default: 16
    assert default.usage.completion_tokens == 16
    assert default.choices[0].text.startswith(r.choices[0].text)
    ids = oai.completions.create(model=GEN, prompt=[2, 10, 11, 12], max_tokens=4, **GREEDY)
    assert ids.usage.prompt_tokens == 4  # token ids are used as given
    listed = oai.completions.create(model=GEN, prompt=[PROMPT], max_tokens=8, **GREEDY)
    assert listed.choices[0].text == r.choices[0].text


def test_chat_with_the_openai_client(oai: Any) -> None:
    r = oai.chat.completions.create(model=GEN, messages=MESSAGES, max_tokens=6, **GREEDY)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == GEN
    msg = r.choices[0].message
    assert msg.role == "assistant" and msg.content.strip() and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 6 and r.usage.total_tokens == r.usage.prompt_tokens + 6
    newer = oai.chat.completions.create(model=GEN, messages=MESSAGES, max_completion_tokens=6, **GREEDY)
    assert newer.choices[0].message.content == msg.content
    parts = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in MESSAGES]
    assert oai.chat.completions.create(
        model=GEN, messages=parts, max_tokens=6, **GREEDY
    ).choices[0].message.content == msg.content  # fmt: skip


def test_a_stream_equals_the_whole_answer_and_ends_with_its_usage(oai: Any) -> None:
    whole = oai.completions.create(model=GEN, prompt=PROMPT, max_tokens=24, **GREEDY)
    chunks = list(
        oai.completions.create(
            model=GEN, prompt=PROMPT, max_tokens=24, stream=True, stream_options={"include_usage": True},
            **GREEDY,
        )
    )  # fmt: skip
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].object == "text_completion"
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])


def test_a_chat_stream_sends_the_role_first_then_the_content(oai: Any) -> None:
    whole = oai.chat.completions.create(model=GEN, messages=MESSAGES, max_tokens=10, **GREEDY)
    chunks = list(
        oai.chat.completions.create(model=GEN, messages=MESSAGES, max_tokens=10, stream=True, **GREEDY)
    )
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].usage is None


def test_chunks_arrive_while_the_rest_is_generated(oai: Any) -> None:
    start = time.perf_counter()
    times = []
    stream = oai.completions.create(model=GEN, prompt=PROMPT, max_tokens=200, stream=True, **GREEDY)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            times.append(time.perf_counter() - start)
    assert len(times) > 100, "the text came in a few large chunks"
    assert times[0] < times[-1] / 4, f"first chunk after {times[0]:.3f} s, last after {times[-1]:.3f} s"


def test_greedy_is_the_same_streamed_or_not_and_a_seed_repeats_its_sample(oai: Any, gen_url: str) -> None:
    def text(**kw: Any) -> str:
        return oai.completions.create(model=GEN, prompt=PROMPT, max_tokens=20, **kw).choices[0].text

    assert text(**GREEDY) == text(**GREEDY)
    sampled = {"temperature": 1.0, "extra_body": {"ignore_eos": True}}
    a, b, c = text(seed=7, **sampled), text(seed=7, **sampled), text(seed=8, **sampled)
    assert a == b and a != c
    topk = {"temperature": 1.0, "extra_body": {"ignore_eos": True, "top_k": 1}}
    assert text(seed=5, **topk) == text(**GREEDY)  # top_k 1 is greedy


def test_a_stop_string_ends_the_text_before_it(oai: Any) -> None:
    full = oai.completions.create(model=GEN, prompt=PROMPT, max_tokens=20, **GREEDY).choices[0].text
    stop = " " + full.split()[5]
    r = oai.completions.create(model=GEN, prompt=PROMPT, max_tokens=20, stop=[stop, "zzz"], **GREEDY)
    assert r.choices[0].text == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"
    streamed = oai.completions.create(
        model=GEN, prompt=PROMPT, max_tokens=20, stop=stop, stream=True, **GREEDY
    )
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text


def test_typed_errors_of_the_openai_client(oai: Any) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        oai.completions.create(model="no-such-model", prompt="a")
    assert err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        oai.completions.create(model=GEN, prompt="a", n=2)
    with pytest.raises(openai.BadRequestError, match="not a text generation model"):
        oai.chat.completions.create(model=EMB, messages=MESSAGES, stream=True)


# ------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("path", "body", "status", "words"),
    [
        ("completions", {"model": GEN, "prompt": "a", "n": 2}, 400, "n must be 1"),
        ("completions", {"model": GEN, "prompt": "a", "best_of": 3}, 400, "best_of"),
        ("completions", {"model": GEN, "prompt": "a", "echo": True}, 400, "echo"),
        ("completions", {"model": GEN, "prompt": "a", "logprobs": 2}, 400, "logprobs"),
        ("chat/completions", {"model": GEN, "messages": MESSAGES, "logprobs": True}, 400, "logprobs"),
        (
            "chat/completions",
            {"model": GEN, "messages": MESSAGES, "tools": [{"type": "function"}]},
            400,
            "tools",
        ),
        ("completions", {"model": GEN, "prompt": "a", "temperature": 3}, 400, "temperature"),
        ("completions", {"model": GEN, "prompt": "a", "temperature": "hot"}, 400, "temperature"),
        ("completions", {"model": GEN, "prompt": "a", "top_p": 0}, 400, "top_p"),
        ("completions", {"model": GEN, "prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
        ("completions", {"model": GEN, "prompt": "a", "stop": [""]}, 400, "stop"),
        ("completions", {"model": GEN, "prompt": "a", "stop": ["x"] * 17}, 400, "stop"),
        ("completions", {"model": GEN, "prompt": "a", "timeout": -1}, 400, "timeout"),
        ("completions", {"model": GEN, "prompt": "a", "stream": "yes"}, 400, "stream"),
        ("completions", {"model": GEN, "prompt": 5}, 400, "prompt: Value error, must be a string"),
        ("completions", {"model": GEN, "prompt": ["a", "b"]}, 400, "one prompt per request"),
        ("completions", {"model": GEN, "prompt": ""}, 400, "empty"),
        ("completions", {"model": GEN, "prompt": [100000]}, 400, "token id"),
        ("completions", {"model": GEN, "prompt": "\ud800"}, 400, "Unicode"),
        ("completions", {"model": GEN, "prompt": "a", "max_tokens": 10**6}, 400, "context"),
        ("completions", {"model": GEN}, 400, "prompt"),
        ("chat/completions", {"model": GEN, "messages": []}, 400, "messages"),
        ("chat/completions", {"model": GEN, "messages": [{"role": "tool", "content": "x"}]}, 400, "role"),
        (
            "chat/completions",
            {"model": GEN, "messages": MESSAGES, "max_tokens": 3, "max_completion_tokens": 4},
            400,
            "differ",
        ),
        ("completions", {"model": "no-such-model", "prompt": "a"}, 404, "no-such-model"),
        ("completions", {"model": EMB, "prompt": "a"}, 400, "not a text generation model"),
        ("chat/completions", {"model": EMB, "messages": MESSAGES}, 400, "not a text generation model"),
        ("embeddings", {"model": GEN, "input": "a"}, 400, "text generation model"),
    ],
)
def test_bad_input_gets_a_clear_error(gen_url: str, path: str, body: dict, status: int, words: str) -> None:
    for stream in (False, True):
        sent = body | {"stream": True} if stream and "stream" not in body and path != "embeddings" else body
        r = httpx.post(f"{gen_url}/v1/{path}", content=json.dumps(sent), timeout=30)  # json.dumps: ASCII
        assert r.status_code == status, r.text
        assert r.headers["content-type"] == "application/json"  # an error before the stream: plain JSON
        err = r.json()["error"]
        assert words in err["message"] and err["type"] and err["code"], err


def test_prompt_limits_are_413(gen_repo: Path) -> None:
    engine = open_engine(gen_repo, kv_cache_memory="1MiB")
    try:
        with live_server(engine, max_input_length=10, max_batch_inputs=2) as live:
            url = f"{live.url}/v1"
            r = httpx.post(f"{url}/completions", json={"model": GEN, "prompt": "x" * 11})
            assert r.status_code == 413 and "11 characters" in r.text
            r = httpx.post(f"{url}/chat/completions", json={"model": GEN, "messages": MESSAGES * 2})
            assert r.status_code == 413 and "4 messages" in r.text
            r = httpx.post(f"{url}/chat/completions", json={"model": GEN, "messages": MESSAGES})
            assert r.status_code == 413 and "characters" in r.text
    finally:
        engine.close(drain_seconds=5)


# ---------------------------------------------------------------------------------- Triton generate


def test_triton_generate_and_its_metadata(gen_url: str, oai: Any) -> None:
    want = oai.completions.create(model=GEN, prompt=PROMPT, max_tokens=8, **GREEDY)
    params = {"max_tokens": 8, "temperature": 0, "ignore_eos": True}
    for path in (f"/v2/models/{GEN}/generate", f"/v2/models/{GEN}/versions/1/generate"):
        r = httpx.post(f"{gen_url}{path}", json={"text_input": PROMPT, "parameters": params}, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json() == {
            "model_name": GEN,
            "model_version": "1",
            "text_output": want.choices[0].text,
            "finish_reason": "length",
            "prompt_tokens": want.usage.prompt_tokens,
            "completion_tokens": 8,
        }
    top_level = httpx.post(f"{gen_url}/v2/models/{GEN}/generate", json={"text_input": PROMPT, **params})
    assert top_level.json()["text_output"] == want.choices[0].text
    meta = httpx.get(f"{gen_url}/v2/models/{GEN}").json()
    assert meta["inputs"] == [{"name": "text_input", "datatype": "BYTES", "shape": [1]}]
    assert meta["outputs"] == [{"name": "text_output", "datatype": "BYTES", "shape": [-1]}]
    config = httpx.get(f"{gen_url}/v2/models/{GEN}/config").json()
    assert [i["name"] for i in config["input"]] == ["text_input"]
    assert config["parameters"]["kind"]["string_value"] == "generator"
    assert "generate" in httpx.get(f"{gen_url}/v2").json()["extensions"]
    stats = httpx.get(f"{gen_url}/v2/models/{GEN}/stats").json()["model_stats"][0]
    assert stats["inference_stats"]["success"]["count"] >= 2


def test_triton_generate_stream_with_plain_httpx(gen_url: str) -> None:
    body = {"text_input": PROMPT, "parameters": {"max_tokens": 12, "temperature": 0, "ignore_eos": True}}
    whole = httpx.post(f"{gen_url}/v2/models/{GEN}/generate", json=body).json()
    with httpx.stream("POST", f"{gen_url}/v2/models/{GEN}/versions/1/generate_stream", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [e for e in map(sse.decode_line, r.iter_lines()) if e is not None]
    assert all(e["model_name"] == GEN and e["model_version"] == "1" for e in events)
    assert "".join(e["text_output"] for e in events) == whole["text_output"]
    assert events[-1] == {**whole, "text_output": ""}


@pytest.mark.parametrize(
    ("path", "body", "status", "words"),
    [
        (f"{GEN}/generate", {"parameters": {"max_tokens": 2}}, 400, "text_input"),
        (f"{GEN}/generate", {"text_input": "a", "top_k": 2, "parameters": {"top_k": 3}}, 400, "twice"),
        (f"{GEN}/generate", {"text_input": "a", "parameters": []}, 400, "parameters"),
        (f"{GEN}/generate", {"text_input": "a", "parameters": {"priority": -1}}, 400, "priority"),
        (f"{GEN}/generate_stream", {"text_input": "a", "parameters": {"top_k": "1"}}, 400, "top_k"),
        (f"{GEN}/versions/2/generate", {"text_input": "a"}, 404, "version"),
        (f"{EMB}/generate_stream", {"text_input": "a"}, 400, "not a text generation model"),
        (f"{GEN}/infer", {"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1], "data": ["a"]}]},
         400, "text generation model"),
    ],
)  # fmt: skip
def test_triton_errors(gen_url: str, path: str, body: dict, status: int, words: str) -> None:
    r = httpx.post(f"{gen_url}/v2/models/{path}", json=body, timeout=30)
    assert r.status_code == status and words in r.json()["error"], r.text


# --------------------------------------------------------------------------------- leaving mid-stream


@pytest.mark.parametrize("path", ["/v1/completions", f"/v2/models/{GEN}/generate_stream"])
def test_a_client_that_leaves_mid_stream_frees_its_kv_blocks(gen_url: str, path: str) -> None:
    cancelled = {"model": GEN, "outcome": "cancelled"}
    before = metric(gen_url, "ptmserve_requests_total", **cancelled)
    params = {"max_tokens": 400, "ignore_eos": True}
    body = {"model": GEN, "prompt": PROMPT, **params} | {"stream": True, "text_input": PROMPT}
    with httpx.stream("POST", f"{gen_url}{path}", json=body, timeout=30) as r:
        lines = r.iter_lines()
        assert sse.decode_line(next(lines)) is not None  # the stream is flowing
        assert kv_blocks_in_use(gen_url) > 0
    left = time.perf_counter()
    assert wait_for(lambda: kv_blocks_in_use(gen_url) == 0, 10), "the KV blocks were not freed"
    assert time.perf_counter() - left < 3  # at once, not after the remaining ~400 tokens
    assert wait_for(lambda: metric(gen_url, "ptmserve_requests_total", **cancelled) == before + 1)


def test_a_client_that_leaves_before_its_first_token_cancels_it(gen_engine: Any, gen_url: str) -> None:
    cancelled = {"model": GEN, "outcome": "cancelled"}
    before = metric(gen_url, "ptmserve_requests_total", **cancelled)
    tokens = metric(gen_url, "ptmserve_generated_tokens_total", model=GEN)
    payload = json.dumps({"model": GEN, "prompt": PROMPT, "max_tokens": 50, "stream": True}).encode()
    u = urlparse(gen_url)
    gate = threading.Event()
    parked = gen_engine._worker.control(lambda: gate.wait(30))  # the request waits in the engine's queue
    try:
        with socket.create_connection((u.hostname, u.port)) as sock:
            sock.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                + f"Content-Length: {len(payload)}\r\n\r\n".encode()
                + payload
            )
            time.sleep(0.3)
        closed = {"route": "/v1/completions", "code": "499"}
        assert wait_for(lambda: metric(gen_url, "ptmserve_http_requests_total", **closed) >= 1)
    finally:
        gate.set()
        parked.result(timeout=30)
    assert wait_for(lambda: metric(gen_url, "ptmserve_requests_total", **cancelled) == before + 1)
    assert metric(gen_url, "ptmserve_generated_tokens_total", model=GEN) == tokens  # it never ran
    assert kv_blocks_in_use(gen_url) == 0


def test_an_error_after_the_stream_began_is_its_last_event() -> None:
    async def run() -> list[bytes]:
        generation = Generation(prompt_tokens=3)
        generation.push(GenerationChunk("hello", (7,)))
        chunks = generation.__aiter__()
        first = await chunks.__anext__()
        stream = GenerationStream(generation, chunks, first, on_end=lambda ok: ended.append(ok))
        generation.future.set_exception(DeadlineExceeded("too late"))
        reply = Reply.new(GEN, chat=True)
        return [e async for e in generation_events(stream, reply, "/v1/chat/completions")]

    ended: list[bool] = []
    events = [sse.decode_line(e.decode().strip()) for e in asyncio.run(run())]
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[1]["choices"][0]["delta"]["content"] == "hello"
    assert events[2] == {
        "error": {"message": "too late", "type": "timeout_error", "param": None, "code": "deadline_exceeded"}
    }
    assert len(events) == 3 and ended == [False]

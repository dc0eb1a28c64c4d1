"""``Client.complete``/``chat`` and their async twins against a real server with the real engine (the
tiny LLaMA-style decoder of ``tests/server/test_generation_routes.py``), streamed and not."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest

from ptmserve import errors
from ptmserve.client import AsyncClient, AsyncCompletionStream, Client, Completion, CompletionStream, Usage
from ptmserve.client.calls import ServerError
from tests.server.conftest import wait_for
from tests.server.test_generation_routes import (  # noqa: F401  (fixtures)
    EMB,
    GEN,
    MESSAGES,
    PROMPT,
    gen_engine,
    gen_repo,
    gen_url,
    kv_blocks_in_use,
)

GREEDY = {"temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def client(gen_url: str) -> Iterator[Client]:  # noqa: F811
    with Client(gen_url) as c:
        yield c


def openai_answer(url: str, path: str, body: dict) -> dict:
    r = httpx.post(f"{url}/v1/{path}", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_complete_returns_the_text_its_reason_and_usage(client: Client, gen_url: str) -> None:  # noqa: F811
    got = client.complete(GEN, PROMPT, max_tokens=8, **GREEDY)
    want = openai_answer(gen_url, "completions", {"model": GEN, "prompt": PROMPT, "max_tokens": 8, **GREEDY})
    assert isinstance(got, Completion)
    assert got.text == want["choices"][0]["text"] and got.finish_reason == "length"
    assert got.usage == Usage(**want["usage"])
    ids = client.complete(GEN, [2, 10, 11, 12], max_tokens=3, **GREEDY)
    assert ids.usage.prompt_tokens == 4 and ids.usage.completion_tokens == 3
    stop = " " + got.text.split()[3]
    stopped = client.complete(GEN, PROMPT, max_tokens=8, stop=[stop], **GREEDY)
    assert stopped.text == got.text[: got.text.index(stop)] and stopped.finish_reason == "stop"
    sampled = [client.complete(GEN, PROMPT, max_tokens=8, seed=3, temperature=1.0).text for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_chat_returns_the_assistants_reply(client: Client, gen_url: str) -> None:  # noqa: F811
    got = client.chat(GEN, MESSAGES, max_tokens=6, priority=1, timeout_us=30_000_000, **GREEDY)
    body = {"model": GEN, "messages": MESSAGES, "max_tokens": 6, **GREEDY}
    want = openai_answer(gen_url, "chat/completions", body)
    assert isinstance(got, Completion) and got.text == want["choices"][0]["message"]["content"]
    assert got.usage.completion_tokens == 6


@pytest.mark.parametrize("chat", [False, True])
def test_a_stream_yields_the_same_text_in_chunks(client: Client, chat: bool) -> None:
    def call(**kw: object) -> Completion | CompletionStream:
        if chat:
            return client.chat(GEN, MESSAGES, max_tokens=12, **GREEDY, **kw)  # type: ignore[arg-type]
        return client.complete(GEN, PROMPT, max_tokens=12, **GREEDY, **kw)  # type: ignore[arg-type]

    whole = call()
    stream = call(stream=True)
    assert isinstance(stream, CompletionStream) and stream.finish_reason is None
    chunks = list(stream)
    assert len(chunks) > 1 and "".join(chunks) == whole.text  # type: ignore[union-attr]
    assert stream.finish_reason == "length" and stream.usage == whole.usage  # type: ignore[union-attr]


def test_errors_are_the_servers_classes(client: Client) -> None:
    with pytest.raises(errors.ModelNotFound):
        client.complete("no-such-model", "a")
    with pytest.raises(errors.InvalidInput, match="not a text generation model"):
        client.chat(EMB, MESSAGES, stream=True)  # refused before the stream begins: raised at the call
    with pytest.raises(errors.InvalidInput, match="temperature"):
        client.complete(GEN, "a", temperature=5.0, stream=True)


def test_closing_a_stream_early_stops_the_generation(client: Client, gen_url: str) -> None:  # noqa: F811
    with client.complete(GEN, PROMPT, max_tokens=400, ignore_eos=True, stream=True) as stream:  # type: ignore[union-attr]
        chunks = iter(stream)  # held: dropping the iterator closes the stream too
        assert next(chunks)
        assert kv_blocks_in_use(gen_url) > 0
    assert wait_for(lambda: kv_blocks_in_use(gen_url) == 0, 5)
    assert client.complete(GEN, PROMPT, max_tokens=2).usage.completion_tokens <= 2  # the client still works


def test_an_error_event_raises_its_class() -> None:
    body = (
        b'data: {"choices":[{"index":0,"text":"hi","finish_reason":null}]}\n\n'
        b'data: {"error":{"message":"too late","type":"timeout_error","param":null,'
        b'"code":"deadline_exceeded"}}\n\n'
    )
    stream = CompletionStream(httpx.Response(200, content=body))
    chunks = []
    with pytest.raises(errors.DeadlineExceeded, match="too late"):
        chunks.extend(stream)
    assert chunks == ["hi"]
    odd = CompletionStream(httpx.Response(200, content=b'data: {"error": "boom"}\n\n'))
    with pytest.raises(ServerError, match="boom"):
        list(odd)


def test_the_async_client(gen_url: str, client: Client) -> None:  # noqa: F811
    want = client.chat(GEN, MESSAGES, max_tokens=10, **GREEDY)

    async def run() -> tuple[Completion, list[str], AsyncCompletionStream]:
        async with AsyncClient(gen_url) as c:
            whole = await c.chat(GEN, MESSAGES, max_tokens=10, **GREEDY)
            stream = await c.chat(GEN, MESSAGES, max_tokens=10, stream=True, **GREEDY)
            assert isinstance(stream, AsyncCompletionStream)
            chunks = [text async for text in stream]
            async with await c.complete(GEN, PROMPT, max_tokens=400, stream=True) as early:  # type: ignore[union-attr]
                async for _ in early:
                    break
            with pytest.raises(errors.ModelNotFound):
                await c.complete("no-such-model", "a", stream=True)
            return whole, chunks, stream  # type: ignore[return-value]

    whole, chunks, stream = asyncio.run(run())
    assert whole == want and "".join(chunks) == want.text
    assert stream.finish_reason == want.finish_reason and stream.usage == want.usage
    assert wait_for(lambda: kv_blocks_in_use(gen_url) == 0, 5)

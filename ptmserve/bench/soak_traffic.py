"""The soak test's traffic: a seeded mix of good, bad, cancelled and abandoned requests, with every
request's outcome counted.

Each request has exactly one outcome (``OUTCOMES``). Good requests carry a server-side deadline
(``parameters.timeout`` / ``timeout``) well under the client's timeout, so a server that works always
answers before the client gives up: a client timeout, a refused or reset connection, is ``no_outcome``.
Cancelled requests are good requests whose asyncio task is cancelled mid-flight (httpx then drops the
connection); abandoned ones (``disconnected``) are raw sockets that send a request, or part of one, and
close without reading the answer. Every loop is bounded in time and in count; only 127.0.0.1 is used.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
import random
import struct
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from ptmserve.bench.soak_models import WORDS

OUTCOMES = (
    "ok",  # a good request answered 200 with a body that matches the contract
    "rejected",  # a bad request answered with one of the 4xx codes it should get
    "overloaded",  # 429
    "not_ready",  # 503
    "deadline",  # 504
    "cancelled",  # the client cancelled the request on purpose
    "disconnected",  # the client closed the connection on purpose before the answer
    "unexpected_status",  # a good request answered 4xx, a bad one 2xx or the wrong 4xx, or a 1xx/3xx
    "invalid_answer",  # 200, but the body does not match the contract (shape, count, non-finite)
    "server_error",  # 500 (or any 5xx but 503 and 504)
    "no_outcome",  # no answer: client timeout, connection refused or reset
)
FAILURES = ("unexpected_status", "invalid_answer", "server_error", "no_outcome")
"""Outcomes that fail the soak."""

GOOD_DEADLINE_US = 20_000_000  # the server must answer (even if only 504) within 20 s ...
CLIENT_TIMEOUT_S = 60.0  # ... so a client still waiting after 60 s has no outcome
MAX_BATCH_INPUTS = 64  # the server runs with --max-batch-inputs 64; the soak sends 65 to get 413


@dataclass(frozen=True, slots=True)
class ModelShape:
    """What a model answers, read from its KServe metadata."""

    name: str
    dim: int  # EMBEDDING width
    classes: int  # LOGITS width; 0 for an embedding model


@dataclass(slots=True)
class Tally:
    """Cumulative outcome counts (owned by the event loop: no locks), with examples of failures."""

    outcomes: Counter[str] = field(default_factory=Counter)
    by_kind: Counter[str] = field(default_factory=Counter)  # "kind outcome" -> count
    statuses: Counter[str] = field(default_factory=Counter)  # "kind status" -> count
    examples: dict[str, list[str]] = field(default_factory=dict)  # failure outcome -> first few
    latencies: list[float] = field(default_factory=list)  # seconds of ``ok`` requests since last taken
    rt_latencies: list[float] = field(default_factory=list)  # the real-time (priority 1) ones among them
    slowest: list[tuple[float, str]] = field(default_factory=list)  # (seconds, what) of the slowest 10

    def add(
        self,
        kind: str,
        outcome: str,
        status: int | None = None,
        detail: str = "",
        seconds: float = 0.0,
        note: str = "",
    ) -> None:
        assert outcome in OUTCOMES, outcome
        self.outcomes[outcome] += 1
        if outcome == "ok":
            self.latencies.append(seconds)
            if "priority=1" in note:
                self.rt_latencies.append(seconds)
        if status is not None and (len(self.slowest) < 10 or seconds > self.slowest[-1][0]):
            entry = (round(seconds, 3), f"{kind} HTTP {status} {note}")
            self.slowest = sorted([*self.slowest, entry], reverse=True)[:10]
        self.by_kind[f"{kind} {outcome}"] += 1
        if status is not None:
            self.statuses[f"{kind} {status}"] += 1
        if outcome in FAILURES:
            seen = self.examples.setdefault(outcome, [])
            if len(seen) < 10:
                seen.append(f"{kind}: {detail}"[:500])

    @property
    def total(self) -> int:
        return sum(self.outcomes.values())

    def take_latencies(self) -> tuple[list[float], list[float]]:
        """The latencies of ``ok`` requests since the last call, all and real-time only, sorted;
        forgets them."""
        taken = sorted(self.latencies), sorted(self.rt_latencies)
        self.latencies, self.rt_latencies = [], []
        return taken


def status_outcome(status: int, *, good: bool, expected: frozenset[int] = frozenset()) -> str:
    """The outcome of an answered request, before its body is checked (``ok`` means: check it)."""
    if status in (429, 503, 504):
        return {429: "overloaded", 503: "not_ready", 504: "deadline"}[status]
    if status >= 500:
        return "server_error"
    if good:
        return "ok" if status == 200 else "unexpected_status"
    return "rejected" if status in expected else "unexpected_status"


# ----------------------------------------------------------------------------------- request bodies


def _texts(rng: random.Random, n: int) -> list[str]:
    def one() -> str:  # one in 20 is longer than any soak model takes: truncated by the server
        words = rng.randint(200, 400) if rng.random() < 0.05 else rng.randint(1, 40)
        pool = [*WORDS, "zzz", "qqq", "Ünïcödé", "日本語"]  # unknown words become the unk token
        return " ".join(rng.choice(pool) for _ in range(words))

    return [one() for _ in range(n)]


def _params(rng: random.Random) -> dict[str, int]:
    return {"priority": rng.choice((0, 1, 2)), "timeout": GOOD_DEADLINE_US}


def _note(m: ModelShape, n: int, params: dict[str, Any]) -> str:
    return f"{m.name} inputs={n} priority={params.get('priority')}"


@dataclass(frozen=True, slots=True)
class Call:
    """One HTTP request and how to judge its answer."""

    kind: str
    path: str
    body: bytes
    good: bool
    check: Callable[[dict[str, Any]], str | None] | None = None  # good: None if the body is right
    expected: frozenset[int] = frozenset()  # bad: the acceptable 4xx codes
    note: str = ""  # model, inputs and priority, for the list of slowest requests


def _check_kserve(n: int, want: dict[str, int]) -> Callable[[dict[str, Any]], str | None]:
    def check(doc: dict[str, Any]) -> str | None:
        outs = {o.get("name"): o for o in doc.get("outputs", [])}
        for name, width in want.items():
            o = outs.get(name)
            if o is None:
                return f"no {name} in {sorted(outs)}"
            shape = [n, width] if width else [n]
            if o.get("shape") != shape or len(o.get("data", ())) != math.prod(shape):
                return f"{name} shape {o.get('shape')} with {len(o.get('data', ()))} values, wanted {shape}"
            if width and not all(math.isfinite(v) for v in o["data"]):
                return f"{name} holds non-finite values"
        return None

    return check


def _check_openai(n: int, dim: int, b64: bool) -> Callable[[dict[str, Any]], str | None]:
    def check(doc: dict[str, Any]) -> str | None:
        data = doc.get("data", [])
        if len(data) != n or [d.get("index") for d in data] != list(range(n)):
            return f"{len(data)} embeddings, wanted {n}"
        for d in data:
            emb = d["embedding"]
            if b64:
                raw = base64.b64decode(emb)
                emb = struct.unpack(f"<{len(raw) // 4}f", raw)
            if len(emb) != dim or not all(math.isfinite(v) for v in emb):
                return f"an embedding of {len(emb)} values (or non-finite), wanted {dim}"
        return None

    return check


def kserve_embed(rng: random.Random, m: ModelShape, n: int | None = None) -> Call:
    n = n or rng.randint(1, 8)
    doc: dict[str, Any] = {
        "inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [n], "data": _texts(rng, n)}],
        "parameters": _params(rng),
    }
    if m.classes:  # a classifier answers EMBEDDING only when asked for it
        doc["outputs"] = [{"name": "EMBEDDING"}]
    path = f"/v2/models/{m.name}/infer"
    check = _check_kserve(n, {"EMBEDDING": m.dim})
    return Call(
        "kserve_embed", path, json.dumps(doc).encode(), True, check, note=_note(m, n, doc["parameters"])
    )


def kserve_classify(rng: random.Random, m: ModelShape) -> Call:
    n = rng.randint(1, 8)
    doc = {
        "inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [n], "data": _texts(rng, n)}],
        "parameters": _params(rng),
    }
    want = {"LOGITS": m.classes, "LABEL": 0}
    if rng.random() < 0.3:
        doc["outputs"] = [{"name": "LOGITS"}, {"name": "LABEL"}, {"name": "EMBEDDING"}]
        want["EMBEDDING"] = m.dim
    path = f"/v2/models/{m.name}/infer"
    note = _note(m, n, doc["parameters"])
    return Call("kserve_classify", path, json.dumps(doc).encode(), True, _check_kserve(n, want), note=note)


def kserve_ids(rng: random.Random, m: ModelShape) -> Call:
    """Token ids as a padded matrix with an attention mask (ids valid for every soak model)."""
    n = rng.randint(1, 6)
    lengths = [rng.randint(1, 30) for _ in range(n)]
    width = max(lengths)
    ids = [rng.randint(5, 300) if j < k else 0 for k in lengths for j in range(width)]
    mask = [1 if j < k else 0 for k in lengths for j in range(width)]
    doc: dict[str, Any] = {
        "inputs": [
            {"name": "INPUT_IDS", "datatype": "INT64", "shape": [n, width], "data": ids},
            {"name": "ATTENTION_MASK", "datatype": "INT64", "shape": [n, width], "data": mask},
        ],
        "outputs": [{"name": "EMBEDDING"}],
        "parameters": _params(rng),
    }
    path = f"/v2/models/{m.name}/infer"
    check = _check_kserve(n, {"EMBEDDING": m.dim})
    return Call(
        "kserve_ids", path, json.dumps(doc).encode(), True, check, note=_note(m, n, doc["parameters"])
    )


def openai_embed(rng: random.Random, m: ModelShape, n: int | None = None) -> Call:
    n = n or rng.randint(1, 8)
    texts = _texts(rng, n)
    b64 = rng.random() < 0.5
    doc: dict[str, Any] = {"model": m.name, "input": texts[0] if n == 1 and rng.random() < 0.5 else texts}
    doc.update(_params(rng))
    if b64:
        doc["encoding_format"] = "base64"
    check = _check_openai(n, m.dim, b64)
    return Call(
        "openai_embed", "/v1/embeddings", json.dumps(doc).encode(), True, check, note=_note(m, n, doc)
    )


def bad_request(rng: random.Random, m: ModelShape) -> Call:
    """One of a dozen malformed requests, each with the 4xx codes the error table promises for it."""
    infer = f"/v2/models/{m.name}/infer"
    text = {"name": "TEXT", "datatype": "BYTES", "shape": [1], "data": ["hello"]}
    bad400, bad404, bad413 = frozenset({400}), frozenset({404}), frozenset({413})
    cases: list[tuple[str, str, Any, frozenset[int]]] = [
        ("unknown_model", "/v2/models/no-such-model/infer", {"inputs": [text]}, bad404),
        ("unknown_version", f"/v2/models/{m.name}/versions/7/infer", {"inputs": [text]}, bad404),
        ("bad_model_name", "/v2/models/-bad-/infer", {"inputs": [text]}, frozenset({400, 404})),
        ("wrong_datatype", infer, {"inputs": [{**text, "datatype": "FP32", "data": [1.0]}]}, bad400),
        ("no_inputs", infer, {"inputs": []}, bad400),
        ("shape_mismatch", infer, {"inputs": [{**text, "shape": [3]}]}, bad400),
        ("unknown_output", infer, {"inputs": [text], "outputs": [{"name": "NOPE"}]}, bad400),
        (
            "bad_token_id",
            infer,
            {"inputs": [{"name": "INPUT_IDS", "datatype": "INT64", "shape": [1, 2], "data": [5, 10**9]}]},
            bad400,
        ),
        (
            "too_many_inputs",
            infer,
            {"inputs": [{**text, "shape": [MAX_BATCH_INPUTS + 1], "data": ["x"] * (MAX_BATCH_INPUTS + 1)}]},
            bad413,
        ),
        ("openai_unknown_model", "/v1/embeddings", {"model": "no-such-model", "input": "x"}, bad404),
        ("openai_empty", "/v1/embeddings", {"model": m.name, "input": []}, bad400),
        ("openai_wrong_type", "/v1/embeddings", {"model": m.name, "input": 123}, bad400),
        ("openai_dimensions", "/v1/embeddings", {"model": m.name, "input": "x", "dimensions": 3}, bad400),
        ("malformed_json", infer, None, bad400),
    ]
    name, path, doc, expected = rng.choice(cases)
    body = b'{"inputs": [{"name": "TEXT",' if doc is None else json.dumps(doc).encode()
    return Call(f"bad_{name}", path, body, False, expected=expected, note=m.name)


# ------------------------------------------------------------------------------------------- senders


async def send(client: httpx.AsyncClient, call: Call, tally: Tally) -> None:
    """Send ``call`` and count its outcome."""
    started = time.perf_counter()
    try:
        r = await client.post(call.path, content=call.body, headers={"content-type": "application/json"})
    except httpx.HTTPError as exc:  # timeouts, refused and reset connections: no answer at all
        tally.add(call.kind, "no_outcome", None, f"{type(exc).__name__}: {exc}")
        return
    outcome = status_outcome(r.status_code, good=call.good, expected=call.expected)
    detail = f"HTTP {r.status_code}: {r.text[:200]}"
    if outcome == "ok" and call.check is not None:
        try:
            problem = call.check(r.json())
        except (ValueError, KeyError, TypeError, struct.error) as exc:
            problem = f"unreadable body ({type(exc).__name__}: {exc})"
        if problem is not None:
            outcome, detail = "invalid_answer", problem
    tally.add(call.kind, outcome, r.status_code, detail, time.perf_counter() - started, call.note)


async def send_and_cancel(client: httpx.AsyncClient, call: Call, tally: Tally, after_s: float) -> None:
    """Send ``call`` and cancel it after ``after_s`` seconds (counted normally if it finished first)."""
    task = asyncio.ensure_future(send(client, call, tally))
    done, _ = await asyncio.wait({task}, timeout=after_s)
    if done:
        return
    task.cancel()
    await asyncio.wait({task})  # never raises; a task that finished first was counted by send()
    if task.cancelled():
        tally.add("cancel", "cancelled")


async def abandon(port: int, call: Call, tally: Tally, rng: random.Random) -> None:
    """Open a raw connection, send all of ``call`` (or only its headers, or half its body), and close
    the connection without reading the answer."""
    head = (
        f"POST {call.path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(call.body)}\r\n\r\n"
    ).encode()
    variant = rng.choice(("whole", "whole", "headers", "half_body"))
    payload = {
        "whole": head + call.body,
        "headers": head,
        "half_body": head + call.body[: len(call.body) // 2],
    }
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
    except (OSError, asyncio.TimeoutError) as exc:
        tally.add("disconnect", "no_outcome", None, f"could not connect: {exc!r}")
        return
    try:
        writer.write(payload[variant])
        await asyncio.wait_for(writer.drain(), 10)
        await asyncio.sleep(rng.uniform(0, 0.05))  # the server may be computing it by now
    except (OSError, asyncio.TimeoutError):
        pass  # the server may have answered and closed first; the client still walks away
    finally:
        writer.close()
        with contextlib.suppress(OSError, asyncio.TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), 5)
    tally.add(f"disconnect_{variant}", "disconnected")


# ------------------------------------------------------------------------------------------- workers

MIX = (  # (weight, action): the share of each kind of request
    (20, "kserve_embed"),
    (15, "kserve_classify"),
    (8, "kserve_ids"),
    (20, "openai_embed"),
    (17, "bad"),
    (10, "cancel"),
    (10, "disconnect"),
)


async def one_request(
    client: httpx.AsyncClient, port: int, models: list[ModelShape], rng: random.Random, tally: Tally
) -> None:
    """Pick one request from ``MIX`` and send it."""
    action = rng.choices([a for _, a in MIX], weights=[w for w, _ in MIX])[0]
    m = rng.choice(models)
    classifiers = [x for x in models if x.classes]
    if action == "kserve_classify" and classifiers:
        await send(client, kserve_classify(rng, rng.choice(classifiers)), tally)
    elif action in ("kserve_embed", "kserve_classify"):
        await send(client, kserve_embed(rng, m), tally)
    elif action == "kserve_ids":
        await send(client, kserve_ids(rng, m), tally)
    elif action == "openai_embed":
        await send(client, openai_embed(rng, m), tally)
    elif action == "bad":
        await send(client, bad_request(rng, m), tally)
    elif action == "cancel":
        big = rng.choice((kserve_embed, openai_embed))(rng, m, 32)
        await send_and_cancel(client, big, tally, rng.uniform(0.001, 0.08))
    else:
        await abandon(port, rng.choice((kserve_embed, openai_embed))(rng, m, 16), tally, rng)


async def worker(
    client: httpx.AsyncClient,
    port: int,
    models: list[ModelShape],
    seed: int,
    tally: Tally,
    end: float,
    rate: float,
    max_requests: int,
) -> None:
    """Send requests at about ``rate`` per second until ``end`` (monotonic) or ``max_requests``."""
    rng = random.Random(seed)
    next_at = time.monotonic() + rng.uniform(0, 1 / rate)
    for _ in range(max_requests):
        now = time.monotonic()
        if now >= end:
            return
        if next_at > now:
            await asyncio.sleep(min(next_at - now, end - now))
            if time.monotonic() >= end:
                return
        # Poisson arrivals; after a slow request, catch up on at most one second of backlog.
        next_at = max(next_at + rng.expovariate(rate), time.monotonic() - 1.0)
        await one_request(client, port, models, rng, tally)


async def model_shapes(client: httpx.AsyncClient, names: list[str]) -> list[ModelShape]:
    """Each model's EMBEDDING and LOGITS widths, from its KServe metadata."""
    shapes = []
    for name in names:
        r = await client.get(f"/v2/models/{name}")
        r.raise_for_status()
        outs = {o["name"]: o["shape"] for o in r.json()["outputs"]}
        shapes.append(ModelShape(name, int(outs["EMBEDDING"][1]), int(outs.get("LOGITS", [0, 0])[1])))
    return shapes

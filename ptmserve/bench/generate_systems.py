"""The systems ``ptmserve bench generate`` compares, each run on the same requests, and the figures of a run.

- ``run_engine``: ours, the real engine in-process (continuous batching: requests join and leave the
  running batch at every step, prompts packed without padding); ``concurrency`` closed-loop client threads.
- ``run_static``: the ablation, ours with static pre-padded batches: ``concurrency`` requests start
  together, their prompts left-padded to the longest (the pads are computed as tokens), and every
  sequence decodes until the longest of its batch is done. It runs our own ``Decoder`` and paged KV cache
  directly; its outputs are not used (its pads are attended), only its cost structure matters.
- ``run_hf``: ``transformers`` ``generate`` in the same static batches, left-padded with an attention mask.
- ``run_llama_cpp``: llama.cpp (``llama-cpp-python``) on the same GGUF file, requests one after another.

Every system yields one ``Trace`` per request: when it was submitted and when each of its tokens came out.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ptmserve.models.decoder import Decoder
from ptmserve.models.paged import KVCache, blocks_needed, make_step_batch

STATIC_BLOCK = 16  # KV cache block size of the static ablation (the engine's default)


@dataclass(frozen=True, slots=True)
class Request:
    prompt: tuple[int, ...]  # token ids
    max_new: int  # tokens to generate, exactly (end-of-sequence ignored)


@dataclass(slots=True)
class Trace:
    """What one request saw."""

    submit: float  # perf_counter() when it was sent
    tokens: list[float] = field(default_factory=list)  # perf_counter() when each generated token came out
    warmup: bool = False  # its client's first request (the synchronized start): not in latency figures
    token_ids: tuple[int, ...] = ()
    error: str = ""


def make_requests(
    stream: Sequence[int],
    n: int,
    prompt_range: tuple[int, int],
    gen_range: tuple[int, int],
    max_positions: int,
    seed: int,
) -> list[Request]:
    """``n`` requests: prompt lengths and generated lengths uniform in their (inclusive) ranges, each
    prompt a window of ``stream`` at a seeded offset; prompt + generated never exceeds ``max_positions``."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        gen = rng.randint(*gen_range)
        length = min(rng.randint(*prompt_range), max_positions - gen, len(stream))
        start = rng.randrange(len(stream) - length + 1)
        out.append(Request(tuple(stream[start : start + length]), gen))
    return out


def summarize(traces: Sequence[Trace], wall: float) -> dict[str, Any]:
    """Aggregate generated tokens/s over the whole run; TTFT and inter-token latency percentiles over the
    requests that were not their client's first (fall back to all when every request was)."""
    done = [t for t in traces if not t.error]
    counted = [t for t in done if not t.warmup] or done
    tokens = sum(len(t.tokens) for t in done)
    ttft = [t.tokens[0] - t.submit for t in counted if t.tokens]
    itl = [b - a for t in counted for a, b in zip(t.tokens, t.tokens[1:], strict=False)]

    def ms(values: list[float], q: float) -> float | None:
        return round(float(np.percentile(values, q)) * 1e3, 2) if values else None

    return {
        "requests": len(traces),
        "errors": len(traces) - len(done),
        "latency_requests": len(counted),
        "generated_tokens": tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 2) if wall > 0 else None,
        "ttft_p50_ms": ms(ttft, 50),
        "ttft_p99_ms": ms(ttft, 99),
        "itl_p50_ms": ms(itl, 50),
        "itl_p99_ms": ms(itl, 99),
    }


# --------------------------------------------------------------------------------------------- ours


def run_engine(
    engine: Any, model: str, requests: Sequence[Request], concurrency: int, timeout_s: float
) -> tuple[list[Trace], float]:
    """``concurrency`` client threads, each sending the next request as soon as its last one finished.

    A chunk may hold several tokens: the time since the previous token is split evenly among them.
    """
    from ptmserve.engine.api import GenerationParams, InferenceOptions

    options = InferenceOptions(timeout_us=int(timeout_s * 1e6))
    traces: list[Trace | None] = [None] * len(requests)
    queue = iter(enumerate(requests))
    lock = threading.Lock()

    def one(r: Request, warmup: bool) -> Trace:
        params = GenerationParams(max_tokens=r.max_new, temperature=0.0, ignore_eos=True)
        trace = Trace(time.perf_counter(), warmup=warmup)
        try:
            gen = engine.complete(model, list(r.prompt), params, options)
            prev = trace.submit
            for chunk in gen:
                k, now = len(chunk.token_ids), time.perf_counter()
                if k and not trace.tokens:
                    trace.tokens += [now] * k
                elif k:
                    trace.tokens += [prev + (now - prev) * (j + 1) / k for j in range(k)]
                prev = now if k else prev
            result = gen.result()
            trace.token_ids = tuple(result.token_ids)
            missing = result.completion_tokens - len(trace.tokens)  # not streamed: came with the end
            trace.tokens += [time.perf_counter()] * max(0, missing)
        except Exception as exc:  # noqa: BLE001 - counted and reported; the run goes on
            trace.error = f"{type(exc).__name__}: {exc}"
        return trace

    def client() -> None:
        first = True
        while True:
            with lock:
                item = next(queue, None)
            if item is None:
                return
            i, r = item
            traces[i] = one(r, first)
            first = False

    start = time.perf_counter()
    threads = [threading.Thread(target=client, name=f"bench-client-{k}") for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return [t for t in traces if t is not None], wall


# ------------------------------------------------------------------------------------ static batches


def _batches(requests: Sequence[Request], size: int) -> Iterator[list[Request]]:
    for i in range(0, len(requests), size):
        yield list(requests[i : i + size])


def run_static(
    decoder: Decoder, requests: Sequence[Request], concurrency: int, pad_id: int = 0
) -> tuple[list[Trace], float]:
    """Our decoder in static batches of ``concurrency`` (see the module docstring); greedy tokens."""
    cfg = decoder.config
    # any batch's padded prompt plus its longest generation fits
    longest = max(len(r.prompt) for r in requests) + max(r.max_new for r in requests)
    per_seq = blocks_needed(longest, STATIC_BLOCK)
    dtype = next(decoder.parameters()).dtype
    cache = KVCache.for_config(cfg, concurrency * per_seq, STATIC_BLOCK, dtype=dtype)
    traces: list[Trace] = []
    start = time.perf_counter()
    with torch.inference_mode():
        for k, batch in enumerate(_batches(requests, concurrency)):
            t0 = time.perf_counter()
            width = max(len(r.prompt) for r in batch)
            steps = max(r.max_new for r in batch)
            tables = [list(range(b * per_seq, (b + 1) * per_seq)) for b in range(len(batch))]
            seqs = [
                ([pad_id] * (width - len(r.prompt)) + list(r.prompt), 0, tables[b])
                for b, r in enumerate(batch)
            ]
            logits = decoder.forward_step(make_step_batch(seqs, STATIC_BLOCK), cache)
            tokens = logits.argmax(-1).tolist()
            times, outputs = [time.perf_counter()], [tokens]
            for s in range(1, steps):
                seqs = [([tokens[b]], width + s - 1, tables[b]) for b in range(len(batch))]
                tokens = decoder.forward_step(make_step_batch(seqs, STATIC_BLOCK), cache).argmax(-1).tolist()
                times.append(time.perf_counter())
                outputs.append(tokens)
            for b, r in enumerate(batch):
                ids = tuple(outputs[s][b] for s in range(r.max_new))
                traces.append(Trace(t0, times[: r.max_new], warmup=k == 0, token_ids=ids))
    return traces, time.perf_counter() - start


class _StepClock:
    """A ``transformers`` streamer that only notes when each step's tokens come out."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self._prompt_seen:  # the first call carries the prompt
            self.times.append(time.perf_counter())
        self._prompt_seen = True

    def end(self) -> None:
        pass


def hf_generation_config(hf: Any) -> Any:
    """A greedy generation config that ends only at ``max_new_tokens``, as our ``ignore_eos`` does.

    The end-of-sequence token is removed from the model's own config (``generate`` fills unset values of
    a passed config from it): with one set, ``generate`` stops there, and ``min_new_tokens`` (the usual
    way to force a length) would mask its logit, changing greedy outputs, while ours masks nothing.
    """
    import copy

    hf.generation_config.eos_token_id = None
    gc = copy.deepcopy(hf.generation_config)
    gc.do_sample = False
    gc.temperature = gc.top_p = gc.top_k = None
    return gc


def run_hf(
    hf: Any, requests: Sequence[Request], concurrency: int, pad_id: int = 0
) -> tuple[list[Trace], float]:
    """``transformers`` ``generate`` in static batches of ``concurrency``, left-padded, greedy."""
    gc = hf_generation_config(hf)
    device = next(hf.parameters()).device
    traces: list[Trace] = []
    start = time.perf_counter()
    with torch.inference_mode():
        for k, batch in enumerate(_batches(requests, concurrency)):
            t0 = time.perf_counter()
            width = max(len(r.prompt) for r in batch)
            steps = max(r.max_new for r in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for b, r in enumerate(batch):
                ids[b, width - len(r.prompt) :] = torch.tensor(r.prompt)
                mask[b, width - len(r.prompt) :] = 1
            clock = _StepClock()
            out = hf.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gc,
                max_new_tokens=steps, pad_token_id=pad_id, streamer=clock,
            )  # fmt: skip
            new = out[:, width:].tolist()
            if len(clock.times) != steps:
                raise RuntimeError(f"transformers generated {len(clock.times)} steps, not {steps}")
            for b, r in enumerate(batch):
                token_ids = tuple(new[b][: r.max_new])
                traces.append(Trace(t0, clock.times[: r.max_new], warmup=k == 0, token_ids=token_ids))
    return traces, time.perf_counter() - start


# ---------------------------------------------------------------------------------------- llama.cpp


def llama_cpp_available() -> str | None:
    """None when ``llama_cpp`` imports, else why not."""
    try:
        import llama_cpp  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken native library
        return f"llama-cpp-python is not installed ({type(exc).__name__}); pip install -e '.[llama]'"
    return None


def run_llama_cpp(gguf: str, requests: Sequence[Request], threads: int) -> tuple[list[Trace], float, str]:
    """llama.cpp on ``gguf``, the requests one after another, greedy, exactly ``max_new`` tokens each
    (its end-of-sequence token does not stop it). Returns traces, wall seconds and its version."""
    import llama_cpp

    longest = max(len(r.prompt) + r.max_new for r in requests)
    llm = llama_cpp.Llama(
        model_path=gguf, n_ctx=longest + 8, n_batch=512, n_threads=threads, n_threads_batch=threads,
        verbose=False,
    )  # fmt: skip

    def one(r: Request, warmup: bool) -> Trace:
        trace = Trace(time.perf_counter(), warmup=warmup)
        ids = []
        for tok in llm.generate(list(r.prompt), temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            trace.tokens.append(time.perf_counter())
            ids.append(int(tok))
            if len(ids) == r.max_new:
                break
        trace.token_ids = tuple(ids)
        return trace

    one(Request(requests[0].prompt[:16], 4), True)  # warm-up
    start = time.perf_counter()
    traces = [one(r, i == 0) for i, r in enumerate(requests)]
    return traces, time.perf_counter() - start, str(getattr(llama_cpp, "__version__", "?"))

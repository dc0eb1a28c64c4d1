"""Text generation through the real engine: tiny random GPT-2 and LLaMA-style models against
transformers, continuous batching, chunked prefill, the KV cache budget, cancellation, deadlines, and
what happens when another model's request arrives while sequences run."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest
import torch

from ptmserve.engine.api import GenerationParams, InferenceOptions
from ptmserve.engine.engine import Engine, EngineSettings
from ptmserve.errors import BudgetExceeded, DeadlineExceeded, InvalidInput
from ptmserve.models.paged import KVCache
from ptmserve.store.importer import import_checkpoint
from ptmserve.store.repository import Repository
from tests.models.tiny import make_tiny_checkpoint
from tests.models.tiny_decoder import VARIANTS, make_tiny_decoder, reference_greedy

GREEDY = GenerationParams(max_tokens=16, temperature=0, ignore_eos=True)
CONTEXT = 256


@pytest.fixture(scope="module")
def repo_and_refs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Repository, dict[str, torch.nn.Module]]:
    root = tmp_path_factory.mktemp("generation")
    repo = Repository(root / "repo")
    refs = {}
    for k, variant in enumerate(VARIANTS):
        folder, hf = make_tiny_decoder(root / variant, variant, context=CONTEXT, seed=k)
        import_checkpoint(repo, folder, name=variant)
        refs[variant] = hf
    import_checkpoint(repo, make_tiny_checkpoint(root / "enc", "bert"), name="encoder")
    return repo, refs


@pytest.fixture
def engine_factory(repo_and_refs: tuple[Repository, dict]) -> Iterator:
    engines = []

    def make(**settings: object) -> Engine:
        settings.setdefault("dtype", "float32")
        engine = Engine(repo_and_refs[0], EngineSettings(**settings))  # type: ignore[arg-type]
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close(drain_seconds=5)


def _prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, 190, (n,), generator=g).tolist()


def _wait_until(condition, timeout: float = 10.0) -> None:  # noqa: ANN001
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError("condition not met in time")
        time.sleep(0.005)


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_output_equals_transformers(variant: str, repo_and_refs: tuple, engine_factory) -> None:  # noqa: ANN001
    engine = engine_factory()
    prompts = [_prompt(n, seed) for seed, n in enumerate((1, 7, 30, 90))]
    handles = [engine.complete(variant, p, GREEDY) for p in prompts]  # one batch, all lengths
    for p, h in zip(prompts, handles, strict=True):
        result = h.result(30)
        assert list(result.token_ids) == reference_greedy(repo_and_refs[1][variant], p, 16)
        assert result.finish_reason == "length" and result.completion_tokens == 16
        assert result.prompt_tokens == len(p)


def test_a_sequence_that_joins_a_running_batch_yields_what_it_yields_alone(engine_factory) -> None:  # noqa: ANN001
    engine = engine_factory()
    long_run = GenerationParams(max_tokens=120, temperature=0, ignore_eos=True)
    joiner = _prompt(40, 7)
    alone = engine.complete("llama-gqa-untied", joiner, GREEDY).result(30).token_ids
    running = engine.complete("llama-gqa-untied", _prompt(20, 8), long_run)
    seen = iter(running)
    for _ in range(5):  # the first sequence is decoding
        next(seen)
    joined = engine.complete("llama-gqa-untied", joiner, GREEDY).result(30)
    assert not running.future.done(), "the joiner should have run next to the long sequence"
    assert joined.token_ids == alone
    assert running.result(30).completion_tokens == 120


def test_chunked_prefill_equals_a_single_pass_and_keeps_decodes_going(engine_factory) -> None:  # noqa: ANN001
    whole = engine_factory(max_batch_tokens=8192)
    chunked = engine_factory(max_batch_tokens=16)  # a 200-token prompt takes 13+ steps
    prompt = _prompt(200, 3)
    expected = whole.complete("llama-tied", prompt, GREEDY).result(30).token_ids
    decoding = chunked.complete(
        "llama-tied", _prompt(10, 4), GenerationParams(max_tokens=100, temperature=0, ignore_eos=True)
    )
    next(iter(decoding))
    generated = chunked.metrics.registry.get_sample_value
    before = generated("ptmserve_generated_tokens_total", {"model": "llama-tied"})
    long_prompt = chunked.complete("llama-tied", prompt, GREEDY)
    next(iter(long_prompt))  # its first token: after 13+ steps of 15-token prefill chunks
    during = generated("ptmserve_generated_tokens_total", {"model": "llama-tied"}) - before
    assert during >= 12, "the decoding stream should get a token in every step of the chunked prefill"
    assert long_prompt.result(30).token_ids == expected
    assert decoding.result(30).completion_tokens == 100


def test_a_long_prompt_up_to_the_context_works_and_a_longer_one_is_refused_or_truncated(
    engine_factory,
) -> None:  # noqa: ANN001
    strict = engine_factory(truncate=False)
    fits = strict.complete("gpt2", _prompt(CONTEXT - 4, 1), GenerationParams(max_tokens=4, temperature=0))
    assert fits.result(30).completion_tokens == 4
    with pytest.raises(InvalidInput, match="context of 256"):
        strict.complete("gpt2", _prompt(CONTEXT, 1), GenerationParams(max_tokens=4))
    lenient = engine_factory(truncate=True)
    kept = lenient.complete("gpt2", _prompt(CONTEXT + 50, 1), GenerationParams(max_tokens=4, temperature=0))
    result = kept.result(30)
    assert result.prompt_tokens == CONTEXT - 4 and result.completion_tokens == 4


def test_without_max_tokens_generation_stops_at_the_context(engine_factory) -> None:  # noqa: ANN001
    engine = engine_factory()
    result = engine.complete(
        "gpt2", _prompt(CONTEXT - 10, 2), GenerationParams(temperature=0, ignore_eos=True)
    )
    out = result.result(30)
    assert out.completion_tokens == 10 and out.finish_reason == "length"


def test_the_kv_budget_is_never_exceeded_and_every_sequence_finishes_right(engine_factory) -> None:  # noqa: ANN001
    # Room for about 2.5 sequences of 64 + 40 tokens: the others wait, or are preempted and recomputed.
    per_block = KVCache.bytes_for(2, 1, 16, 2, 8, torch.float32)
    engine = engine_factory(kv_cache_memory=per_block * 16)
    params = GenerationParams(max_tokens=40, temperature=0, ignore_eos=True)
    prompts = [_prompt(64, 10 + i) for i in range(6)]
    alone = [engine.complete("llama-gqa-untied", p, params).result(30).token_ids for p in prompts]
    peak = 0
    stop = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, engine.generation.used_blocks)
            time.sleep(0.0005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    handles = [engine.complete("llama-gqa-untied", p, params) for p in prompts]
    together = [h.result(60).token_ids for h in handles]
    stop.set()
    watcher.join()
    assert together == alone
    assert peak <= engine.generation.total_blocks == 16
    assert engine.generation.used_blocks == 0
    small = engine_factory(kv_cache_memory=per_block * 8)  # 128 token slots
    with pytest.raises(BudgetExceeded, match="can never fit"):
        small.complete("llama-gqa-untied", _prompt(100, 1), GenerationParams(max_tokens=50))
    capped = small.complete("llama-gqa-untied", _prompt(100, 1), GenerationParams(ignore_eos=True))
    assert capped.result(30).completion_tokens == 28  # no max_tokens: up to what the cache holds


def test_preemption_recomputes_to_the_same_tokens(engine_factory) -> None:  # noqa: ANN001
    per_block = KVCache.bytes_for(2, 1, 16, 2, 8, torch.float32)
    engine = engine_factory(kv_cache_memory=per_block * 10)  # 160 slots; 3 x (16 + 100) do not fit
    params = GenerationParams(max_tokens=100, temperature=0, ignore_eos=True)
    prompts = [_prompt(16, 30 + i) for i in range(3)]
    alone = [engine.complete("llama-gqa-untied", p, params).result(30).token_ids for p in prompts]
    handles = [engine.complete("llama-gqa-untied", p, params) for p in prompts]
    assert [h.result(60).token_ids for h in handles] == alone
    assert engine.generation.preemptions > 0


def test_a_cancelled_stream_frees_its_blocks_at_once(engine_factory) -> None:  # noqa: ANN001
    engine = engine_factory()
    stream = engine.complete("llama-tied", _prompt(50, 5), GenerationParams(max_tokens=200, ignore_eos=True))
    next(iter(stream))
    assert engine.generation.used_blocks > 0
    stream.cancel()
    _wait_until(lambda: engine.generation.used_blocks == 0, timeout=2.0)
    text = engine.metrics.registry.get_sample_value(
        "ptmserve_requests_total", {"model": "llama-tied", "outcome": "cancelled"}
    )
    assert text == 1.0
    # the engine goes on serving
    assert engine.complete("llama-tied", [5, 6], GREEDY).result(30).completion_tokens == 16


def test_the_deadline_applies_to_the_first_token(engine_factory) -> None:  # noqa: ANN001
    per_block = KVCache.bytes_for(2, 1, 16, 2, 8, torch.float32)
    engine = engine_factory(kv_cache_memory=per_block * 8)  # one 100-token sequence fills it
    hog = engine.complete(
        "llama-gqa-untied", _prompt(28, 1), GenerationParams(max_tokens=100, ignore_eos=True)
    )
    next(iter(hog))
    # cannot start while the hog holds the cache: it fails by its deadline, not after the hog
    late = engine.complete("llama-gqa-untied", _prompt(100, 2), GREEDY, InferenceOptions(timeout_us=50_000))
    with pytest.raises(DeadlineExceeded):
        late.result(10)
    # a running sequence has no deadline after its first token: it finishes although its timeout passed
    slow = engine.complete(
        "llama-gqa-untied",
        [5],
        GenerationParams(max_tokens=20, ignore_eos=True),
        InferenceOptions(timeout_us=5_000_000),
    )
    assert hog.result(30).completion_tokens == 100
    assert slow.result(30).completion_tokens == 20


def test_another_decoder_waits_for_the_running_sequences_and_encoders_interleave(engine_factory) -> None:  # noqa: ANN001
    engine = engine_factory()
    a = engine.complete("llama-tied", _prompt(10, 1), GenerationParams(max_tokens=150, ignore_eos=True))
    next(iter(a))
    b = engine.complete("gpt2", _prompt(10, 2), GREEDY)
    embedded = engine.embed("encoder", ["the man said hello"])
    assert not a.future.done(), "the encoder request should run between the decoder's steps"
    assert embedded.embeddings.shape[0] == 1
    next(iter(b))
    # b could not start while a's sequence held the KV cache: its first token came after a's last
    assert a.future.done() and a.result().completion_tokens == 150
    assert b.result(60).completion_tokens == 16
    assert engine.generation.model == "gpt2"


def test_stop_strings_end_token_and_seeded_sampling(engine_factory) -> None:  # noqa: ANN001
    engine = engine_factory()
    free = engine.complete(
        "llama-tied", [5, 6, 7], GenerationParams(max_tokens=30, temperature=0, ignore_eos=True)
    )
    text = free.result(30).text
    words = text.split()
    stop = words[3]
    cut = engine.complete(
        "llama-tied", [5, 6, 7], GenerationParams(max_tokens=30, temperature=0, ignore_eos=True, stop=(stop,))
    ).result(30)
    assert cut.finish_reason == "stop" and cut.text == text[: text.index(stop)]
    streamed = "".join(c.text for c in engine.complete(
        "llama-tied", [5, 6, 7], GenerationParams(max_tokens=30, temperature=0, ignore_eos=True, stop=(stop,))
    ))  # fmt: skip
    assert streamed == cut.text
    seeded = GenerationParams(max_tokens=20, temperature=1.0, top_p=0.9, seed=42, ignore_eos=True)
    one = engine.complete("llama-tied", [8, 9], seeded)
    others = [engine.complete("llama-tied", _prompt(5, i), seeded) for i in range(3)]
    again = engine.complete("llama-tied", [8, 9], seeded).result(30)
    assert one.result(30).token_ids == again.token_ids
    assert all(o.result(30).completion_tokens == 20 for o in others)


def test_chat_uses_the_models_template(engine_factory) -> None:  # noqa: ANN001
    engine = engine_factory()
    messages = [{"role": "system", "content": "be short"}, {"role": "user", "content": "the man said hello"}]
    direct = engine.complete(
        "llama-tied", engine.catalog.tokenizer("llama-tied").encode_prompt(
            "system: be short\nuser: the man said hello\nassistant:", special_tokens=False
        ), GREEDY,
    ).result(30)  # fmt: skip
    assert engine.chat("llama-tied", messages, GREEDY).result(30).token_ids == direct.token_ids
    with pytest.raises(InvalidInput, match="role"):
        engine.chat("llama-tied", [{"role": "wizard", "content": "x"}])
    with pytest.raises(InvalidInput, match="does not generate text"):
        engine.complete("encoder", "hello")
    with pytest.raises(InvalidInput, match="text generation model"):
        engine.embed("gpt2", ["hello"])


def test_generation_metrics_and_the_kv_tier(engine_factory) -> None:  # noqa: ANN001
    engine = engine_factory(kv_cache_memory="4MiB")
    engine.complete("gpt2", [5, 6, 7], GREEDY).result(30)
    get = engine.metrics.registry.get_sample_value
    assert get("ptmserve_generated_tokens_total", {"model": "gpt2"}) == 16
    assert get("ptmserve_time_to_first_token_seconds_count", {"model": "gpt2"}) == 1
    assert get("ptmserve_inter_token_seconds_count", {"model": "gpt2"}) == 15
    assert get("ptmserve_kv_blocks_in_use") == 0
    assert get("ptmserve_budget_bytes", {"tier": "kv"}) == 4 * 2**20
    kv = next(t for t in engine.tiers() if t.name == "kv")
    assert kv.budget_bytes == 4 * 2**20 and kv.used_bytes == 0


def test_decoders_import_generation_settings_from_hf_folders(repo_and_refs: tuple) -> None:
    manifest = repo_and_refs[0].manifest("llama-tied")
    assert manifest.generation["eos_token_id"] == 3
    assert manifest.generation["chat_template"].startswith("{% for m in messages %}")


def test_a_model_with_running_sequences_is_never_evicted(engine_factory, repo_and_refs: tuple) -> None:  # noqa: ANN001
    probe = engine_factory()
    sizes = {m: probe.catalog.device_bytes(m) for m in ("llama-tied", "encoder")}
    # the device tier holds either model, never both: the encoder must wait for the sequences to end
    engine = engine_factory(device_memory=max(sizes.values()) + min(sizes.values()) // 2)
    stream = engine.complete("llama-tied", [5, 6], GenerationParams(max_tokens=60, ignore_eos=True))
    next(iter(stream))
    embedded = engine.embed("encoder", ["the man said hello"], InferenceOptions(timeout_us=60_000_000))
    assert stream.future.done(), "the encoder ran only after the decoder's sequence finished"
    assert stream.result().completion_tokens == 60 and embedded.embeddings.shape[0] == 1
    loads = engine.metrics.registry.get_sample_value("ptmserve_model_loads_total", {"model": "llama-tied"})
    assert loads == 1


def test_a_caller_cancelled_while_its_prompt_is_prepared_leaves_nothing_running(engine_factory) -> None:  # noqa: ANN001
    engine = engine_factory()
    messages = [{"role": "user", "content": "the man said hello " * 5000}]  # milliseconds to tokenize
    params = GenerationParams(max_tokens=200, ignore_eos=True)

    async def cancel_while_preparing() -> bool:
        """True when the cancellation landed while the prompt was being prepared."""
        task = asyncio.create_task(engine.achat("llama-tied", messages, params))
        await asyncio.sleep(0.001)  # rendering and tokenizing on the pool
        if not task.cancel():  # prepared already: not the case under test; stop that generation
            (await task).cancel()
            return False
        with pytest.raises(asyncio.CancelledError):
            await task
        return True

    landed = sum(asyncio.run(cancel_while_preparing()) for _ in range(10))
    assert landed >= 1, "no cancellation landed during preparation; make the prompt longer"
    _wait_until(lambda: engine.generation.sequences == 0 and engine._scheduler.pending() == 0, timeout=3.0)
    assert engine.generation.used_blocks == 0


def test_parameters_left_out_take_the_models_defaults(tmp_path, repo_and_refs: tuple) -> None:  # noqa: ANN001
    folder, hf = make_tiny_decoder(tmp_path / "ck", "llama-tied")
    repo = Repository(tmp_path / "repo")
    import_checkpoint(repo, folder, name="greedy-by-default", sampling={"temperature": 0.0})
    assert repo.manifest("greedy-by-default").generation["sampling"] == {"temperature": 0.0}
    with Engine(repo, EngineSettings(dtype="float32")) as engine:
        prompt = _prompt(12, 9)
        result = engine.complete(
            "greedy-by-default", prompt, GenerationParams(max_tokens=10, ignore_eos=True)
        )
        assert list(result.result(30).token_ids) == reference_greedy(hf, prompt, 10)
        sampled = GenerationParams(max_tokens=10, ignore_eos=True, temperature=1.0, seed=1)
        assert engine.complete("greedy-by-default", prompt, sampled).result(30).completion_tokens == 10

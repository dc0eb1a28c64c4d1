"""The real decoder, SmolLM2-135M-Instruct from its Q4_1 GGUF file, through the engine (slow: it imports
540 MB of float32 weights once per module)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ptmserve.engine.api import GenerationParams
from ptmserve.engine.engine import Engine, EngineSettings
from ptmserve.store.importer import import_checkpoint
from ptmserve.store.repository import Repository
from tests.models.test_gguf import needs_smollm2, smollm2_file

MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    path = smollm2_file()
    assert path is not None
    repo = Repository(tmp_path_factory.mktemp("smollm2") / "repo")
    import_checkpoint(repo, Path(path), name=MODEL)
    with Engine(repo, EngineSettings(dtype="float32")) as engine:
        yield engine


@pytest.mark.slow
@needs_smollm2
def test_smollm2_answers_a_fixed_chat_prompt_greedily(engine: Engine) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    result = engine.chat(MODEL, messages, GenerationParams(temperature=0, max_tokens=40)).result(120)
    assert result.text == "The capital of France is Paris."
    assert result.finish_reason == "stop"  # it ended with its end-of-turn token, <|im_end|>
    assert result.token_ids[-1] == 2
    assert result.prompt_tokens == 37  # the template's default system prompt, then the question


@pytest.mark.slow
@needs_smollm2
def test_smollm2_streams_the_same_text_in_a_busy_batch(engine: Engine) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    params = GenerationParams(temperature=0, max_tokens=40)
    others = [
        engine.chat(MODEL, [{"role": "user", "content": f"Count to {n}."}], GenerationParams(max_tokens=30))
        for n in (3, 5, 7)
    ]
    streamed = "".join(chunk.text for chunk in engine.chat(MODEL, messages, params))
    assert streamed == "The capital of France is Paris."
    assert all(o.result(120).completion_tokens >= 1 for o in others)

"""Engine defects an adversarial run found, each reproduced on the real engine with tiny models."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest

from ptmserve import errors
from ptmserve.engine.api import InferenceOptions, ModelState
from ptmserve.engine.engine import Engine, EngineSettings
from ptmserve.store.importer import import_checkpoint
from ptmserve.store.repository import Repository
from tests.models.tiny import make_tiny_checkpoint

RT = InferenceOptions(priority=1, timeout_us=30_000_000)


@pytest.fixture(scope="module")
def source_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("ckpt")
    root = tmp_path_factory.mktemp("repo")
    repo = Repository(root)
    for name, seed in (("a-first", 1), ("b-second", 2), ("c-third", 3)):
        import_checkpoint(
            repo, make_tiny_checkpoint(src, "bert", seed=seed, name=name), name, dtype="float32"
        )
    return root


@pytest.fixture
def repo_dir(tmp_path: Path, source_repo: Path) -> Path:
    """A private copy each test may damage."""
    return Path(shutil.copytree(source_repo, tmp_path / "repo"))


def open_engine(root: Path, **settings: object) -> Engine:
    return Engine(Repository(root), EngineSettings(dtype="float32", **settings))  # type: ignore[arg-type]


def flip_a_byte_of(root: Path, model: str) -> None:
    manifest = Repository(root).manifest(model)
    e = manifest.groups["layers.0"][0]
    path = root / "segments" / f"{e.segment}.seg"
    data = bytearray(path.read_bytes())
    data[e.offset + 3] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_damaged_first_model_does_not_stop_warm_up(repo_dir: Path) -> None:
    flip_a_byte_of(repo_dir, "a-first")  # the model warm-up tries first
    with open_engine(repo_dir) as engine:
        engine.warm_up()
        infos = {m.name: m for m in engine.models()}
        assert infos["a-first"].state is ModelState.UNAVAILABLE
        assert "checksum mismatch" in infos["a-first"].reason and str(repo_dir) not in infos["a-first"].reason
        assert engine.metrics.loads.labels("b-second")._value.get() == 1  # the next one was warmed up
        assert engine.embed("c-third", ["hello"], RT).embeddings.shape == (1, 32)
        with pytest.raises(errors.NotReady, match="checksum mismatch"):
            engine.embed("a-first", ["hello"], RT)


def test_an_unreadable_manifest_is_listed_with_its_error(repo_dir: Path) -> None:
    (repo_dir / "manifests" / "b-second.json").write_text("{ not json")
    with open_engine(repo_dir) as engine:
        engine.warm_up()
        infos = {m.name: m for m in engine.models()}
        assert set(infos) == {"a-first", "b-second", "c-third"}
        assert (
            infos["b-second"].state is ModelState.UNAVAILABLE and "not valid JSON" in infos["b-second"].reason
        )
        assert infos["a-first"].state is ModelState.READY
        with pytest.raises(errors.CorruptData, match="not valid JSON"):
            engine.embed("b-second", ["hello"], RT)
        assert engine.embed("c-third", ["hello"], RT).embeddings.shape == (1, 32)


def test_zero_copy_with_another_dtype_is_refused_at_startup(repo_dir: Path) -> None:
    with pytest.raises(errors.InvalidConfig, match=r"--zero-copy.*bfloat16.*a-first \(float32\)"):
        Engine(Repository(repo_dir), EngineSettings(dtype="bfloat16", zero_copy=True))
    with Engine(Repository(repo_dir), EngineSettings(dtype="float32", zero_copy=True)) as engine:
        assert engine.embed("a-first", ["hello"], RT).embeddings.shape == (1, 32)


def test_state_is_loading_while_an_explicit_load_runs(repo_dir: Path) -> None:
    with open_engine(repo_dir, model_control="explicit") as engine:
        assert engine.model_info("a-first").state is ModelState.UNAVAILABLE
        gate = threading.Event()
        engine._worker.control(gate.wait)  # the worker is busy: the load waits its turn
        loader = threading.Thread(target=engine.load, args=("a-first",))
        loader.start()
        deadline = time.monotonic() + 10
        while engine.model_info("a-first").state is not ModelState.LOADING and time.monotonic() < deadline:
            time.sleep(0.005)
        assert engine.model_info("a-first").state is ModelState.LOADING
        gate.set()
        loader.join(30)
        assert engine.model_info("a-first").state is ModelState.READY


def test_unload_stays_unloaded(repo_dir: Path) -> None:
    with open_engine(repo_dir, model_control="explicit") as engine:
        engine.load("a-first")
        engine.load("b-second")
        gate = threading.Event()
        engine._worker.control(gate.wait)  # park the worker so requests stay queued
        queued = [engine._submit("a-first", ["hello"], RT, classify=False) for _ in range(3)]
        unloader = threading.Thread(target=engine.unload, args=("a-first",))
        unloader.start()
        deadline = time.monotonic() + 10
        while not all(f.done() for f in queued) and time.monotonic() < deadline:
            time.sleep(0.005)
        for f in queued:  # the queued requests fail instead of reloading the weights
            with pytest.raises(errors.NotReady, match="unloaded"):
                f.result(0)
        gate.set()
        unloader.join(30)
        for _ in range(5):  # other traffic, with its prefetches, never brings it back
            engine.embed("b-second", ["hello"], RT)
        where = engine.weights.residency("a-first")
        assert not where.on_device and not where.on_host and not where.loading
        assert engine.model_info("a-first").state is ModelState.UNAVAILABLE
        with pytest.raises(errors.NotReady):
            engine.embed("a-first", ["hello"], RT)


def test_a_deadline_centuries_away_does_not_stop_the_deadline_timer(repo_dir: Path) -> None:
    with open_engine(repo_dir) as engine:
        far = InferenceOptions(priority=2, timeout_us=10**19)  # past threading.TIMEOUT_MAX
        assert engine.embed("a-first", ["hello"], far).embeddings.shape == (1, 32)
        time.sleep(0.05)
        assert engine._worker._timer.is_alive()
        with pytest.raises(errors.DeadlineExceeded):  # the timer still expires what is due
            gate = threading.Event()
            engine._worker.control(gate.wait)
            try:
                engine.embed("b-second", ["hello"], InferenceOptions(priority=1, timeout_us=50_000))
            finally:
                gate.set()


def test_a_text_generation_model_is_listed_and_refused_clearly(tmp_path: Path, repo_dir: Path) -> None:
    import transformers

    from tests.models.tiny import tiny_tokenizer, tiny_vocab_size

    folder = tmp_path / "gpt2"
    torch_cfg = transformers.GPT2Config(
        vocab_size=tiny_vocab_size("bert"), n_positions=64, n_embd=32, n_layer=2, n_head=4
    )
    transformers.GPT2LMHeadModel(torch_cfg).save_pretrained(folder)
    tiny_tokenizer("bert").save(str(folder / "tokenizer.json"))
    import_checkpoint(Repository(repo_dir), folder, "tiny-gpt2", dtype="float32")
    with open_engine(repo_dir) as engine:
        engine.warm_up()  # skips it: it cannot embed
        info = engine.model_info("tiny-gpt2")
        assert info.kind.value == "generator" and info.state is ModelState.READY
        with pytest.raises(errors.InvalidInput, match="text generation model"):
            engine.embed("tiny-gpt2", ["hello"], RT)
        assert engine.embed("a-first", ["hello"], RT).embeddings.shape == (1, 32)

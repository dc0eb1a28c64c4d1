"""``ptmserve import --weights``: the stored weight format, from a GGUF file."""

from __future__ import annotations

from pathlib import Path

from ptmserve.store.repository import Repository
from tests.cli.conftest import run_cli
from tests.models.test_gguf import write_tiny_gguf


def test_import_stores_the_asked_weight_format(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "tiny.gguf").path
    repo = tmp_path / "models"
    run = run_cli("import", path, "--name", "tiny-int4", "--repo", repo, "--weights", "int4")
    assert run.code == 0, run.err
    assert run.out.rstrip().endswith(", float32, int4 weights"), run.out
    manifest = Repository(repo).manifest("tiny-int4")
    assert manifest.weights == "int4" and {"uint8", "float32"} <= {e.dtype for e in manifest.tensors}
    run = run_cli("import", path, "--name", "bad", "--repo", repo, "--weights", "int3")
    assert run.code != 0 and "invalid choice: 'int3'" in run.err

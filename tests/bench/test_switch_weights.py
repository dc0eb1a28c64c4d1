"""``bench switch --weights``: bytes moved and switch times per weight format, on a tiny model."""

from __future__ import annotations

import argparse
from pathlib import Path

from ptmserve.bench import switch
from ptmserve.store.importer import import_checkpoint
from ptmserve.store.repository import Repository
from tests.models.tiny import make_tiny_checkpoint


def test_formats_are_measured_against_fp_in_the_same_run(tmp_path: Path) -> None:
    folder = make_tiny_checkpoint(tmp_path / "ck", "bert")
    repo = Repository(tmp_path / "repo")
    import_checkpoint(repo, folder, "tiny", "float32")
    formats = switch._formats("int4, int8")
    assert formats == ["fp", "int8", "int4"]  # fp first: the baseline of the ratios
    rows = switch._measure_formats(repo, "tiny bert", "tiny", folder, formats, argparse.Namespace(), runs=1)
    by = {r["weights"]: r for r in rows}
    assert by["fp"]["bytes_vs_fp"] == 1.0 and by["fp"]["warm_vs_fp"] == 1.0
    for fmt in ("int8", "int4"):
        assert repo.manifest(f"tiny-{fmt}").weights == fmt
        assert by[fmt]["bytes_vs_fp"] < 0.5 and by[fmt]["device_bytes"] == by[fmt]["bytes"]
        assert by[fmt]["warm_s"] > 0 and by[fmt]["cold_s"] > 0
    table = switch.format_weights_table(rows, 1)
    assert table.count("| tiny bert |") == 3 and "| int8 |" in table

"""The CUDA switch measurement of scripts/gpu-check, run small on the CPU so its code is exercised here."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from ptmserve.bench import gpu_switch


@pytest.mark.slow
def test_small_run_on_cpu_writes_every_figure(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    gpu_switch.add_arguments(parser)
    out = tmp_path / "r.json"
    args = parser.parse_args(
        [
            "--device",
            "cpu",
            "--small",
            "--runs",
            "2",
            "--dtypes",
            "float32",
            "--weights",
            "fp,int8",
            "--json",
            str(out),
            "--workdir",
            str(tmp_path),
        ]
    )
    result = gpu_switch.run(args)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert [(r["weights"], r["pipelined"]) for r in result["rows"]] == [
        ("fp", True),
        ("fp", False),
        ("int8", True),
        ("int8", False),
    ]
    assert result["rows"][2]["bytes"] < 0.5 * result["rows"][0]["bytes"]
    for r in result["rows"]:
        assert r["switched_equals_resident"]
        assert r["bytes"] > 0 and r["warm_ms"] > 0 and r["resident_ms"] > 0 and r["h2d_gbps"] > 0
        assert r["overhead_ms"] == pytest.approx(r["warm_ms"] - r["resident_ms"])
    assert "PipeSwitch (OSDI '20) reports a switch overhead of 3.6-6.6 ms" in gpu_switch.format_table(result)
    assert list(tmp_path.iterdir()) == [out]  # the temporary repository is gone

"""The ``hrkernels`` command: ``info`` and a CPU ``bench`` run end to end."""

from __future__ import annotations

import json
import subprocess
import sys

from hrkernels.cli import main


def test_info_lists_versions_and_backends(capsys):
    assert main(["info"]) == 0
    printed = capsys.readouterr().out
    for key in ("hrkernels", "torch", "triton", "diffusers", "cuda", "device", "backend triton",
                "backend cuda"):
        assert key in printed


def test_python_m_hrkernels_info():
    result = subprocess.run([sys.executable, "-m", "hrkernels", "info"], capture_output=True,
                            text=True, check=True)
    assert "backend torch" in result.stdout


def test_bench_writes_json_markdown_and_labels_cpu_numbers(tmp_path, capsys):
    assert main(["bench", "--out", str(tmp_path), "--family", "views", "--filter",
                 "gather_dilated", "--providers", "torch", "hrkernels"]) == 0
    document = json.loads((tmp_path / "ops_cpu.json").read_text())
    assert {row["provider"] for row in document["results"]} == {"torch", "hrkernels"}
    assert all(row["max_abs_error"] == 0 for row in document["results"])
    assert "CPU run" in (tmp_path / "ops_cpu.md").read_text()

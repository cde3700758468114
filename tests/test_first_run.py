"""The first run of a new user (issue 20): the README's claims, and the ``hrkernels`` command's
answers to bad devices, backends, models and output paths (one line on stderr, exit status 2,
before any model work), its start-up cost, and where ``hrkernels bench`` writes."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hrkernels
from hrkernels.bench import harness
from hrkernels.cli import main

ROOT = Path(__file__).resolve().parents[1]
GENERATE = ["generate", "--model", "tiny-sd15", "--method", "demofusion", "--prompt", "a",
            "--steps", "1"]


@pytest.fixture
def no_model_work(monkeypatch):
    """Loading the pipeline fails the test: the error must come before it."""
    def load_pipeline(*args):
        raise AssertionError("the pipeline was loaded before the arguments were checked")

    monkeypatch.setattr("hrkernels.cli.generate.load_pipeline", load_pipeline)


def one_line_error(capsys, *fragments: str) -> str:
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1, error
    for fragment in fragments:
        assert fragment in error, error
    return error


# --------------------------------------------------------------------------------------------------
# The README and the package say what exists
# --------------------------------------------------------------------------------------------------


def test_readme_says_how_to_install_the_cpu_build_and_that_ops_have_no_backward():
    readme = (ROOT / "README.md").read_text()
    assert "--index-url https://download.pytorch.org/whl/cpu" in readme
    assert re.search(r"suite takes\s+about\s+\d+\s+min(utes)?\s+on\s+2\s+CPU\s+cores", readme)
    assert "inference-only" in readme


def test_the_package_docstring_names_modules_that_exist():
    for name in re.findall(r"``(hrkernels\.[a-z_.]+)``", hrkernels.__doc__):
        assert importlib.util.find_spec(name) is not None, name
    assert "MegaFusion" in hrkernels.__doc__ and "planned" not in hrkernels.__doc__


# --------------------------------------------------------------------------------------------------
# Start-up: no diffusers/transformers and no third-party warnings for --help and info
# --------------------------------------------------------------------------------------------------


def test_help_and_info_import_no_diffusers_and_print_no_warnings():
    script = ("import contextlib, io, sys\n"
              "from hrkernels.cli import main\n"
              "with contextlib.redirect_stdout(io.StringIO()):\n"
              "    try:\n"
              "        main(['--help'])\n"
              "    except SystemExit:\n"
              "        pass\n"
              "    main(['info'])\n"
              "loaded = {name.split('.')[0] for name in sys.modules}\n"
              "print(sorted(loaded & {'diffusers', 'transformers'}))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            check=True, cwd=ROOT)
    assert result.stdout.strip() == "[]"
    assert result.stderr == ""


# --------------------------------------------------------------------------------------------------
# Bad devices, backends, models and output paths: one line, exit status 2, no model work
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["foo", "cuda"])
def test_an_unusable_device_is_one_line(device, tmp_path, capsys, no_model_work):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main([*GENERATE, "--out", str(tmp_path / "x.png"), "--device", device]) == 2
    one_line_error(capsys, f"--device {device!r} cannot be used here", "this machine has cpu")


def test_a_bad_backend_variable_is_one_line(monkeypatch, capsys, tmp_path, no_model_work):
    monkeypatch.setenv("HRKERNELS_BACKEND", "bogus")
    assert main(["info"]) == 2
    one_line_error(capsys, "HRKERNELS_BACKEND must be one of auto, triton, torch, cuda; got "
                           "'bogus'")
    monkeypatch.setenv("HRKERNELS_BACKEND", "cuda")
    assert main([*GENERATE, "--out", str(tmp_path / "x.png"), "--device", "cpu"]) == 2
    one_line_error(capsys, "backend 'cuda' requested, but", "use auto, triton or torch")


def test_a_backend_that_cannot_run_here_is_one_line(monkeypatch, capsys, tmp_path,
                                                    no_model_work):
    monkeypatch.setenv("HRKERNELS_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # Triton cannot run CPU tensors then
    assert main([*GENERATE, "--out", str(tmp_path / "x.png"), "--device", "cpu"]) == 2
    one_line_error(capsys, "backend 'triton' requested, but", "use auto or torch")


def test_a_model_that_cannot_be_loaded_is_one_line(monkeypatch, capsys, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for model in ("nobody/no-such-pipeline", str(tmp_path / "missing"), str(tmp_path)):
        assert main([*GENERATE, "--model", model, "--out", str(tmp_path / "x.png")]) == 2
        one_line_error(capsys, f"--model {model!r}: cannot load a diffusers pipeline",
                       "tiny-sd15")


@pytest.mark.parametrize("options, message", [
    (["--out", "{tmp}/image"], "must end in an image extension"),
    (["--out", "{tmp}/image.txt"], "must end in an image extension"),
    (["--out", "{tmp}"], "must end in an image extension"),
    (["--out", "{tmp}/folder.png"], "is a folder"),
    (["--out", "{tmp}/file/x.png"], "is a file, not a folder"),
    (["--out", "{tmp}/x.png", "--previews", "{tmp}/file"], "is a file; name a folder"),
    (["--out", "{tmp}/x.png", "--previews", "{tmp}/file/stages"], "is a file, not a folder"),
])
def test_outputs_are_checked_before_any_work(options, message, tmp_path, capsys, no_model_work):
    (tmp_path / "file").write_text("")
    (tmp_path / "folder.png").mkdir()
    assert main([*GENERATE, *[option.format(tmp=tmp_path) for option in options]]) == 2
    one_line_error(capsys, message)


# --------------------------------------------------------------------------------------------------
# hrkernels bench: where it writes, the spread, the chart
# --------------------------------------------------------------------------------------------------


def test_bench_writes_to_a_temporary_folder_by_default_and_skips_an_empty_chart(
        tmp_path, monkeypatch, capsys, recwarn):
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--family", "views", "--filter", "gather_dilated", "--providers",
                 "hrkernels"]) == 0
    printed = capsys.readouterr()
    assert not (tmp_path / "bench").exists()
    written = [Path(path) for path in printed.out.split("wrote ")[-1].strip().split(", ")]
    assert [path.name for path in written] == ["ops_cpu.json", "ops_cpu.md"]
    assert all(path.is_file() and "hrkernels-bench-" in str(path) for path in written)
    assert printed.err.count("no chart") == 1
    assert not [w for w in recwarn if "matplotlib" in str(w.filename)]


def test_a_result_whose_spread_is_too_wide_ranks_no_provider():
    def result(provider, median, minimum):
        timing = harness.Timing(median, minimum, 2 * median)
        return harness.Result("op", "shape", provider, "torch", median, minimum,
                              timing.maximum, timing.steady)

    steady, busy = result("torch", 1.0, 0.9), result("hrkernels", 8.0, 0.06)
    assert steady.steady and not busy.steady
    assert harness._ratio(steady, busy) is None
    rows = harness.format_rows([steady, busy])
    assert harness.UNSTEADY in rows[1] and "x |" not in rows[1] and "(busy)" in rows[1]
    timing = harness.time_ms(lambda: torch.ones(8).sum(), torch.device("cpu"))
    assert timing.minimum <= timing.median <= timing.maximum

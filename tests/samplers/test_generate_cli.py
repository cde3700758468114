"""``hrkernels generate`` end to end with the tiny pipelines (no download)."""

from __future__ import annotations

import argparse

import pytest
from PIL import Image

from hrkernels.cli.generate import add_arguments, run
from hrkernels.samplers import SAMPLERS


def parse(argv):
    parser = argparse.ArgumentParser(prog="hrkernels generate")
    add_arguments(parser)
    return parser.parse_args(argv)


def test_generate_tiny_sdxl_with_previews(tmp_path, capsys):
    from hrkernels.cli import main

    out, previews = tmp_path / "image.png", tmp_path / "stages"
    status = main(["generate", "--model", "tiny-sdxl", "--method", "demofusion",
                   "--prompt", "a lighthouse", "--height", "256", "--width", "192",
                   "--steps", "2", "--seed", "1", "--out", str(out), "--previews", str(previews),
                   "--device", "cpu", "--dtype", "fp32"])
    assert status == 0
    assert Image.open(out).size == (192, 256)
    # W x H, as the image's size and the progress bars.
    assert sorted(p.name for p in previews.iterdir()) == ["stage_1_96x128.png",
                                                         "stage_2_192x256.png"]
    assert Image.open(previews / "stage_1_96x128.png").size == (96, 128)
    assert "wrote" in capsys.readouterr().out


def test_generate_apt_default_size_is_twice_the_base(tmp_path):
    out = tmp_path / "apt.png"
    args = parse(["--model", "tiny-sdxl", "--method", "apt", "--prompt", "a cat", "--steps", "2",
                  "--out", str(out), "--view-batch-size", "4"])
    assert run(args) == 0
    assert Image.open(out).size == (256, 256)


def test_generate_reports_bad_sizes_and_options(tmp_path, capsys):
    args = parse(["--model", "tiny-sd15", "--method", "demofusion", "--prompt", "a cat",
                  "--height", "100", "--width", "128", "--steps", "1", "--out",
                  str(tmp_path / "x.png")])
    assert run(args) == 2
    assert "multiple of 8" in capsys.readouterr().err
    args = parse(["--model", "tiny-sd15", "--method", "demofusion", "--prompt", "a cat",
                  "--out", str(tmp_path / "x.png"), "--view-batch-size", "many"])
    assert run(args) == 2
    with pytest.raises(SystemExit):
        parse(["--model", "tiny-sd15", "--method", "nope", "--prompt", "a", "--out", "x.png"])
    assert {"demofusion", "apt"} <= set(SAMPLERS)
    capsys.readouterr()
    # A scheduler asked for by name is explicit: one that would drop the skip residual is
    # refused, by APT too (which samples with DDIM unless told otherwise).
    for method in ("demofusion", "apt"):
        args = parse(["--model", "tiny-sd15", "--method", method, "--prompt", "a cat",
                      "--steps", "1", "--scheduler", "unipc", "--out", str(tmp_path / "x.png")])
        assert run(args) == 2
        assert "UniPCMultistepScheduler.step ignores" in capsys.readouterr().err


def test_generate_scalecrafter_with_eta_and_without_noise_damping(tmp_path, capsys):
    out = tmp_path / "sc.png"
    args = parse(["--model", "tiny-sd15", "--method", "scalecrafter", "--prompt", "a cat",
                  "--height", "256", "--width", "256", "--steps", "2", "--eta", "0.5",
                  "--no-noise-damped", "--out", str(out)])
    assert run(args) == 0
    assert Image.open(out).size == (256, 256)
    args = parse(["--model", "tiny-sd15", "--method", "demofusion", "--prompt", "a cat",
                  "--steps", "1", "--no-noise-damped", "--out", str(out)])
    assert run(args) == 2
    assert "--no-noise-damped: demofusion takes no noise_damped" in capsys.readouterr().err


def test_generate_freescale_from_an_image(tmp_path, capsys):
    source, out = tmp_path / "small.png", tmp_path / "fs.png"
    Image.new("RGB", (40, 30), (200, 30, 90)).save(source)
    args = parse(["--model", "tiny-sdxl", "--method", "freescale", "--prompt", "a cat",
                  "--steps", "2", "--fast-mode", "--alpha", "1.5", "--image", str(source),
                  "--out", str(out)])
    assert run(args) == 0
    assert Image.open(out).size == (256, 192)  # 2x the base size at the image's aspect ratio
    args = parse(["--model", "tiny-sdxl", "--method", "apt", "--prompt", "a cat", "--steps", "1",
                  "--fidelity", "0.5", "--out", str(out)])
    assert run(args) == 2
    assert "--fidelity applies to --image" in capsys.readouterr().err


def test_generate_megafusion_on_tiny_if_sd3_and_if_sr(tmp_path, capsys):
    out = tmp_path / "mf.png"
    args = parse(["--model", "tiny-if", "--method", "megafusion", "--prompt", "a cat",
                  "--height", "32", "--width", "24", "--stages", "16:2,24:1,32:1", "--mega-plus",
                  "--previews", str(tmp_path / "stages"), "--out", str(out)])
    assert run(args) == 0
    assert Image.open(out).size == (24, 32)
    assert sorted(p.name for p in (tmp_path / "stages").iterdir()) == [
        "stage_1_16x16.png", "stage_2_16x24.png", "stage_3_24x32.png"]
    args = parse(["--model", "tiny-if-sr", "--method", "megafusion", "--prompt", "a cat",
                  "--steps", "2", "--image", str(out), "--out", str(out)])
    assert run(args) == 0
    assert Image.open(out).size == (48, 64)  # 2x the base size at the 24x32 image's aspect ratio
    args = parse(["--model", "tiny-sd3", "--method", "megafusion", "--prompt", "a cat",
                  "--steps", "3", "--out", str(out)])
    assert run(args) == 0
    assert Image.open(out).size == (256, 256)
    capsys.readouterr()
    for options, message in (
            (["--stages", "128:2;256:1"], "SIZE:STEPS"),
            (["--stages", "256:1,128:2"], "ascending"),
            (["--steps", "4", "--stages", "128:2,256:1"], "sum to 3"),
            (["--mega-plus", "--model", "tiny-sd3"], "mega_plus")):
        args = parse(["--model", "tiny-sdxl", "--method", "megafusion", "--prompt", "a cat",
                      "--out", str(out), *options])
        assert run(args) == 2
        assert message in capsys.readouterr().err
    args = parse(["--model", "tiny-sdxl", "--method", "apt", "--prompt", "a cat", "--steps", "1",
                  "--stages", "128:1,256:1", "--out", str(out)])
    assert run(args) == 2
    assert "--stages: apt takes no stages" in capsys.readouterr().err


def test_generate_with_an_image_and_a_tiny_controlnet(tmp_path, capsys):
    # --image sets the default size's aspect ratio (2x the base size on the long side); --fidelity
    # reaches the sampler; --controlnet tiny turns the tiny pipeline into its ControlNet pipeline.
    source, control, out = tmp_path / "in.png", tmp_path / "edges.png", tmp_path / "out.png"
    Image.new("RGBA", (40, 20), (200, 30, 90, 128)).save(source)
    Image.new("L", (80, 40), 255).save(control)
    args = parse(["--model", "tiny-sd15", "--method", "demofusion", "--prompt", "a cat",
                  "--steps", "1", "--image", str(source), "--fidelity", "0.8",
                  "--controlnet", "tiny", "--control-image", str(control), "--out", str(out)])
    assert run(args) == 0
    assert Image.open(out).size == (128, 64)
    args = parse(["--model", "tiny-sd15", "--method", "demofusion", "--prompt", "a cat",
                  "--steps", "1", "--controlnet", "tiny", "--out", str(out)])
    assert run(args) == 2
    assert "--controlnet and --control-image go together" in capsys.readouterr().err


def test_generate_with_a_saved_controlnet(tmp_path, capsys):
    from hrkernels.testing import tiny_controlnet, tiny_pipeline

    saved, control, out = tmp_path / "controlnet", tmp_path / "edges.png", tmp_path / "out.png"
    tiny_controlnet(tiny_pipeline("sd15")).save_pretrained(saved)
    Image.new("RGB", (64, 64), (255, 255, 255)).save(control)
    args = parse(["--model", "tiny-sd15", "--method", "scalecrafter", "--prompt", "a cat",
                  "--steps", "1", "--controlnet", str(saved), "--control-image", str(control),
                  "--out", str(out)])
    assert run(args) == 0
    assert Image.open(out).size == (128, 128)
    args = parse(["--model", "tiny-sd15", "--method", "scalecrafter", "--prompt", "a cat",
                  "--steps", "1", "--controlnet", str(tmp_path / "missing"), "--control-image",
                  str(control), "--out", str(out)])
    assert run(args) == 2
    assert "--controlnet" in capsys.readouterr().err

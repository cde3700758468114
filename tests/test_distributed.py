"""hrkernels.distributed on the CPU (gloo): view-parallel DemoFusion/APT bitwise equal to one
process, CFG-parallel ScaleCrafter/FreeScale equal to it, the tiled VAE across ranks, a rank that
raises, prompt-parallel generation and resume.

One group of 2 and one of 3 processes (``torch.multiprocessing.start_processes``, forked so that
no process imports diffusers again; ``file://`` rendezvous) run every check of their size in turn.
Each rank saves what it computed; the test process computes the one-process references itself
(with the same pipelines, one thread as the ranks) and compares.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import hrkernels
from hrkernels.samplers import APT, DemoFusion, FreeScale, MegaFusion, ScaleCrafter

TIMEOUT = 30.0  # seconds a collective waits (the failing-rank check must end well before)


def _generate(sampler, height, width, steps=2, output_type="latent", **kwargs):
    return sampler(prompt="a photo of a cat", negative_prompt="blurry", height=height,
                   width=width, num_inference_steps=steps, progress=False,
                   output_type=output_type, generator=torch.Generator().manual_seed(7), **kwargs)


def _cases(world: int):
    """name -> (tiny pipeline kind, sampler factory, height, width, output type): the generations
    a group of ``world`` ranks checks, 2 steps each (the test process runs the same with
    parallel=None)."""
    cases = {
        # 256^2 SDXL: stage 2 has 9 windows + 4 dilated views = 13 views of 16x16 -> 7 calls of
        # 2 views: 4 + 3 on 2 ranks, 3 + 3 + 1 on 3. Decoded: the VAE's strips across the ranks.
        "demofusion_views": ("sdxl", lambda pipe, parallel: DemoFusion(
            pipe, view_batch_size=2, parallel=parallel), 256, 256, "pt"),
    }
    if world == 2:
        cases.update({
            "apt_views": ("sdxl", lambda pipe, parallel: APT(
                pipe, view_batch_size=3, shortcut_steps=1, parallel=parallel), 256, 192,
                "latent"),
            # SD 1.5 at 4x its base: the preset with noise-damped guidance (its base pass).
            "scalecrafter_cfg": ("sd15", lambda pipe, parallel: ScaleCrafter(
                pipe, parallel=parallel), 256, 256, "latent"),
            "freescale_cfg": ("sdxl", lambda pipe, parallel: FreeScale(
                pipe, parallel=parallel), 256, 256, "latent"),
            # 2 stages (128 -> 256) of one step each, the dilated mid block in stage 2.
            "megafusion_cfg": ("sdxl", lambda pipe, parallel: MegaFusion(
                pipe, mega_plus=True, parallel=parallel), 256, 256, "latent"),
        })
    else:
        # 3 ranks, 7 calls of 2 branches: 14 units, 5 + 5 + 4 (CFG- and view-parallel together).
        cases["demofusion_cfg"] = ("sdxl", lambda pipe, parallel: DemoFusion(
            pipe, view_batch_size=2, parallel=parallel if parallel is None else "cfg"),
            256, 256, "latent")
    return cases


def _parallel(name: str) -> str:
    return "cfg" if name.endswith("cfg") else "views"


def _run_checks(pipes, rank: int, comm) -> dict:
    results = {}
    for name, (kind, make, height, width, output_type) in _cases(comm.world_size).items():
        output = _generate(make(pipes[kind], _parallel(name)), height, width,
                           output_type=output_type)
        results[name] = {"latents": output.latents, "images": output.images,
                         "stages": [stage.latents for stage in output.stages],
                         "communication": output.communication}
    # The tiled VAE alone, strips of 4 rows: 5 to 40 strips per pass, dealt out in rounds.
    latents = torch.randn(1, 4, 20, 24, generator=torch.Generator().manual_seed(3))
    results["decode"] = hrkernels.vae.decode(pipes["sdxl"].vae, latents, tile=4, comm=comm)

    # A rank that raises mid-run: rank 1's callback at stage 2, step 1.
    def callback(stage, step, timestep, z):
        if rank == 1 and stage == 2 and step == 1:
            raise ValueError("boom on purpose")

    started = time.perf_counter()
    try:
        _generate(DemoFusion(pipes["sdxl"], view_batch_size=2, parallel="views"), 256, 256,
                  callback_on_step_end=callback)
    except Exception as error:  # noqa: BLE001 (the type is what is checked)
        results["failure"] = (type(error).__name__, str(error), time.perf_counter() - started)
    # The group still works after a reported failure.
    results["after"] = _generate(DemoFusion(pipes["sdxl"], view_batch_size=4, parallel="views"),
                                 256, 256).latents
    return results


def _worker(rank: int, world: int, init_file: str, out: str, pipes: dict) -> None:
    torch.set_num_threads(1)
    comm = hrkernels.distributed.init("gloo", init_method=f"file://{init_file}", rank=rank,
                                      world_size=world, timeout=TIMEOUT)
    results = _run_checks(pipes, rank, comm)
    path = Path(out) / f"rank{rank}.pt"

    # Last: rank 1 dies without a word (as if killed) in stage 2; the others must not hang.
    def vanish(stage, step, timestep, z):
        if rank == 1 and stage == 2:
            torch.save(results, path)
            os._exit(0)  # exit status 0: the launcher leaves the other ranks running

    started = time.perf_counter()
    try:
        _generate(DemoFusion(pipes["sdxl"], view_batch_size=2, parallel="views"), 256, 256,
                  callback_on_step_end=vanish)
    except Exception as error:  # noqa: BLE001
        results["lost"] = (type(error).__name__, str(error), time.perf_counter() - started)
    torch.save(results, path)


@pytest.fixture(scope="module")
def pipes(sd15, sdxl):
    return {"sd15": sd15, "sdxl": sdxl}


@pytest.fixture(scope="module", params=[2, 3], ids=["2 ranks", "3 ranks"])
def group(request, pipes, tmp_path_factory):
    """The checks' results of every rank of a group of 2 or 3 processes. Forked (the children
    inherit the imported modules and the tiny pipelines: no second import of diffusers); the
    process group meets through a file."""
    world = request.param
    folder = tmp_path_factory.mktemp(f"world{world}")
    mp.start_processes(_worker, args=(world, str(folder / "init"), str(folder), pipes),
                       nprocs=world, start_method="fork")
    return world, [torch.load(folder / f"rank{rank}.pt", weights_only=False)
                   for rank in range(world)]


@pytest.fixture(scope="module")
def references(pipes):
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks
    try:
        results = {}
        for world in (2, 3):
            for name, (kind, make, height, width, output_type) in _cases(world).items():
                if name not in results:
                    results[name] = _generate(make(pipes[kind], None), height, width,
                                              output_type=output_type)
        latents = torch.randn(1, 4, 20, 24, generator=torch.Generator().manual_seed(3))
        results["decode"] = hrkernels.vae.decode(pipes["sdxl"].vae, latents, tile=4)
        results["after"] = _generate(DemoFusion(pipes["sdxl"], view_batch_size=4), 256, 256)
        return results
    finally:
        torch.set_num_threads(previous)


def _max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def test_view_parallel_is_bitwise_the_one_process_run(group, references):
    world, ranks = group
    names = [name for name in _cases(world) if name.endswith("views")] + ["after"]
    for name in names:
        expected = references[name]
        for rank, results in enumerate(ranks):
            got = results[name] if name == "after" else results[name]["latents"]
            assert torch.equal(got, expected.latents), (
                f"{name}, rank {rank} of {world}: max difference "
                f"{_max_difference(got, expected.latents):.3e}")
            if name != "after":
                for actual, stage in zip(results[name]["stages"], expected.stages, strict=True):
                    assert torch.equal(actual, stage.latents), f"{name} rank {rank}"
                # The decode (strips shared across the ranks) too.
                if isinstance(expected.images, torch.Tensor) and name != "after":
                    assert torch.equal(results[name]["images"], expected.images), name


def test_cfg_parallel_equals_the_one_process_run(group, references):
    world, ranks = group
    for name in [name for name in _cases(world) if name.endswith("cfg")]:
        expected = references[name].latents
        first = ranks[0][name]["latents"]
        for results in ranks[1:]:  # every rank holds the same latent, bit for bit
            assert torch.equal(results[name]["latents"], first)
        # Branches of k rows instead of 2k: the model's kernels round differently at another
        # batch size (measured here: up to ~1e-5 after 3 steps), so equal to float32 rounding.
        print(f"{name}: max difference {_max_difference(first, expected):.3e}")
        torch.testing.assert_close(first, expected, atol=1e-4, rtol=1e-4)


def test_communication_is_recorded(group):
    world, ranks = group
    stats = ranks[0]["demofusion_views"]["communication"]
    assert stats["exchanges"] > 0 and stats["sent_bytes"] > 0
    assert stats["received_bytes"] == (world - 1) * stats["sent_bytes"]
    assert set(stats["by_kind"]) == {"model calls", "vae strips"}
    # DemoFusion 256^2, 2 steps: 2 base-stage steps + 2 upscaling steps exchange predictions.
    assert stats["by_kind"]["model calls"]["exchanges"] == 4


def test_the_tiled_vae_across_ranks_is_the_one_process_decode(group, references):
    world, ranks = group
    for results in ranks:
        assert torch.equal(results["decode"], references["decode"])


def test_a_rank_that_raises_stops_the_others_naming_it(group):
    world, ranks = group
    kind, message, seconds = ranks[1]["failure"]
    assert kind == "ValueError" and "boom on purpose" in message  # its own error
    for rank in [0] + list(range(2, world)):
        kind, message, seconds = ranks[rank]["failure"]
        assert kind == "RankFailedError", message
        assert "rank 1 failed during DemoFusion" in message and "boom on purpose" in message
        assert seconds < TIMEOUT / 2


def test_a_rank_that_vanishes_stops_the_others(group):
    world, ranks = group
    for rank in [0] + list(range(2, world)):
        kind, message, seconds = ranks[rank]["lost"]
        assert kind == "RankLostError", message
        assert f"rank {rank} lost the other ranks during DemoFusion" in message
        assert seconds < TIMEOUT / 2  # gloo sees the closed connection at once


# --------------------------------------------------------------------------------------------------
# One process
# --------------------------------------------------------------------------------------------------


def test_init_is_a_no_op_in_one_process(monkeypatch, sdxl):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert hrkernels.distributed.init() is None
    assert not torch.distributed.is_initialized()
    assert hrkernels.distributed.world_size() == 1 and hrkernels.distributed.is_main()
    sampler = DemoFusion(sdxl, parallel="views")
    assert sampler.executor is None  # the one-process path
    with pytest.raises(ValueError, match="parallel"):
        ScaleCrafter(sdxl, parallel="views")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match=r"hrkernels.distributed.init\(\)"):
        DemoFusion(sdxl, parallel="views")


def test_select_rows_cuts_every_per_row_input():
    from hrkernels.samplers.pipelines import ModelCall

    rows = torch.arange(6.0).view(6, 1, 1, 1)
    call = ModelCall(rows, torch.tensor(5.0), {"encoder_hidden_states": torch.arange(6.0)[:, None]},
                     {"time_ids": torch.arange(12.0).view(6, 2)}, "base", ("uncond", "cond"))
    cond = call.select_rows(slice(3, 6))
    assert cond.branches == ("cond",) and cond.variant == "base" and cond.timestep is call.timestep
    assert cond.sample.flatten().tolist() == [3.0, 4.0, 5.0]
    assert cond.text["encoder_hidden_states"].flatten().tolist() == [3.0, 4.0, 5.0]
    assert cond.micro["time_ids"][:, 0].tolist() == [6.0, 8.0, 10.0]
    assert call.select_rows(slice(1, 3)).branches == ()  # rows across the branch blocks


def test_auto_view_batches_balance_the_ranks(sdxl):
    from hrkernels.samplers.engine import CFG, Engine, choose_view_batch
    from hrkernels.samplers.pipelines import adapter_for

    # 4096^2 SDXL: 13, 34, 65 views per step; 4 ranks share batches of 9 (2, 4, 8 calls) evenly.
    assert choose_view_batch([13, 34, 65], 16) == 13
    assert choose_view_batch([13, 34, 65], 16, concurrency=4) == 9

    class FourRanks:
        concurrency = 4.0

    adapter = adapter_for(sdxl, "test")
    cond = adapter.encode_prompts(guided=True, size=(256, 256), num_images_per_prompt=1,
                                  prompt="a cat", negative_prompt="blurry")
    counts = {(16, 16): [13, 34, 65]}
    # "auto" on a CPU: at most 8 views. One process: k = 7 (2 + 5 + 10 calls of 8 view-costs,
    # 136); 4 ranks: k = 6 (3, 6, 11 calls: 1 + 2 + 3 rounds of 7, 42; k = 5 ties, the larger wins).
    assert Engine(adapter, cond, FourRanks()).plan(counts, "auto", CFG(5.0)) == {(16, 16): 6}
    assert Engine(adapter, cond).plan(counts, "auto", CFG(5.0)) == {(16, 16): 7}
    # An int gives the batches of one process (bitwise comparable runs).
    assert Engine(adapter, cond, FourRanks()).plan(counts, 16, CFG(5.0)) == {(16, 16): 13}


def test_prompt_parallel_writes_each_image_once_and_resumes(tmp_path, monkeypatch):
    from hrkernels.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\n" + json.dumps({"prompt": "a dog", "seed": 3}) + "\na bird\n"
                       + json.dumps({"prompt": "a fish", "height": 128, "width": 192}) + "\n")
    out = tmp_path / "out"
    arguments = ["generate", "--model", "tiny-sdxl", "--method", "demofusion", "--prompts",
                 str(prompts), "--out-dir", str(out), "--steps", "1", "--height", "128",
                 "--width", "128", "--device", "cpu"]
    written = {}
    for rank in (0, 1):  # the two ranks of a torchrun job, one after the other
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert main(arguments) == 0
        for path in out.iterdir():
            written.setdefault(path.name, path.stat().st_mtime_ns)
    assert sorted(written) == ["line1.png", "line3.png", "line4.png", "line5.png"]
    from PIL import Image

    assert Image.open(out / "line5.png").size == (192, 128)
    # A rerun writes nothing; a lost image is made again, only it.
    (out / "line3.png").unlink()
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        assert main(arguments) == 0
    for name, stamp in written.items():
        if name != "line3.png":
            assert (out / name).stat().st_mtime_ns == stamp, name
    assert (out / "line3.png").exists()


def test_prompt_file_errors_name_the_line(tmp_path, capsys):
    from hrkernels.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n{\"prompt\": \"a dog\", \"seed\": \"x\"}\n")
    code = main(["generate", "--model", "tiny-sdxl", "--method", "demofusion", "--prompts",
                 str(prompts), "--out-dir", str(tmp_path / "out")])
    assert code == 2
    assert f"{prompts}:2" in capsys.readouterr().err

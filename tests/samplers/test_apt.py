"""APT end to end on tiny SD 1.5 / SDXL pipelines (CPU), and its pieces: statistical matching,
scale-aware schedules, default etas, the shortcut."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from hrkernels.samplers import APT, DemoFusion
from hrkernels.schedules import scale_aware_betas
from hrkernels.testing import tiny_pipeline


def generate(sampler, height, width, seed=0, steps=4, **kwargs):
    kwargs.setdefault("output_type", "latent")
    return sampler(prompt="a photo of a cat", height=height, width=width,
                   num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                   progress=False, **kwargs)


@pytest.mark.parametrize("kind", ["sdxl", "sd15"])
@pytest.mark.parametrize("size", ["2x", "3x", "non-square"])
def test_stages_and_shortcut(kind, size, request, sizes):
    pipe = request.getfixturevalue(kind)
    height, width = sizes[kind][size]
    steps_seen = []
    out = generate(APT(pipe, shortcut_steps=2, view_batch_size=64), height, width, steps=4,
                   output_type="pt",
                   callback_on_step_end=lambda stage, step, t, z: steps_seen.append((stage, t)))
    count = len(out.stages)
    assert count == (3 if size == "3x" else 2)
    assert (out.stages[-1].height, out.stages[-1].width) == (height, width)
    assert out.images.shape == (1, 3, height, width)
    assert all(torch.isfinite(stage.latents).all() for stage in out.stages)
    # DDIM, 4 steps at stage 1; the last 2 of the same 4 timesteps at every later stage.
    timesteps = DDIMScheduler.from_config(pipe.scheduler.config)
    timesteps.set_timesteps(4)
    expected = timesteps.timesteps.tolist()
    for stage in range(1, count + 1):
        seen = [t for s, t in steps_seen if s == stage]
        assert seen == (expected if stage == 1 else expected[2:])


def test_shortcut_none_runs_every_step_and_uses_ddim(sdxl):
    # The tiny SDXL pipeline carries Euler; APT samples with DDIM regardless.
    out = generate(APT(sdxl, shortcut_steps=None, view_batch_size=16), 256, 256, steps=3)
    assert out.unet_calls == {(2, 16, 16): 3, (26, 16, 16): 3}
    out = generate(APT(sdxl, shortcut_steps=30, view_batch_size=16), 256, 256, steps=3)
    assert out.unet_calls == {(2, 16, 16): 3, (26, 16, 16): 3}  # T0 >= steps: nothing skipped
    out = generate(APT(sdxl, shortcut_steps=1, view_batch_size=16), 256, 256, steps=3)
    assert out.unet_calls == {(2, 16, 16): 3, (26, 16, 16): 1}


def test_deterministic_bitwise(sdxl):
    sampler = APT(sdxl, shortcut_steps=2)
    first, second = generate(sampler, 256, 192, seed=5), generate(sampler, 256, 192, seed=5)
    for a, b in zip(first.stages, second.stages, strict=True):
        assert torch.equal(a.latents, b.latents)
    assert not torch.equal(first.latents, generate(sampler, 256, 192, seed=6).latents)


def test_stage_one_is_plain_ddim_and_apt_differs_from_demofusion(sdxl):
    ddim = tiny_pipeline("sdxl", scheduler="ddim")
    apt = generate(APT(ddim, shortcut_steps=None), 256, 256, steps=3)
    demofusion = generate(DemoFusion(ddim), 256, 256, steps=3)
    # Same stage 1 (same DDIM sampling, same noise), different stage 2 (matching, eta schedule).
    assert torch.equal(apt.stages[0].latents, demofusion.stages[0].latents)
    assert not torch.allclose(apt.latents, demofusion.latents)


def test_statistical_matching_of_sizes_that_do_not_divide(sdxl):
    # 34 rows with factor 2 (34 / 16 -> 2): padded by replication, matched, cropped.
    generator = torch.Generator().manual_seed(2)
    reference = torch.randn(1, 4, 16, 16, generator=generator)
    upsampled = torch.randn(1, 4, 34, 32, generator=generator) * 2 + 1
    matched = APT(sdxl).prepare_stage_latent(upsampled, 2, reference)
    assert matched.shape == upsampled.shape
    for i in range(2):
        for j in range(2):
            lattice = matched[:, :, i::2, j::2]
            torch.testing.assert_close(lattice.mean(), reference.mean(), atol=0.05, rtol=0)
            torch.testing.assert_close(lattice.std(), reference.std(), atol=0, rtol=0.05)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("size, factor", [((32, 32), (2, 2)), ((48, 48), (3, 3)),
                                          ((32, 24), (2, 2)), ((32, 16), (2, 1))])
def test_statistical_matching_gives_every_sublattice_the_reference_stats(sdxl, per_channel, size,
                                                                         factor):
    generator = torch.Generator().manual_seed(1)
    reference = torch.randn(2, 4, 16, 12, generator=generator) * 0.7 + 0.2
    upsampled = torch.randn(2, 4, *size, generator=generator) * 1.9 - 0.5
    matched = APT(sdxl, per_channel=per_channel).prepare_stage_latent(upsampled, 2, reference)
    assert matched.shape == upsampled.shape
    ref = reference.flatten(2) if per_channel else reference.flatten(1)
    for i in range(factor[0]):
        for j in range(factor[1]):
            lattice = matched[:, :, i::factor[0], j::factor[1]]
            flat = lattice.flatten(2) if per_channel else lattice.flatten(1)
            torch.testing.assert_close(flat.mean(dim=-1), ref.mean(dim=-1), atol=1e-5, rtol=0)
            torch.testing.assert_close(flat.std(dim=-1), ref.std(dim=-1), atol=1e-5, rtol=1e-5)


def test_default_etas_by_upscale_factor(sdxl):
    apt = APT(sdxl)
    sizes_4x = [(128, 128), (256, 256), (384, 384), (512, 512)]
    assert [apt.stage_eta(s, sizes_4x) for s in (2, 3, 4)] == [2.0, 3.0, 3.5]
    assert APT(sdxl, scale_aware_eta=2.5).stage_eta(3, sizes_4x) == 2.5
    assert APT(sdxl, scale_aware_eta=[1.0, 2.0, 3.0]).stage_eta(4, sizes_4x) == 3.0
    with pytest.warns(FutureWarning, match="scale_aware_eta"):
        assert APT(sdxl, eta=2.5).stage_eta(3, sizes_4x) == 2.5


def test_local_path_uses_the_scale_aware_schedule(sdxl, monkeypatch):
    # Record the betas of every DDIM scheduler APT steps with; stage 2 of a 2x run steps one with
    # the original table (global path) and one with eta_2 = 2 (local path).
    stepped = set()
    original = DDIMScheduler.step

    def spy(self, *args, **kwargs):
        stepped.add(tuple(self.betas[::111].tolist()))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DDIMScheduler, "step", spy)
    generate(APT(sdxl), 256, 256, steps=2)
    config = sdxl.scheduler.config
    for eta in (0.5, 2.0):
        betas = scale_aware_betas(config.beta_start, config.beta_end, eta)
        assert tuple(betas[::111].tolist()) in stepped
    assert len(stepped) == 2


def test_stage_schedule_shortcut_and_eta_noising(sdxl):
    # Stage 2 of a 2x run, 5 steps, shortcut 3: the last 3 DDIM timesteps; z'_t is noised with the
    # eta_2 = 2 table: add_noise(z0, noise, t) = sqrt(abar_t) z0 + sqrt(1 - abar_t) noise.
    schedule = APT(sdxl, shortcut_steps=3).schedule_for(2, [(128, 128), (256, 256)], 5,
                                                        torch.device("cpu"))
    ddim = DDIMScheduler.from_config(sdxl.scheduler.config)
    ddim.set_timesteps(5)
    timesteps = ddim.timesteps[2:]
    assert [int(t) for t in schedule.timesteps] == timesteps.tolist()
    config = sdxl.scheduler.config
    abar = torch.cumprod(1 - scale_aware_betas(config.beta_start, config.beta_end, 2.0), 0)
    assert schedule.noise_scale == pytest.approx(abar[timesteps].sqrt().tolist(), rel=1e-6)
    assert schedule.noise_sigma == pytest.approx((1 - abar[timesteps]).sqrt().tolist(), rel=1e-6)
    assert torch.equal(schedule.schedulers["main"].betas, ddim.betas)


def test_bad_input(sdxl):
    with pytest.raises(TypeError, match="StableDiffusionXLPipeline"):
        APT("not a pipeline")
    with pytest.raises(ValueError, match="scale_aware_eta"):
        APT(sdxl, scale_aware_eta=0)
    with pytest.raises(ValueError, match=r"scale_aware_eta\[1\]"):
        APT(sdxl, scale_aware_eta=[2.0, -1.0])
    with pytest.raises(TypeError, match="scale_aware_eta"):
        APT(sdxl, scale_aware_eta="2")
    with pytest.raises(ValueError, match="shortcut_steps"):
        APT(sdxl, shortcut_steps=0)
    with pytest.raises(TypeError, match="per_channel"):
        APT(sdxl, per_channel="yes")
    with pytest.raises(ValueError, match="2 stages"):
        generate(APT(sdxl, scale_aware_eta=[2.0, 3.0]), 256, 256)
    with pytest.raises(ValueError, match="eta = 0"):
        generate(APT(sdxl), 256, 256, step_options={"eta": 0.5})
    with pytest.raises(ValueError, match="multiple of 8"):
        generate(APT(sdxl), 256, 250)

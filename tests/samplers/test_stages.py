"""The stage loop: schedules over a range of steps, the skip residual, set_step when patched."""

from __future__ import annotations

import copy

import pytest
import torch

import hrkernels
from hrkernels.samplers import APT, DemoFusion
from hrkernels.samplers import stages as stages_module
from hrkernels.samplers.stages import SkipResidual, stage_schedule
from hrkernels.schedules import cosine_decay
from hrkernels.testing import tiny_pipeline


def test_stage_schedule_runs_a_range_of_steps():
    template = tiny_pipeline("sdxl", scheduler="ddim").scheduler
    full = stage_schedule(template, 10, torch.device("cpu"))
    part = stage_schedule(template, 10, torch.device("cpu"), start=4, end=7, noised=True)
    assert list(part.indices) == [4, 5, 6] and len(part) == 3
    assert [int(t) for t in part.timesteps] == [int(t) for t in full.timesteps[4:7]]
    assert torch.equal(part.device_timesteps, full.device_timesteps[4:7])
    assert part.c == [cosine_decay(float(t), 1000) for t in part.timesteps]
    abar = part.scheduler.alphas_cumprod
    for step, t in enumerate(part.timesteps):
        assert part.noise_scale[step] == pytest.approx(float(abar[int(t)].sqrt()), rel=1e-6)
        assert part.noise_sigma[step] == pytest.approx(float((1 - abar[int(t)]).sqrt()),
                                                       rel=1e-6)
    assert full.noise_scale == [] and full.noise_sigma == []


def test_skip_residual_formula():
    template = tiny_pipeline("sdxl", scheduler="ddim").scheduler
    schedule = stage_schedule(template, 5, torch.device("cpu"), noised=True)
    generator = torch.Generator().manual_seed(0)
    z0, noise, z = (torch.randn(1, 4, 8, 8, generator=generator) for _ in range(3))
    skip = SkipResidual(z0, noise, 3.0)
    noised = z0 * schedule.noise_scale[2] + noise * schedule.noise_sigma[2]
    c1 = schedule.c[2] ** 3
    torch.testing.assert_close(skip(schedule, 2, z.clone()), c1 * noised + (1 - c1) * z)
    torch.testing.assert_close(skip(schedule, 0, None),
                               z0 * schedule.noise_scale[0] + noise * schedule.noise_sigma[0])


@pytest.mark.parametrize("sampler", ["demofusion", "apt"])
def test_set_step_is_called_every_step_with_the_global_index(sampler, monkeypatch):
    # A patched UNet hears every step of every stage, with the step's index in the full timestep
    # sequence (APT's stage 2 starts at index 4 of 6 with shortcut_steps=2).
    pipe = tiny_pipeline("sdxl")
    pipe.unet = copy.deepcopy(pipe.unet)
    hrkernels.patch(pipe.unet, hrkernels.ReDilation({"mid_block": 2}, until_step=3))
    seen = []
    original = stages_module.set_step

    def spy(unet, index, timestep=None):
        seen.append(index)
        return original(unet, index, timestep)

    monkeypatch.setattr(stages_module, "set_step", spy)
    instance = (APT(pipe, shortcut_steps=2, view_batch_size=16) if sampler == "apt"
                else DemoFusion(pipe, view_batch_size=16))
    instance(prompt="a cat", height=256, width=256, num_inference_steps=6, output_type="latent",
             progress=False, generator=torch.Generator().manual_seed(0))
    expected_stage_two = [4, 5] if sampler == "apt" else list(range(6))
    assert seen == list(range(6)) + expected_stage_two
    assert hrkernels.is_patched(pipe.unet)  # the sampler leaves the patch as it found it
    hrkernels.unpatch(pipe.unet)


def test_an_unpatched_unet_is_not_told_anything(sdxl, monkeypatch):
    monkeypatch.setattr(stages_module, "set_step", lambda *args: pytest.fail("set_step called"))
    DemoFusion(sdxl, view_batch_size=16)(
        prompt="a cat", height=256, width=256, num_inference_steps=1, output_type="latent",
        progress=False, generator=torch.Generator().manual_seed(0))


def test_stage_schedule_refuses_an_empty_range():
    template = tiny_pipeline("sdxl", scheduler="ddim").scheduler
    with pytest.raises(ValueError, match="start"):
        stage_schedule(template, 5, torch.device("cpu"), start=5)
    with pytest.raises(ValueError, match="end"):
        stage_schedule(template, 5, torch.device("cpu"), start=2, end=2)


def test_skip_residual_with_a_map_of_exponents():
    # FreeScale's region-wise detail control: c1 = c(t) ** alpha per position.
    template = tiny_pipeline("sdxl", scheduler="ddim").scheduler
    schedule = stage_schedule(template, 5, torch.device("cpu"), noised=True)
    generator = torch.Generator().manual_seed(1)
    z0, noise, z = (torch.randn(1, 4, 4, 4, generator=generator) for _ in range(3))
    alpha = torch.linspace(1.0, 3.0, 16).view(1, 1, 4, 4)
    out = SkipResidual(z0, noise, alpha)(schedule, 3, z.clone())
    noised = z0 * schedule.noise_scale[3] + noise * schedule.noise_sigma[3]
    c1 = torch.tensor(schedule.c[3]) ** alpha
    torch.testing.assert_close(out, c1 * noised + (1 - c1) * z)
    # A constant map equals the number.
    constant = SkipResidual(z0, noise, torch.full((1, 1, 1, 1), 2.0))(schedule, 3, z.clone())
    torch.testing.assert_close(constant, SkipResidual(z0, noise, 2.0)(schedule, 3, z.clone()))


@pytest.mark.parametrize("fail", [False, True])
def test_a_patched_unet_is_left_at_its_step_and_configuration(fail):
    pipe = tiny_pipeline("sdxl")
    pipe.unet = copy.deepcopy(pipe.unet)
    hrkernels.patch(pipe.unet, hrkernels.ReDilation({"mid_block": 2}, until_step=3))
    hrkernels.set_step(pipe.unet, 7, 123)

    def callback(stage, step, timestep, latents):
        if fail and stage == 2:
            raise RuntimeError("stop")

    sampler = DemoFusion(pipe, view_batch_size=16)
    call = dict(prompt="a cat", height=256, width=256, num_inference_steps=4,
                output_type="latent", progress=False, callback_on_step_end=callback,
                generator=torch.Generator().manual_seed(0))
    if fail:
        with pytest.raises(RuntimeError, match="stop"):
            sampler(**call)
    else:
        sampler(**call)
    state = hrkernels.patching.patch_state(pipe.unet)
    assert (state.step_index, state.timestep, state.active_variant) == (7, 123, "default")

"""The samplers' scheduler handling: clip_sample, noising by step index, step options, and the
schedulers that keep (or drop) a skip residual."""

from __future__ import annotations

import functools

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

from hrkernels.samplers import APT, DemoFusion
from hrkernels.samplers.schedulers import (
    check_step_options,
    fresh_scheduler,
    keeps_sample,
    noising_coefficients,
    requested_scheduler,
    sampling_scheduler_class,
)
from hrkernels.testing import tiny_pipeline

# An SDXL scheduler made by hand, as users do: no clip_sample / set_alpha_to_one in its config.
BARE_EULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
              "steps_offset": 1}


def test_a_ddim_built_from_a_config_without_clip_sample_never_clips():
    template = EulerDiscreteScheduler(**BARE_EULER)
    assert "clip_sample" not in template.config
    ddim = fresh_scheduler(template, 10, scheduler_class=DDIMScheduler)
    assert ddim.config.clip_sample is False
    assert ddim.config.set_alpha_to_one is False
    # An x0 prediction far outside [-1, 1] goes through unclipped.
    sample = torch.full((1, 4, 2, 2), 30.0)
    clipped = DDIMScheduler.from_config(template.config)
    clipped.set_timesteps(10)
    t = ddim.timesteps[5]
    ours = ddim.step(torch.zeros_like(sample), t, sample, return_dict=False)[0]
    theirs = clipped.step(torch.zeros_like(sample), t, sample, return_dict=False)[0]
    assert clipped.config.clip_sample is True and not torch.allclose(ours, theirs)


def test_apt_on_a_bare_euler_config_steps_an_unclipped_ddim(monkeypatch):
    pipe = tiny_pipeline("sdxl")
    pipe.scheduler = EulerDiscreteScheduler(**BARE_EULER)
    configs = []
    original = DDIMScheduler.step

    def spy(self, *args, **kwargs):
        configs.append((self.config.clip_sample, self.config.set_alpha_to_one))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DDIMScheduler, "step", spy)
    APT(pipe, view_batch_size=16, shortcut_steps=None)(
        prompt="a cat", height=256, width=256, num_inference_steps=2, output_type="latent",
        progress=False, generator=torch.Generator().manual_seed(0))
    assert configs and set(configs) == {(False, False)}


def test_noising_coefficients_are_looked_up_by_step_not_by_timestep():
    # DPM-Solver++ with Karras sigmas at 50 steps repeats timesteps (t = 1 several times) with
    # different noise levels; each step must get its own.
    template = DPMSolverMultistepScheduler.from_config(
        tiny_pipeline("sdxl").scheduler.config, use_karras_sigmas=True)
    scheduler = fresh_scheduler(template, 50)
    timesteps = scheduler.timesteps.tolist()
    repeated = [i for i in range(50) if timesteps.count(timesteps[i]) > 1]
    assert len(repeated) >= 2
    scale, sigma = noising_coefficients(template, 50, range(50))
    for i in range(50):
        alpha_t, sigma_t = scheduler._sigma_to_alpha_sigma_t(scheduler.sigmas[i])
        assert scale[i] == pytest.approx(float(alpha_t), rel=1e-6)
        assert sigma[i] == pytest.approx(float(sigma_t), rel=1e-6)
    assert len({sigma[i] for i in repeated}) == len(repeated)  # same t, different noise levels


@pytest.mark.parametrize("cls, keeps", [
    (DDIMScheduler, True), (DDPMScheduler, True), (EulerDiscreteScheduler, True),
    (EulerAncestralDiscreteScheduler, True), (LMSDiscreteScheduler, True),
    (DEISMultistepScheduler, True), (DPMSolverMultistepScheduler, True),
    (DPMSolverSinglestepScheduler, False), (UniPCMultistepScheduler, False),
    (PNDMScheduler, False), (HeunDiscreteScheduler, False),
])
def test_which_schedulers_keep_the_sample(cls, keeps):
    config = tiny_pipeline("sdxl").scheduler.config
    assert keeps_sample(cls, config) is keeps


def test_sampling_scheduler_class_substitutes_or_refuses():
    pndm = tiny_pipeline("sd15").scheduler
    assert sampling_scheduler_class(pndm, None, needs_sample=False, sampler="S") == (
        PNDMScheduler, None)
    # A method's default that drops the sample is replaced too (the user asked for nothing).
    assert sampling_scheduler_class(pndm, None, needs_sample=True, sampler="S",
                                    default=UniPCMultistepScheduler)[0] is DDIMScheduler
    cls, reason = sampling_scheduler_class(pndm, None, needs_sample=True, sampler="S")
    assert cls is DDIMScheduler and "PNDMScheduler.step ignores" in reason
    assert sampling_scheduler_class(pndm, EulerDiscreteScheduler, needs_sample=True,
                                    sampler="S") == (EulerDiscreteScheduler, None)
    with pytest.raises(ValueError, match="UniPCMultistepScheduler.step ignores"):
        sampling_scheduler_class(pndm, UniPCMultistepScheduler, needs_sample=True, sampler="S")
    with pytest.raises(TypeError, match="scheduler"):
        requested_scheduler(3, "S")
    assert requested_scheduler(pndm, "S") == (PNDMScheduler, pndm)
    assert requested_scheduler(DDIMScheduler, "S") == (DDIMScheduler, None)


def test_step_options_are_checked_against_the_step():
    assert check_step_options(DDIMScheduler, {"eta": 0.5}, "S") == {"eta": 0.5}
    assert check_step_options(EulerDiscreteScheduler, None, "S") == {}
    with pytest.raises(ValueError, match=r"\['churn'\].*takes \['s_churn', 's_noise'"):
        check_step_options(EulerDiscreteScheduler, {"churn": 1.0}, "S")
    with pytest.raises(TypeError, match="step_options"):
        check_step_options(DDIMScheduler, [("eta", 0.5)], "S")


@pytest.mark.parametrize("scheduler, options", [("ddim", {"eta": 0.7}),
                                                ("euler", {"s_churn": 2.0})])
def test_step_options_reach_every_step(scheduler, options, monkeypatch):
    pipe = tiny_pipeline("sdxl", scheduler=scheduler)
    cls = type(pipe.scheduler)
    assert keeps_sample(cls, pipe.scheduler.config)  # measured (and cached) before the spy
    seen = []
    original = cls.step

    @functools.wraps(original)
    def spy(self, *args, **kwargs):
        seen.append({key: kwargs.get(key) for key in options})
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, "step", spy)

    def run(step_options):
        return DemoFusion(pipe, view_batch_size=16)(
            prompt="a cat", height=256, width=256, num_inference_steps=3, output_type="latent",
            progress=False, generator=torch.Generator().manual_seed(0),
            step_options=step_options).latents

    stochastic = run(options)
    assert seen and all(kwargs == options for kwargs in seen)
    # The stochastic step draws from the call's generator: reproducible, and different from the
    # deterministic run.
    assert torch.equal(stochastic, run(options))
    assert not torch.equal(stochastic, run(None))


def test_a_scheduler_instance_is_built_from_its_own_config(monkeypatch):
    pipe = tiny_pipeline("sdxl")
    karras = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True)
    assert keeps_sample(DPMSolverMultistepScheduler, karras.config)
    seen = set()
    original = DPMSolverMultistepScheduler.step

    @functools.wraps(original)
    def spy(self, *args, **kwargs):
        seen.add(self.config.use_karras_sigmas)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DPMSolverMultistepScheduler, "step", spy)
    DemoFusion(pipe, view_batch_size=16, scheduler=karras)(
        prompt="a cat", height=256, width=256, num_inference_steps=2, output_type="latent",
        progress=False, generator=torch.Generator().manual_seed(0))
    assert seen == {True}

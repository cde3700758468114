"""Bad and edge input to the samplers, as a new user meets it (issue 20): every check raises
TypeError/ValueError naming the argument before any model work; huge sizes fail at once with the
plan's numbers; the user's scheduler choice is never ignored."""

from __future__ import annotations

import math
import time

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    PNDMScheduler,
)

from hrkernels import MemoryPlanError
from hrkernels.samplers import (
    APT,
    DemoFusion,
    FreeScale,
    MegaFusion,
    NonFiniteLatentsError,
    ScaleCrafter,
)
from hrkernels.samplers import stages as stages_module
from hrkernels.schedules import scale_aware_betas

FAST = {"num_inference_steps": 1, "progress": False, "output_type": "latent"}


@pytest.fixture
def no_encoding(sdxl, monkeypatch):
    """The checks must come before any model work: encoding the prompt fails the test."""
    def encode_prompt(*args, **kwargs):
        raise AssertionError("the prompt was encoded before the arguments were checked")

    monkeypatch.setattr(sdxl, "encode_prompt", encode_prompt)
    return sdxl


def embeds(batch=1, length=77, width=64):
    return torch.zeros(batch, length, width)


POOLED = torch.zeros(1, 32)  # the tiny SDXL's text_embeds width
PROMPT_CASES = {
    "prompt an int": ({"prompt": 123}, TypeError, "prompt must be"),
    "prompt an empty list": ({"prompt": []}, ValueError, "prompt must be"),
    "prompt a list with a non-string": ({"prompt": ["a", 1]}, TypeError, "prompt must be"),
    "negative_prompt an int": ({"prompt": "a", "negative_prompt": 5}, TypeError,
                               "negative_prompt must be"),
    "prompt batches differ": ({"prompt": ["a", "b"], "negative_prompt": ["c"]}, ValueError,
                              "negative_prompt 1"),
    "prompt_embeds a string": ({"prompt_embeds": "a", "pooled_prompt_embeds": POOLED},
                               TypeError, "prompt_embeds must be a tensor"),
    "prompt_embeds of rank 2": ({"prompt_embeds": torch.zeros(77, 64),
                                 "pooled_prompt_embeds": POOLED}, ValueError,
                                r"prompt_embeds must be a tensor \[B, L, D\] with D = 64"),
    "prompt_embeds of the wrong width": ({"prompt_embeds": embeds(width=5),
                                          "pooled_prompt_embeds": POOLED}, ValueError,
                                         "prompt_embeds .* got shape \\[1, 77, 5\\]"),
    "prompt_embeds of another batch": ({"prompt_embeds": embeds(batch=2),
                                        "pooled_prompt_embeds": POOLED}, ValueError,
                                       "prompt_embeds 2, pooled_prompt_embeds 1"),
    "pooled_prompt_embeds of the wrong size": ({"prompt_embeds": embeds(),
                                                "pooled_prompt_embeds": torch.zeros(1, 7)},
                                               ValueError, "pooled_prompt_embeds .* P = 32"),
    "negative embeds of another length": ({"prompt_embeds": embeds(),
                                           "pooled_prompt_embeds": POOLED,
                                           "negative_prompt_embeds": embeds(length=70),
                                           "negative_pooled_prompt_embeds": POOLED},
                                          ValueError, "negative_prompt_embeds must have"),
    "negative embeds of another batch": ({"prompt_embeds": embeds(),
                                          "pooled_prompt_embeds": POOLED,
                                          "negative_prompt_embeds": embeds(batch=2),
                                          "negative_pooled_prompt_embeds": torch.zeros(2, 32)},
                                         ValueError, "negative_prompt_embeds 2"),
}


@pytest.mark.parametrize("case", PROMPT_CASES)
def test_prompt_arguments_are_checked_before_encoding(no_encoding, case):
    arguments, error, message = PROMPT_CASES[case]
    with pytest.raises(error, match=message):
        DemoFusion(no_encoding)(height=256, width=256, **arguments, **FAST)


def test_sd15_embeddings_are_checked_against_its_text_width(sd15):
    with pytest.raises(ValueError, match="D = 32"):
        ScaleCrafter(sd15)(prompt_embeds=embeds(width=64), height=128, width=128, **FAST)


CALL_CASES = {
    "guidance_scale nan": ({"guidance_scale": math.nan}, ValueError, "guidance_scale"),
    "guidance_scale inf": ({"guidance_scale": math.inf}, ValueError, "guidance_scale"),
    "callback not callable": ({"callback_on_step_end": 3}, TypeError, "callback_on_step_end"),
}


@pytest.mark.parametrize("case", CALL_CASES)
def test_call_options_are_checked_before_any_work(no_encoding, case):
    arguments, error, message = CALL_CASES[case]
    with pytest.raises(error, match=message):
        DemoFusion(no_encoding)(prompt="a", height=256, width=256, **arguments, **FAST)


METHOD_CASES = {
    "cosine_scales None": (DemoFusion, {"cosine_scales": None}, TypeError, "cosine_scales"),
    "sigma inf": (DemoFusion, {"sigma": math.inf}, ValueError, "sigma"),
    "APT eta inf": (APT, {"scale_aware_eta": math.inf}, ValueError, "scale_aware_eta"),
    "APT eta 1e-9": (APT, {"scale_aware_eta": 1e-9}, ValueError,
                     "scale_aware_eta: eta=1e-09 gives a beta table"),
    "APT eta per stage": (APT, {"scale_aware_eta": [2.0, 40.0]}, ValueError, "scale_aware_eta"),
}


@pytest.mark.parametrize("case", METHOD_CASES)
def test_method_options_are_checked_by_the_constructor(sdxl, case):
    sampler, arguments, error, message = METHOD_CASES[case]
    with pytest.raises(error, match=message):
        sampler(sdxl, **arguments)


def test_scale_aware_betas_refuse_an_eta_float32_cannot_hold():
    for eta in (1e-9, 40.0):
        with pytest.raises(ValueError, match=f"eta={eta!r}"):
            scale_aware_betas(0.00085, 0.012, eta)
    assert torch.isfinite(scale_aware_betas(0.00085, 0.012, 3.5)).all()


@pytest.mark.parametrize("sampler", [DemoFusion, ScaleCrafter])
def test_a_scheduler_without_add_noise_names_the_supported_ones(no_encoding, sampler):
    with pytest.raises(TypeError, match="FlowMatchEulerDiscreteScheduler is not a noise-prediction "
                                        "scheduler .*add_noise.*use one of DDIMScheduler"):
        sampler(no_encoding, scheduler=FlowMatchEulerDiscreteScheduler)(
            prompt="a", height=256, width=256, **FAST)


def test_the_pipelines_own_flow_matching_scheduler_is_refused(no_encoding, monkeypatch):
    monkeypatch.setattr(no_encoding, "scheduler", FlowMatchEulerDiscreteScheduler())
    with pytest.raises(TypeError, match="the pipeline's scheduler FlowMatchEulerDiscreteScheduler"):
        DemoFusion(no_encoding)(prompt="a", height=256, width=256, **FAST)


def test_nonfinite_latents_blame_fp16_only_for_an_fp16_model(sd15):
    def poison(stage, step, timestep, latents):
        return torch.full_like(latents, math.nan)

    with pytest.raises(NonFiniteLatentsError, match="stage 1, step 0") as caught:
        DemoFusion(sd15, scheduler=DDIMScheduler)(prompt="a", height=64, width=64,
                                                  callback_on_step_end=poison, **FAST)
    assert "fp16" not in str(caught.value) and "callback" in str(caught.value)
    assert "fp16 UNet" in str(NonFiniteLatentsError("APT", 2, 0, 1, torch.float16))


# --------------------------------------------------------------------------------------------------
# APT's scheduler: DDIM by default (the paper's), the user's when given
# --------------------------------------------------------------------------------------------------


def test_apt_builds_both_schedulers_from_the_one_asked_for(sdxl):
    sizes = [(128, 128), (256, 256)]
    default = APT(sdxl).schedule_for(2, sizes, 4, torch.device("cpu"))
    assert {type(s) for s in default.schedulers.values()} == {DDIMScheduler}
    sampler = APT(sdxl, scheduler=EulerDiscreteScheduler)
    schedule = sampler.schedule_for(2, sizes, 4, torch.device("cpu"))
    assert {type(s) for s in schedule.schedulers.values()} == {EulerDiscreteScheduler}
    expected = sampler.scale_aware_betas(sampler.stage_eta(2, sizes))
    assert schedule.schedulers["local"].betas.tolist() == expected


def test_apt_refuses_a_scheduler_that_drops_the_sample_or_stochastic_steps(no_encoding):
    with pytest.raises(ValueError, match="PNDMScheduler.step ignores"):
        APT(no_encoding, scheduler=PNDMScheduler)(prompt="a", height=256, width=256, **FAST)
    with pytest.raises(ValueError, match="s_churn=1.0 is not supported"):
        APT(no_encoding, scheduler=EulerDiscreteScheduler)(
            prompt="a", height=256, width=256, step_options={"s_churn": 1.0}, **FAST)


def test_generate_apt_passes_the_scheduler(tmp_path):
    from hrkernels.cli import build_parser
    from hrkernels.cli.generate import _sampler_options

    args = build_parser(["generate"]).parse_args([
        "generate", "--model", "tiny-sdxl", "--method", "apt", "--prompt", "a", "--scheduler",
        "euler", "--out", str(tmp_path / "x.png")])
    assert _sampler_options(args, APT)["scheduler"] is EulerDiscreteScheduler


# --------------------------------------------------------------------------------------------------
# Planning: closed-form counts, huge sizes fail at once, extreme aspect ratios warn
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", [DemoFusion, APT, ScaleCrafter, FreeScale, MegaFusion])
@pytest.mark.parametrize("max_memory", [None, 16 * 2**30])
def test_a_huge_size_fails_at_once_with_the_plans_numbers(no_encoding, sampler, max_memory):
    started = time.perf_counter()
    with pytest.raises(MemoryPlanError, match=r"100000x100000 \(W x H\), batch 1: phase '[^']+' "
                                              r"needs an estimated [\d.]+ GiB .* the budget is "
                                              r"[\d.]+ GiB .*To fit: "):
        sampler(no_encoding)(prompt="a", height=100000, width=100000, max_memory=max_memory,
                             **{**FAST, "num_inference_steps": 2})  # MegaFusion: 2 stages
    assert time.perf_counter() - started < 1.0


def test_a_plan_beyond_max_view_evaluations_fails_with_its_numbers(no_encoding):
    sampler = DemoFusion(no_encoding)
    sampler.max_view_evaluations = 10
    with pytest.raises(ValueError, match=r"512x512 \(W x H\) plans 4 stage\(s\) and 113 view "
                                         r"evaluations .* max_view_evaluations = 10"):
        sampler(prompt="a", height=512, width=512, **FAST)


def test_an_extreme_aspect_ratio_warns_with_the_stage_count(sd15):
    with pytest.warns(UserWarning, match=r"64x1024 \(W x H\) has an aspect ratio of 16:1.* 16 "
                                         r"stage\(s\), the first at 8x64"):
        plan = DemoFusion(sd15).view_plan(1024, 64, 2)
    assert len(plan.sizes) == 16 and plan.steps == [2] * 16
    assert plan.view_evaluations == 2 * sum(sum(views.values()) for views in plan.views)


def test_the_view_plan_counts_what_the_engine_runs(sdxl):
    sampler = DemoFusion(sdxl)
    plan = sampler.view_plan(384, 256, 3)
    latent_sizes = [(h // 8, w // 8) for h, w in plan.sizes]
    assert sampler.view_counts(latent_sizes, batch=2) == {
        shape: [2 * views[shape] for views in plan.views[1:] if shape in views]
        for shape in {shape for views in plan.views[1:] for shape in views}}
    assert APT(sdxl, shortcut_steps=2).view_plan(384, 256, 3).steps == [3, 2, 2]


# --------------------------------------------------------------------------------------------------
# Progress bars: W x H, and the steps that run
# --------------------------------------------------------------------------------------------------


def test_progress_bars_say_w_x_h_and_count_the_steps_run(sd15, monkeypatch):
    bars, calls = [], []
    original = stages_module.progress_bar

    def recording_bar(total, description, enabled):
        bars.append((total, description))
        return original(total, description, False)

    monkeypatch.setattr(stages_module, "progress_bar", recording_bar)
    ScaleCrafter(sd15, scheduler=PNDMScheduler, noise_damped=False)(
        prompt="a", height=128, width=96, num_inference_steps=2, output_type="latent",
        callback_on_step_end=lambda *args: calls.append(args))
    # PNDM runs one step more than num_inference_steps: the bar counts what runs.
    assert bars == [(len(calls), "ScaleCrafter stage 1/1 (96x128)")] and len(calls) == 3

"""DemoFusion end to end on tiny SD 1.5 / SDXL pipelines (CPU), and its step against METHODS.md.

Tiny pipelines: SDXL base 128 px (16x16 latents), SD 1.5 base 64 px (8x8 latents); "2x" is 256 /
128 px. The ops run their PyTorch references here (the default backend on CPU), except in the one
test that forces the Triton kernels through the interpreter. Each generation that several tests
look at runs once per module (``runs``).
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionXLPipeline

from hrkernels import ops
from hrkernels.samplers import SAMPLERS, DemoFusion, NonFiniteLatentsError, SamplerOutput
from hrkernels.samplers.schedulers import fresh_scheduler
from hrkernels.samplers.stages import StageSchedule
from hrkernels.testing import tiny_pipeline


def generate(pipe, height, width, seed=0, steps=2, sampler=None, **kwargs):
    sampler = sampler or DemoFusion(pipe, view_batch_size=16)
    kwargs.setdefault("output_type", "pt")
    return sampler(prompt="a photo of a cat", height=height, width=width,
                   num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                   progress=False, **kwargs)


@pytest.fixture(scope="module")
def runs(sdxl, sd15, sizes):
    """Generations shared by several tests, computed on first use."""
    pipes = {"sdxl": sdxl, "sd15": sd15}
    cache = {}

    def get(kind, size, **kwargs):
        key = (kind, size, tuple(sorted(kwargs.items())))
        if key not in cache:
            height, width = sizes[kind][size] if isinstance(size, str) else size
            cache[key] = generate(pipes[kind], height, width, **kwargs)
        return cache[key]

    return get


@pytest.mark.parametrize("kind", ["sdxl", "sd15"])
@pytest.mark.parametrize("size", ["2x", "3x", "non-square"])
def test_stages_sizes_and_outputs(kind, size, runs, sizes):
    height, width = sizes[kind][size]
    with pytest.warns(UserWarning, match="PNDMScheduler") if kind == "sd15" else _no_warning():
        out = runs(kind, size)
    assert isinstance(out, SamplerOutput)
    base = 128 if kind == "sdxl" else 64
    count = -(-max(height, width) // base)
    assert [(s.stage, s.height, s.width) for s in out.stages] == [
        (s, round(height * s / count / 8) * 8, round(width * s / count / 8) * 8)
        for s in range(1, count + 1)
    ]
    for stage in out.stages:
        assert stage.latents.shape == (1, 4, stage.height // 8, stage.width // 8)
        assert stage.latents.dtype == torch.float32
        assert torch.isfinite(stage.latents).all()
        assert stage.images is None
    assert out.latents is out.stages[-1].latents
    assert out.images.shape == (1, 3, height, width)
    assert 0 <= out.images.min() and out.images.max() <= 1
    # End of every later stage: renormalised to the stage-1 result's mean and std.
    mean, std = out.stages[0].latents.mean(), out.stages[0].latents.std()
    for stage in out.stages[1:]:
        torch.testing.assert_close(stage.latents.mean(), mean, atol=1e-5, rtol=0)
        torch.testing.assert_close(stage.latents.std(), std, atol=1e-5, rtol=1e-5)


class _no_warning:
    """A context manager that does nothing (the SDXL pipelines' Euler keeps its sample)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("sampler", ["demofusion", "apt"])
@pytest.mark.parametrize("height, width, stages", [
    # 4:1 -- the stage latents are 4 to 16 wide: windows clamped to the short axis.
    (512, 128, [(128, 32), (256, 64), (384, 96), (512, 128)]),
    # Sides that are not multiples of the base: stage 1 at the base size (long side 128), odd
    # latent sizes (17x33), padded dilated views.
    (136, 264, [(64, 128), (128, 256), (136, 264)]),
])
def test_any_aspect_ratio(sdxl, sampler, height, width, stages):
    out = generate(sdxl, height, width, sampler=SAMPLERS[sampler](sdxl, view_batch_size=8))
    assert [(stage.height, stage.width) for stage in out.stages] == stages
    assert out.images.shape == (1, 3, height, width)
    assert torch.isfinite(out.latents).all()


def test_views_run_in_fixed_shape_batches(sdxl, runs):
    # 3x: stage 2 has 9 windows + 4 dilated views, stage 3 has 25 + 9 (all 16x16): one batch size
    # for both stages (13 here), the last call of a step padded; stage 1 has its own shape.
    assert runs("sdxl", "3x").unet_calls == {(2, 16, 16): 2, (26, 16, 16): 2 * 1 + 2 * 3}
    out = generate(sdxl, 384, 384, steps=2, sampler=DemoFusion(sdxl, view_batch_size=5))
    assert out.unet_calls == {(2, 16, 16): 2, (10, 16, 16): 2 * 3 + 2 * 7}
    # Non-square: windows and dilated views differ in shape.
    assert runs("sdxl", "non-square").unet_calls == {(2, 16, 12): 2, (12, 16, 16): 2,
                                                     (8, 16, 12): 2}


def test_deterministic_bitwise(sdxl, runs):
    first = runs("sdxl", "non-square", seed=3)
    second = generate(sdxl, 256, 192, seed=3)
    assert torch.equal(first.images, second.images)
    for a, b in zip(first.stages, second.stages, strict=True):
        assert torch.equal(a.latents, b.latents)
    assert not torch.equal(first.latents, runs("sdxl", "non-square").latents)


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpm"])
def test_schedulers_that_keep_the_sample(scheduler):
    pipe = tiny_pipeline("sdxl", scheduler=scheduler)
    timesteps_before = copy.deepcopy(pipe.scheduler.timesteps)
    out = generate(pipe, 256, 256, steps=3)
    assert torch.isfinite(out.latents).all()
    assert out.unet_calls == {(2, 16, 16): 3, (26, 16, 16): 3}
    # The pipeline's own scheduler is left alone (each stage steps a fresh copy).
    assert pipe.scheduler.timesteps is None or torch.equal(pipe.scheduler.timesteps,
                                                           timesteps_before)


def test_schedulers_that_drop_the_sample_are_replaced_by_ddim_or_refused(sd15, monkeypatch):
    # SD 1.5's PNDM (the pipeline's own): sample with DDIM from the same config, warn once.
    stepped = []
    original = DDIMScheduler.step

    def spy(self, *args, **kwargs):
        stepped.append(type(self).__name__)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DDIMScheduler, "step", spy)
    sampler = DemoFusion(sd15, view_batch_size=16)
    with pytest.warns(UserWarning, match="PNDMScheduler.step ignores") as warned:
        out = generate(sd15, 128, 128, steps=2, sampler=sampler, output_type="latent")
    assert torch.isfinite(out.latents).all() and len(stepped) == 4
    assert warned[0].filename == __file__  # points at the caller's line
    with warnings.catch_warnings():  # once per sampler
        warnings.simplefilter("error")
        generate(sd15, 128, 128, steps=1, sampler=sampler, output_type="latent")
    # UniPC asked for explicitly: an error before any model work.
    from diffusers import UniPCMultistepScheduler

    with pytest.raises(ValueError, match="UniPCMultistepScheduler.step ignores"):
        generate(sd15, 128, 128, sampler=DemoFusion(sd15, scheduler=UniPCMultistepScheduler))


def test_model_input_scaled_with_each_steps_own_index(sdxl, monkeypatch):
    # Official-code defect (A): a stale Euler step index. Here every scale_model_input call of a
    # stage uses the index of the step it belongs to, and the timestep matching it.
    seen = []
    original = EulerDiscreteScheduler.scale_model_input

    def spy(self, sample, timestep):
        result = original(self, sample, timestep)
        seen.append((self.step_index, float(timestep), float(self.timesteps[self.step_index])))
        return result

    monkeypatch.setattr(EulerDiscreteScheduler, "scale_model_input", spy)
    generate(sdxl, 256, 256, steps=3)
    assert [index for index, _, _ in seen] == [0, 1, 2, 0, 1, 2]
    assert all(t == expected for _, t, expected in seen)


@pytest.mark.parametrize("name", ["ddim", "euler"])
def test_fused_eps_equals_per_view_stepping(name):
    # The official code steps every view and averages the stepped views; the sampler averages the
    # views' noise predictions and steps once. Equal for DDIM (eta 0) and Euler (no churn).
    template = tiny_pipeline("sdxl", scheduler=name).scheduler
    steps, index, stage = 10, 3, 2
    scheduler = fresh_scheduler(template, steps, begin_index=index)
    timestep = scheduler.timesteps[index]
    generator = torch.Generator().manual_seed(0)
    zh = torch.randn(1, 4, 40, 36, generator=generator)
    starts = ops.window_grid(40, 36, 16, 8, jitter=2, generator=generator)
    eps_local = torch.randn(starts.shape[0], 4, 16, 16, generator=generator)
    eps_global = torch.randn(stage * stage, 4, 20, 18, generator=generator)
    c2 = 0.37

    def step(eps, sample):
        return copy.deepcopy(scheduler).step(eps, timestep, sample, return_dict=False)[0]

    local_samples = ops.gather_windows(zh, starts, 16)
    stepped_local = torch.cat([step(eps_local[n:n + 1], local_samples[n:n + 1])
                               for n in range(starts.shape[0])])
    global_samples = ops.gather_dilated(zh, stage)
    stepped_global = torch.cat([step(eps_global[k:k + 1], global_samples[k:k + 1])
                                for k in range(stage * stage)])
    per_view = (c2 * ops.scatter_dilated(stepped_global, stage)
                + (1 - c2) * ops.scatter_windows_mean(stepped_local, starts, (40, 36)))

    schedule = StageSchedule(schedulers={"main": copy.deepcopy(scheduler)},
                             indices=range(index, index + 1), timesteps=[timestep],
                             device_timesteps=torch.stack([timestep]), c=[0.5])
    fused = DemoFusion(tiny_pipeline("sdxl")).combine_step(
        schedule, 0, ops.scatter_dilated(eps_global, stage),
        ops.scatter_windows_mean(eps_local, starts, (40, 36)), c2, zh, {})
    torch.testing.assert_close(fused, per_view, atol=2e-5, rtol=1e-5)


def _gaussian_blur(x, sigma, kernel_size):
    """A separable Gaussian blur with zero padding, written here from its definition."""
    offsets = torch.arange(kernel_size, dtype=torch.float64) - (kernel_size - 1) / 2
    weights = torch.exp(-offsets**2 / (2 * sigma**2))
    weights = (weights / weights.sum()).float()
    channels = x.shape[1]
    rows = weights.view(1, 1, 1, -1).expand(channels, 1, 1, kernel_size)
    x = F.conv2d(x, rows, padding=(0, kernel_size // 2), groups=channels)
    return F.conv2d(x, rows.transpose(2, 3), padding=(kernel_size // 2, 0), groups=channels)


def test_stage_two_against_methods_md(sdxl, monkeypatch):
    # A model whose prediction of a view depends on the whole view (its mean) and on the guidance
    # branch (the mean of its text embedding) makes every quantity of METHODS.md's step visible:
    # zh = c1 z'_t + (1 - c1) z_t; eps_local = the overlap mean of the windows' predictions (window
    # starts replayed from the generator, in the documented order of draws); eps_global = the
    # predictions of the s x s sub-lattices of blur(zin) (kernel 2s - 1, std sigma * c3) matched
    # to zin's mean/std; eps = c2 eps_global + (1 - c2) eps_local, guided u + w (c - u); then
    # z_{t-1} = step(eps, t, zh). Non-default exponents, so a wrong one fails.
    inputs = []

    def model(sample, timestep, encoder_hidden_states, **kwargs):
        inputs.append(sample.clone())
        return (f(sample, encoder_hidden_states.mean(dim=(1, 2))),)

    def f(x, text):
        return 0.3 * x - 0.1 + 0.2 * x.mean(dim=(1, 2, 3), keepdim=True) + 0.05 * text.view(-1, 1,
                                                                                          1, 1)

    monkeypatch.setattr(sdxl.unet, "forward", model)
    scales, sigma, steps, w = (2.0, 0.5, 1.5), 1.3, 3, 4.0
    latents = []
    sampler = DemoFusion(sdxl, cosine_scales=scales, sigma=sigma, view_batch_size=64)
    out = sampler(prompt="a cat", negative_prompt="blurry", height=256, width=256,
                  num_inference_steps=steps, guidance_scale=w,
                  generator=torch.Generator().manual_seed(0), progress=False, output_type="latent",
                  callback_on_step_end=lambda stage, step, t, z: latents.append(z.clone()))
    embeds, negative, _, _ = sdxl.encode_prompt("a cat", device="cpu", negative_prompt="blurry")
    text = {"cond": embeds.mean(), "uncond": negative.mean()}

    def guided(x):
        rows = x.shape[0]
        uncond, cond = f(x, text["uncond"].expand(rows)), f(x, text["cond"].expand(rows))
        return uncond + w * (cond - uncond)

    # The draws, in the documented order: stage 1's noise, stage 2's, then each step's jitter.
    generator = torch.Generator().manual_seed(0)
    torch.randn(1, 4, 16, 16, generator=generator)
    noise = torch.randn(1, 4, 32, 32, generator=generator)
    starts = [ops.window_grid(32, 32, 16, 8, 2, generator=generator) for _ in range(steps)]
    z0 = F.interpolate(out.stages[0].latents, size=(32, 32), mode="bicubic", align_corners=False)
    scheduler = fresh_scheduler(sdxl.scheduler, steps, begin_index=0)
    a1, a2, a3 = scales
    z = None
    for step in range(steps):
        t = scheduler.timesteps[step]
        c = (0.5 * (1 + math.cos(math.pi * (1000 - float(t)) / 1000)))
        c1, c2, c3 = c**a1, c**a2, 0.99 * c**a3 + 0.01
        noised = z0 + noise * scheduler.sigmas[step]  # Euler's add_noise at step i
        zh = noised if z is None else c1 * noised + (1 - c1) * z
        zin = zh / (scheduler.sigmas[step] ** 2 + 1) ** 0.5
        # Local: every window (zeros outside), its guided prediction, averaged where they overlap.
        total, count = torch.zeros_like(zin), torch.zeros_like(zin)
        padded = F.pad(zin, (16, 16, 16, 16))
        for top, left in starts[step].tolist():
            rows, cols = slice(top + 16, top + 32), slice(left + 16, left + 32)
            canvas, inside = torch.zeros_like(padded), torch.zeros_like(padded)
            canvas[:, :, rows, cols] = guided(padded[:, :, rows, cols])
            inside[:, :, rows, cols] = 1
            total += canvas[:, :, 16:48, 16:48]
            count += inside[:, :, 16:48, 16:48]
        eps_local = total / count
        # Global: the sub-lattices of the blurred, matched latent.
        blurred = _gaussian_blur(zin, sigma * c3, 2 * 2 - 1)
        blurred = (blurred - blurred.mean()) / blurred.std() * zin.std() + zin.mean()
        eps_global = torch.zeros_like(zin)
        for i in range(2):
            for j in range(2):
                eps_global[:, :, i::2, j::2] = guided(blurred[:, :, i::2, j::2])
        # What the model saw at this step: the windows of zin, then the sub-lattices of blurred
        # (uncond rows first).
        seen = inputs[steps + step]
        windows = starts[step].shape[0]
        assert seen.shape[0] == 2 * (windows + 4)
        top, left = starts[step][windows // 2].tolist()
        torch.testing.assert_close(seen[windows // 2], zin[0, :, top:top + 16, left:left + 16])
        torch.testing.assert_close(seen[windows:windows + 4], ops.gather_dilated(blurred, 2),
                                   atol=1e-5, rtol=1e-5)
        eps = c2 * eps_global + (1 - c2) * eps_local
        z = scheduler.step(eps, t, zh, return_dict=False)[0]
        torch.testing.assert_close(latents[steps + step], z, atol=1e-5, rtol=1e-5)


def test_output_types_and_previews(sdxl, runs):
    latent = runs("sdxl", "non-square", output_type="latent")
    assert latent.images is latent.latents
    pil = generate(sdxl, 256, 192, output_type="pil", decode_stages=True)
    assert [image.size for image in pil.images] == [(192, 256)]
    assert [stage.images[0].size for stage in pil.stages] == [(96, 128), (192, 256)]
    assert torch.equal(pil.latents, latent.latents)
    array = generate(sdxl, 256, 192, output_type="np")
    assert array.images.shape == (1, 256, 192, 3)
    # Tiling was switched on for the large decode only and switched off again.
    assert sdxl.vae.use_tiling is False


def test_prompt_embeds_without_text_encoders_and_batches(sdxl, runs):
    # The benchmark path: a pipeline without text encoders, given the embeddings.
    embeds, _, pooled, _ = sdxl.encode_prompt("a photo of a cat", device="cpu",
                                              do_classifier_free_guidance=False)
    from_text = runs("sdxl", "non-square", output_type="latent")
    encoderless = StableDiffusionXLPipeline(
        **{**sdxl.components, "text_encoder": None, "text_encoder_2": None})
    from_embeds = DemoFusion(encoderless, view_batch_size=16)(
        prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=256, width=192,
        num_inference_steps=2, output_type="latent", progress=False,
        generator=torch.Generator().manual_seed(0))
    assert torch.equal(from_text.latents, from_embeds.latents)
    two = DemoFusion(sdxl, view_batch_size=16)(
        prompt=["a cat", "a dog"], height=256, width=192, num_inference_steps=1,
        output_type="latent", progress=False, generator=torch.Generator().manual_seed(0),
        guidance_scale=1.0)
    assert two.latents.shape == (2, 4, 32, 24)
    assert not torch.equal(two.latents[0], two.latents[1])
    # Without guidance each view is one UNet row (the cond branch alone).
    assert two.unet_calls == {(2, 16, 12): 1, (12, 16, 16): 1, (8, 16, 12): 1}


def test_sdxl_micro_conditioning_per_view(sdxl, monkeypatch):
    seen = []
    forward = sdxl.unet.forward

    def spy(sample, timestep, **kwargs):
        seen.append(kwargs["added_cond_kwargs"]["time_ids"].clone())
        return forward(sample, timestep, **kwargs)

    monkeypatch.setattr(sdxl.unet, "forward", spy)
    generate(sdxl, 256, 256, steps=2)
    for time_ids in seen:
        assert torch.equal(time_ids[:, [0, 1, 4, 5]], torch.tensor([[256.0] * 4]).expand(
            time_ids.shape[0], 4))
    stage_two = seen[2]
    assert stage_two.shape == (26, 6)  # 9 windows + 4 dilated views, uncond then cond
    assert torch.equal(stage_two[:13], stage_two[13:])
    crops = stage_two[:9, 2:4]
    assert torch.all(crops >= 0) and torch.all(crops % 8 == 0) and crops.max() > 0
    assert torch.all(stage_two[9:13, 2:4] == 0)  # global views: (0, 0)


def test_callback_sees_every_step_and_may_replace_latents(sdxl, runs):
    calls = []

    def callback(stage, step, timestep, latents):
        calls.append((stage, step, timestep, tuple(latents.shape)))
        return latents + 1 if (stage, step) == (1, 1) else None

    out = generate(sdxl, 256, 256, steps=2, callback_on_step_end=callback, output_type="latent")
    assert [(stage, step, shape) for stage, step, _, shape in calls] == [
        (1, 0, (1, 4, 16, 16)), (1, 1, (1, 4, 16, 16)),
        (2, 0, (1, 4, 32, 32)), (2, 1, (1, 4, 32, 32)),
    ]
    assert calls[0][2] > calls[1][2]
    plain = runs("sdxl", "2x", output_type="latent")
    assert torch.equal(out.stages[0].latents, plain.stages[0].latents + 1)


@pytest.mark.parametrize("stage, step, calls_before", [(1, 1, 1), (2, 1, 4)])
def test_non_finite_latents_name_stage_and_step(sdxl, monkeypatch, stage, step, calls_before):
    forward = sdxl.unet.forward
    count = [0]

    def poisoned(sample, timestep, **kwargs):
        result = forward(sample, timestep, **kwargs)
        count[0] += 1
        if count[0] == calls_before + 1:
            result = (result[0] * float("nan"),)
        return result

    monkeypatch.setattr(sdxl.unet, "forward", poisoned)
    with pytest.raises(NonFiniteLatentsError, match=f"stage {stage}, step {step}") as error:
        generate(sdxl, 256, 256, steps=3)
    assert (error.value.stage, error.value.step) == (stage, step)


def test_bad_input(sdxl, sd15):
    with pytest.raises(TypeError, match="StableDiffusionPipeline.*StableDiffusionXLPipeline"):
        DemoFusion(object())
    sampler = DemoFusion(sdxl)
    with pytest.raises(ValueError, match="multiple of 8"):
        generate(sdxl, 260, 256, sampler=sampler)
    with pytest.raises(ValueError, match="base size 128"):
        generate(sdxl, 120, 96, sampler=sampler)
    with pytest.raises(ValueError, match="output_type"):
        generate(sdxl, 256, 256, sampler=sampler, output_type="jpeg")
    with pytest.raises(ValueError, match="num_inference_steps"):
        generate(sdxl, 256, 256, sampler=sampler, steps=0)
    with pytest.raises(TypeError, match="num_inference_steps"):
        generate(sdxl, 256, 256, sampler=sampler, steps=2.0)
    with pytest.raises(ValueError, match="exactly one of prompt and prompt_embeds"):
        sampler(height=256, width=256)
    with pytest.raises(ValueError, match="pooled_prompt_embeds"):
        sampler(prompt_embeds=torch.zeros(1, 77, 64), height=256, width=256)
    with pytest.raises(ValueError, match="only apply to SDXL"):
        DemoFusion(sd15)(prompt="a", prompt_2="b", height=128, width=128)
    with pytest.raises(ValueError, match="stride"):
        DemoFusion(sdxl, stride=17)
    with pytest.raises(TypeError, match="stride"):
        DemoFusion(sdxl, stride=8.0)
    with pytest.raises(ValueError, match="view_batch_size"):
        DemoFusion(sdxl, view_batch_size=0)
    with pytest.raises(ValueError, match="view_batch_size"):
        DemoFusion(sdxl, view_batch_size="many")
    with pytest.raises(ValueError, match="cosine_scales"):
        DemoFusion(sdxl, cosine_scales=(3, 1))
    with pytest.raises(ValueError, match="sigma"):
        DemoFusion(sdxl, sigma=0)
    with pytest.raises(TypeError, match="scheduler"):
        DemoFusion(sdxl, scheduler="ddim")
    with pytest.raises(TypeError, match="generator"):
        sampler(prompt="a", height=256, width=256, generator=[torch.Generator()])
    with pytest.raises(ValueError, match=r"step_options \['eta'\].*EulerDiscreteScheduler"):
        generate(sdxl, 256, 256, sampler=sampler, step_options={"eta": 0.5})
    with pytest.raises(TypeError, match="decode_stages"):
        generate(sdxl, 256, 256, sampler=sampler, decode_stages="yes")


def test_one_step_through_the_triton_kernels(sdxl, triton_backend):
    # Every fused op of a DemoFusion step (gather, blur, match, scatter) on the Triton kernels,
    # through the interpreter; the result matches the PyTorch-reference run.
    reference = None
    with ops.use_backend("torch"):
        reference = generate(sdxl, 256, 256, steps=1, output_type="latent")
    out = generate(sdxl, 256, 256, steps=1, output_type="latent")
    torch.testing.assert_close(out.latents, reference.latents, atol=1e-4, rtol=1e-4)


def test_compiled_unet_sees_one_shape_for_stage_one_and_one_for_all_views():
    # torch.compile(fullgraph=True, dynamic=False) on the UNet: 3 stages x 2 steps, the views of
    # stages 2 and 3 in fixed-shape batches -> exactly two graphs (no recompilation per step or
    # per stage). The "eager" backend keeps this to dynamo's tracing (about 10 s here).
    import torch._dynamo
    from torch._dynamo.utils import counters

    pipe = tiny_pipeline("sdxl")
    torch._dynamo.reset()
    counters.clear()
    pipe.unet.compile(backend="eager", fullgraph=True, dynamic=False)
    try:
        out = generate(pipe, 384, 384, steps=2, output_type="latent")
        assert out.unet_calls == {(2, 16, 16): 2, (26, 16, 16): 8}
        assert counters["stats"]["unique_graphs"] == 2
        assert not counters["graph_break"]
    finally:
        torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["demofusion", "apt", "scalecrafter", "freescale"])
def test_no_host_sync_inside_the_step_loop(method, monkeypatch):
    # CUDA's sync debug mode raises on any synchronising call (.item(), .cpu(), blocking copies,
    # nonzero, ...). It is on from the creation of each stage's NaN/inf watch (just before the
    # loop) to its one check after the loop: every step, with set_step on a patched UNet, the
    # callback and the first call of each stage (whose row layouts were built before the loop).
    import copy as copy_module

    import hrkernels
    from hrkernels.samplers import stages

    pipe = tiny_pipeline("sdxl", device="cuda")
    pipe.unet = copy_module.deepcopy(pipe.unet)
    if method not in ("scalecrafter", "freescale"):  # these two patch the UNet themselves
        hrkernels.patch(pipe.unet, hrkernels.ReDilation({"mid_block": 2}, until_step=2))
    steps = 3
    options = {"shortcut_steps": None} if method == "apt" else {}
    sampler = SAMPLERS[method](pipe, view_batch_size=4, **options)
    created, checked = stages.FiniteWatch.__init__, stages.FiniteWatch.check

    def strict_init(self, *args):
        created(self, *args)
        torch.cuda.set_sync_debug_mode("error")

    def relaxed_check(self):
        torch.cuda.set_sync_debug_mode("default")
        checked(self)

    monkeypatch.setattr(stages.FiniteWatch, "__init__", strict_init)
    monkeypatch.setattr(stages.FiniteWatch, "check", relaxed_check)
    # ScaleCrafter: the noise-damped preset; FreeScale: a 2-stage cascade (relay between them)
    height = 512 if method in ("scalecrafter", "freescale") else 384
    try:
        out = sampler(prompt="a cat", height=height, width=height, num_inference_steps=steps,
                      generator=torch.Generator("cuda").manual_seed(0), progress=False,
                      output_type="latent", callback_on_step_end=lambda *args: None)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out.latents).all()


@pytest.mark.gpu
def test_deterministic_on_cuda():
    pipe = tiny_pipeline("sdxl", device="cuda", dtype=torch.float16)
    runs = [DemoFusion(pipe)(prompt="a cat", height=256, width=192, num_inference_steps=2,
                             generator=torch.Generator("cuda").manual_seed(0), progress=False,
                             output_type="latent").latents for _ in range(2)]
    assert torch.equal(runs[0], runs[1])

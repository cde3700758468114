"""FreeScale end to end on the tiny pipelines: the cascade, the restart and skip residual, alpha as
a number and as a map, ``image=``, determinism, the UNet left as found, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler
from PIL import Image

import hrkernels
from hrkernels import presets
from hrkernels.samplers import SAMPLERS, FreeScale
from hrkernels.samplers.schedulers import fresh_scheduler
from hrkernels.testing import tiny_pipeline


def generate(pipe, height, width, seed=0, steps=4, sampler=None, **kwargs):
    sampler = sampler or FreeScale(pipe)
    kwargs.setdefault("output_type", "latent")
    return sampler(prompt="a photo of a cat", height=height, width=width,
                   num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                   progress=False, **kwargs)


@pytest.fixture(scope="module")
def sd15_ddim():
    return tiny_pipeline("sd15", scheduler="ddim")


@pytest.mark.parametrize("kind, height, width, stages", [
    ("sdxl", 256, 256, [(128, 128), (256, 256)]),                      # 2 stages
    ("sdxl", 256, 192, [(128, 96), (256, 192)]),                       # non-square
    ("sd15_ddim", 256, 256, [(64, 64), (128, 128), (256, 256)]),       # 4x: 3 stages
    # 8x the base on the long side: 4 stages (4:1, which keeps the last stage cheap on a CPU).
    ("sd15_ddim", 512, 128, [(64, 16), (128, 32), (256, 64), (512, 128)]),
    ("sd15_ddim", 192, 128, [(64, 40), (128, 88), (192, 128)]),         # 3x, non-square
])
def test_cascade_end_to_end(kind, height, width, stages, request):
    pipe = request.getfixturevalue(kind)
    out = generate(pipe, height, width, steps=3, output_type="pt")
    assert [(s.height, s.width) for s in out.stages] == stages
    assert out.images.shape == (1, 3, height, width)
    for stage in out.stages:
        assert stage.latents.shape == (1, 4, stage.height // 8, stage.width // 8)
        assert torch.isfinite(stage.latents).all()
    # Stage 1 runs every step, the later ones from the restart step on, one call per step each.
    scheduler = fresh_scheduler(pipe.scheduler, 3)
    restart = next(i for i, t in enumerate(scheduler.timesteps.tolist()) if t <= 700)
    calls = {}
    for index, (h, w) in enumerate(stages):
        key = (2, h // 8, w // 8)
        calls[key] = calls.get(key, 0) + (3 if index == 0 else 3 - restart)
    assert out.unet_calls == calls
    assert len(out.plan) == len(stages) and "Scale Fusion" in out.plan[-1]
    assert not hrkernels.is_patched(pipe.unet)


def test_restart_and_skip_residual_against_the_formula(sdxl, monkeypatch):
    # Stage 2 starts at the first step with t <= 700; at every later step the scheduler's input
    # sample is zh = c z'_t + (1 - c) z_t, c = c(t)^alpha, z'_t = add_noise(z0, noise, t).
    steps, alpha = 10, 1.5
    relayed, stepped = [], []
    original_relay = FreeScale.relay

    def relay(self, run, z, stage):
        relayed.append(original_relay(self, run, z, stage))
        return relayed[-1]

    original_step = EulerDiscreteScheduler.step

    def step(self, model_output, timestep, sample, *args, **kwargs):
        result = original_step(self, model_output, timestep, sample, *args, **kwargs)
        stepped.append((float(timestep), sample.clone(), result[0].clone()))
        return result

    monkeypatch.setattr(FreeScale, "relay", relay)
    monkeypatch.setattr(EulerDiscreteScheduler, "step", step)
    generate(sdxl, 256, 256, steps=steps, sampler=FreeScale(sdxl, alpha=alpha))
    scheduler = fresh_scheduler(sdxl.scheduler, steps)
    timesteps = scheduler.timesteps.tolist()
    restart = next(i for i, t in enumerate(timesteps) if t <= 700)
    assert timesteps[restart - 1] > 700
    stage_two = stepped[steps:]
    assert [t for t, _, _ in stage_two] == timesteps[restart:]
    z0 = relayed[0]
    # Euler's add_noise: z0 + sigma_i noise; recover the noise from the first step's sample.
    sigmas = scheduler.sigmas
    noise = (stage_two[0][1] - z0) / sigmas[restart]
    for offset in range(1, len(stage_two)):
        index = restart + offset
        t = timesteps[index]
        c = hrkernels.schedules.cosine_decay(t, 1000, alpha)
        expected = c * (z0 + sigmas[index] * noise) + (1 - c) * stage_two[offset - 1][2]
        torch.testing.assert_close(stage_two[offset][1], expected, atol=1e-4, rtol=1e-4)


def test_alpha_as_a_map(sdxl):
    number = generate(sdxl, 256, 256, sampler=FreeScale(sdxl, alpha=2.0)).latents
    constant = generate(sdxl, 256, 256, sampler=FreeScale(sdxl, alpha=torch.full((5, 7), 2.0)))
    torch.testing.assert_close(constant.latents, number, atol=1e-5, rtol=1e-5)
    ramp = torch.linspace(0.5, 4.0, 64).view(8, 8)
    regional = generate(sdxl, 256, 256, sampler=FreeScale(sdxl, alpha=ramp)).latents
    assert not torch.allclose(regional, number, atol=1e-4)


def test_an_image_replaces_the_first_stage(sdxl):
    generator = torch.Generator().manual_seed(7)
    pixels = torch.rand(1, 3, 100, 100, generator=generator)
    out = generate(sdxl, 256, 256, image=pixels)
    assert out.unet_calls == {(2, 32, 32): 3}  # no stage-1 sampling; stage 2 from t = 501
    # Stage 1 is the image resized to the base size and encoded with the first draw.
    resized = torch.nn.functional.interpolate(pixels * 2 - 1, size=(128, 128), mode="bicubic",
                                              align_corners=False).clamp(-1, 1)
    expected = hrkernels.vae.encode(sdxl.vae, resized, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.stages[0].latents, expected)
    # A PIL image and an array give the same result as the tensor.
    array = pixels[0].permute(1, 2, 0).numpy()
    pil = Image.fromarray((array * 255).round().astype(np.uint8))
    from_pil = generate(sdxl, 256, 256, image=pil)
    from_array = generate(sdxl, 256, 256, image=np.asarray(pil, dtype=np.float32) / 255)
    assert torch.equal(from_pil.latents, from_array.latents)


def test_deterministic_and_the_unet_left_as_found(sdxl):
    unet = sdxl.unet
    hrkernels.patch(unet, hrkernels.ReDilation({"up_blocks.1": 2}))
    try:
        entries = [(e.variant, e.spec) for e in hrkernels.patching.patch_state(unet).entries]
        first, second = generate(sdxl, 256, 256, seed=2), generate(sdxl, 256, 256, seed=2)
        assert torch.equal(first.latents, second.latents)

        def fail(stage, step, timestep, latents):
            if stage == 2:
                raise RuntimeError("stop")

        with pytest.raises(RuntimeError, match="stop"):
            generate(sdxl, 256, 256, callback_on_step_end=fail)
        state = hrkernels.patching.patch_state(unet)
        assert [(e.variant, e.spec) for e in state.entries] == entries
        assert state.active_variant == "default"
    finally:
        hrkernels.unpatch(unet)


def test_fast_mode_and_presets(sdxl):
    fast = generate(sdxl, 256, 256, sampler=FreeScale(sdxl, fast_mode=True)).latents
    assert not torch.allclose(fast, generate(sdxl, 256, 256).latents, atol=1e-5)
    plan = presets.freescale(sdxl, 512, 384, num_inference_steps=50)
    assert [(s.height, s.width, s.scale) for s in plan.stages] == [
        (128, 96, 1), (256, 192, 2), (512, 384, 4)]
    assert plan.dilated_until == 35
    fusion, dilation = plan.stages[2].specs
    assert isinstance(fusion, hrkernels.ScaleFusion)
    assert dict(dilation.layers) == {name: 4 for name in presets.FREESCALE_DILATED_LAYERS["sdxl"]}
    assert SAMPLERS["freescale"] is FreeScale


def test_bad_input(sdxl):
    with pytest.raises(ValueError, match="alpha"):
        FreeScale(sdxl, alpha=torch.ones(1, 4, 4))
    with pytest.raises(ValueError, match="alpha"):
        FreeScale(sdxl, alpha=-1.0)
    with pytest.raises(ValueError, match="restart_timestep"):
        FreeScale(sdxl, restart_timestep=1001)
    with pytest.raises(TypeError, match="restart_timestep"):
        FreeScale(sdxl, restart_timestep=700.0)
    with pytest.raises(TypeError, match="image"):
        generate(sdxl, 256, 256, image="cat.png")
    with pytest.raises(ValueError, match="image"):
        generate(sdxl, 256, 256, image=torch.rand(1, 2, 64, 64))
    with pytest.raises(ValueError, match="multiple of 8"):
        generate(sdxl, 260, 256)
    with pytest.raises(TypeError, match="StableDiffusionPipeline"):
        FreeScale(object())



@pytest.mark.gpu
@pytest.mark.parametrize("fast_mode", [False, True])
def test_on_cuda_fp16_against_fp32(fast_mode):
    # The Triton view, blur and fusion kernels inside Scale Fusion, the re-dilated convolutions and
    # the exact tiled VAE relay on the GPU: fp16 follows the fp32 run, and repeats bitwise.
    runs = {}
    for dtype in (torch.float32, torch.float16):
        pipe = tiny_pipeline("sdxl", device="cuda", dtype=dtype)
        sampler = FreeScale(pipe, fast_mode=fast_mode)
        runs[dtype] = [sampler(prompt="a cat", height=384, width=256, num_inference_steps=4,
                               generator=torch.Generator("cuda").manual_seed(0), progress=False,
                               output_type="latent").latents.float() for _ in range(2)]
    assert torch.equal(*runs[torch.float16])
    reference = runs[torch.float32][0]
    error = (runs[torch.float16][0] - reference).norm() / reference.norm()
    assert error < 2e-2, error

"""MegaFusion end to end on the tiny SD 1.5, SDXL, IF stage I / II and SD3 pipelines: stages over
one shared timestep sequence, x0_hat from the sample before the update, the relay noise at the
stage's first timestep with the re-scheduled table, MegaFusion++'s dilation in stages >= 2 only,
the UNet left as found, determinism, bad input."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

import hrkernels
from hrkernels import ops, presets
from hrkernels.samplers import SAMPLERS, MegaFusion
from hrkernels.samplers import megafusion as megafusion_module
from hrkernels.samplers.megafusion import split_steps
from hrkernels.samplers.schedulers import fresh_scheduler
from hrkernels.testing import tiny_pipeline


def generate(sampler, height, width, seed=0, **kwargs):
    kwargs.setdefault("output_type", "pt")
    return sampler(prompt="a photo of a cat", height=height, width=width,
                   generator=torch.Generator().manual_seed(seed), progress=False, **kwargs)


@pytest.fixture(scope="module")
def tiny():
    """The tiny pipelines by kind, built once."""
    pipes: dict[str, object] = {}

    def get(kind):
        if kind not in pipes:
            pipes[kind] = tiny_pipeline(kind)
        return pipes[kind]

    return get


@pytest.fixture(scope="module")
def if_image(tiny):
    """An IF stage I result in [0, 1] (the image IF stage II upscales)."""
    return generate(MegaFusion(tiny("if")), 16, 16, num_inference_steps=2).images


# kind, (H, W), stages (None: the family default), steps, expected stage sizes, step split
CASES = [
    ("sd15", (128, 96), None, 4, [(64, 48), (96, 72), (128, 96)], [2, 1, 1]),
    ("sdxl", (256, 192), None, 4, [(128, 96), (256, 192)], [3, 1]),
    ("sdxl", (192, 256), [(128, 2), (192, 1), (256, 1)], 4,
     [(96, 128), (144, 192), (192, 256)], [2, 1, 1]),
    ("if", (32, 24), None, 5, [(16, 16), (32, 24)], [4, 1]),
    ("if", (32, 24), [(16, 2), (24, 1), (32, 1)], 4, [(16, 16), (24, 16), (32, 24)], [2, 1, 1]),
    ("if-sr", (64, 48), None, 3, [(32, 24), (64, 48)], [2, 1]),
    ("sd3", (256, 192), None, 3, [(128, 96), (256, 192)], [2, 1]),
    ("sd3", (256, 192), [(128, 2), (192, 1), (256, 1)], 4,
     [(128, 96), (192, 144), (256, 192)], [2, 1, 1]),
]


@pytest.mark.parametrize("kind, target, stages, steps, sizes, split", CASES)
def test_end_to_end(tiny, if_image, kind, target, stages, steps, sizes, split):
    pipe = tiny(kind)
    extra = {"image": if_image} if kind == "if-sr" else {}
    out = generate(MegaFusion(pipe, stages=stages), *target, num_inference_steps=steps, **extra)
    assert [(s.height, s.width) for s in out.stages] == sizes
    assert out.images.shape == (1, 3, *target)
    assert 0 <= float(out.images.min()) and float(out.images.max()) <= 1
    f = 1 if kind in ("if", "if-sr") else 8
    channels = {"sd3": 16, "if": 3, "if-sr": 3}.get(kind, 4)
    for stage in out.stages:
        assert stage.latents.shape == (1, channels, stage.height // f, stage.width // f)
        assert torch.isfinite(stage.latents).all()
    # One guided call (2 rows) per step, each stage its share of the steps.
    calls = {(2, h // f, w // f): n for (h, w), n in zip(sizes, split, strict=True)}
    assert out.unet_calls == calls
    assert len(out.plan) == len(sizes) and "relay" in out.plan[-1]


def test_default_stages_and_step_split(tiny):
    sd15 = MegaFusion(tiny("sd15"))
    assert sd15.stage_sizes(128, 128) == [(64, 64), (96, 96), (128, 128)]
    assert sd15.stage_steps(50, 3) == [40, 5, 5] and sd15.default_steps() == 50
    assert sd15.stage_sizes(64, 64) == [(64, 64)]  # a target at the base size: one stage
    assert sd15.stage_sizes(72, 64) == [(64, 56), (72, 64)]  # no room for the middle stage
    assert sd15.stage_steps(50, 2) == [40, 10]
    assert MegaFusion(tiny("sdxl")).stage_steps(50, 2) == [40, 10]
    assert MegaFusion(tiny("if")).default_steps() == 100
    assert MegaFusion(tiny("if")).stage_steps(100, 2) == [80, 20]
    assert MegaFusion(tiny("if-sr")).stage_steps(50, 2) == [40, 10]
    assert MegaFusion(tiny("sd3")).stage_steps(28, 2) == [20, 8]
    assert split_steps((40, 5, 5), 30) == [24, 3, 3] and split_steps((20, 8), 7) == [5, 2]
    assert split_steps((40, 10), 2) == [1, 1]
    assert SAMPLERS["megafusion"] is MegaFusion


def test_stages_consume_the_shared_timestep_sequence(tiny):
    seen = []

    def record(stage, step, timestep, latents):
        seen.append((stage, step, timestep))

    for kind, stages in (("sd15", [(64, 3), (96, 2), (128, 2)]), ("sd3", [(128, 4), (256, 3)])):
        pipe, seen[:] = tiny(kind), []
        generate(MegaFusion(pipe, stages=stages), 128, 128 if kind == "sd15" else 256,
                 num_inference_steps=7, callback_on_step_end=record, output_type="latent")
        cls = DDIMScheduler if kind == "sd15" else type(pipe.scheduler)
        expected = cls.from_config(pipe.scheduler.config)
        expected.set_timesteps(7)
        assert [t for _, _, t in seen] == expected.timesteps.tolist()
        assert [(s, i) for s, i, _ in seen] == [(s, i) for s, (_, n) in enumerate(stages, 1)
                                                for i in range(n)]


def test_x0_hat_from_the_sample_before_the_update(tiny, monkeypatch):
    # Stage 1's result is DDIM's x0 of its last step from the sample *before* that step's update:
    # x0 = (z_t - sqrt(1 - a_t) eps) / sqrt(a_t) (eq. 2). The authors' code applies eq. 2 to the
    # updated sample z_{t-1}.
    pipe = tiny("sd15")
    samples = []

    def record(stage, step, timestep, latents):
        samples.append((stage, step, latents.clone()))

    out = generate(MegaFusion(pipe, stages=[(64, 3), (128, 1)]), 128, 128, num_inference_steps=4,
                   guidance_scale=1.0, callback_on_step_end=record, output_type="latent")
    z_t = samples[1][2]  # after stage 1's step 1: the sample its last step (index 2) starts from
    scheduler = fresh_scheduler(pipe.scheduler, 4, scheduler_class=DDIMScheduler)
    t, t_next = scheduler.timesteps[2], scheduler.timesteps[3]
    embeds = pipe.encode_prompt("a photo of a cat", "cpu", 1, False)[0]
    with torch.no_grad():
        eps = pipe.unet(z_t, t, encoder_hidden_states=embeds).sample
    a_t, a_next = scheduler.alphas_cumprod[t], scheduler.alphas_cumprod[t_next]
    x0 = (z_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    torch.testing.assert_close(out.stages[0].latents, x0, atol=1e-5, rtol=1e-5)
    updated = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps  # DDIM's z_{t-1} (eta 0)
    authors = (updated - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    assert (out.stages[0].latents - authors).abs().max() > 0.05


def test_relay_noise_at_the_first_timestep_with_the_rescheduled_table(tiny, monkeypatch):
    pipe = tiny("sdxl")
    relayed, noises, starts = [], [], []
    original_relay, original_randn = megafusion_module.relay, megafusion_module.randn
    original_run_stage = megafusion_module.run_stage

    def relay(run, z, size):
        relayed.append(original_relay(run, z, size))
        return relayed[-1]

    def randn(shape, generator, device):
        noises.append(original_randn(shape, generator, device))
        return noises[-1]

    def run_stage(run, stage, size, schedule, z, step_function, skip=None):
        starts.append(z.clone())
        return original_run_stage(run, stage, size, schedule, z, step_function, skip)

    monkeypatch.setattr(megafusion_module, "relay", relay)
    monkeypatch.setattr(megafusion_module, "randn", randn)
    monkeypatch.setattr(megafusion_module, "run_stage", run_stage)
    sampler = MegaFusion(pipe, stages=[(128, 3), (192, 1), (256, 1)], mega_plus=True)
    generate(sampler, 256, 256, num_inference_steps=5, output_type="latent")
    timesteps = fresh_scheduler(pipe.scheduler, 5, scheduler_class=DDIMScheduler).timesteps
    abar = DDIMScheduler.from_config(pipe.scheduler.config).alphas_cumprod.double()
    for stage, (start, gamma) in enumerate(((3, 2.25), (4, 4.0)), start=1):
        a = float(abar[timesteps[start]])
        rescheduled = a / (gamma - (gamma - 1) * a)  # the table, at the stage's first timestep
        expected = rescheduled ** 0.5 * relayed[stage - 1] + (1 - rescheduled) ** 0.5 * noises[
            stage - 1]
        torch.testing.assert_close(starts[stage], expected.float(), atol=1e-5, rtol=1e-5)


def test_mega_plus_dilates_only_the_later_stages(tiny, monkeypatch):
    pipe = tiny("sdxl")
    shapes = []
    original = ops.dilated_conv2d

    def counted(input, *args, **kwargs):
        shapes.append((tuple(input.shape[2:]), kwargs.get("dilation")))
        return original(input, *args, **kwargs)

    monkeypatch.setattr(ops, "dilated_conv2d", counted)
    state = {name: value.clone() for name, value in pipe.unet.state_dict().items()}
    sample = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(1))
    embeds = torch.randn(2, 77, 64, generator=torch.Generator().manual_seed(2))
    added = {"text_embeds": torch.randn(2, 32), "time_ids": torch.ones(2, 6)}
    with torch.no_grad():
        before = pipe.unet(sample, 500, embeds, added_cond_kwargs=added).sample
    out = generate(MegaFusion(pipe, mega_plus=True), 256, 256, num_inference_steps=4,
                   output_type="latent")
    # 4 mid-block 3x3 convs (2 resnets) per call, dilation 2, only at stage 2's mid-block size
    # (32 x 32 latents, two downsamplers: 8 x 8), once per stage-2 step (1 of 4).
    assert shapes == [((8, 8), 2.0)] * 4
    assert out.unet_calls == {(2, 16, 16): 3, (2, 32, 32): 1}
    assert not hrkernels.is_patched(pipe.unet)
    assert all(torch.equal(state[name], value) for name, value in pipe.unet.state_dict().items())
    with torch.no_grad():
        after = pipe.unet(sample, 500, embeds, added_cond_kwargs=added).sample
    assert torch.equal(before, after)
    assert dict(presets.megafusion(pipe).layers) == {"mid_block": 2}


def test_deterministic_and_a_patched_unet_left_as_found(tiny):
    pipe = tiny("sd15")
    unet = pipe.unet
    hrkernels.patch(unet, hrkernels.ReDilation({"up_blocks.1": 2}))
    try:
        entries = [(e.variant, e.spec) for e in hrkernels.patching.patch_state(unet).entries]
        sampler = MegaFusion(pipe, mega_plus=True)
        first, second = (generate(sampler, 128, 128, seed=3, num_inference_steps=4)
                         for _ in range(2))
        assert torch.equal(first.images, second.images)
        assert torch.equal(first.stages[0].latents, second.stages[0].latents)
        other = generate(sampler, 128, 128, seed=4, num_inference_steps=4)
        assert not torch.equal(first.images, other.images)

        def fail(stage, step, timestep, latents):
            if stage == 2:
                raise RuntimeError("stop")

        with pytest.raises(RuntimeError, match="stop"):
            generate(sampler, 128, 128, num_inference_steps=4, callback_on_step_end=fail)
        state = hrkernels.patching.patch_state(unet)
        assert [(e.variant, e.spec) for e in state.entries] == entries
        assert state.active_variant == "default"
    finally:
        hrkernels.unpatch(unet)


def test_sd3_one_stage_is_the_pipeline(tiny):
    # At the base size MegaFusion is plain sampling: the adapter (transformer call, flow
    # scheduler, SD3's VAE scaling) reproduces the stock pipeline.
    # hrkernels.vae decodes SD3's VAE (16 channels, shift_factor, no quant convs) as it does.
    pipe = tiny("sd3")
    out = generate(MegaFusion(pipe), 128, 96, num_inference_steps=3, output_type="pt")
    reference = {kind: pipe("a photo of a cat", height=128, width=96, num_inference_steps=3,
                            generator=torch.Generator().manual_seed(0), output_type=kind).images
                 for kind in ("latent", "pt")}
    assert len(out.stages) == 1
    torch.testing.assert_close(out.latents, reference["latent"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.images, reference["pt"], atol=1e-4, rtol=1e-4)


def test_bad_input(tiny, if_image):
    sdxl = tiny("sdxl")
    with pytest.raises(ValueError, match="ascending"):
        MegaFusion(sdxl, stages=[(256, 2), (128, 2)])
    with pytest.raises(ValueError, match="multiple of 8"):
        MegaFusion(sdxl, stages=[(128, 2), (252, 2)])
    with pytest.raises(TypeError, match="stages"):
        MegaFusion(sdxl, stages=[128, 256])
    with pytest.raises(ValueError, match="sum to 4"):
        generate(MegaFusion(sdxl, stages=[(128, 2), (256, 2)]), 256, 256, num_inference_steps=5)
    with pytest.raises(ValueError, match="long side 192"):
        generate(MegaFusion(sdxl, stages=[(128, 2), (256, 2)]), 192, 192)
    with pytest.raises(ValueError, match="too few"):
        generate(MegaFusion(sdxl), 256, 256, num_inference_steps=1)
    with pytest.raises(TypeError, match="mega_plus"):
        MegaFusion(sdxl, mega_plus=1)
    with pytest.raises(ValueError, match="latent"):
        generate(MegaFusion(tiny("if")), 32, 32, num_inference_steps=2, output_type="latent")
    with pytest.raises(ValueError, match="mega_plus"):
        MegaFusion(tiny("sd3"), mega_plus=True)
    with pytest.raises(ValueError, match="multiples of 16"):  # SD3's 2x2 patches
        generate(MegaFusion(tiny("sd3"), stages=[(136, 2), (256, 1)]), 256, 256)
    with pytest.raises(ValueError, match="image="):
        generate(MegaFusion(tiny("if-sr")), 64, 64, num_inference_steps=2)
    with pytest.raises(ValueError, match="noise_level"):
        generate(MegaFusion(tiny("if-sr")), 64, 64, num_inference_steps=2, image=if_image,
                 noise_level=1000)
    # On latent models image= is the shared one (it replaces stage 1's result): checked likewise.
    with pytest.raises(ValueError, match="image"):
        generate(MegaFusion(sdxl), 256, 256, num_inference_steps=2,
                 image=torch.rand(1, 3, 32, 64))
    with pytest.raises(TypeError, match="pred_original_sample"):
        from diffusers import DPMSolverMultistepScheduler
        generate(MegaFusion(sdxl, scheduler=DPMSolverMultistepScheduler), 256, 256,
                 num_inference_steps=2)
    with pytest.raises(TypeError, match="megafusion needs"):
        presets.megafusion(tiny("sd3"))


def test_the_e2e_case_builds_and_warms_up(tiny):
    # hrkernels.bench.e2e runs it on the GPU: its options must build the sampler, and its warm-up
    # step count must serve the default stages (here at the tiny SDXL's 2x base).
    from hrkernels.bench.e2e import ANCHORS, CASES

    case = dict(CASES["megafusion-plus-2048"])
    assert (case.pop("method"), case.pop("size")) in ANCHORS
    warmup = case.pop("warmup_steps")
    sampler = SAMPLERS["megafusion"](tiny("sdxl"), **case)
    assert sampler.mega_plus and sampler.stage_steps(50, 2) == [40, 10]
    out = generate(sampler, 256, 256, num_inference_steps=warmup, output_type="latent")
    assert len(out.stages) == 2


def test_if_stage_two_conditions_on_the_upscaled_noised_image(tiny, if_image, monkeypatch):
    # As IFSuperResolutionPipeline: the low-resolution image upscaled (bilinear, corners aligned)
    # to the sample's size, noised to noise_level by the image-noising scheduler, concatenated to
    # the sample's channels, noise_level as the class label; here at every stage's size.
    pipe = tiny("if-sr")
    noises, inputs = [], []
    original_randn = megafusion_module.randn

    def randn(shape, generator, device):
        noises.append(original_randn(shape, generator, device))
        return noises[-1]

    def record(module, args, kwargs):
        inputs.append((args[0].clone(), kwargs["class_labels"].clone()))

    monkeypatch.setattr(megafusion_module, "randn", randn)
    handle = pipe.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        generate(MegaFusion(pipe), 64, 48, num_inference_steps=3, image=if_image, noise_level=100,
                 guidance_scale=1.0)
    finally:
        handle.remove()
    low = if_image * 2 - 1
    for stage, (call, size) in enumerate(((0, (32, 24)), (2, (64, 48)))):
        upscaled = torch.nn.functional.interpolate(low, size, mode="bilinear", align_corners=True)
        expected = pipe.image_noising_scheduler.add_noise(upscaled, noises[stage],
                                                          torch.tensor([100]))
        sample, labels = inputs[call]
        assert sample.shape == (1, 6, *size)
        torch.testing.assert_close(sample[:, 3:], expected, atol=1e-6, rtol=1e-6)
        assert labels.tolist() == [100]


def test_prompt_embeddings_give_the_prompts_result(tiny):
    # IF (T5) and SD3 (two CLIPs, pooled; T5 zeros): embeddings from the pipeline's own
    # encode_prompt reproduce the prompt's run.
    pipe = tiny("if")
    embeds, negative = pipe.encode_prompt("a photo of a cat", True, clean_caption=False)
    by_prompt = generate(MegaFusion(pipe), 32, 32, num_inference_steps=2)
    by_embeds = MegaFusion(pipe)(prompt_embeds=embeds, negative_prompt_embeds=negative,
                                 height=32, width=32, num_inference_steps=2, output_type="pt",
                                 generator=torch.Generator().manual_seed(0), progress=False)
    assert torch.equal(by_prompt.images, by_embeds.images)
    pipe = tiny("sd3")
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        "a photo of a cat", None, None, do_classifier_free_guidance=True)
    by_prompt = generate(MegaFusion(pipe), 256, 256, num_inference_steps=2, output_type="latent")
    by_embeds = MegaFusion(pipe)(
        prompt_embeds=embeds, negative_prompt_embeds=negative, pooled_prompt_embeds=pooled,
        negative_pooled_prompt_embeds=negative_pooled, height=256, width=256,
        num_inference_steps=2, output_type="latent", generator=torch.Generator().manual_seed(0),
        progress=False)
    assert torch.equal(by_prompt.latents, by_embeds.latents)
    with pytest.raises(ValueError, match="takes prompt, negative_prompt"):
        generate(MegaFusion(tiny("if")), 32, 32, num_inference_steps=2, prompt_2="a dog")

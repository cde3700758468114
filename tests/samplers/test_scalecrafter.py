"""ScaleCrafter: presets, the sampler end to end on the tiny pipelines, noise-damped guidance, the
stock-pipeline path, and the UNet left as found."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

import hrkernels
from hrkernels import presets
from hrkernels.patching import patch_state
from hrkernels.presets import SCALECRAFTER_PRESETS, ScaleCrafterPlan
from hrkernels.samplers import SAMPLERS, ScaleCrafter
from hrkernels.testing import _SD15_UNET_CONFIG, _SDXL_UNET_CONFIG, tiny_pipeline

# Tiny pipelines: SD 1.5 base 64 px, SDXL base 128 px. "4x" SD 1.5 (256^2) takes the 2048^2 preset
# (dispersion, progressive, noise-damped); "4x" SDXL (512^2) the 4096^2 one.


def generate(pipe, height, width, seed=0, steps=3, sampler=None, **kwargs):
    sampler = sampler or ScaleCrafter(pipe)
    kwargs.setdefault("output_type", "latent")
    return sampler(prompt="a photo of a cat", height=height, width=width,
                   num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                   progress=False, **kwargs)


def unet_outputs(unet, seed=0):
    generator = torch.Generator().manual_seed(seed)
    config = unet.config
    sample = torch.randn(1, 4, 16, 16, generator=generator)
    states = torch.randn(1, 5, config.cross_attention_dim, generator=generator)
    added = None
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        added = {"text_embeds": torch.randn(1, pooled, generator=generator),
                 "time_ids": torch.tensor([[128.0, 128.0, 0.0, 0.0, 128.0, 128.0]])}
    with torch.no_grad():
        return unet(sample, 500, encoder_hidden_states=states, added_cond_kwargs=added).sample


# --------------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family, size, preset, scale", [
    ("sd", (1024, 1024), (1024, 1024), 1.0),
    ("sd", (1152, 1152), (1280, 1280), 0.9),
    ("sd", (1536, 1536), (1024, 2048), math.sqrt(1536**2 / (1024 * 2048))),
    ("sd", (1024, 2048), (1024, 2048), 1.0),
    ("sd", (2048, 1024), (1024, 2048), 1.0),
    ("sd", (2048, 2048), (2048, 2048), 1.0),
    ("sd", (3072, 3072), (2048, 2048), 1.5),
    ("sdxl", (3072, 3072), (2560, 2560), 1.2),
    ("sdxl", (2048, 4096), (2560, 2560), math.sqrt(2048 * 4096) / 2560),
    ("sdxl", (1536, 1536), (2048, 2048), 0.75),
])
def test_preset_selection_and_factor_scaling(family, size, preset, scale):
    pipe = tiny_pipeline("sdxl" if family == "sdxl" else "sd15")
    base = 1024 if family == "sdxl" else 512
    tiny = pipe.unet.config.sample_size * 8
    # The tables are in the real models' pixels; the tiny models use them at their own scale.
    height, width = size[0] * tiny // base, size[1] * tiny // base
    plan = presets.scalecrafter(pipe, height, width, num_inference_steps=50)
    row = next(p for p in SCALECRAFTER_PRESETS[family] if p.size == preset)
    dispersed = dict(row.dispersed or {})
    expected = {name: max(float(dispersed.get(name, 1)), 1.0, factor * scale)
                for name, factor in row.layers.items()}
    assert dict(plan.specs.layers) == pytest.approx(expected)
    assert plan.until_step == row.tau and plan.progressive == row.progressive
    assert (plan.base is not None) == row.has_noise_damped
    assert plan.noise_damped_until == (row.tau if row.has_noise_damped else 0)


def test_taus_scale_with_the_step_count(sd15):
    plan = presets.scalecrafter(sd15, 256, 256, num_inference_steps=20)  # 2048^2: tau 35 of 50
    assert plan.until_step == 14 and plan.noise_damped_until == 14
    assert presets.scalecrafter(sd15, 256, 256, num_inference_steps=3).until_step == 2  # 2.1


def test_the_2048_preset_of_sd15_as_methods_md():
    plan = presets.scalecrafter(tiny_pipeline("sd15"), 256, 256)
    assert dict(plan.specs.layers) == {
        "down_blocks.0": 2, "down_blocks.1": 4, "up_blocks.2": 4, "up_blocks.3": 2,
        "down_blocks.2": 2, "down_blocks.3": 2, "mid_block": 2, "up_blocks.0": 2, "up_blocks.1": 2}
    assert dict(plan.dispersed) == {name: 2 for name in (
        "down_blocks.2", "down_blocks.3", "mid_block", "up_blocks.0", "up_blocks.1")}
    assert plan.progressive and plan.until_step == 35
    # The base model: the noise-damped blocks (DB0, DB1, UB2, UB3) back to ordinary convolutions.
    assert set(plan.base.layers) == {"down_blocks.2", "down_blocks.3", "mid_block", "up_blocks.0",
                                     "up_blocks.1"}
    assert dict(plan.base.dispersed) == dict(plan.dispersed)


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_every_preset_resolves_on_the_tiny_and_the_full_size_unet(family):
    tiny = tiny_pipeline("sdxl" if family == "sdxl" else "sd15").unet
    with torch.device("meta"):
        full = UNet2DConditionModel(**(_SDXL_UNET_CONFIG if family == "sdxl"
                                       else _SD15_UNET_CONFIG))
    for unet in (tiny, full):
        assert presets.model_family(unet) == family
        for row in SCALECRAFTER_PRESETS[family]:
            main = hrkernels.ReDilation(row.layers, until_step=row.tau,
                                        progressive=row.progressive, dispersed=row.dispersed)
            with hrkernels.patched(unet, main):
                pass
            if row.base_layers is not None:
                with hrkernels.patched(unet, hrkernels.ReDilation(row.base_layers)):
                    pass


def test_plan_errors():
    spec = hrkernels.ReDilation({"mid_block": 2}, until_step=10)
    with pytest.raises(ValueError, match="noise_damped_until"):
        ScaleCrafterPlan(spec, base=hrkernels.ReDilation({"mid_block": 2}), noise_damped_until=11)
    with pytest.raises(ValueError, match="base"):
        ScaleCrafterPlan(spec, noise_damped_until=3)
    with pytest.raises(TypeError, match="specs"):
        ScaleCrafterPlan({"mid_block": 2})
    assert ScaleCrafterPlan(spec, base=hrkernels.ReDilation({"mid_block": 2})).noise_damped_until \
        == 10
    with pytest.raises(ValueError, match="multiple of 8"):
        presets.scalecrafter(tiny_pipeline("sdxl"), 260, 256)
    with pytest.raises(ValueError, match="base size"):
        presets.scalecrafter(tiny_pipeline("sdxl"), 120, 96)


# --------------------------------------------------------------------------------------------------
# The sampler
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, height, width, damped", [
    ("sd15", 128, 128, False),   # 2x: 1024^2 preset
    ("sd15", 256, 256, True),    # 4x: 2048^2 preset, dispersed + progressive + noise-damped
    ("sd15", 128, 256, True),    # 2048x1024 preset (noise-damped), non-square
    ("sdxl", 256, 256, False),   # 2x: 2048^2 preset
    ("sdxl", 512, 512, True),    # 4x: 4096^2 preset, progressive + noise-damped (own base layers)
    ("sdxl", 256, 192, False),   # non-square, scaled factors
])
def test_end_to_end(kind, height, width, damped, request):
    pipe = request.getfixturevalue(kind)
    before = unet_outputs(pipe.unet)
    out = generate(pipe, height, width, steps=3, output_type="pt")
    assert out.images.shape == (1, 3, height, width)
    assert [(s.stage, s.height, s.width) for s in out.stages] == [(1, height, width)]
    assert out.latents.shape == (1, 4, height // 8, width // 8)
    assert torch.isfinite(out.latents).all()
    latent = (height // 8, width // 8)
    plan = presets.scalecrafter(pipe, height, width, num_inference_steps=3)
    expected = {(2, *latent): 3}
    if damped:
        expected[(1, *latent)] = plan.noise_damped_until  # the base pass: the uncond rows only
    assert out.unet_calls == expected
    assert not hrkernels.is_patched(pipe.unet)
    assert torch.equal(unet_outputs(pipe.unet), before)


def test_deterministic_and_different_from_plain_sampling(sdxl):
    first, second = generate(sdxl, 256, 256), generate(sdxl, 256, 256)
    assert torch.equal(first.latents, second.latents)
    plain = generate(sdxl, 256, 256, sampler=ScaleCrafter(
        sdxl, plan=hrkernels.ReDilation({"mid_block": 1})))
    assert not torch.equal(first.latents, plain.latents)


def test_noise_damped_guidance_against_two_patched_unets(sd15, monkeypatch):
    # One step of the 2048^2 preset, w = 6: eps = eps_base_u + w (eps~_c - eps~_u), with eps~ from
    # a copy patched with plan.specs and eps_base from a copy patched with plan.base.
    steps, w = 2, 6.0
    plan = presets.scalecrafter(sd15, 256, 256, num_inference_steps=steps)
    assert plan.noise_damped_until == 1
    seen = []
    from diffusers import DDIMScheduler

    original = DDIMScheduler.step

    def spy(self, model_output, timestep, sample, *args, **kwargs):
        seen.append((model_output.clone(), sample.clone(), timestep))
        return original(self, model_output, timestep, sample, *args, **kwargs)

    monkeypatch.setattr(DDIMScheduler, "step", spy)
    generate(sd15, 256, 256, steps=steps, guidance_scale=w)
    eps, sample, timestep = seen[0]
    embeds, negative = sd15.encode_prompt("a photo of a cat", "cpu", 1, True)
    copies = {}
    for name, spec in (("main", plan.specs), ("base", plan.base)):
        copies[name] = hrkernels.patch(copy.deepcopy(sd15.unet), spec)
        hrkernels.set_step(copies[name], 0)
    with torch.no_grad():
        def predict(unet, states):
            return unet(sample, timestep, encoder_hidden_states=states).sample

        uncond, cond = predict(copies["main"], negative), predict(copies["main"], embeds)
        uncond_base = predict(copies["base"], negative)
    assert not torch.allclose(uncond, uncond_base, atol=1e-3)
    torch.testing.assert_close(eps, uncond_base + w * (cond - uncond), atol=1e-4, rtol=1e-4)
    # Step 1 (past noise_damped_until): ordinary CFG.
    assert len(seen) == 2


def test_the_base_pass_runs_on_the_uncond_rows_of_every_image(sd15):
    out = generate(sd15, 256, 256, steps=3, num_images_per_prompt=2)
    plan = presets.scalecrafter(sd15, 256, 256, num_inference_steps=3)
    assert out.unet_calls == {(4, 32, 32): 3, (2, 32, 32): plan.noise_damped_until}
    off = generate(sd15, 256, 256, steps=3, sampler=ScaleCrafter(sd15, noise_damped=False))
    assert off.unet_calls == {(2, 32, 32): 3}
    assert not torch.equal(off.latents, generate(sd15, 256, 256, steps=3).latents)


def test_the_unet_is_left_as_found_with_the_users_patch_and_after_an_error(sdxl):
    unet = sdxl.unet
    users = hrkernels.ReDilation({"up_blocks.1": 2})
    hrkernels.patch(unet, users)
    try:
        state_before = [(e.variant, e.spec) for e in patch_state(unet).entries]
        patched_outputs = unet_outputs(unet)

        def fail(stage, step, timestep, latents):
            raise RuntimeError("stop")

        with pytest.raises(RuntimeError, match="stop"):
            generate(sdxl, 512, 512, callback_on_step_end=fail)
        generate(sdxl, 256, 256)
        assert [(e.variant, e.spec) for e in patch_state(unet).entries] == state_before
        assert patch_state(unet).active_variant == "default"
        assert torch.equal(unet_outputs(unet), patched_outputs)
    finally:
        hrkernels.unpatch(unet)


def test_stock_pipeline_path_redilates_the_first_tau_steps_only(sdxl):
    # presets.scalecrafter + patched + step_callback on a stock StableDiffusionXLPipeline: at every
    # UNet call, compare the patched UNet with an unpatched copy on the same inputs.
    pipe = StableDiffusionXLPipeline(**sdxl.components)
    pipe.unet = copy.deepcopy(sdxl.unet)
    reference = copy.deepcopy(sdxl.unet)
    steps = 5
    plan = presets.scalecrafter(pipe, 256, 256, num_inference_steps=steps)
    assert plan.until_step == 3
    differs = []

    def compare(module, args, kwargs, output):
        with torch.no_grad():
            expected = reference(*args, **kwargs)
        differs.append(not torch.allclose(output[0], expected[0], atol=1e-6))

    handle = pipe.unet.register_forward_hook(compare, with_kwargs=True)
    try:
        with hrkernels.patched(pipe.unet, plan.specs):
            pipe(prompt="a cat", height=256, width=256, num_inference_steps=steps,
                 generator=torch.Generator().manual_seed(0), output_type="latent",
                 callback_on_step_end=plan.step_callback)
            assert patch_state(pipe.unet).step_index == 0  # ready for the next call
    finally:
        handle.remove()
    assert differs == [True] * 3 + [False] * 2


def test_freeu_is_kept(sdxl):
    pipe = copy.copy(sdxl)
    pipe.unet = copy.deepcopy(sdxl.unet)
    plain = generate(pipe, 256, 256).latents
    pipe.enable_freeu(s1=0.9, s2=0.2, b1=1.3, b2=1.4)
    freeu = generate(pipe, 256, 256).latents
    assert not torch.equal(plain, freeu)
    assert getattr(pipe.unet.up_blocks[0], "b1", None) == 1.3  # still enabled


def test_options_and_cli_registration(sdxl):
    assert SAMPLERS["scalecrafter"] is ScaleCrafter
    assert ScaleCrafter(sdxl).default_guidance_scale == 5.0
    assert ScaleCrafter(tiny_pipeline("sd15")).default_guidance_scale == 7.5
    # eta is DDIM's: it reaches the step (a stochastic run differs, reproducibly).
    stochastic = generate(sdxl, 256, 256, eta=1.0).latents
    assert torch.equal(stochastic, generate(sdxl, 256, 256, eta=1.0).latents)
    assert not torch.equal(stochastic, generate(sdxl, 256, 256).latents)


def test_bad_input(sdxl):
    with pytest.raises(TypeError, match="StableDiffusionPipeline.*StableDiffusionXLPipeline"):
        ScaleCrafter(object())
    with pytest.raises(TypeError, match="plan"):
        ScaleCrafter(sdxl, plan={"mid_block": 2})
    with pytest.raises(TypeError, match="noise_damped"):
        ScaleCrafter(sdxl, noise_damped="no")
    with pytest.raises(ValueError, match="multiple of 8"):
        generate(sdxl, 260, 256)
    with pytest.raises(ValueError, match="base size 128"):
        generate(sdxl, 120, 96)
    with pytest.raises(ValueError, match="down_blocks.9.*does not exist.*down_blocks.0"):
        generate(sdxl, 256, 256, sampler=ScaleCrafter(
            sdxl, plan=hrkernels.ReDilation({"down_blocks.9": 2})))
    assert not hrkernels.is_patched(sdxl.unet)
    with pytest.raises(ValueError, match="eta"):
        generate(sdxl, 256, 256, eta=0.5, step_options={"eta": 0.5})


@pytest.mark.slow
def test_compiled_unet_one_graph_per_configuration():
    # Slow (a minute of tracing); covered fast by tests/test_patch_variants.py (one graph per
    # configuration when switching every call) and test_end_to_end (the calls per shape).
    # The SDXL 4096^2 preset (progressive, noise-damped) over 6 steps: the main configuration
    # changes with the progressive factors (4 -> 3 -> 2 in up_blocks.1), the base has one setting,
    # then the re-dilation stops. One graph per distinct (configuration, shape), never per step.
    import torch._dynamo
    from torch._dynamo.utils import counters

    pipe = tiny_pipeline("sdxl")
    plan = presets.scalecrafter(pipe, 512, 512, num_inference_steps=6)
    configurations = set()
    for step in range(6):
        main = tuple(sorted((name, plan.specs.factor_at(f, step))
                            for name, f in plan.specs.layers.items()))
        configurations.add(("main", main))
        if step < plan.noise_damped_until:
            configurations.add(("base", tuple(sorted(
                (name, plan.base.factor_at(f, step)) for name, f in plan.base.layers.items()))))
    torch._dynamo.reset()
    counters.clear()
    pipe.unet.compile(backend="eager", fullgraph=True, dynamic=False)
    try:
        out = generate(pipe, 512, 512, steps=6)
        assert out.unet_calls == {(2, 64, 64): 6, (1, 64, 64): plan.noise_damped_until}
        assert counters["stats"]["unique_graphs"] == len(configurations)
        assert not counters["graph_break"]
    finally:
        torch._dynamo.reset()

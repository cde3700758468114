"""Input images, ControlNet, IP-Adapter, LoRA and CPU offload with every sampler, on the tiny
pipelines (SD 1.5 at 128^2: two stages of 64^2 and 128^2; 2 steps)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
from PIL import Image

import hrkernels
from hrkernels import ops
from hrkernels.samplers import APT, DemoFusion, FreeScale, MegaFusion, ScaleCrafter
from hrkernels.samplers.inputs import as_pixels, with_controlnet
from hrkernels.testing import tiny_controlnet, tiny_pipeline

SAMPLERS = {"demofusion": DemoFusion, "apt": APT, "scalecrafter": ScaleCrafter,
            "freescale": FreeScale, "megafusion": MegaFusion}
SIZE = 128  # SD 1.5 tiny: base 64, so 2x
F_VAE = 8


def generate(pipe, name, seed=0, steps=2, size=SIZE, **kwargs):
    # 16 views per call: a DemoFusion/APT stage-2 step (9 windows + 4 dilated views) is one call.
    options = {}
    if name == "megafusion":  # 2 stages: the base size, then the target with its last step
        steps = max(steps, 2)
        options["stages"] = [(64, steps - 1), (size, 1)]
    sampler = SAMPLERS[name](pipe, view_batch_size=16, **options)
    kwargs.setdefault("output_type", "latent")
    return sampler(prompt="a photo of a cat", height=size, width=size, num_inference_steps=steps,
                   generator=torch.Generator().manual_seed(seed), progress=False, **kwargs)


def rand_image(seed, size=SIZE, channels=3):
    return torch.rand(1, channels, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def sd15():
    return tiny_pipeline("sd15", scheduler="ddim")


@pytest.fixture(scope="module")
def sd15_control(sd15):
    return with_controlnet(sd15, tiny_controlnet(sd15))


class Recorder:
    """Forward hooks on the UNet (its keyword arguments) and the ControlNet (inputs, outputs)."""

    def __init__(self, unet, controlnet=None):
        self.unet, self.control = [], []
        self.handles = [unet.register_forward_pre_hook(self._unet, with_kwargs=True)]
        if controlnet is not None:
            self.handles.append(controlnet.register_forward_hook(self._controlnet,
                                                                 with_kwargs=True))

    def _unet(self, module, args, kwargs):
        self.unet.append({"sample": args[0], "timestep": args[1], **kwargs})

    def _controlnet(self, module, args, kwargs, output):
        self.control.append(({"sample": args[0], "timestep": args[1], **kwargs}, output))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def resized(image, size):
    """The control image at a stage's size, as documented (bicubic, antialiased when shrinking)."""
    if tuple(image.shape[2:]) == tuple(size):
        return image
    return F.interpolate(image, size=size, mode="bicubic", align_corners=False,
                         antialias=size[0] < image.shape[2]).clamp(0, 1)


def hand_crops(control, starts, window, dilation):
    """Local window crops (zero outside the image) then the dilated sub-sampled images, cut with
    plain slicing at pixel resolution: ``[N + d^2, 3, ...]``."""
    pad = 2 * F_VAE * window  # room for windows that jitter past a border
    padded = F.pad(control, (pad, pad, pad, pad))
    rows = []
    for top, left in starts.tolist():
        y, x = pad + top * F_VAE, pad + left * F_VAE
        rows.append(padded[:, :, y:y + window * F_VAE, x:x + window * F_VAE])
    for k in range(dilation * dilation):
        rows.append(control[:, :, k // dilation::dilation, k % dilation::dilation])
    return torch.cat(rows)


def expected_control_rows(name, control, calls, grids):
    """The control images every ControlNet call should get, computed by hand."""
    expected = []
    stage2 = iter(grids)
    for kwargs, _ in calls:
        rows, _, h, w = kwargs["sample"].shape
        if name in ("demofusion", "apt") and rows > 2:
            # Stage 2: [uncond, cond] x (9 windows of 8x8, then the 2x2 dilated views).
            views = hand_crops(control, next(stage2), 8, 2)
            expected.append(torch.cat([views, views]))
        else:
            # One view of the whole latent per row (stage 1, ScaleCrafter, FreeScale; both passes
            # of ScaleCrafter's noise-damped guidance).
            expected.append(resized(control, (h * F_VAE, w * F_VAE)).expand(rows, -1, -1, -1))
    return expected


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_controlnet_residuals_of_every_view_match_a_hand_computation(name, sd15_control,
                                                                     monkeypatch):
    control = rand_image(1)
    grids = []
    window_grid = ops.window_grid

    def recording_grid(*args, **kwargs):
        grids.append(window_grid(*args, **kwargs))
        return grids[-1]

    monkeypatch.setattr(ops, "window_grid", recording_grid)
    net = sd15_control.controlnet
    # ScaleCrafter at 3x (192^2), where SD 1.5's preset has noise-damped guidance: its base pass
    # (the uncond rows alone) gets the ControlNet too.
    size = 192 if name == "scalecrafter" else SIZE
    with Recorder(sd15_control.unet, net) as record:
        out = generate(sd15_control, name, size=size, control_image=control)
    if name == "scalecrafter":
        assert (1, 24, 24) in out.unet_calls
    # One ControlNet call per UNet call, its residuals passed on as diffusers passes them.
    assert len(record.control) == len(record.unet) == sum(out.unet_calls.values())
    for (_, (down, mid)), unet_kwargs in zip(record.control, record.unet, strict=True):
        assert unet_kwargs["mid_block_additional_residual"] is mid
        assert all(a is b for a, b in zip(unet_kwargs["down_block_additional_residuals"], down,
                                          strict=True))
    expected = expected_control_rows(name, control, record.control, grids)
    for (kwargs, (down, mid)), images in zip(record.control, expected, strict=True):
        torch.testing.assert_close(kwargs["controlnet_cond"], images)
        # The ControlNet run by hand on the same rows with the hand-cut control images.
        hand_down, hand_mid = net(kwargs["sample"], kwargs["timestep"],
                                  encoder_hidden_states=kwargs["encoder_hidden_states"],
                                  controlnet_cond=images, conditioning_scale=1.0,
                                  return_dict=False)
        torch.testing.assert_close(mid, hand_mid)
        for actual, by_hand in zip(down, hand_down, strict=True):
            torch.testing.assert_close(actual, by_hand)
    # The output follows the control image.
    other = generate(sd15_control, name, size=size, control_image=1 - control)
    assert not torch.allclose(out.latents, other.latents, atol=1e-4)


def test_sdxl_controlnet_in_local_and_dilated_views():
    # SDXL: the ControlNet takes the views' micro-conditioning (time ids with each view's crop).
    pipe = tiny_pipeline("sdxl")
    controlled = with_controlnet(pipe, tiny_controlnet(pipe))
    control = rand_image(2, 256)
    with Recorder(controlled.unet, controlled.controlnet) as record:
        generate(controlled, "demofusion", size=256, steps=1, control_image=control)
    (stage1, _), (stage2, (down, mid)) = record.control
    assert stage1["controlnet_cond"].shape == (2, 3, 128, 128)
    # Stage 2 (32x32 latent): 9 windows of 16 (stride 8) and 4 dilated views, each 128x128 pixels
    # and [uncond, cond]; dilated view 0 (row 9) is the control image's even pixels.
    assert stage2["controlnet_cond"].shape == (26, 3, 128, 128)
    torch.testing.assert_close(stage2["controlnet_cond"][9], control[0, :, ::2, ::2])
    torch.testing.assert_close(stage2["added_cond_kwargs"]["time_ids"],
                               record.unet[1]["added_cond_kwargs"]["time_ids"])
    hand_down, hand_mid = controlled.controlnet(
        stage2["sample"], stage2["timestep"], encoder_hidden_states=stage2["encoder_hidden_states"],
        controlnet_cond=stage2["controlnet_cond"], added_cond_kwargs=stage2["added_cond_kwargs"],
        return_dict=False)
    torch.testing.assert_close(mid, hand_mid)


def test_multi_controlnet_and_guidance_window(sd15):
    nets = [tiny_controlnet(sd15, seed=1), tiny_controlnet(sd15, seed=2)]
    controlled = with_controlnet(sd15, nets)
    assert isinstance(controlled.controlnet, MultiControlNetModel)
    images = [rand_image(3), rand_image(4)]
    with Recorder(controlled.unet) as record:
        generate(controlled, "freescale", control_image=images,
                 controlnet_conditioning_scale=[1.0, 0.5])
    kwargs = record.unet[-1]
    size = kwargs["sample"].shape[2:]
    hand = [net(kwargs["sample"], kwargs["timestep"],
                encoder_hidden_states=kwargs["encoder_hidden_states"],
                controlnet_cond=resized(image, (size[0] * 8, size[1] * 8)).expand(2, -1, -1, -1),
                conditioning_scale=scale, return_dict=False)
            for net, image, scale in zip(nets, images, (1.0, 0.5), strict=True)]
    torch.testing.assert_close(kwargs["mid_block_additional_residual"], hand[0][1] + hand[1][1])
    # control_guidance_end = 0.5 of 2 steps: the ControlNet runs at each stage's step 0 only
    # (diffusers' controlnet_keep); steps without it pass no residuals.
    with Recorder(controlled.unet, controlled.controlnet) as record:
        out = generate(controlled, "scalecrafter", control_image=images, control_guidance_end=0.5)
    first = record.unet[0]["timestep"]
    assert len(record.control) == sum(int(torch.equal(k["timestep"], first))
                                      for k in record.unet) >= 1
    assert sum(out.unet_calls.values()) > len(record.control)
    assert all("mid_block_additional_residual" not in k for k in record.unet
               if not torch.equal(k["timestep"], first))


def test_controlnet_bad_input(sd15, sd15_control):
    with Recorder(sd15_control.unet) as record:
        with pytest.raises(TypeError, match="control_image must be a PIL image"):
            generate(sd15_control, "demofusion", control_image="edges.png")
        with pytest.raises(ValueError, match="control_image is 128x64 .W x H., of another aspect"):
            generate(sd15_control, "demofusion", control_image=torch.rand(1, 3, 64, 128))
        with pytest.raises(ValueError, match="pass control_image"):
            generate(sd15_control, "scalecrafter")
        with pytest.raises(ValueError, match="control_guidance_start must be < "):
            generate(sd15_control, "freescale", control_image=rand_image(0),
                     control_guidance_start=0.6, control_guidance_end=0.5)
        with pytest.raises(ValueError, match="control_image holds 2 images; pass 1 or 1"):
            generate(sd15_control, "apt", control_image=torch.rand(2, 3, 128, 128))
    with pytest.raises(ValueError, match="control_image need a ControlNet pipeline"):
        generate(sd15, "demofusion", control_image=rand_image(0))
    assert record.unet == []  # all refused before any model work
    # A ControlNet made for another UNet (SDXL's) does not fit SD 1.5's.
    misfit = with_controlnet(sd15, tiny_controlnet(tiny_pipeline("sdxl")))
    with pytest.raises(ValueError, match="ControlNet 0 does not fit this pipeline: its "
                                         "cross_attention_dim is 64, the UNet's .* is 32"):
        generate(misfit, "demofusion", control_image=rand_image(0))
    with pytest.raises(ValueError, match="list of 2 images"):
        generate(with_controlnet(sd15, [tiny_controlnet(sd15)] * 2), "demofusion",
                 control_image=rand_image(0))


# --------------------------------------------------------------------------------------------------
# image= and fidelity
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_image_input_and_fidelity(name, sd15):
    image, other = rand_image(5), rand_image(6)
    out = generate(sd15, name, image=image)
    assert not torch.allclose(out.latents, generate(sd15, name, image=other).latents, atol=1e-4)
    # ScaleCrafter: fidelity 0 starts at step 0 (default 0.2: step 1); MegaFusion: fidelity 0
    # starts stage 2 at step 0 (default: its own first step, 1); the others: fidelity 1 makes the
    # skip residual's exponent 0 (default: the method's own, 0.5).
    fidelity = 0.0 if name in ("scalecrafter", "megafusion") else 1.0
    assert not torch.allclose(out.latents, generate(sd15, name, image=image,
                                                    fidelity=fidelity).latents, atol=1e-4)
    if name == "scalecrafter":
        # Image-to-image at the target: from step N - int(N (1 - 0.2)) = 1 of 2, one step.
        assert out.unet_calls == {(2, 16, 16): 1}
    else:
        # The image replaces stage 1: encoded at the first stage's size, no stage-1 sampling.
        expected = hrkernels.vae.encode(sd15.vae, resized(image, (64, 64)) * 2 - 1,
                                        generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(out.stages[0].latents, expected)
        assert (2, 8, 8) not in out.unet_calls
        if name == "freescale":
            assert out.plan[0] == "stage 1 (64x64): the input image, encoded (no sampling)"
        if name == "megafusion":
            assert out.plan[0] == "stage 1 (64x64): the input image, encoded"
            assert out.unet_calls == {(2, 16, 16): 1}


def test_image_alpha_and_types(sd15):
    # Alpha is composited over white for image= (over black for control images).
    rgba = np.zeros((4, 6, 4), dtype=np.uint8)
    rgba[..., :3], rgba[:2, :, 3] = 40, 255
    pixels = as_pixels(Image.fromarray(rgba, "RGBA"), "image", background=1.0)
    assert pixels.shape == (1, 3, 4, 6)
    assert torch.equal(pixels[:, :, :2], torch.full((1, 3, 2, 6), 40 / 255))
    assert torch.equal(pixels[:, :, 2:], torch.ones(1, 3, 2, 6))
    half = torch.cat([torch.zeros(1, 3, 2, 2), torch.full((1, 1, 2, 2), 0.25)], 1)
    assert torch.equal(as_pixels(half, "control_image", background=0.0), torch.zeros(1, 3, 2, 2))
    assert torch.equal(as_pixels(half, "image", background=1.0), torch.full((1, 3, 2, 2), 0.75))
    grey = np.full((2, 2, 1), 0.5, dtype=np.float32)
    assert torch.equal(as_pixels(grey, "image", background=1.0), torch.full((1, 3, 2, 2), 0.5))
    assert torch.equal(as_pixels(Image.fromarray(np.full((2, 2), 255, np.uint8), "L"), "image",
                                 background=0.0), torch.ones(1, 3, 2, 2))
    # End to end: a fully transparent image is a white one.
    transparent = generate(sd15, "demofusion", steps=1, image=Image.fromarray(
        np.zeros((SIZE, SIZE, 4), dtype=np.uint8), "RGBA")).stages[0]
    white = generate(sd15, "demofusion", steps=1, image=torch.ones(3, SIZE, SIZE)).stages[0]
    assert torch.equal(transparent.latents, white.latents)


def test_image_bad_input(sd15):
    with Recorder(sd15.unet) as record:
        with pytest.raises(ValueError, match="fidelity must be a number >= 0 and <= 1; got 1.5"):
            generate(sd15, "demofusion", image=rand_image(0), fidelity=1.5)
        with pytest.raises(ValueError, match="fidelity applies to image="):
            generate(sd15, "scalecrafter", fidelity=0.5)
        with pytest.raises(ValueError, match="image is 64x128 .W x H., of another aspect ratio"):
            generate(sd15, "apt", image=torch.rand(3, 128, 64))
        with pytest.raises(ValueError, match="2 channel"):
            generate(sd15, "freescale", image=torch.rand(1, 2, 128, 128))
        with pytest.raises(TypeError, match="image must be a PIL image"):
            generate(sd15, "demofusion", image=torch.zeros(3, 128, 128, dtype=torch.uint8))
    assert record.unet == []


# --------------------------------------------------------------------------------------------------
# IP-Adapter
# --------------------------------------------------------------------------------------------------

CLIP_WIDTH = 16


def load_tiny_ip_adapter(unet, seed=0):
    """A tiny IP-Adapter (ImageProjection + IP attention processors) from a hand-made state dict,
    loaded through diffusers' own path (``_load_ip_adapter_weights``)."""
    generator = torch.Generator().manual_seed(seed)
    width = unet.config.cross_attention_dim
    image_proj = {"proj.weight": torch.randn(4 * width, CLIP_WIDTH, generator=generator),
                  "proj.bias": torch.zeros(4 * width),
                  "norm.weight": torch.ones(width), "norm.bias": torch.zeros(width)}
    ip_layers, key = {}, 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        hidden = unet.get_submodule(name.removesuffix(".processor")).to_k.out_features
        for projection in ("to_k_ip", "to_v_ip"):
            ip_layers[f"{key}.{projection}.weight"] = torch.randn(hidden, width,
                                                                  generator=generator)
        key += 2
    unet._load_ip_adapter_weights([{"image_proj": image_proj, "ip_adapter": ip_layers}],
                                  low_cpu_mem_usage=False)


@pytest.fixture(scope="module")
def sd15_ip():
    pipe = tiny_pipeline("sd15", scheduler="ddim")
    load_tiny_ip_adapter(pipe.unet)
    return pipe


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_ip_adapter_embeds_reach_every_unet_call(name, sd15_ip):
    negative, positive = torch.randn(2, 1, CLIP_WIDTH, generator=torch.Generator().manual_seed(1))
    embeds = [torch.stack([negative, positive])]
    with Recorder(sd15_ip.unet) as record:
        out = generate(sd15_ip, name, steps=1, ip_adapter_image_embeds=embeds)
    assert len(record.unet) == sum(out.unet_calls.values())
    for kwargs in record.unet:
        (rows,) = kwargs["added_cond_kwargs"]["image_embeds"]
        count = kwargs["sample"].shape[0]
        assert rows.shape == (count, 1, CLIP_WIDTH)
        # Uncond rows first (the negative embedding), then the cond rows; ScaleCrafter's base pass
        # is uncond only.
        uncond = count // 2 if count % 2 == 0 and count > 1 else count
        assert torch.equal(rows[:uncond], negative.expand(uncond, 1, CLIP_WIDTH))
        assert torch.equal(rows[uncond:], positive.expand(count - uncond, 1, CLIP_WIDTH))
    changed = [torch.stack([negative, -positive])]
    assert not torch.allclose(out.latents, generate(sd15_ip, name, steps=1,
                                                    ip_adapter_image_embeds=changed).latents,
                              atol=1e-4)


def test_ip_adapter_image_goes_through_the_pipelines_image_encoder(sd15_ip):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    with torch.random.fork_rng():
        torch.manual_seed(0)
        encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            image_size=32, patch_size=8, projection_dim=CLIP_WIDTH)).eval()
    sd15_ip.register_modules(image_encoder=encoder)
    try:
        reference = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
        with Recorder(sd15_ip.unet) as record:
            generate(sd15_ip, "scalecrafter", steps=1, ip_adapter_image=reference)
        positive = encoder(reference).image_embeds
        for kwargs in record.unet:
            (rows,) = kwargs["added_cond_kwargs"]["image_embeds"]
            if rows.shape[0] == 2:  # [uncond, cond]: zeros (diffusers' negative), the image's
                torch.testing.assert_close(rows[1, 0], positive[0])
                assert torch.equal(rows[0], torch.zeros_like(rows[0]))
    finally:
        sd15_ip.register_modules(image_encoder=None)


def test_ip_adapter_bad_input(sd15, sd15_ip):
    with pytest.raises(ValueError, match="pass exactly one of ip_adapter_image and"):
        generate(sd15_ip, "demofusion")
    with pytest.raises(ValueError, match="need an IP-Adapter in the UNet"):
        generate(sd15, "demofusion", ip_adapter_image_embeds=[torch.randn(2, 1, CLIP_WIDTH)])
    with pytest.raises(ValueError, match="a list of 1 tensors"):
        generate(sd15_ip, "demofusion", ip_adapter_image_embeds=torch.randn(2, 1, CLIP_WIDTH))


# --------------------------------------------------------------------------------------------------
# LoRA and CPU offload
# --------------------------------------------------------------------------------------------------


def lora_state(unet):
    return {name: value.clone() for name, value in unet.state_dict().items() if "lora" in name}


def test_lora_changes_the_output_and_survives_the_patches(tmp_path):
    from peft import LoraConfig

    pipe = tiny_pipeline("sd15", scheduler="ddim")
    unet = pipe.unet
    with torch.random.fork_rng():
        torch.manual_seed(0)
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                    target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    before = lora_state(unet)
    assert before
    with_lora = {name: generate(pipe, name, steps=1).latents for name in SAMPLERS}
    # ScaleCrafter's and FreeScale's patches came and went: the LoRA layers are still there.
    after = lora_state(unet)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in after)
    assert not hrkernels.is_patched(unet)
    unet.disable_adapters()
    try:
        for name, latents in with_lora.items():
            assert not torch.allclose(latents, generate(pipe, name, steps=1).latents, atol=1e-4)
    finally:
        unet.enable_adapters()
    assert torch.equal(with_lora["freescale"], generate(pipe, "freescale", steps=1).latents)
    # Patching and unpatching by hand leaves the adapters too.
    hrkernels.patch(unet, hrkernels.ReDilation({"mid_block": 2}))
    hrkernels.unpatch(unet)
    assert lora_state(unet).keys() == before.keys()
    # The same LoRA saved and loaded with diffusers' own pipe.load_lora_weights.
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    StableDiffusionPipeline.save_lora_weights(tmp_path, safe_serialization=True,
                                              unet_lora_layers=get_peft_model_state_dict(unet))
    loaded = tiny_pipeline("sd15", scheduler="ddim")
    loaded.load_lora_weights(tmp_path)
    assert torch.equal(with_lora["freescale"], generate(loaded, "freescale", steps=1).latents)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_cpu_offload_runs_through_the_hooks(name, sd15):
    # On a CPU the offload hooks move nothing, but they must be the ones that would: the samplers
    # call the UNet, the ControlNet and the VAE through them and never move a module by hand.
    def controlled():
        return with_controlnet(tiny_pipeline("sd15", scheduler="ddim"), tiny_controlnet(sd15))

    def run(pipe):
        return generate(pipe, name, steps=1, control_image=rand_image(1), image=rand_image(5))

    expected = run(controlled()).latents
    pipe = controlled()
    pipe.enable_model_cpu_offload(device="cpu")
    calls = {"unet": 0, "vae": 0, "controlnet": 0}
    for component in calls:
        hook = getattr(pipe, component)._hf_hook
        original = hook.pre_forward

        def counting(module, *args, _name=component, _original=original, **kwargs):
            calls[_name] += 1
            return _original(module, *args, **kwargs)

        hook.pre_forward = counting
    out = run(pipe)
    torch.testing.assert_close(out.latents, expected)
    assert calls["unet"] == calls["controlnet"] == sum(out.unet_calls.values())
    assert calls["vae"] >= 1  # the encode of image=
    # Sequential offload: the weights live on "meta" and each module's hook loads them for its
    # forward (ScaleCrafter's and FreeScale's re-dilated convolutions run the hook too; the tiled
    # VAE loads them through the hooks for the call). diffusers' enable_sequential_cpu_offload
    # raises in this CPU build (accelerate's offload back to "meta" fails under torch 2.13, in
    # diffusers' own pipeline call too), so the same hooks are attached with accelerate itself.
    from accelerate import cpu_offload

    pipe = controlled()
    for module in (pipe.unet, pipe.controlnet, pipe.vae):
        cpu_offload(module, execution_device=torch.device("cpu"))
    out = run(pipe)
    torch.testing.assert_close(out.latents, expected)
    for module in (pipe.unet, pipe.controlnet, pipe.vae):
        assert {p.device.type for p in module.parameters()} == {"meta"}


def test_a_new_sampler_gets_the_conditioning_from_the_core(sd15_control):
    # What MegaFusion-style samplers inherit: a method whose steps evaluate the whole latent
    # (denoising_step) and whose first stage is the input image (image_latent) gets ControlNet,
    # image= and fidelity checks with no code of its own.
    from hrkernels.samplers.base import Sampler
    from hrkernels.samplers.outputs import StageResult
    from hrkernels.samplers.stages import (
        denoising_step,
        image_latent,
        initial_latents,
        run_stage,
        stage_schedule,
    )

    class Plain(Sampler):
        name = "Plain"

        def stage_sizes(self, height, width):
            return [(height, width)]

        def generate(self, run, sizes):
            latent = (sizes[0][0] // 8, sizes[0][1] // 8)
            if run.image is not None:
                return [StageResult(1, *sizes[0], image_latent(run, sizes[0]))]
            schedule = stage_schedule(self.scheduler_template, run.num_inference_steps,
                                      run.device)
            batch_sizes = run.engine.plan({latent: [run.batch]}, 1, run.guidance)
            z = run_stage(run, 1, latent, schedule,
                          initial_latents(run, latent, schedule.scheduler),
                          denoising_step(run, schedule, batch_sizes))
            return [StageResult(1, *sizes[0], z)]

    control = rand_image(7, 64)
    with Recorder(sd15_control.unet, sd15_control.controlnet) as record:
        out = Plain(sd15_control)(prompt="a cat", height=64, width=64, num_inference_steps=2,
                                  control_image=control, progress=False, output_type="latent")
    assert len(record.control) == len(record.unet) == 2
    assert all(torch.equal(kwargs["controlnet_cond"], control.expand(2, -1, -1, -1))
               for kwargs, _ in record.control)
    image = Plain(sd15_control)(prompt="a cat", height=64, width=64, image=control,
                                control_image=control, progress=False, output_type="latent")
    assert image.unet_calls == {} and image.latents.shape == out.latents.shape


def test_controlnet_rows_follow_the_images_of_a_batch(sd15_control, monkeypatch):
    # Two images per prompt: view rows are window-major (row r belongs to image r % 2), and one
    # control image serves both.
    control = rand_image(8)
    grids = []
    window_grid = ops.window_grid
    monkeypatch.setattr(ops, "window_grid",
                        lambda *a, **k: grids.append(window_grid(*a, **k)) or grids[-1])
    with Recorder(sd15_control.unet, sd15_control.controlnet) as record:
        DemoFusion(sd15_control, view_batch_size=32)(
            prompt="a cat", height=SIZE, width=SIZE, num_inference_steps=1, progress=False,
            num_images_per_prompt=2, control_image=control, output_type="latent",
            generator=torch.Generator().manual_seed(0))
    stage2 = record.control[-1][0]["controlnet_cond"]
    views = hand_crops(control, grids[0], 8, 2).repeat_interleave(2, dim=0)
    assert torch.equal(stage2, torch.cat([views, views]))

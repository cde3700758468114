"""Tests of ``hrkernels.testing``: the tiny and the full-size random pipelines."""

from __future__ import annotations

import re
import string

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from hrkernels.testing import random_pipeline, tiny_pipeline

KINDS = ["sd15", "sdxl"]
PIPELINE_CLASSES = {"sd15": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}
SCHEDULER_CLASSES = {"sd15": PNDMScheduler, "sdxl": EulerDiscreteScheduler}
BASE_RESOLUTIONS = {"sd15": 64, "sdxl": 128}
REAL_BLOCK_TYPES = {
    "sd15": (
        ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    ),
    "sdxl": (
        ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 2,
        ["CrossAttnUpBlock2D"] * 2 + ["UpBlock2D"],
    ),
}
# Parameter counts of the released checkpoints' modules.
REAL_PARAMETER_COUNTS = {
    "sd15": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    "sdxl": {
        "unet": 2_567_463_684,
        "vae": 83_653_863,
        "text_encoder": 123_060_480,
        "text_encoder_2": 694_659_840,
    },
}


def modules_of(pipe: StableDiffusionPipeline | StableDiffusionXLPipeline) -> dict:
    return {
        name: component
        for name, component in pipe.components.items()
        if isinstance(component, torch.nn.Module)
    }


def module_names(module: torch.nn.Module) -> set[str]:
    return {name for name, _ in module.named_modules()}


def parameter_count(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


@pytest.fixture(scope="module", params=KINDS)
def tiny(request: pytest.FixtureRequest) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    return tiny_pipeline(request.param)


@pytest.fixture(scope="module")
def real_on_meta() -> dict[str, StableDiffusionPipeline | StableDiffusionXLPipeline]:
    return {kind: random_pipeline(kind, device="meta") for kind in KINDS}


def kind_of(pipe: StableDiffusionPipeline | StableDiffusionXLPipeline) -> str:
    return "sdxl" if isinstance(pipe, StableDiffusionXLPipeline) else "sd15"


def test_tiny_pipeline_components(tiny):
    kind = kind_of(tiny)
    assert type(tiny) is PIPELINE_CLASSES[kind]
    assert type(tiny.scheduler) is SCHEDULER_CLASSES[kind]
    assert tiny.scheduler.config.beta_schedule == "scaled_linear"
    assert tiny.scheduler.config.steps_offset == 1
    assert tiny.vae_scale_factor == 8
    assert tiny.unet.config.sample_size * tiny.vae_scale_factor == BASE_RESOLUTIONS[kind]
    if kind == "sd15":
        assert tiny.safety_checker is None
    else:
        assert tiny.watermark is None
    encoders = [tiny.text_encoder] + ([tiny.text_encoder_2] if kind == "sdxl" else [])
    assert sum(encoder.config.hidden_size for encoder in encoders) == (
        tiny.unet.config.cross_attention_dim
    )
    for module in modules_of(tiny).values():
        assert all(parameter.device.type == "cpu" for parameter in module.parameters())
        assert all(parameter.dtype == torch.float32 for parameter in module.parameters())
        assert parameter_count(module) < 3_000_000


def test_tiny_pipeline_has_the_real_topology(tiny, real_on_meta):
    kind = kind_of(tiny)
    real = real_on_meta[kind]
    down_types, up_types = REAL_BLOCK_TYPES[kind]
    assert [type(block).__name__ for block in tiny.unet.down_blocks] == down_types
    assert [type(block).__name__ for block in tiny.unet.up_blocks] == up_types
    assert type(tiny.unet.mid_block).__name__ == "UNetMidBlock2DCrossAttn"
    assert module_names(tiny.vae) == module_names(real.vae)
    tiny_names, real_names = module_names(tiny.unet), module_names(real.unet)
    if kind == "sd15":
        assert tiny_names == real_names
        assert {"down_blocks.3", "down_blocks.2.downsamplers.0.conv"} <= tiny_names
        assert "down_blocks.3.downsamplers" not in tiny_names
    else:
        # Only SDXL's ten-deep transformer stacks are shallower (two deep).
        missing = real_names - tiny_names
        assert missing and all(
            re.search(r"\.transformer_blocks\.[2-9]\b", name) for name in missing
        )
        assert tiny_names <= real_names
        assert tiny.unet.config.addition_embed_type == "text_time"
        assert tiny.unet.config.projection_class_embeddings_input_dim == (
            6 * tiny.unet.config.addition_time_embed_dim + tiny.text_encoder_2.config.projection_dim
        )
    assert {"mid_block", "up_blocks.0.upsamplers.0.conv", "down_blocks.0.resnets.1"} <= tiny_names


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_pipeline_is_seeded(kind):
    state_before = torch.get_rng_state()
    first = tiny_pipeline(kind, seed=3)
    assert torch.equal(torch.get_rng_state(), state_before)
    second = tiny_pipeline(kind, seed=3)
    other = tiny_pipeline(kind, seed=4)
    for name, module in modules_of(first).items():
        second_state = modules_of(second)[name].state_dict()
        other_state = modules_of(other)[name].state_dict()
        assert second_state.keys() == module.state_dict().keys()
        for key, tensor in module.state_dict().items():
            assert torch.equal(tensor, second_state[key]), f"{name}.{key} differs for one seed"
        assert any(
            not torch.equal(tensor, other_state[key])
            for key, tensor in module.state_dict().items()
            if tensor.is_floating_point()
        ), f"{name} is the same for two seeds"


def test_tiny_pipeline_generates_latents(tiny):
    kind = kind_of(tiny)
    side = BASE_RESOLUTIONS[kind]
    latents = tiny(
        prompt="a cat",
        height=side,
        width=side,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    ).images
    assert latents.shape == (1, 4, side // 8, side // 8)
    assert latents.dtype == torch.float32
    assert torch.isfinite(latents).all()
    assert latents.std() > 0.1


def test_tiny_tokenizers_accept_any_ascii_prompt(tiny):
    tokenizers = [tiny.tokenizer] + ([tiny.tokenizer_2] if kind_of(tiny) == "sdxl" else [])
    prompt = string.printable + " The quick brown fox, jumping over the lazy dog!"
    for tokenizer in tokenizers:
        assert tokenizer.model_max_length == 77
        ids = tokenizer(
            prompt,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        assert ids.shape == (1, 77)
        assert ids[0, 0] == tokenizer.bos_token_id
        assert ids[0, -1] == tokenizer.eos_token_id
        # The unknown token is the end-of-text token: no character of the prompt maps to it.
        assert (ids[0, 1:-1] != tokenizer.unk_token_id).all()
        words = tokenizer.convert_tokens_to_ids(["a</w>", "cat</w>"])
        short = tokenizer("a cat", padding="max_length", max_length=77).input_ids
        assert (
            short
            == [tokenizer.bos_token_id, *words, tokenizer.eos_token_id]
            + [tokenizer.pad_token_id] * 73
        )
    if kind_of(tiny) == "sdxl":
        assert tiny.tokenizer_2.pad_token == "!"
    for encoder in (tiny.text_encoder, getattr(tiny, "text_encoder_2", None)):
        if encoder is not None:
            assert encoder.config.vocab_size == len(tiny.tokenizer)
            assert encoder.config.max_position_embeddings == 77


@pytest.mark.parametrize(
    ("name", "scheduler_class"),
    [
        ("ddim", DDIMScheduler),
        ("euler", EulerDiscreteScheduler),
        ("dpm", DPMSolverMultistepScheduler),
        ("unipc", UniPCMultistepScheduler),
    ],
)
def test_tiny_pipeline_scheduler_swap(name, scheduler_class):
    pipe = tiny_pipeline("sdxl", scheduler=name)
    assert type(pipe.scheduler) is scheduler_class
    # The checkpoint's config carries over, including keys Euler itself does not use.
    assert pipe.scheduler.config.beta_end == 0.012
    if name == "ddim":
        assert pipe.scheduler.config.clip_sample is False
        assert pipe.scheduler.config.set_alpha_to_one is False
    latents = pipe("a cat", num_inference_steps=2, output_type="latent").images
    assert torch.isfinite(latents).all()


def test_tiny_pipeline_dtype():
    pipe = tiny_pipeline("sd15", dtype=torch.bfloat16)
    for module in modules_of(pipe).values():
        assert all(parameter.dtype == torch.bfloat16 for parameter in module.parameters())


@pytest.mark.parametrize("build", [tiny_pipeline, random_pipeline])
@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ({"kind": "sd21"}, ValueError, "kind must be one of"),
        ({"dtype": torch.int8}, TypeError, "dtype must be a floating"),
    ],
)
def test_bad_arguments_are_rejected(build, arguments, error, message):
    with pytest.raises(error, match=message):
        build(**arguments, device="meta" if build is random_pipeline else "cpu")


def test_tiny_pipeline_rejects_an_unknown_scheduler():
    with pytest.raises(ValueError, match="scheduler must be None or one of"):
        tiny_pipeline(scheduler="lms")


@pytest.mark.parametrize("kind", KINDS)
def test_random_pipeline_has_the_real_sizes(kind, real_on_meta):
    pipe = real_on_meta[kind]
    assert type(pipe) is PIPELINE_CLASSES[kind]
    assert type(pipe.scheduler) is SCHEDULER_CLASSES[kind]
    modules = modules_of(pipe)
    assert {name: parameter_count(module) for name, module in modules.items()} == (
        REAL_PARAMETER_COUNTS[kind]
    )
    assert isinstance(modules["unet"], UNet2DConditionModel)
    assert isinstance(modules["vae"], AutoencoderKL)
    assert type(modules["text_encoder"]) is CLIPTextModel
    if kind == "sdxl":
        assert type(modules["text_encoder_2"]) is CLIPTextModelWithProjection
    for module in modules.values():
        for parameter in module.parameters():
            assert parameter.device.type == "meta" and parameter.dtype == torch.float16
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == {"sd15": 512, "sdxl": 1024}[kind]
    assert pipe.vae.config.scaling_factor == {"sd15": 0.18215, "sdxl": 0.13025}[kind]


def test_random_pipeline_without_text_encoders():
    pipe = random_pipeline("sdxl", device="meta", with_text_encoders=False)
    assert pipe.text_encoder is None and pipe.text_encoder_2 is None
    assert pipe.tokenizer is not None and pipe.tokenizer_2 is not None
    assert parameter_count(pipe.unet) == REAL_PARAMETER_COUNTS["sdxl"]["unet"]


def test_tiny_if_and_sd3_pipelines_run_offline():
    from diffusers import IFPipeline, IFSuperResolutionPipeline, StableDiffusion3Pipeline

    classes = {"if": IFPipeline, "if-sr": IFSuperResolutionPipeline,
               "sd3": StableDiffusion3Pipeline}
    pipes = {kind: tiny_pipeline(kind) for kind in classes}
    for kind, cls in classes.items():
        assert type(pipes[kind]) is cls
        # eval mode, as from_pretrained leaves a pipeline (the T5 encoder has dropout)
        assert not any(module.training for module in pipes[kind].components.values()
                       if isinstance(module, torch.nn.Module))
    assert pipes["if"].unet.config.sample_size == 16 and pipes["if-sr"].unet.config.in_channels == 6
    assert pipes["sd3"].vae.config.latent_channels == 16 and pipes["sd3"].vae.config.shift_factor
    # The offline T5 tokenizer ends every text with </s> and pads with <pad>.
    ids = pipes["if"].tokenizer("a cat", padding="max_length", max_length=12).input_ids
    assert ids[6:] == [1, 0, 0, 0, 0, 0] and 2 not in ids  # 6 pieces: "▁", "a", "▁", "c", "a", "t"
    image = pipes["if"]("a cat", num_inference_steps=1, height=16, width=16, output_type="pt",
                        clean_caption=False).images
    upscaled = pipes["if-sr"]("a cat", image=image, num_inference_steps=1, height=32, width=32,
                              output_type="pt", clean_caption=False).images
    latents = pipes["sd3"]("a cat", num_inference_steps=1, height=128, width=128,
                           output_type="latent").images
    assert image.shape == (1, 3, 16, 16) and upscaled.shape == (1, 3, 32, 32)
    assert latents.shape == (1, 16, 16, 16) and torch.isfinite(latents).all()
    first = tiny_pipeline("sd3", seed=5).transformer.state_dict()
    second = tiny_pipeline("sd3", seed=5).transformer.state_dict()
    assert all(torch.equal(first[name], second[name]) for name in first)
    with pytest.raises(ValueError, match="SD3 keeps its flow-matching scheduler"):
        tiny_pipeline("sd3", scheduler="ddim")
    with pytest.raises(ValueError, match="kind must be one of"):
        random_pipeline("sd3", device="meta")

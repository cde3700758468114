"""Stable Diffusion pipelines with random weights, for tests and benchmarks.

Nothing here touches a model hub: every module is built from a config written in this file and
initialised from a seeded RNG, and the CLIP tokenizers come from a small byte-level vocabulary
generated in code.

* :func:`tiny_pipeline` builds a real diffusers ``StableDiffusionPipeline`` or
  ``StableDiffusionXLPipeline`` whose modules have the SD 1.5 / SDXL topology (same block types,
  same module names) with tiny channel counts, so a sampler runs end to end on a CPU in well under
  a second.
  ``tiny_pipeline("if" | "if-sr" | "sd3")`` builds tiny DeepFloyd ``IFPipeline`` /
  ``IFSuperResolutionPipeline`` (a T5 encoder and a T5 tokenizer over a local vocabulary) and
  ``StableDiffusion3Pipeline`` (two CLIPs, no T5: the pipeline's zeros path), for MegaFusion.
* :func:`random_pipeline` builds the full-size SD 1.5 / SDXL architectures with random weights, for
  GPU timing and memory measurements.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    IFPipeline,
    IFSuperResolutionPipeline,
    PNDMScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from hrkernels.samplers.schedulers import SCHEDULERS

__all__ = ["random_pipeline", "tiny_controlnet", "tiny_pipeline"]

_Pipeline = StableDiffusionPipeline | StableDiffusionXLPipeline

_KINDS = ("sd15", "sdxl")
# MegaFusion's other families (tiny_pipeline only).
_OTHER_KINDS = ("if", "if-sr", "sd3")


# Scheduler configs as shipped with the checkpoints (runwayml/stable-diffusion-v1-5,
# stabilityai/stable-diffusion-xl-base-1.0). The keys the class does not use are kept on purpose:
# `X.from_config(pipe.scheduler.config)` reads them (DDIM's `clip_sample`, `set_alpha_to_one`).
_SD15_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
}
_SDXL_SCHEDULER_CONFIG: dict[str, Any] = {
    **_SD15_SCHEDULER_CONFIG,
    "interpolation_type": "linear",
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "timestep_spacing": "leading",
    "use_karras_sigmas": False,
}

_SD15_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "up_block_types": (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    # diffusers' legacy name: for these UNets `attention_head_dim` is the number of heads.
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
    "norm_num_groups": 32,
}
_SDXL_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    # 6 micro-conditioning numbers (original size, crop, target size) x 256 + pooled text (1280).
    "projection_class_embeddings_input_dim": 2816,
    "norm_num_groups": 32,
}

_SD15_VAE_CONFIG: dict[str, Any] = {
    "sample_size": 512,
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
}
_SDXL_VAE_CONFIG: dict[str, Any] = {
    **_SD15_VAE_CONFIG,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}

# A few merges so that common words become single tokens, as with the real vocabulary.
_TOKENIZER_MERGES = (
    ("t", "h"),
    ("th", "e</w>"),
    ("a", "n"),
    ("an", "d</w>"),
    ("o", "f</w>"),
    ("i", "n"),
    ("in", "g</w>"),
    ("c", "a"),
    ("ca", "t</w>"),
    ("d", "o"),
    ("do", "g</w>"),
)
_BOS_TOKEN = "<|startoftext|>"
_EOS_TOKEN = "<|endoftext|>"
# SDXL's second tokenizer pads with "!" (id 0), its first with the end-of-text token.
_SDXL_TOKENIZER_2_PAD_TOKEN = "!"
# Bytes, word-final bytes, merges, start and end of text.
_TOKENIZER_VOCAB_SIZE = 2 * 256 + len(_TOKENIZER_MERGES) + 2

# CLIP ViT-L/14 (SD 1.5's encoder and SDXL's first) and OpenCLIP ViT-bigG/14 (SDXL's second).
_CLIP_VIT_L_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}
_CLIP_BIGG_CONFIG: dict[str, Any] = {
    **_CLIP_VIT_L_CONFIG,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}

_TINY_TEXT_OVERRIDES: dict[str, Any] = {
    "vocab_size": _TOKENIZER_VOCAB_SIZE,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "projection_dim": 32,
}
_TINY_ADDITION_TIME_EMBED_DIM = 8

# Tiny configs: the real ones with the sizes overridden, so block types and module names match.
_TINY_UNET_CONFIGS: dict[str, dict[str, Any]] = {
    "sd15": {
        **_SD15_UNET_CONFIG,
        "sample_size": 8,
        "block_out_channels": (16, 32, 64, 64),
        "attention_head_dim": 2,
        "cross_attention_dim": _TINY_TEXT_OVERRIDES["hidden_size"],
        "norm_num_groups": 8,
    },
    "sdxl": {
        **_SDXL_UNET_CONFIG,
        "sample_size": 16,
        "block_out_channels": (16, 32, 64),
        "transformer_layers_per_block": (1, 2, 2),
        "attention_head_dim": (2, 4, 8),
        "cross_attention_dim": 2 * _TINY_TEXT_OVERRIDES["hidden_size"],
        "addition_time_embed_dim": _TINY_ADDITION_TIME_EMBED_DIM,
        "projection_class_embeddings_input_dim": 6 * _TINY_ADDITION_TIME_EMBED_DIM
        + _TINY_TEXT_OVERRIDES["projection_dim"],
        "norm_num_groups": 8,
    },
}
_TINY_VAE_OVERRIDES: dict[str, Any] = {"block_out_channels": (8, 16, 32, 32), "norm_num_groups": 4}
_TINY_VAE_CONFIGS: dict[str, dict[str, Any]] = {
    "sd15": {**_SD15_VAE_CONFIG, **_TINY_VAE_OVERRIDES, "sample_size": 64},
    "sdxl": {**_SDXL_VAE_CONFIG, **_TINY_VAE_OVERRIDES, "sample_size": 128},
}


def _byte_symbols() -> list[str]:
    """The 256 printable characters that byte-level BPE (GPT-2, CLIP) uses for the 256 bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    symbols = {byte: chr(byte) for byte in printable}
    remapped = (byte for byte in range(256) if byte not in symbols)
    symbols.update({byte: chr(256 + offset) for offset, byte in enumerate(remapped)})
    return [symbols[byte] for byte in range(256)]


def _clip_tokenizer(pad_token: str = _EOS_TOKEN) -> CLIPTokenizer:
    """A CLIP tokenizer over a local vocabulary: every byte (alone and word-final), a few merges.

    Laid out like CLIP's (bytes, word-final bytes, merges, then the two special tokens), so any
    text tokenizes; ``model_max_length`` is 77 as in the real checkpoints.
    """
    symbols = _byte_symbols()
    tokens = symbols + [symbol + "</w>" for symbol in symbols]
    tokens += [left + right for left, right in _TOKENIZER_MERGES]
    tokens += [_BOS_TOKEN, _EOS_TOKEN]
    # Loading from files on disk is the one constructor path that transformers 4 and 5 share
    # (transformers 5 ignores `vocab_file=`/`merges_file=` keyword arguments).
    with tempfile.TemporaryDirectory(prefix="hrkernels-tokenizer-") as directory:
        Path(directory, "vocab.json").write_text(
            json.dumps({token: index for index, token in enumerate(tokens)}), encoding="utf-8"
        )
        merges = "\n".join(f"{left} {right}" for left, right in _TOKENIZER_MERGES)
        Path(directory, "merges.txt").write_text(f"#version: 0.2\n{merges}\n", encoding="utf-8")
        return CLIPTokenizer.from_pretrained(
            directory, model_max_length=77, pad_token=pad_token, local_files_only=True
        )


def _text_config(config: dict[str, Any], tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    """A ``CLIPTextConfig`` whose special-token ids are those of ``tokenizer``.

    The eos id matters: the pooled output (SDXL's pooled text embedding) is read at the first eos.
    """
    return CLIPTextConfig(
        **config,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed the CPU generator and ``device``'s own; restore both (and nothing else) on exit."""
    accelerator = device.type not in ("cpu", "meta")
    if accelerator:
        device_module = torch.get_device_module(device.type)
        index = device.index if device.index is not None else device_module.current_device()
        with torch.random.fork_rng(devices=[index], device_type=device.type):
            torch.default_generator.manual_seed(seed)
            with device_module.device(index):
                device_module.manual_seed(seed)
            yield
    else:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            yield


def _check_arguments(kind: str, dtype: torch.dtype, kinds: tuple[str, ...] = _KINDS) -> None:
    """Raise for a ``kind`` (not in ``kinds``) or ``dtype`` that no pipeline can be built with."""
    if kind not in kinds:
        raise ValueError(f"kind must be one of {kinds}, got {kind!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")


def _build_pipeline(
    kind: str,
    unet_config: dict[str, Any],
    vae_config: dict[str, Any],
    text_configs: tuple[dict[str, Any], dict[str, Any]] | None,
    *,
    seed: int,
    init_device: torch.device,
) -> _Pipeline:
    """Build the modules on ``init_device`` from ``seed`` (in float32) and assemble the pipeline.

    ``text_configs`` holds the first and second text encoder configs (SD 1.5 uses only the first);
    ``None`` leaves the text encoders out.
    """
    tokenizer = _clip_tokenizer()
    tokenizer_2 = _clip_tokenizer(pad_token=_SDXL_TOKENIZER_2_PAD_TOKEN) if kind == "sdxl" else None
    text_encoder = text_encoder_2 = None
    with _seeded(seed, init_device), init_device:
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**vae_config)
        if text_configs is not None:
            text_encoder = CLIPTextModel(_text_config(text_configs[0], tokenizer))
            if kind == "sdxl":
                text_encoder_2 = CLIPTextModelWithProjection(
                    _text_config(text_configs[1], tokenizer_2)
                )
    # Schedulers are built outside the device context: they keep their tables on the CPU.
    if kind == "sd15":
        pipe: _Pipeline = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=PNDMScheduler.from_config(_SD15_SCHEDULER_CONFIG),
            safety_checker=None,
            feature_extractor=None,
            image_encoder=None,
            requires_safety_checker=False,
        )
    else:
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=EulerDiscreteScheduler.from_config(_SDXL_SCHEDULER_CONFIG),
            image_encoder=None,
            feature_extractor=None,
            force_zeros_for_empty_prompt=True,
            # The default adds an invisible watermark when the package is installed, which would
            # make outputs depend on the environment.
            add_watermarker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _cast(pipe: _Pipeline, device: torch.device | str, dtype: torch.dtype) -> None:
    """Move every module of ``pipe`` to ``device`` and ``dtype``, in place."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            # `torch.nn.Module.to`, not diffusers' `ModelMixin.to`: diffusers 0.42 logs a warning
            # about float32-only modules on every dtype cast, even when a model has none.
            torch.nn.Module.to(component, device=device, dtype=dtype)


# DeepFloyd IF: the checkpoints' block types (pixel-space UNets with simple cross-attention on T5
# embeddings, a learned-range variance), two levels of 16 and 32 channels; stage II takes the image
# as three more input channels and the noise level as a timestep class embedding.
_TINY_T5_CONFIG: dict[str, Any] = {
    "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4,
    "relative_attention_num_buckets": 8, "pad_token_id": 0, "eos_token_id": 1,
    "decoder_start_token_id": 0, "dropout_rate": 0.0,
}
_TINY_IF_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 16,
    "in_channels": 3,
    "out_channels": 6,
    "layers_per_block": 1,
    "block_out_channels": (16, 32),
    "down_block_types": ("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
    "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
    "up_block_types": ("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
    "cross_attention_dim": 32,
    "encoder_hid_dim": 32,
    "attention_head_dim": 8,
    "addition_embed_type": "text",
    "addition_embed_type_num_heads": 2,
    "cross_attention_norm": "group_norm",
    "resnet_time_scale_shift": "scale_shift",
    "act_fn": "gelu",
    "norm_num_groups": 8,
}
_TINY_IF_SR_UNET_CONFIG: dict[str, Any] = {
    **_TINY_IF_UNET_CONFIG,
    "sample_size": 32,
    "in_channels": 6,
    "class_embed_type": "timestep",
    "mid_block_scale_factor": 1.414,
    "time_embedding_act_fn": "gelu",
    "time_embedding_dim": 32,
}
# The IF checkpoints' kind of scheduler: DDPM on squared-cosine betas with dynamic thresholding and
# a learned-range variance; the image-noising scheduler of stage II is a plain one.
_IF_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "thresholding": True,
    "dynamic_thresholding_ratio": 0.95,
    "sample_max_value": 1.5,
    "prediction_type": "epsilon",
    "variance_type": "learned_range",
}
_IF_NOISING_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
}

# SD3: an MMDiT of two blocks on 16-channel latents (patch 2), SD3's VAE layout (16 latent channels,
# shift and scale, no quant convs), SD3's flow-matching scheduler (shift 3).
_TINY_SD3_TRANSFORMER_CONFIG: dict[str, Any] = {
    "sample_size": 16,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 2,
    "attention_head_dim": 8,
    "num_attention_heads": 4,
    "caption_projection_dim": 32,
    # the two CLIPs' hidden states side by side (32 + 32); the absent T5's zeros have this width
    "joint_attention_dim": 2 * _TINY_TEXT_OVERRIDES["hidden_size"],
    "pooled_projection_dim": 2 * _TINY_TEXT_OVERRIDES["projection_dim"],
}
_TINY_SD3_VAE_CONFIG: dict[str, Any] = {
    **_SD15_VAE_CONFIG,
    **_TINY_VAE_OVERRIDES,
    "sample_size": 128,
    "latent_channels": 16,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
_SD3_SCHEDULER_CONFIG: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 3.0}

_T5_SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")


def _t5_tokenizer() -> T5TokenizerFast:
    """A T5 tokenizer over a local vocabulary: pad, end and unknown tokens, every printable ASCII
    character and the word-start marker (a unigram model built in code: nothing downloaded, no
    sentencepiece); ``model_max_length`` 77 as IF's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    symbols = [chr(code) for code in range(ord(" ") + 1, ord("~") + 1)] + ["\u2581"]
    vocab = [(token, 0.0) for token in _T5_SPECIAL_TOKENS] + [(s, -1.0) for s in symbols]
    backend = Tokenizer(models.Unigram(vocab, unk_id=_T5_SPECIAL_TOKENS.index("<unk>")))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                           unk_token="<unk>", extra_ids=0, model_max_length=77)


def _tiny_other(kind: str, seed: int) -> Any:
    """The tiny IF stage I / II or SD3 pipeline, float32 on the CPU."""
    with _seeded(seed, torch.device("cpu")):
        if kind == "sd3":
            tokenizer = _clip_tokenizer()
            tokenizer_2 = _clip_tokenizer(pad_token=_SDXL_TOKENIZER_2_PAD_TOKEN)
            text = {**_CLIP_VIT_L_CONFIG, **_TINY_TEXT_OVERRIDES}
            pipe = StableDiffusion3Pipeline(
                transformer=SD3Transformer2DModel(**_TINY_SD3_TRANSFORMER_CONFIG),
                scheduler=FlowMatchEulerDiscreteScheduler.from_config(_SD3_SCHEDULER_CONFIG),
                vae=AutoencoderKL(**_TINY_SD3_VAE_CONFIG),
                text_encoder=CLIPTextModelWithProjection(_text_config(text, tokenizer)),
                tokenizer=tokenizer,
                text_encoder_2=CLIPTextModelWithProjection(_text_config(text, tokenizer_2)),
                tokenizer_2=tokenizer_2,
                text_encoder_3=None,
                tokenizer_3=None,
            )
        else:
            tokenizer = _t5_tokenizer()
            common = {
                "tokenizer": tokenizer,
                "text_encoder": T5EncoderModel(T5Config(vocab_size=len(tokenizer),
                                                        **_TINY_T5_CONFIG)),
                "scheduler": DDPMScheduler.from_config(_IF_SCHEDULER_CONFIG),
                "safety_checker": None,
                "feature_extractor": None,
                "watermarker": None,
                "requires_safety_checker": False,
            }
            if kind == "if":
                pipe = IFPipeline(unet=UNet2DConditionModel(**_TINY_IF_UNET_CONFIG), **common)
            else:
                pipe = IFSuperResolutionPipeline(
                    unet=UNet2DConditionModel(**_TINY_IF_SR_UNET_CONFIG),
                    image_noising_scheduler=DDPMScheduler.from_config(
                        _IF_NOISING_SCHEDULER_CONFIG), **common)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()  # as from_pretrained leaves them (T5 has dropout)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_pipeline(
    kind: str = "sd15",
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    scheduler: str | None = None,
) -> Any:
    """Build a tiny SD 1.5, SDXL, DeepFloyd IF (stage I or II) or SD3 pipeline with random
    weights, for tests on CPU.

    The pipeline is a real ``StableDiffusionPipeline`` (``kind="sd15"``) or
    ``StableDiffusionXLPipeline`` (``kind="sdxl"``) whose UNet and VAE have exactly the real
    models' module names (block types, layers per block, resnets with their shortcut convs,
    attentions, down/upsamplers: ``down_blocks.3``, ``mid_block``, ``up_blocks.0.upsamplers.0.conv``
    ...), with 20 times fewer channels in the UNet (``16, 32, 64[, 64]``) and 16 times fewer in
    the VAE (``8, 16, 32, 32``): one UNet evaluation at 32x32 latents takes a few tens of
    milliseconds on two CPU cores. The one exception is SDXL's ten-deep transformer stacks, two
    deep here (depths ``(1, 2, 2)``); SDXL's UNet keeps the ``text_time`` additional embedding.
    The text encoders are two-layer CLIPs of width 32 (SDXL's second with a 32-wide projection, so
    its UNet's ``cross_attention_dim`` is 64), the tokenizers are CLIP tokenizers over a small
    local byte-level vocabulary (any text tokenizes; ``model_max_length`` 77; SDXL's second pads
    with ``"!"`` like the real one), and the scheduler is the one the real checkpoint ships, with
    its config: ``PNDMScheduler`` for SD 1.5, ``EulerDiscreteScheduler`` for SDXL. There is no
    safety checker, no watermarker and no progress bar.

    Base resolution (``unet.config.sample_size * vae_scale_factor``, the pipeline's default
    ``height``/``width``): 64 px (8x8 latents) for ``"sd15"``, 128 px (16x16 latents) for
    ``"sdxl"``. Latent sides must be multiples of 8 for ``"sd15"`` (three downsamplers) and of 4
    for ``"sdxl"`` (two), i.e. image sides multiples of 64 and 32 pixels.

    ``kind="if"``: an ``IFPipeline`` whose UNet has IF's block types (residual down/up blocks,
    simple cross-attention on T5 embeddings, a learned-range variance: 6 output channels), two
    levels of 16 and 32 channels, base size 16 px (pixel space), a two-layer T5 encoder of width
    32 and a T5 tokenizer over a local vocabulary (printable ASCII; anything else is unknown),
    IF's kind of scheduler (DDPM, squared-cosine betas, dynamic thresholding), no safety checker
    or watermarker. ``"if-sr"``: the same as an ``IFSuperResolutionPipeline`` (UNet input: the
    sample and the upscaled image, 6 channels; the noise level as a timestep class embedding),
    base size 32 px. ``"sd3"``: a ``StableDiffusion3Pipeline`` with a two-block MMDiT (patch 2,
    16 latent channels, base size 128 px), SD3's VAE layout (16 latent channels, scaling and
    ``shift_factor``) with the tiny VAE's widths, two tiny CLIPs and no T5 (the pipeline uses
    zeros for it), ``FlowMatchEulerDiscreteScheduler`` with shift 3.

    The modules are initialised on the CPU from ``seed`` (the global RNG state is left untouched)
    and then moved to ``device`` and ``dtype``, so the same seed gives bitwise identical weights on
    every call and every device.

    Args:
        kind: ``"sd15"``, ``"sdxl"``, ``"if"``, ``"if-sr"`` or ``"sd3"``.
        seed: seed of the weight initialisation.
        dtype: floating dtype of every module.
        device: device of every module.
        scheduler: ``None`` keeps the checkpoint's scheduler; a name of
            :data:`hrkernels.samplers.schedulers.SCHEDULERS` (``"ddim"``, ``"euler"``, ``"dpm"``:
            DPM-Solver++ multistep, ``"unipc"``, ``"pndm"``) swaps in that class built with
            ``from_config(pipe.scheduler.config)``, as users do with real checkpoints (SD 1.5,
            SDXL, IF only).

    Returns:
        The pipeline, in ``dtype`` on ``device``.

    Raises:
        ValueError: ``kind`` or ``scheduler`` is not one of the values above.
        TypeError: ``dtype`` is not a floating ``torch.dtype``.

    Example:
        >>> pipe = tiny_pipeline("sd15")
        >>> latents = pipe("a cat", num_inference_steps=2, output_type="latent").images
        >>> tuple(latents.shape)
        (1, 4, 8, 8)
    """
    _check_arguments(kind, dtype, _KINDS + _OTHER_KINDS)
    if scheduler is not None and (scheduler not in SCHEDULERS or kind == "sd3"):
        allowed = "None (SD3 keeps its flow-matching scheduler)" if kind == "sd3" else \
            f"None or one of {tuple(SCHEDULERS)}"
        raise ValueError(f"scheduler must be {allowed}, got {scheduler!r}")
    if kind in _OTHER_KINDS:
        pipe = _tiny_other(kind, seed)
        if scheduler is not None:
            pipe.scheduler = SCHEDULERS[scheduler].from_config(pipe.scheduler.config)
        _cast(pipe, device, dtype)
        return pipe
    text_configs = (
        {**_CLIP_VIT_L_CONFIG, **_TINY_TEXT_OVERRIDES},
        {**_CLIP_BIGG_CONFIG, **_TINY_TEXT_OVERRIDES},
    )
    pipe = _build_pipeline(
        kind,
        _TINY_UNET_CONFIGS[kind],
        _TINY_VAE_CONFIGS[kind],
        text_configs,
        seed=seed,
        init_device=torch.device("cpu"),
    )
    if scheduler is not None:
        pipe.scheduler = SCHEDULERS[scheduler].from_config(pipe.scheduler.config)
    _cast(pipe, device, dtype)
    return pipe


def random_pipeline(
    kind: str = "sdxl",
    dtype: torch.dtype = torch.float16,
    device: str | torch.device = "cuda",
    *,
    seed: int = 0,
    with_text_encoders: bool = True,
) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """Build a full-size SD 1.5 or SDXL pipeline with random weights, for GPU timing.

    The configs are those of runwayml/stable-diffusion-v1-5 and
    stabilityai/stable-diffusion-xl-base-1.0, written out in this module: the UNet (859.5M
    parameters for SD 1.5, 2567.5M for SDXL), the VAE (83.7M; SDXL's with ``scaling_factor``
    0.13025), CLIP ViT-L/14 as text encoder (123.1M) and, for SDXL, OpenCLIP ViT-bigG/14 with
    projection as second text encoder (694.7M), and the checkpoint's scheduler
    (``PNDMScheduler``/``EulerDiscreteScheduler``). The tokenizers are the small local ones of
    :func:`tiny_pipeline`; the text encoders keep the real 49408-entry embedding tables, so their
    cost is the real one. Base resolution: 512 px for SD 1.5, 1024 px for SDXL.

    The weights have the default (random) initialisation, so images are noise, but every tensor
    shape and every kernel launched is the real one; activations stay small (below 10 in
    magnitude through either UNet), so float16 runs are finite. The modules are created directly
    on ``device`` (``"meta"`` builds them without allocating memory) from ``seed``, in float32,
    then cast to ``dtype``: reset the peak-memory statistics after building. The global RNG state
    is left untouched. The same seed gives the same weights on the same device type, not across
    device types.

    Args:
        kind: ``"sd15"`` or ``"sdxl"``.
        dtype: floating dtype of every module.
        device: device on which the modules are created.
        seed: seed of the weight initialisation.
        with_text_encoders: ``False`` leaves out the text encoders (``text_encoder`` and
            ``text_encoder_2`` are ``None``), saving their memory (1.6 GB in fp16 for SDXL) and
            initialisation time. The caller must then pass the text embeddings: ``prompt_embeds``
            of shape ``[B, 77, 768]`` (SD 1.5) or ``[B, 77, 2048]`` plus ``pooled_prompt_embeds``
            ``[B, 1280]`` (SDXL), and for SD 1.5 with ``guidance_scale > 1`` also
            ``negative_prompt_embeds`` (SDXL uses zeros for an empty negative prompt).

    Returns:
        The pipeline, in ``dtype`` on ``device``.

    Raises:
        ValueError: ``kind`` is not ``"sd15"`` or ``"sdxl"``.
        TypeError: ``dtype`` is not a floating ``torch.dtype``.

    Example:
        >>> pipe = random_pipeline("sdxl", device="meta", with_text_encoders=False)
        >>> sum(p.numel() for p in pipe.unet.parameters())
        2567463684
    """
    _check_arguments(kind, dtype)
    if kind == "sd15":
        unet_config, vae_config = _SD15_UNET_CONFIG, _SD15_VAE_CONFIG
    else:
        unet_config, vae_config = _SDXL_UNET_CONFIG, _SDXL_VAE_CONFIG
    text_configs = (_CLIP_VIT_L_CONFIG, _CLIP_BIGG_CONFIG) if with_text_encoders else None
    pipe = _build_pipeline(
        kind, unet_config, vae_config, text_configs, seed=seed, init_device=torch.device(device)
    )
    _cast(pipe, device, dtype)
    return pipe


# The tiny ControlNet's conditioning embedding: 3 stride-2 convolutions (control images at f = 8
# times the latent size, as the real ones), 8 channels each.
_TINY_CONTROLNET_EMBEDDING = (8, 8, 8, 8)


def tiny_controlnet(pipe: _Pipeline, *, seed: int = 0) -> Any:
    """A ``ControlNetModel`` for a pipeline's UNet (``ControlNetModel.from_unet``: its encoder
    copied), with a tiny conditioning embedding and random output convolutions (a fresh
    ControlNet's are zero, so its residuals would be zero), on the UNet's device and dtype.

    Example::

        >>> from hrkernels.samplers.inputs import with_controlnet
        >>> pipe = tiny_pipeline("sdxl")
        >>> type(with_controlnet(pipe, tiny_controlnet(pipe))).__name__
        'StableDiffusionXLControlNetPipeline'
    """
    from diffusers import ControlNetModel

    unet = pipe.unet
    with _seeded(seed, torch.device("cpu")):
        controlnet = ControlNetModel.from_unet(
            unet, conditioning_embedding_out_channels=_TINY_CONTROLNET_EMBEDDING)
        zero_initialised = [controlnet.controlnet_cond_embedding.conv_out,
                            *controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]
        for conv in zero_initialised:
            torch.nn.init.normal_(conv.weight, std=1.0)
            torch.nn.init.normal_(conv.bias, std=1.0)
    if (controlnet.device, controlnet.dtype) != (unet.device, unet.dtype):
        controlnet = controlnet.to(unet.device, unet.dtype)
    return controlnet

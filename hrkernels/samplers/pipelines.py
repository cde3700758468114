"""Pipeline adapters: everything a sampler needs from one family of diffusers pipelines.

A sampler never branches on the model family; it asks its :class:`PipelineAdapter` for

* the geometry: the denoiser (``model``), the scheduler, the device and dtype, ``vae_scale_factor``
  ``f`` (pixels per latent pixel; 1 for a pixel-space model), the base latent size and the latent
  channels;
* prompt encoding into a :class:`Conditioning` (per-image model inputs for the cond and uncond
  branches of guidance);
* one model evaluation (:meth:`PipelineAdapter.denoise`) of a :class:`ModelCall`: the rows, the
  timestep, the text rows and the family's extra inputs (SDXL's micro-conditioning, built from
  each view's crop by :meth:`PipelineAdapter.micro_conditioning`);
* latents -> the caller's ``output_type`` (:meth:`PipelineAdapter.to_images`: the VAE, the safety
  checker where the pipeline has one, post-processing).

:func:`adapter_for` picks the adapter of a pipeline; :data:`ADAPTERS` is the open list (a family
such as DeepFloyd IF or SD3 adds a subclass and registers it with :func:`register_adapter`, without
touching the engine or the stage loop).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from hrkernels import vae as vae_io
from hrkernels._validate import check_int, describe

__all__ = [
    "ADAPTERS",
    "Conditioning",
    "ModelCall",
    "PipelineAdapter",
    "SDXLAdapter",
    "StableDiffusionAdapter",
    "adapter_for",
    "register_adapter",
]

OUTPUT_TYPES = ("pil", "pt", "np", "latent")


@dataclass
class Conditioning:
    """Encoded prompts, one row per image (``B = batch * num_images_per_prompt``).

    ``cond`` / ``uncond``: model-input name -> ``[B, ...]`` tensor on the device, in the model's
    dtype (SD: ``encoder_hidden_states`` ``[B, L, D]``; SDXL adds ``text_embeds`` ``[B, P]``);
    ``uncond`` is None without classifier-free guidance. ``extra``: per-call tensors the adapter
    builds its micro-conditioning from (SDXL: ``size_ids`` ``[1, 2]``, the final image's size).
    """

    cond: dict[str, torch.Tensor]
    uncond: dict[str, torch.Tensor] | None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return next(iter(self.cond.values())).shape[0]

    def branch(self, name: str) -> dict[str, torch.Tensor]:
        """The inputs of guidance branch ``"cond"`` or ``"uncond"``."""
        if name == "cond":
            return self.cond
        if name == "uncond" and self.uncond is not None:
            return self.uncond
        raise ValueError(f"this conditioning has no {name!r} branch")


@dataclass
class ModelCall:
    """One evaluation of the denoiser, as the engine plans it.

    ``sample``: ``[R, C, h, w]`` in the model's dtype; ``timestep``: 0-d device tensor; ``text``:
    model-input name -> ``[R, ...]`` rows (from :class:`Conditioning`); ``micro``: the family's
    extra per-row inputs (SDXL: ``time_ids`` ``[R, 6]``), or empty; ``variant``: the patched
    model's configuration to run (:func:`hrkernels.patching.variant`), None for the active one.
    """

    sample: torch.Tensor
    timestep: torch.Tensor
    text: dict[str, torch.Tensor]
    micro: dict[str, torch.Tensor] = field(default_factory=dict)
    variant: str | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(rows, h, w)``: the key of :attr:`SamplerOutput.unet_calls`."""
        return (self.sample.shape[0], *self.sample.shape[2:])


class PipelineAdapter:
    """A diffusers pipeline as the samplers see it (one subclass per model family)."""

    family: ClassVar[str]
    pipeline_classes: ClassVar[tuple[type, ...]]
    # Whether micro_conditioning reads the views' crops (the engine builds them only then).
    uses_crops: ClassVar[bool] = False

    def __init__(self, pipe: Any, sampler: str) -> None:
        self.pipe = pipe
        self.sampler = sampler
        for component in self.required_components():
            if getattr(pipe, component, None) is None:
                raise TypeError(f"{sampler} needs a pipeline with a {component}; this "
                                f"{type(pipe).__name__} has none")

    # -- geometry ---------------------------------------------------------------------------------

    def required_components(self) -> tuple[str, ...]:
        return ("unet", "vae", "scheduler")

    @property
    def model(self) -> torch.nn.Module:
        """The denoiser (the UNet)."""
        return self.pipe.unet

    @property
    def scheduler(self) -> Any:
        return self.pipe.scheduler

    @property
    def device(self) -> torch.device:
        return self.pipe._execution_device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def vae_scale_factor(self) -> int:
        """``f``: pixels per latent pixel (the VAE's scale factor; 1 for a pixel-space model)."""
        return int(getattr(self.pipe, "vae_scale_factor", vae_io.scale_factor(self.pipe.vae)))

    @property
    def base_latent_size(self) -> int:
        """The model's native latent size (``unet.config.sample_size``): 128 for SDXL, 64 for
        SD 1.5."""
        size = self.model.config.sample_size
        return int(size if isinstance(size, int) else max(size))

    @property
    def base_size(self) -> int:
        """``b``: the model's native size in pixels (1024 for SDXL, 512 for SD 1.5)."""
        return self.base_latent_size * self.vae_scale_factor

    @property
    def latent_channels(self) -> int:
        return int(self.model.config.in_channels)

    @property
    def text_width(self) -> int | None:
        """``D`` of the text embeddings the model takes (``cross_attention_dim``; None when the
        config does not say one)."""
        return _config_width(self.model.config.cross_attention_dim)

    @property
    def model_channels(self) -> int:
        """Channels of the model's first level (the activation-memory estimate of
        ``view_batch_size="auto"``)."""
        return int(self.model.config.block_out_channels[0])

    # -- conditioning -----------------------------------------------------------------------------

    def encode_prompts(self, *, guided: bool, size: tuple[int, int],
                       num_images_per_prompt: int, **prompts: Any) -> Conditioning:
        """Encode the call's prompt arguments (as the pipeline's own ``__call__`` takes them)."""
        raise NotImplementedError

    def micro_conditioning(self, cond: Conditioning,
                           crops: torch.Tensor) -> dict[str, torch.Tensor]:
        """Extra per-row model inputs for views whose top-left corners in pixels are ``crops``
        ``[R, 2]`` (int64, on the device). None here."""
        return {}

    def denoise(self, call: ModelCall) -> torch.Tensor:
        """The model's noise prediction for one call: ``[R, C, h, w]`` with the sample's channels
        (a family whose model predicts more, e.g. a learned variance, returns the noise part), in
        the model's dtype."""
        raise NotImplementedError

    # -- output -----------------------------------------------------------------------------------

    def decode(self, latents: torch.Tensor, max_memory: int | None = None) -> torch.Tensor:
        """Latents ``[B, C, h, w]`` -> pixels ``[B, 3, h f, w f]`` in about [-1, 1] (not
        clamped): :func:`hrkernels.vae.decode` within ``max_memory`` bytes (None: its default)
        (a pixel-space family returns the latents)."""
        return vae_io.decode(self.pipe.vae, latents, max_memory=max_memory)

    def encode(self, images: torch.Tensor, generator: torch.Generator | None,
               max_memory: int | None = None) -> torch.Tensor:
        """Pixels ``[B, 3, H, W]`` in [-1, 1] -> float32 latents (posterior sample from
        ``generator``): :func:`hrkernels.vae.encode` within ``max_memory`` bytes."""
        return vae_io.encode(self.pipe.vae, images, generator=generator, max_memory=max_memory)

    def to_images(self, latents: torch.Tensor, output_type: str,
                  max_memory: int | None = None) -> Any:
        """Latents ``[B, C, h, w]`` -> ``output_type`` images (the latents themselves for
        ``"latent"``); the decode within ``max_memory`` bytes."""
        if output_type == "latent":
            return latents
        return self.pipe.image_processor.postprocess(self.decode(latents, max_memory),
                                                     output_type=output_type)


def _text_batch(value: Any, name: str) -> int | None:
    """The batch of a text prompt argument (None, a string or a non-empty list of strings)."""
    if value is None:
        return None
    if isinstance(value, str):
        return 1
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise TypeError(f"{name} must be a string or a list of strings; got {describe(value)}")
    if not value:
        raise ValueError(f"{name} must be a string or a non-empty list of strings; got []")
    return len(value)


def _embeds_batch(value: Any, name: str, dims: tuple[str, ...], width: int | None) -> int | None:
    """The batch of an embeddings argument: None, or a tensor of the named ``dims`` whose last is
    ``width`` (None: not checked)."""
    if value is None:
        return None
    shape = f"[{', '.join(dims)}]"
    if width is not None:
        shape += f" with {dims[-1]} = {width} (this model's)"
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a tensor {shape}; got {describe(value)}")
    if value.dim() != len(dims) or (width is not None and value.shape[-1] != width):
        raise ValueError(f"{name} must be a tensor {shape}; got shape {list(value.shape)}")
    return value.shape[0]


def _same_batch(batches: dict[str, int | None], sampler: str) -> None:
    given = {name: batch for name, batch in batches.items() if batch is not None}
    if len(set(given.values())) > 1:
        listed = ", ".join(f"{name} {batch}" for name, batch in given.items())
        raise ValueError(f"{sampler}: the prompt arguments must have one batch size; got {listed}")


def check_prompt_arguments(sampler: str, prompts: dict[str, Any], num_images_per_prompt: Any,
                           text_width: int | None, pooled_width: int | None = None) -> None:
    """The call's prompt arguments, before any model work (encoding included).

    Texts are None, a string or a non-empty list of strings; ``prompt_embeds`` and
    ``negative_prompt_embeds`` are ``[B, L, D]`` tensors with ``D = text_width`` (the model's
    ``cross_attention_dim``) and, both given, the same shape; the pooled ones (SDXL,
    ``pooled_width`` given) ``[B, P]``; every argument given has the same batch ``B``.

    Raises:
        TypeError: an argument of the wrong type.
        ValueError: neither or both of ``prompt`` and ``prompt_embeds``, an empty prompt list,
            embeddings of the wrong rank or width, batches or shapes that disagree, SDXL
            embeddings without their pooled ones.
    """
    texts = ("prompt", "prompt_2", "negative_prompt", "negative_prompt_2")
    batches = {name: _text_batch(prompts.get(name), name) for name in texts}
    for name in ("prompt_embeds", "negative_prompt_embeds"):
        batches[name] = _embeds_batch(prompts.get(name), name, ("B", "L", "D"), text_width)
    if pooled_width is not None:
        for name in ("pooled_prompt_embeds", "negative_pooled_prompt_embeds"):
            batches[name] = _embeds_batch(prompts.get(name), name, ("B", "P"), pooled_width)
    if (prompts.get("prompt") is None) == (prompts.get("prompt_embeds") is None):
        raise ValueError(f"{sampler}: pass exactly one of prompt and prompt_embeds")
    _same_batch(batches, sampler)
    embeds, negative = prompts.get("prompt_embeds"), prompts.get("negative_prompt_embeds")
    if embeds is not None and negative is not None and embeds.shape != negative.shape:
        raise ValueError(f"{sampler}: negative_prompt_embeds must have prompt_embeds' shape "
                         f"{list(embeds.shape)} (the same sequence length); got "
                         f"{list(negative.shape)}")
    if pooled_width is not None:
        for embeds_name, pooled_name in (("prompt_embeds", "pooled_prompt_embeds"),
                                         ("negative_prompt_embeds",
                                          "negative_pooled_prompt_embeds")):
            if prompts.get(embeds_name) is not None and prompts.get(pooled_name) is None:
                raise ValueError(f"{sampler}: SDXL needs {pooled_name} with {embeds_name}")
    check_int(num_images_per_prompt, "num_images_per_prompt", minimum=1)


def _config_width(value: Any) -> int | None:
    """A width from a UNet config entry (an int, or a per-block list of one value)."""
    if isinstance(value, int):
        return value
    if isinstance(value, (list, tuple)) and len(set(value)) == 1:
        return int(value[0])
    return None


class StableDiffusionAdapter(PipelineAdapter):
    """``StableDiffusionPipeline`` (SD 1.x, 2.x): one CLIP text encoder, no extra model inputs;
    the safety checker runs where the pipeline has one."""

    family = "sd"
    pipeline_classes = (StableDiffusionPipeline,)
    _SDXL_ONLY = ("prompt_2", "negative_prompt_2", "pooled_prompt_embeds",
                  "negative_pooled_prompt_embeds")

    def encode_prompts(self, *, guided: bool, size: tuple[int, int],
                       num_images_per_prompt: int, **prompts: Any) -> Conditioning:
        pipe, sampler = self.pipe, self.sampler
        given = [name for name in self._SDXL_ONLY if prompts.get(name) is not None]
        if given:
            raise ValueError(f"{sampler}: {', '.join(given)} only apply to SDXL pipelines; "
                             f"{type(pipe).__name__} takes prompt/negative_prompt (or their "
                             "embeds)")
        check_prompt_arguments(sampler, prompts, num_images_per_prompt, self.text_width)
        negative_embeds = prompts.get("negative_prompt_embeds")
        if guided and pipe.text_encoder is None and negative_embeds is None:
            raise ValueError(f"{sampler}: this pipeline has no text encoder; with guidance_scale "
                             "> 1 pass negative_prompt_embeds too")
        embeds, negative = pipe.encode_prompt(
            prompts.get("prompt"), self.device, num_images_per_prompt, guided,
            prompts.get("negative_prompt"), prompt_embeds=prompts.get("prompt_embeds"),
            negative_prompt_embeds=negative_embeds,
        )
        device, dtype = self.device, self.dtype
        return Conditioning(
            cond={"encoder_hidden_states": embeds.to(device, dtype)},
            uncond={"encoder_hidden_states": negative.to(device, dtype)} if guided else None,
        )

    def denoise(self, call: ModelCall) -> torch.Tensor:
        return self.model(call.sample, call.timestep,
                          encoder_hidden_states=call.text["encoder_hidden_states"],
                          added_cond_kwargs=None, return_dict=False)[0]

    def to_images(self, latents: torch.Tensor, output_type: str,
                  max_memory: int | None = None) -> Any:
        if output_type == "latent" or getattr(self.pipe, "safety_checker", None) is None:
            return super().to_images(latents, output_type, max_memory)
        images = self.decode(latents, max_memory)
        images, flagged = self.pipe.run_safety_checker(images, images.device, self.dtype)
        keep = None if flagged is None else [not value for value in flagged]
        return self.pipe.image_processor.postprocess(images, output_type=output_type,
                                                     do_denormalize=keep)


class SDXLAdapter(PipelineAdapter):
    """``StableDiffusionXLPipeline``: two text encoders (pooled text embeddings) and the
    micro-conditioning ``time_ids = [H, W, crop_top, crop_left, H, W]`` per row, with
    ``original_size = target_size = (H, W)`` of the final image for every stage and each view's
    own crop (METHODS.md, DemoFusion, "SDXL micro-conditioning")."""

    family = "sdxl"
    pipeline_classes = (StableDiffusionXLPipeline,)
    uses_crops = True
    # time_ids per row: original size, crop, target size.
    TIME_IDS = 6

    @property
    def pooled_width(self) -> int | None:
        """``P`` of the pooled text embeddings: the UNet's added-embedding input minus the
        time ids' embeddings."""
        config = self.model.config
        total, per_id = (config.get("projection_class_embeddings_input_dim"),
                         config.get("addition_time_embed_dim"))
        if not isinstance(total, int) or not isinstance(per_id, int):
            return None
        return total - self.TIME_IDS * per_id

    def encode_prompts(self, *, guided: bool, size: tuple[int, int],
                       num_images_per_prompt: int, **prompts: Any) -> Conditioning:
        check_prompt_arguments(self.sampler, prompts, num_images_per_prompt, self.text_width,
                               self.pooled_width)
        embeds, negative, pooled, negative_pooled = self.pipe.encode_prompt(
            device=self.device, num_images_per_prompt=num_images_per_prompt,
            do_classifier_free_guidance=guided, **prompts)
        device, dtype = self.device, self.dtype
        return Conditioning(
            cond={"encoder_hidden_states": embeds.to(device, dtype),
                  "text_embeds": pooled.to(device, dtype)},
            uncond={"encoder_hidden_states": negative.to(device, dtype),
                    "text_embeds": negative_pooled.to(device, dtype)} if guided else None,
            extra={"size_ids": torch.tensor([list(size)], dtype=dtype, device=device)},
        )

    def micro_conditioning(self, cond: Conditioning,
                           crops: torch.Tensor) -> dict[str, torch.Tensor]:
        sizes = cond.extra["size_ids"].expand(crops.shape[0], 2)
        return {"time_ids": torch.cat([sizes, crops.to(sizes.dtype), sizes], dim=1)}

    def denoise(self, call: ModelCall) -> torch.Tensor:
        added = {"text_embeds": call.text["text_embeds"], "time_ids": call.micro["time_ids"]}
        return self.model(call.sample, call.timestep,
                          encoder_hidden_states=call.text["encoder_hidden_states"],
                          added_cond_kwargs=added, return_dict=False)[0]


ADAPTERS: list[type[PipelineAdapter]] = []


def register_adapter(adapter: type[PipelineAdapter]) -> None:
    """Make :func:`adapter_for` recognise ``adapter.pipeline_classes`` (later registrations are
    tried first, so a subclass pipeline may get its own adapter)."""
    if not (isinstance(adapter, type) and issubclass(adapter, PipelineAdapter)):
        raise TypeError(f"adapter must be a PipelineAdapter subclass; got {adapter!r}")
    if adapter not in ADAPTERS:
        ADAPTERS.insert(0, adapter)


register_adapter(StableDiffusionAdapter)
register_adapter(SDXLAdapter)


def adapter_for(pipe: Any, sampler: str,
                families: tuple[str, ...] | None = None) -> PipelineAdapter:
    """The adapter of ``pipe`` for sampler ``sampler``.

    Args:
        pipe: a diffusers pipeline.
        sampler: the sampler's name (for messages).
        families: the families the sampler supports (None: every registered one).

    Raises:
        TypeError: ``pipe`` is of no supported family (the message names the supported pipeline
            classes), or lacks a component the family needs.
    """
    supported = [a for a in ADAPTERS if families is None or a.family in families]
    for adapter in supported:
        if isinstance(pipe, adapter.pipeline_classes):
            return adapter(pipe, sampler)
    names = ", ".join(cls.__name__ for a in reversed(supported) for cls in a.pipeline_classes)
    raise TypeError(f"{sampler} supports {names} (or subclasses); got {type(pipe).__name__}")


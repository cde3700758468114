"""Pipeline adapters: everything a sampler needs from one family of diffusers pipelines.

A sampler never branches on the model family; it asks its :class:`PipelineAdapter` for

* the geometry: the denoiser (``model``), the scheduler, the device and dtype, ``vae_scale_factor``
  ``f`` (pixels per latent pixel; 1 for a pixel-space model), the base latent size and the latent
  channels;
* prompt encoding into a :class:`Conditioning` (per-image model inputs for the cond and uncond
  branches of guidance);
* one model evaluation (:meth:`PipelineAdapter.denoise`) of a :class:`ModelCall`: the rows, the
  timestep, the text rows and the family's extra inputs (SDXL's micro-conditioning, built from
  each view's crop by :meth:`PipelineAdapter.micro_conditioning`), with the pipeline's ControlNet
  run on the call's control images and IP-Adapter embeddings passed
  (:meth:`PipelineAdapter.run_unet`);
* latents -> the caller's ``output_type`` (:meth:`PipelineAdapter.to_images`: the VAE, the safety
  checker where the pipeline has one, post-processing).

Families: SD 1.x/2.x (:class:`StableDiffusionAdapter`), SDXL (:class:`SDXLAdapter`), DeepFloyd IF
stage I and II (:class:`IFAdapter`, :class:`IFSuperResolutionAdapter`: pixel space) and SD3
(:class:`SD3Adapter`: a transformer on flow matching).

:func:`adapter_for` picks the adapter of a pipeline; :data:`ADAPTERS` is the open list (a family
such as DeepFloyd IF or SD3 adds a subclass and registers it with :func:`register_adapter`, without
touching the engine or the stage loop).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from diffusers import (
    IFPipeline,
    IFSuperResolutionPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLPipeline,
)

from hrkernels import vae as vae_io
from hrkernels._validate import check_int, describe

__all__ = [
    "ADAPTERS",
    "IMAGE_EMBEDS",
    "Conditioning",
    "IFAdapter",
    "IFSuperResolutionAdapter",
    "SD3Adapter",
    "ModelCall",
    "PipelineAdapter",
    "SDXLAdapter",
    "StableDiffusionAdapter",
    "adapter_for",
    "register_adapter",
]

OUTPUT_TYPES = ("pil", "pt", "np", "latent")
# Conditioning rows named ``image_embeds.<i>`` are IP-Adapter ``i``'s image embeddings.
IMAGE_EMBEDS = "image_embeds"


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
    model's configuration to run (:func:`hrkernels.patching.variant`), None for the active one;
    ``branches``: the guidance branches stacked in the rows, in equal blocks (``("uncond",
    "cond")``: ``[uncond x k, cond x k]``; empty when unknown).
    ``control``: per ControlNet the control images of the rows, ``[R, 3, h f, w f]`` in the
    ControlNet's dtype (empty: no ControlNet this call), with ``control_scales`` (one
    ``conditioning_scale`` each).

    A field added here that holds per-row inputs must be a tensor (or a dict, list or tuple of
    tensors) whose first dimension is ``R``, so :meth:`select_rows` cuts it with the sample.
    """

    sample: torch.Tensor
    timestep: torch.Tensor
    text: dict[str, torch.Tensor]
    micro: dict[str, torch.Tensor] = field(default_factory=dict)
    variant: str | None = None
    branches: tuple[str, ...] = ()
    control: tuple[torch.Tensor, ...] = ()
    control_scales: tuple[float, ...] = ()

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(rows, h, w)``: the key of :attr:`SamplerOutput.unet_calls`."""
        return (self.sample.shape[0], *self.sample.shape[2:])

    def select_rows(self, rows: slice) -> ModelCall:
        """The call on rows ``rows`` of every per-row input (CFG-parallel runs one guidance
        branch of a call per rank: ``branches`` keeps the branches those rows hold)."""
        count = self.sample.shape[0]
        start, stop, _ = rows.indices(count)
        block = count // len(self.branches) if self.branches else 0
        whole_blocks = block and count % block == 0 and start % block == 0 and stop % block == 0
        branches = self.branches[start // block:stop // block] if whole_blocks else ()
        changes = {f.name: _select_rows(getattr(self, f.name), rows, count)
                   for f in fields(self) if f.name not in ("timestep", "variant", "branches")}
        return replace(self, **changes, branches=branches)


def _select_rows(value: Any, rows: slice, count: int) -> Any:
    """``value`` cut to ``rows`` where it is per-row (a tensor whose first dimension is
    ``count``, or a dict, list or tuple of them)."""
    if isinstance(value, torch.Tensor):
        return value[rows] if value.dim() and value.shape[0] == count else value
    if isinstance(value, dict):
        return {name: _select_rows(item, rows, count) for name, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_select_rows(item, rows, count) for item in value)
    return value


class PipelineAdapter:
    """A diffusers pipeline as the samplers see it (one subclass per model family)."""

    family: ClassVar[str]
    pipeline_classes: ClassVar[tuple[type, ...]]
    # Whether micro_conditioning reads the views' crops (the engine builds them only then).
    uses_crops: ClassVar[bool] = False
    # A pixel-space model (DeepFloyd IF): no VAE, its "latents" are the images in [-1, 1].
    pixel_space: ClassVar[bool] = False
    # The ranks a parallel sampler shares the VAE's strips with (hrkernels.distributed), or None.
    communicator: Any = None

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
    def size_multiple(self) -> int:
        """Pixels an image side must be a multiple of for the model (``f``; SD3: ``f`` times the
        transformer's patch size)."""
        return self.vae_scale_factor

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
    def controlnet(self) -> torch.nn.Module | None:
        """The pipeline's ControlNet module (a ``ControlNetModel`` or ``MultiControlNetModel``), or
        None."""
        return getattr(self.pipe, "controlnet", None)

    @property
    def controlnets(self) -> tuple[torch.nn.Module, ...]:
        """The ControlNets, one per control image (empty without)."""
        net = self.controlnet
        if net is None:
            return ()
        return tuple(getattr(net, "nets", None) or (net,))

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

    def run_unet(self, call: ModelCall, added: dict[str, torch.Tensor] | None) -> torch.Tensor:
        """The UNet on one call, as diffusers' pipelines call it: ``encoder_hidden_states`` from
        the text rows, ``added`` (the family's ``added_cond_kwargs``, or None) plus the
        IP-Adapter embeddings (``added_cond_kwargs["image_embeds"]``, a list with one ``[R,
        ...]`` per adapter), and the ControlNet's residuals on the call's control images
        (``down_block_additional_residuals`` / ``mid_block_additional_residual``; one ControlNet
        call, of all the call's rows, per UNet call). The modules are called through their
        ``forward``, so offload hooks (``enable_model_cpu_offload``) move them."""
        hidden = call.text["encoder_hidden_states"]
        residuals = self.control_residuals(call, hidden, added) if call.control else {}
        embeds = [call.text[name] for name in sorted(call.text)
                  if name.startswith(IMAGE_EMBEDS + ".")]
        if embeds:
            added = {**(added or {}), IMAGE_EMBEDS: embeds}
        return self.model(call.sample, call.timestep, encoder_hidden_states=hidden,
                          added_cond_kwargs=added, return_dict=False, **residuals)[0]

    def control_residuals(self, call: ModelCall, hidden: torch.Tensor,
                          added: dict[str, torch.Tensor] | None) -> dict[str, Any]:
        """The ControlNet's residuals for the call's rows (summed over the nets of a
        ``MultiControlNetModel``, each at its scale), as the UNet's keyword arguments."""
        net = self.controlnet
        multi = len(self.controlnets) > 1
        sample = call.sample.to(net.dtype)
        down, mid = net(sample, call.timestep, encoder_hidden_states=hidden.to(net.dtype),
                        controlnet_cond=list(call.control) if multi else call.control[0],
                        conditioning_scale=list(call.control_scales) if multi
                        else call.control_scales[0],
                        added_cond_kwargs=added, return_dict=False)
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}

    # -- output -----------------------------------------------------------------------------------

    def decode(self, latents: torch.Tensor, max_memory: int | None = None) -> torch.Tensor:
        """Latents ``[B, C, h, w]`` -> pixels ``[B, 3, h f, w f]`` in about [-1, 1] (not
        clamped): :func:`hrkernels.vae.decode` within ``max_memory`` bytes (None: its default),
        its strips shared across the ranks of :attr:`communicator` when a parallel sampler set
        one (a pixel-space family returns the latents)."""
        return vae_io.decode(self.pipe.vae, latents, max_memory=max_memory,
                             comm=self.communicator)

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
                raise ValueError(f"{sampler}: this model needs {pooled_name} with "
                                 f"{embeds_name}")
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
    pipeline_classes = (StableDiffusionPipeline, StableDiffusionControlNetPipeline)
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
        return self.run_unet(call, None)

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
    pipeline_classes = (StableDiffusionXLPipeline, StableDiffusionXLControlNetPipeline)
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
        return self.run_unet(call, added)


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


# --------------------------------------------------------------------------------------------------
# DeepFloyd IF (pixel space) and SD3 (a transformer on flow matching): MegaFusion's other families
# --------------------------------------------------------------------------------------------------


def _only(prompts: dict[str, Any], allowed: tuple[str, ...], sampler: str, pipe: Any) -> None:
    """Raise for a prompt argument the family does not take."""
    given = [name for name, value in prompts.items() if value is not None and name not in allowed]
    if given:
        raise ValueError(f"{sampler}: {type(pipe).__name__} takes {', '.join(allowed)}; got "
                         f"{', '.join(given)}")


class IFAdapter(PipelineAdapter):
    """DeepFloyd ``IFPipeline`` (stage I): a pixel-space UNet (``f = 1``: the "latents" are the
    images ``[B, 3, h, w]`` in [-1, 1]) on T5 text embeddings; the UNet predicts the noise and a
    learned variance, the adapter returns the noise part (the samplers step with DDIM, which takes
    no variance).

    Prompts are encoded with ``clean_caption=False`` (the pipeline's caption cleaning needs
    ``bs4`` and ``ftfy``; pass cleaned prompts). Decoding is post-processing only; the pipeline's
    safety checker and watermarker are not run (they are part of the pipeline's own ``__call__``).
    """

    family = "if"
    pipeline_classes = (IFPipeline,)
    pixel_space = True
    _PROMPTS = ("prompt", "negative_prompt", "prompt_embeds", "negative_prompt_embeds")

    def required_components(self) -> tuple[str, ...]:
        return ("unet", "scheduler")

    @property
    def vae_scale_factor(self) -> int:
        return 1

    @property
    def text_width(self) -> int | None:
        """``D`` of the T5 embeddings (``encoder_hid_dim``, else ``cross_attention_dim``)."""
        config = self.model.config
        return _config_width(config.encoder_hid_dim or config.cross_attention_dim)

    def encode_prompts(self, *, guided: bool, size: tuple[int, int],
                       num_images_per_prompt: int, **prompts: Any) -> Conditioning:
        pipe, sampler = self.pipe, self.sampler
        _only(prompts, self._PROMPTS, sampler, pipe)
        check_prompt_arguments(sampler, prompts, num_images_per_prompt, self.text_width)
        negative_embeds = prompts.get("negative_prompt_embeds")
        if guided and negative_embeds is None and (pipe.text_encoder is None
                                                   or pipe.tokenizer is None):
            raise ValueError(f"{sampler}: this pipeline has no text encoder or tokenizer; with "
                             "guidance_scale > 1 pass negative_prompt_embeds too")
        embeds, negative = pipe.encode_prompt(
            prompts.get("prompt"), guided, num_images_per_prompt=num_images_per_prompt,
            device=self.device, negative_prompt=prompts.get("negative_prompt"),
            prompt_embeds=prompts.get("prompt_embeds"), negative_prompt_embeds=negative_embeds,
            clean_caption=False)
        device, dtype = self.device, self.dtype
        return Conditioning(
            cond={"encoder_hidden_states": embeds.to(device, dtype)},
            uncond={"encoder_hidden_states": negative.to(device, dtype)} if guided else None,
        )

    def model_input(self, call: ModelCall) -> torch.Tensor:
        """The UNet's input rows (stage I: the sample itself)."""
        return call.sample

    def denoise(self, call: ModelCall) -> torch.Tensor:
        prediction = self.model(self.model_input(call), call.timestep,
                                encoder_hidden_states=call.text["encoder_hidden_states"],
                                class_labels=call.text.get("class_labels"), return_dict=False)[0]
        return prediction[:, :call.sample.shape[1]]

    def decode(self, latents: torch.Tensor, max_memory: int | None = None) -> torch.Tensor:
        return latents

    def encode(self, images: torch.Tensor, generator: torch.Generator | None,
               max_memory: int | None = None) -> torch.Tensor:
        return images.float()

    def to_images(self, latents: torch.Tensor, output_type: str,
                  max_memory: int | None = None) -> Any:
        if output_type == "latent":
            raise ValueError(f"{self.sampler}: output_type='latent' does not apply to the "
                             "pixel-space DeepFloyd IF; use 'pt', 'np' or 'pil'")
        from diffusers.image_processor import VaeImageProcessor

        return VaeImageProcessor(vae_scale_factor=1, do_resize=False).postprocess(
            latents, output_type=output_type)


def image_condition_key(height: int, width: int) -> str:
    """The :class:`Conditioning` entry of IF stage II's low-resolution image at a sample size."""
    return f"image_{height}x{width}"


class IFSuperResolutionAdapter(IFAdapter):
    """DeepFloyd ``IFSuperResolutionPipeline`` (stage II): as :class:`IFAdapter`, and the UNet
    also takes a low-resolution image, upscaled (bilinear, corners aligned) to the sample's size
    and noised to ``noise_level`` with the pipeline's ``image_noising_scheduler``, concatenated
    to the sample's channels, and ``noise_level`` as its class label (as the pipeline's
    ``__call__``). :meth:`add_image_condition` puts both in the :class:`Conditioning`, one
    upscaled image per sample size, before the engine builds its rows.
    """

    family = "if-sr"
    pipeline_classes = (IFSuperResolutionPipeline,)

    def required_components(self) -> tuple[str, ...]:
        return ("unet", "scheduler", "image_noising_scheduler")

    @property
    def latent_channels(self) -> int:
        """Channels of the sample (half the UNet's input: the other half is the image)."""
        return int(self.model.config.in_channels) // 2

    def add_image_condition(self, cond: Conditioning, image: torch.Tensor,
                            sizes: list[tuple[int, int]], noises: list[torch.Tensor],
                            noise_level: int) -> None:
        """Add the low-resolution ``image`` (``[B, 3, h, w]`` in [-1, 1], on the device) upscaled
        to every sample size in ``sizes`` and noised with ``noises`` (one ``[B, 3, H, W]`` per
        size) to ``noise_level``, and the class labels, to both branches of ``cond``."""
        levels = torch.full((image.shape[0],), noise_level, dtype=torch.long, device=self.device)
        entries: dict[str, torch.Tensor] = {"class_labels": levels}
        noising = self.pipe.image_noising_scheduler
        for (height, width), noise in zip(sizes, noises, strict=True):
            upscaled = F.interpolate(image.float(), (height, width), mode="bilinear",
                                     align_corners=True)
            noised = noising.add_noise(upscaled, noise, levels)
            entries[image_condition_key(height, width)] = noised.to(self.device, self.dtype)
        cond.cond.update(entries)
        if cond.uncond is not None:
            cond.uncond.update(entries)

    def model_input(self, call: ModelCall) -> torch.Tensor:
        image = call.text.get(image_condition_key(*call.sample.shape[2:]))
        if image is None:
            raise RuntimeError(f"{self.sampler}: IF stage II needs its low-resolution image at "
                               f"{tuple(call.sample.shape[2:])}; add_image_condition() first")
        return torch.cat([call.sample, image], dim=1)


class SD3Adapter(PipelineAdapter):
    """``StableDiffusion3Pipeline``: an MMDiT transformer (``pipe.transformer``) on flow matching
    (``FlowMatchEulerDiscreteScheduler``), 16-channel VAE latents scaled with ``shift_factor``
    (handled by :mod:`hrkernels.vae`), three text encoders (the T5 one may be absent: the pipeline
    then uses zeros) giving ``encoder_hidden_states`` ``[B, L, D]`` and ``pooled_projections``
    ``[B, P]``. The transformer takes one timestep per row (the flow's ``sigma * 1000``).
    """

    family = "sd3"
    pipeline_classes = (StableDiffusion3Pipeline,)
    _PROMPTS = ("prompt", "prompt_2", "negative_prompt", "negative_prompt_2", "prompt_embeds",
                "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")

    def required_components(self) -> tuple[str, ...]:
        return ("transformer", "vae", "scheduler")

    @property
    def model(self) -> torch.nn.Module:
        """The denoiser (the transformer)."""
        return self.pipe.transformer

    @property
    def text_width(self) -> int | None:
        return int(self.model.config.joint_attention_dim)

    @property
    def pooled_width(self) -> int:
        return int(self.model.config.pooled_projection_dim)

    @property
    def size_multiple(self) -> int:
        return self.vae_scale_factor * int(self.model.config.patch_size)

    @property
    def model_channels(self) -> int:
        """The transformer's width per latent pixel (``inner_dim / patch_size^2``), standing in
        for a UNet's first-level channels in ``view_batch_size="auto"``'s estimate (not measured
        for SD3)."""
        config = self.model.config
        return int(config.num_attention_heads * config.attention_head_dim
                   // config.patch_size ** 2)

    def encode_prompts(self, *, guided: bool, size: tuple[int, int],
                       num_images_per_prompt: int, **prompts: Any) -> Conditioning:
        _only(prompts, self._PROMPTS, self.sampler, self.pipe)
        check_prompt_arguments(self.sampler, prompts, num_images_per_prompt, self.text_width,
                               self.pooled_width)
        embeds, negative, pooled, negative_pooled = self.pipe.encode_prompt(
            prompt=prompts.get("prompt"), prompt_2=prompts.get("prompt_2"), prompt_3=None,
            device=self.device, num_images_per_prompt=num_images_per_prompt,
            do_classifier_free_guidance=guided, negative_prompt=prompts.get("negative_prompt"),
            negative_prompt_2=prompts.get("negative_prompt_2"),
            prompt_embeds=prompts.get("prompt_embeds"),
            negative_prompt_embeds=prompts.get("negative_prompt_embeds"),
            pooled_prompt_embeds=prompts.get("pooled_prompt_embeds"),
            negative_pooled_prompt_embeds=prompts.get("negative_pooled_prompt_embeds"))
        device, dtype = self.device, self.dtype
        return Conditioning(
            cond={"encoder_hidden_states": embeds.to(device, dtype),
                  "pooled_projections": pooled.to(device, dtype)},
            uncond={"encoder_hidden_states": negative.to(device, dtype),
                    "pooled_projections": negative_pooled.to(device, dtype)} if guided else None,
        )

    def denoise(self, call: ModelCall) -> torch.Tensor:
        rows = call.sample.shape[0]
        return self.model(hidden_states=call.sample, timestep=call.timestep.expand(rows),
                          encoder_hidden_states=call.text["encoder_hidden_states"],
                          pooled_projections=call.text["pooled_projections"],
                          return_dict=False)[0]


register_adapter(IFAdapter)
register_adapter(IFSuperResolutionAdapter)
register_adapter(SD3Adapter)


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


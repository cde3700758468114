"""What a call conditions on besides the prompt: an input image (``image=``), ControlNet images
(``control_image=``) and IP-Adapter embeddings, checked before any model work and prepared once
per call, so every sampler gets them from the shared core (docs/DESIGN.md, "Conditioning").

* :func:`as_pixels` -- a PIL image, tensor or array (RGB, grey or with an alpha channel) as
  ``[n, 3, H, W]`` float32 in [0, 1].
* :func:`check_image_size` -- an input's aspect ratio against the target's.
* :func:`resize_pixels` -- pixels resized on the device (bicubic, antialiased when shrinking).
* :class:`ControlInputs` -- the ControlNet(s) of a ``StableDiffusion(XL)ControlNetPipeline``,
  their images at each stage's size, and the per-view control images: the whole image
  (:meth:`ControlInputs.full`), the crops of local windows (:meth:`ControlInputs.windows`) and the
  sub-sampled images of dilated views (:meth:`ControlInputs.dilated`), gathered with the same view
  ops as the latents (:func:`hrkernels.ops.gather_windows`, :func:`hrkernels.ops.gather_dilated`)
  at pixel resolution; the per-step scales of ``control_guidance_start/end``.
* :func:`ip_adapter_conditioning` -- IP-Adapter embeddings as per-image rows of the
  :class:`~hrkernels.samplers.pipelines.Conditioning` (so the engine repeats them per view row, as
  the text rows).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from hrkernels import ops
from hrkernels._validate import check_real, describe
from hrkernels.samplers.pipelines import IMAGE_EMBEDS, Conditioning, PipelineAdapter

__all__ = [
    "ControlInputs",
    "as_pixels",
    "check_controlnets",
    "check_image_size",
    "control_inputs",
    "ip_adapter_conditioning",
    "resize_pixels",
    "with_controlnet",
]

# How far an input's aspect ratio may differ from the target's before it is refused: 1%, or the
# rounding of the target's sides to multiples of the VAE factor (8 pixels), whichever is more.
ASPECT_TOLERANCE = 0.01
ROUNDING_PIXELS = 8


# --------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------


def _composite(rgba: torch.Tensor, background: float) -> torch.Tensor:
    """``[n, 4, H, W]`` in [0, 1] -> ``[n, 3, H, W]``: RGB over a uniform ``background``."""
    rgb, alpha = rgba[:, :3], rgba[:, 3:]
    return rgb * alpha + background * (1 - alpha)


def as_pixels(image: Any, name: str, background: float) -> torch.Tensor:
    """An image argument as ``[n, 3, H, W]`` float32 in [0, 1] (on the tensor's device; CPU for
    PIL images and arrays).

    Accepts a PIL image (any mode: ``"L"``, ``"RGB"``, ``"RGBA"``, ...) or a list of PIL images of
    one size; a float tensor ``[3, H, W]`` / ``[n, 3, H, W]`` in [0, 1] (also 1 channel: grey, or 4:
    RGBA); a float array ``[H, W, 3]`` / ``[n, H, W, 3]`` in [0, 1] (also 1 or 4 channels). An
    alpha channel is composited over the uniform ``background`` value (0: black, 1: white).

    Raises:
        TypeError: not one of these types, or a tensor/array that is not floating point.
        ValueError: the wrong rank or channel count, an empty image, PIL images of several sizes.
    """
    from PIL import Image

    allowed = (f"{name} must be a PIL image (or a list of PIL images), a float tensor "
               "[n, C, H, W] / [C, H, W] or a float array [n, H, W, C] / [H, W, C] in [0, 1], with "
               "C = 3 (RGB), 1 (grey) or 4 (RGBA)")
    if isinstance(image, Image.Image):
        image = [image]
    if isinstance(image, list) and image and all(isinstance(i, Image.Image) for i in image):
        if len({i.size for i in image}) != 1:
            raise ValueError(f"{name}: the PIL images must all have one size; got "
                             f"{sorted({i.size for i in image})} (W x H)")
        has_alpha = any(i.mode in ("RGBA", "LA", "PA") or "transparency" in i.info for i in image)
        mode = "RGBA" if has_alpha else "RGB"
        arrays = [np.asarray(i.convert(mode), dtype=np.float32) / 255.0 for i in image]
        tensor = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    elif isinstance(image, np.ndarray):
        if not np.issubdtype(image.dtype, np.floating):
            raise TypeError(f"{allowed}; got an array of {image.dtype}")
        array = image[None] if image.ndim == 3 else image
        if array.ndim != 4:
            raise ValueError(f"{allowed}; got an array of shape {image.shape}")
        tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).permute(0, 3, 1, 2)
    elif isinstance(image, torch.Tensor):
        if not image.is_floating_point():
            raise TypeError(f"{allowed}; got a tensor of {image.dtype}")
        tensor = image[None] if image.dim() == 3 else image
        if tensor.dim() != 4:
            raise ValueError(f"{allowed}; got a tensor of shape {tuple(image.shape)}")
        tensor = tensor.float()
    else:
        raise TypeError(f"{allowed}; got {describe(image)}")
    channels = tensor.shape[1]
    if channels not in (1, 3, 4) or tensor.shape[2] == 0 or tensor.shape[3] == 0:
        raise ValueError(f"{allowed}; got {channels} channel(s) of {tensor.shape[2]}x"
                         f"{tensor.shape[3]} (H x W)")
    if channels == 4:
        return _composite(tensor, background)
    return tensor.expand(-1, 3, -1, -1) if channels == 1 else tensor


def check_image_size(pixels: torch.Tensor, name: str, height: int, width: int) -> None:
    """``pixels`` ``[n, 3, h, w]`` has the aspect ratio of the ``height x width`` target: it is
    resized to every stage's size, never stretched. The target's height at the image's aspect
    ratio (and its width likewise) may be off by 1% (:data:`ASPECT_TOLERANCE`) or 8 pixels
    (:data:`ROUNDING_PIXELS`: sides rounded to multiples of the VAE factor), whichever is more.

    Raises:
        ValueError: the aspect ratios differ (the message gives both sizes, W x H).
    """
    h, w = pixels.shape[2:]
    stretch = (height / h) / (width / w)
    off_h, off_w = abs(h * width / w - height), abs(w * height / h - width)
    if (off_h > max(ROUNDING_PIXELS, ASPECT_TOLERANCE * height)
            and off_w > max(ROUNDING_PIXELS, ASPECT_TOLERANCE * width)):
        raise ValueError(f"{name} is {w}x{h} (W x H), of another aspect ratio than the "
                         f"{width}x{height} target (it would be stretched by {stretch:.3g}x); crop "
                         "or pad it to the target's aspect ratio")


def resize_pixels(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[n, 3, h, w]`` pixels resized to ``size`` (bicubic; antialiased when shrinking), float32
    on the pixels' device, clamped to the input's range [0, 1]."""
    if tuple(pixels.shape[2:]) == tuple(size):
        return pixels.float()
    shrinking = size[0] < pixels.shape[2] or size[1] < pixels.shape[3]
    return F.interpolate(pixels.float(), size=size, mode="bicubic", align_corners=False,
                         antialias=shrinking).clamp_(0, 1)


def batch_rows(pixels: torch.Tensor, batch: int, name: str) -> torch.Tensor:
    """``[n, ...]`` with ``n`` 1 or ``batch``, as ``batch`` rows (a view for ``n = 1``).

    Raises:
        ValueError: any other ``n``.
    """
    if pixels.shape[0] not in (1, batch):
        raise ValueError(f"{name} holds {pixels.shape[0]} images; pass 1 or {batch} (the prompts "
                         "times num_images_per_prompt)")
    return pixels.expand(batch, *pixels.shape[1:])


# --------------------------------------------------------------------------------------------------
# ControlNet
# --------------------------------------------------------------------------------------------------


@dataclass
class ControlInputs:
    """The ControlNet conditioning of one call.

    Attributes:
        images: per ControlNet, ``[n, 3, H, W]`` float32 in [0, 1] on the device (the caller's
            image; ``n`` 1 or ``batch``).
        batch: images per call (``B``: the rows of every image at a stage's size).
        scales: ``controlnet_conditioning_scale`` per ControlNet.
        start, end: ``control_guidance_start`` / ``control_guidance_end`` per ControlNet
            (fractions of the ``num_inference_steps`` steps).
        num_inference_steps: the steps the fractions refer to.
        vae_scale_factor: ``f``, pixels per latent pixel.
        dtype: the ControlNet's dtype (the control images' in the model calls).
    """

    images: tuple[torch.Tensor, ...]
    batch: int
    scales: tuple[float, ...]
    start: tuple[float, ...]
    end: tuple[float, ...]
    num_inference_steps: int
    vae_scale_factor: int
    dtype: torch.dtype
    _sized: dict[tuple[int, int], tuple[torch.Tensor, ...]] = field(default_factory=dict)

    def step_scales(self, index: int) -> tuple[float, ...]:
        """The conditioning scale of each ControlNet at global step ``index`` (0: the noisiest of
        ``num_inference_steps``): ``scale`` while ``start <= index / N`` and ``(index + 1) / N <=
        end``, else 0 (diffusers' ``controlnet_keep``)."""
        steps = self.num_inference_steps
        return tuple(scale if index / steps >= start and (index + 1) / steps <= end else 0.0
                     for scale, start, end in zip(self.scales, self.start, self.end, strict=True))

    def at(self, size: tuple[int, int]) -> tuple[torch.Tensor, ...]:
        """Per ControlNet, the control image at a latent ``size`` ``(h, w)``: ``[B, 3, h f, w f]``
        in the ControlNet's dtype (resized once per size and kept for the call)."""
        size = (int(size[0]), int(size[1]))
        if size not in self._sized:
            f = self.vae_scale_factor
            self._sized[size] = tuple(
                batch_rows(resize_pixels(image, (size[0] * f, size[1] * f)).to(self.dtype),
                           self.batch, "control_image") for image in self.images)
        return self._sized[size]

    def full(self, size: tuple[int, int]) -> tuple[torch.Tensor, ...]:
        """The control images of one view per image covering a latent of ``size``: ``[B, 3, h f,
        w f]`` per ControlNet (:meth:`at`)."""
        return self.at(size)

    def windows(self, size: tuple[int, int], starts: torch.Tensor,
                window: tuple[int, int]) -> tuple[torch.Tensor, ...]:
        """The crops of local windows on a latent of ``size``: per ControlNet ``[N*B, 3, wh f,
        ww f]``, window-major as :func:`hrkernels.ops.gather_windows` cuts the latent views
        (``starts``: ``[N, 2]`` latent (top, left) on the device; scaled by ``f`` on the device,
        no host synchronisation)."""
        f = self.vae_scale_factor
        pixel_starts = starts * f
        return tuple(ops.gather_windows(image, pixel_starts, (window[0] * f, window[1] * f))
                     for image in self.at(size))

    def dilated(self, size: tuple[int, int], dilation: int) -> tuple[torch.Tensor, ...]:
        """The sub-sampled control images of the ``dilation x dilation`` dilated views of a latent
        of ``size`` (padded at the bottom/right to multiples of ``dilation``, as the latent):
        :func:`hrkernels.ops.gather_dilated` of the (zero-padded) control image at pixel
        resolution, ``[d^2 B, 3, ceil(h / d) f, ceil(w / d) f]`` per ControlNet, view ``k`` for
        the latent's view ``k``.

        The latent's view ``(a, b)`` holds latent pixels ``(i d + a, j d + b)``; its control image
        holds pixels ``(I d + a, J d + b)``: the same lattice at pixel resolution, so the two
        align to within ``(d - 1)(f - 1)`` pixels (under one latent pixel of the view)."""
        f = self.vae_scale_factor
        pad_h, pad_w = -size[0] % dilation * f, -size[1] % dilation * f
        views = []
        for image in self.at(size):
            padded = F.pad(image, (0, pad_w, 0, pad_h)) if pad_h or pad_w else image
            views.append(ops.gather_dilated(padded, dilation))
        return tuple(views)


def check_controlnets(adapter: PipelineAdapter) -> None:
    """Each ControlNet fits the UNet: the same input channels, text width and block channels (its
    residuals add into the UNet's down and mid blocks), and a conditioning embedding that
    downsamples the control image by the VAE factor ``f`` (so a view of ``h x w`` latent pixels
    takes a control image of ``h f x w f``).

    Raises:
        ValueError: a ControlNet that does not fit (the message names the setting and both values).
    """
    unet = adapter.model.config
    f = adapter.vae_scale_factor
    for index, net in enumerate(adapter.controlnets):
        config = net.config
        downscale = 2 ** (len(config.conditioning_embedding_out_channels) - 1)
        checks = (("in_channels", config.in_channels, unet.in_channels),
                  ("cross_attention_dim", config.cross_attention_dim, unet.cross_attention_dim),
                  ("block_out_channels", tuple(config.block_out_channels),
                   tuple(unet.block_out_channels)),
                  ("control image downscale", downscale, f))
        for setting, value, expected in checks:
            if value != expected:
                raise ValueError(f"{adapter.sampler}: ControlNet {index} does not fit this "
                                 f"pipeline: its {setting} is {value}, the UNet's (VAE's) is "
                                 f"{expected}")


def _per_net(value: Any, name: str, count: int, default: float, **bounds: float) -> tuple[float,
                                                                                         ...]:
    """A number for every ControlNet (one number for all, or a list of ``count``)."""
    if value is None:
        return (default,) * count
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(f"{name} must be one number or a list of {count} (one per "
                             f"ControlNet); got {value!r}")
        return tuple(check_real(item, f"{name}[{i}]", **bounds) for i, item in enumerate(value))
    return (check_real(value, name, **bounds),) * count


def control_inputs(adapter: PipelineAdapter, control_image: Any, scale: Any, start: Any, end: Any,
                   *, height: int, width: int, batch: int,
                   num_inference_steps: int) -> ControlInputs | None:
    """The call's ControlNet conditioning, checked (None without a ControlNet).

    Args:
        adapter: the pipeline's adapter (its ``controlnets``).
        control_image: one image (:func:`as_pixels`; alpha composited over black: no control) per
            ControlNet: an image for one ControlNet, a list of ``len(nets)`` images for a
            ``MultiControlNetModel``.
        scale, start, end: ``controlnet_conditioning_scale`` (default 1.0),
            ``control_guidance_start`` (0.0), ``control_guidance_end`` (1.0): a number, or a list
            with one per ControlNet.
        height, width: the target size (the images' aspect ratio must match it).
        batch: images per call (each control image holds 1 or ``batch``).
        num_inference_steps: the steps ``start``/``end`` are fractions of.

    Raises:
        TypeError / ValueError: a control image of a wrong type, count, batch or aspect ratio;
            ControlNet arguments without a ControlNet pipeline; out-of-range scales or fractions.
    """
    nets = adapter.controlnets
    given = {"control_image": control_image, "controlnet_conditioning_scale": scale,
             "control_guidance_start": start, "control_guidance_end": end}
    if not nets:
        passed = [name for name, value in given.items() if value is not None]
        if passed:
            raise ValueError(f"{adapter.sampler}: {', '.join(passed)} need a ControlNet pipeline "
                             "(StableDiffusionControlNetPipeline or "
                             f"StableDiffusionXLControlNetPipeline); got "
                             f"{type(adapter.pipe).__name__}")
        return None
    count = len(nets)
    check_controlnets(adapter)
    if control_image is None:
        raise ValueError(f"{adapter.sampler}: this pipeline has {count} ControlNet(s); pass "
                         "control_image")
    if count > 1:
        if not isinstance(control_image, (list, tuple)) or len(control_image) != count:
            raise ValueError(f"control_image must be a list of {count} images (one per ControlNet "
                             f"of the MultiControlNetModel); got {describe(control_image)}")
        images = list(control_image)
    else:
        images = [control_image]
    pixels = []
    for index, image in enumerate(images):
        label = "control_image" if count == 1 else f"control_image[{index}]"
        tensor = as_pixels(image, label, background=0.0)
        check_image_size(tensor, label, height, width)
        batch_rows(tensor, batch, label)
        pixels.append(tensor.to(adapter.device))
    scales = _per_net(scale, "controlnet_conditioning_scale", count, 1.0)
    starts = _per_net(start, "control_guidance_start", count, 0.0, minimum=0, maximum=1)
    ends = _per_net(end, "control_guidance_end", count, 1.0, minimum=0, maximum=1)
    for index, (first, last) in enumerate(zip(starts, ends, strict=True)):
        if first >= last:
            raise ValueError(f"control_guidance_start must be < control_guidance_end; got "
                             f"{first} and {last} (ControlNet {index})")
    return ControlInputs(tuple(pixels), batch, scales, starts, ends, num_inference_steps,
                         adapter.vae_scale_factor, nets[0].dtype)


# --------------------------------------------------------------------------------------------------
# IP-Adapter
# --------------------------------------------------------------------------------------------------


def _ip_adapter_count(unet: torch.nn.Module) -> int:
    """IP-Adapters loaded into ``unet`` (0 without)."""
    projection = getattr(unet, "encoder_hid_proj", None)
    layers = getattr(projection, "image_projection_layers", None)
    return 0 if layers is None else len(layers)


def ip_adapter_conditioning(adapter: PipelineAdapter, cond: Conditioning, image: Any,
                            embeds: Sequence[torch.Tensor] | None,
                            num_images_per_prompt: int) -> Conditioning:
    """``cond`` with the IP-Adapter image embeddings as per-image rows of each branch
    (``image_embeds.<i>`` for adapter ``i``: ``[B, ...]``), encoded by the pipeline's own
    ``prepare_ip_adapter_image_embeds`` (``ip_adapter_image``) or taken as given
    (``ip_adapter_image_embeds``: per adapter ``[2B or 2, ...]`` negative then positive with
    guidance, ``[B or 1, ...]`` without, as diffusers takes them).

    Raises:
        ValueError: IP-Adapter inputs without an IP-Adapter in the UNet, an IP-Adapter without
            inputs, both inputs, or embeddings of the wrong count or batch.
    """
    pipe, sampler = adapter.pipe, adapter.sampler
    count = _ip_adapter_count(adapter.model)
    if count == 0:
        if image is not None or embeds is not None:
            raise ValueError(f"{sampler}: ip_adapter_image/ip_adapter_image_embeds need an "
                             "IP-Adapter in the UNet (pipe.load_ip_adapter(...))")
        return cond
    if (image is None) == (embeds is None):
        raise ValueError(f"{sampler}: the UNet has {count} IP-Adapter(s) loaded; pass exactly one "
                         "of ip_adapter_image and ip_adapter_image_embeds (or "
                         "pipe.unload_ip_adapter())")
    guided = cond.uncond is not None
    if embeds is not None:
        if not isinstance(embeds, (list, tuple)) or len(embeds) != count or not all(
                isinstance(e, torch.Tensor) and e.dim() >= 2 for e in embeds):
            raise ValueError(f"ip_adapter_image_embeds must be a list of {count} tensors (one per "
                             f"IP-Adapter), each [batch, ...]; got {describe(embeds)}")
        if guided and any(e.shape[0] % 2 for e in embeds):
            raise ValueError("ip_adapter_image_embeds: with guidance each tensor holds the "
                             "negative then the positive embeddings (an even batch); got batches "
                             f"{[e.shape[0] for e in embeds]}")
    prepared = pipe.prepare_ip_adapter_image_embeds(image, embeds, adapter.device,
                                                    num_images_per_prompt, guided)
    rows = {"cond": dict(cond.cond), "uncond": None if cond.uncond is None else dict(cond.uncond)}
    for index, both in enumerate(prepared):
        both = both.to(adapter.device, adapter.dtype)
        parts = both.chunk(2) if guided else (None, both)
        for branch, part in zip(("uncond", "cond"), parts, strict=True):
            if part is None:
                continue
            rows[branch][f"{IMAGE_EMBEDS}.{index}"] = batch_rows(
                part, cond.batch, f"ip_adapter_image_embeds[{index}]")
    return Conditioning(cond=rows["cond"], uncond=rows["uncond"], extra=cond.extra)


def with_controlnet(pipe: Any, controlnet: Any) -> Any:
    """The ControlNet pipeline of a ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline``
    sharing its modules (``StableDiffusionControlNetPipeline`` /
    ``StableDiffusionXLControlNetPipeline``); ``controlnet``: a ``ControlNetModel``, a list of
    them (a ``MultiControlNetModel``) or a ``MultiControlNetModel``.

    Raises:
        TypeError: ``pipe`` is of neither class.
    """
    from diffusers import (
        StableDiffusionControlNetPipeline,
        StableDiffusionPipeline,
        StableDiffusionXLControlNetPipeline,
        StableDiffusionXLPipeline,
    )

    for plain, controlled in ((StableDiffusionXLPipeline, StableDiffusionXLControlNetPipeline),
                              (StableDiffusionPipeline, StableDiffusionControlNetPipeline)):
        if isinstance(pipe, plain):
            names = set(inspect.signature(controlled.__init__).parameters)
            components = {name: module for name, module in pipe.components.items()
                          if name in names}
            return controlled(**components, controlnet=controlnet)
    raise TypeError("with_controlnet takes a StableDiffusionPipeline or StableDiffusionXLPipeline; "
                    f"got {type(pipe).__name__}")

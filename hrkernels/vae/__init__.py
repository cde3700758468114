"""Latents <-> images with a diffusers VAE, exact and within a memory budget, for every sampler
(decode at the end and for previews, encode between the stages of the methods that relay through
pixels).

``latents`` are as the samplers hold them: scaled as the diffusers pipelines do
(``scaling_factor``, and ``latents_mean`` / ``latents_std`` where the VAE config has them, else
``shift_factor``), ``[B, C, h, w]``, any float dtype. ``images`` are ``[B, 3, H, W]`` in the
VAE's range (about [-1, 1]); :func:`decode` returns the VAE's raw output (not clamped). As the
pipelines do, an fp16 VAE whose config says ``force_upcast`` runs in fp32 for the call (and is
put back).

Both run the VAE as a tiled program (see README.md): row strips with the halos every convolution
needs, every GroupNorm with the statistics of the whole image (fp32), the mid-block attention over
the whole latent (SDPA, queries in strips). The result equals the untiled ``vae.decode`` /
``vae.encode`` up to floating-point reordering, with no seams, at any size; the activations and
workspace stay within ``max_memory`` bytes of device memory, whatever the image size (down to the
attention's whole-latent keys and values). Which values are kept whole (on the device, or on the
host on CUDA), which are recomputed, and how high the strips are is planned per call
(:func:`plan_decode`, :func:`plan_encode`): the cheapest plan that fits. diffusers' own tiling
(``vae.enable_tiling()``, which normalises each tile on its own) is never used.

Handles ``AutoencoderKL`` as SD 1.5/2.x, SDXL and SD3-style configs build it; other classes or
modules raise :class:`UnsupportedVAEError`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch

from hrkernels._validate import check_int
from hrkernels.vae.executor import execute
from hrkernels.vae.plan import TilePlan, TilePlanError, make_plan
from hrkernels.vae.program import (
    Program,
    UnsupportedVAEError,
    decoder_program,
    encoder_program,
)

__all__ = [
    "CUDA_HEADROOM",
    "TilePlan",
    "TilePlanError",
    "UnsupportedVAEError",
    "decode",
    "default_budget",
    "encode",
    "plan_decode",
    "plan_encode",
    "scale_factor",
]

# The budget on a device without memory statistics (CPU): a share of the physical memory, or this.
FALLBACK_BUDGET = 16 * 2**30
# Share of the free CUDA memory the default budget leaves to what plans do not count.
CUDA_HEADROOM = 0.1


def _check_vae(vae: Any) -> None:
    for attribute in ("decode", "encode", "config"):
        if not hasattr(vae, attribute):
            raise TypeError("vae must be a diffusers VAE (AutoencoderKL); got "
                            f"{type(vae).__name__}")


def scale_factor(vae: Any) -> int:
    """``f``: image pixels per latent pixel of ``vae`` (8 for the SD VAEs)."""
    _check_vae(vae)
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _check_tensor(value: Any, name: str, channels: int | None, layout: str) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a {layout} torch.Tensor; got {type(value).__name__}")
    if value.dim() != 4 or (channels is not None and value.shape[1] != channels):
        raise ValueError(f"{name} must be a {layout} tensor; got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor; got {value.dtype}")
    if value.numel() == 0:
        raise ValueError(f"{name} must not be empty; got shape {tuple(value.shape)}")


def _check_limits(max_memory: Any, tile: Any) -> tuple[int | None, int | None]:
    return (None if max_memory is None else check_int(max_memory, "max_memory", minimum=1),
            None if tile is None else check_int(tile, "tile", minimum=1))


def default_budget(device: torch.device) -> int:
    """Bytes the tiled VAE may use on ``device`` when ``max_memory`` is None: on CUDA what is free
    (the driver's free memory plus what PyTorch's allocator holds unused) less ``CUDA_HEADROOM``
    of it for what the plan does not count (cuDNN workspaces, allocator rounding); elsewhere (the
    host is the device) half of the physical memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free * (1 - CUDA_HEADROOM))
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (AttributeError, ValueError, OSError):
        return FALLBACK_BUDGET


def _compute_dtype(vae: Any) -> torch.dtype:
    """What a call runs in: fp32 for an fp16 VAE whose config says ``force_upcast``."""
    if vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        return torch.float32
    return vae.dtype


@contextlib.contextmanager
def _prepared(vae: Any) -> Iterator[tuple[torch.device, torch.dtype]]:
    """The VAE ready for one call, as ``vae.decode`` would have it: its offload hook run
    (``enable_model_cpu_offload`` moves it to the execution device; with
    ``enable_sequential_cpu_offload`` every module's weights are loaded for the call and offloaded
    after it, :func:`_offloaded_modules`), upcast for the call (``force_upcast``, undone on exit,
    also when the call raises). Yields its device and dtype."""
    hook = getattr(vae, "_hf_hook", None)
    if hook is not None and hasattr(hook, "pre_forward"):
        hook.pre_forward(vae)
    offloaded = _offloaded_modules(vae)
    for module, module_hook in offloaded:
        module_hook.pre_forward(module)
    try:
        devices = {parameter.device for parameter in vae.parameters()}
        if len(devices) != 1 or next(iter(devices)).type == "meta":
            raise UnsupportedVAEError(f"hrkernels.vae: the VAE's weights must all be on one "
                                      f"device; found {devices}")
        original, dtype = vae.dtype, _compute_dtype(vae)
        if dtype != original:
            vae.to(dtype=dtype)
        try:
            yield next(iter(devices)), dtype
        finally:
            if dtype != original:
                vae.to(dtype=original)
    finally:
        for module, module_hook in reversed(offloaded):
            module_hook.post_forward(module, None)


def _offloaded_modules(vae: Any) -> list[tuple[torch.nn.Module, Any]]:
    """The VAE's modules whose weights an offload hook keeps off the device between calls
    (``enable_sequential_cpu_offload``: accelerate's ``AlignDevicesHook`` with ``offload``), with
    their hooks. The tiled program reads the weights of many modules per strip, so their hooks'
    ``pre_forward`` loads them all for the call and ``post_forward`` offloads them after it: the
    whole VAE's weights are on the device during one decode or encode."""
    found = []
    for module in vae.modules():
        hook = getattr(module, "_hf_hook", None)
        for part in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
            if getattr(part, "offload", False):
                found.append((module, part))
    return found


def _latent_normalisation(vae: Any, channels: int, device: torch.device,
                          dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``latents_mean`` / ``latents_std`` of the VAE config as ``[1, C, 1, 1]`` tensors, or
    None."""
    mean = getattr(vae.config, "latents_mean", None)
    std = getattr(vae.config, "latents_std", None)
    if mean is None or std is None:
        return None, None
    return (torch.tensor(mean, device=device, dtype=dtype).view(1, channels, 1, 1),
            torch.tensor(std, device=device, dtype=dtype).view(1, channels, 1, 1))


def _shift(vae: Any) -> float:
    return getattr(vae.config, "shift_factor", None) or 0.0


def _check_latents(vae: Any, latents: Any) -> None:
    _check_vae(vae)
    _check_tensor(latents, "latents", None, "[B, C, h, w]")
    channels = vae.config.latent_channels
    if latents.shape[1] != channels:
        raise ValueError(f"latents must have the VAE's {channels} latent channels; got shape "
                         f"{tuple(latents.shape)}")


def _check_images(vae: Any, images: Any) -> None:
    _check_vae(vae)
    _check_tensor(images, "images", vae.config.in_channels, "[B, 3, H, W]")


def plan_decode(vae: Any, latents: torch.Tensor | torch.Size | tuple[int, ...],
                max_memory: int | None = None, tile: int | None = None) -> TilePlan:
    """The plan :func:`decode` would run for latents of this shape (nothing is decoded).

    Args:
        vae: a diffusers ``AutoencoderKL``.
        latents: the latents, or their shape ``(B, C, h, w)``.
        max_memory: the budget in bytes (default :func:`default_budget` of the VAE's device).
        tile: force the strip height (rows of each pass's output value).

    Returns:
        A :class:`TilePlan`: segments, checkpoints, estimated peak bytes, FLOPs and host traffic.

    Raises:
        TilePlanError: nothing fits ``max_memory``.
        UnsupportedVAEError: a VAE or module the tiled VAE does not handle.
    """
    shape = _shape_of(latents, "latents")
    _check_latents(vae, _tensor_or_meta(latents, shape))
    return _plan(decoder_program(vae), shape, _compute_dtype(vae), next(vae.parameters()).device,
                 *_check_limits(max_memory, tile), decoding=True)


def plan_encode(vae: Any, images: torch.Tensor | torch.Size | tuple[int, ...],
                max_memory: int | None = None, tile: int | None = None) -> TilePlan:
    """The plan :func:`encode` would run for images of this shape (nothing is encoded); as
    :func:`plan_decode`, with ``images`` or their shape ``(B, 3, H, W)``."""
    shape = _shape_of(images, "images")
    _check_images(vae, _tensor_or_meta(images, shape))
    return _plan(encoder_program(vae), shape, _compute_dtype(vae), next(vae.parameters()).device,
                 *_check_limits(max_memory, tile), decoding=False)


def _plan(program: Program, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
          max_memory: int | None, tile: int | None, decoding: bool) -> TilePlan:
    """The plan of a decode (the call allocates the unscaled latents) or an encode (the caller's
    images are read in strips)."""
    what = f"decoding latents {list(shape)}" if decoding else f"encoding images {list(shape)}"
    return make_plan(program, shape[0], shape[2], shape[3], dtype, device,
                     max_memory or default_budget(device), tile, input_bytes=decoding, what=what)


def _tensor_or_meta(value: Any, shape: tuple[int, ...]) -> torch.Tensor:
    """``value`` if it is a tensor, else a float tensor of ``shape`` on the meta device (for the
    checks of a shape)."""
    return value if isinstance(value, torch.Tensor) else torch.empty(shape, device="meta")


def _shape_of(value: Any, name: str) -> tuple[int, ...]:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, (tuple, list, torch.Size)) and all(
            isinstance(size, int) and not isinstance(size, bool) for size in value):
        return tuple(value)
    raise TypeError(f"{name} must be a tensor or a shape (a tuple of ints); got "
                    f"{type(value).__name__}")


@torch.no_grad()
def decode(vae: Any, latents: torch.Tensor, max_memory: int | None = None,
           tile: int | None = None, comm: Any = None) -> torch.Tensor:
    """Decode scaled latents into images, exactly and within a memory budget.

    Args:
        vae: a diffusers ``AutoencoderKL`` (``pipe.vae``).
        latents: ``[B, C, h, w]`` scaled latents (as a sampler holds them), any float dtype, on
            any device (strips move to the VAE's device).
        max_memory: bytes of device memory for activations and workspace (not the weights, the
            latents or the output); default :func:`default_budget`.
        tile: force the strip height (rows of each pass's output value); default: planned.
        comm: a :class:`hrkernels.distributed.Communicator`: every pass's strips are dealt out
            over its ranks, the strips and GroupNorm statistics exchanged after each round, so
            every rank computes about ``1 / world_size`` of the decode and returns the whole
            image, equal bit for bit to the one-process decode (every rank must make the call,
            with the same latents). The plan is each rank's own (one strip result more per rank
            is held during a round).

    Returns:
        ``[B, 3, h * f, w * f]`` images on the VAE's device, in the VAE's dtype for the call (fp32
        when upcast), not clamped.

    Raises:
        TypeError: ``vae`` is not a VAE; ``latents`` not a float tensor; ``max_memory``/``tile``
            not ints.
        ValueError: ``latents`` not ``[B, C, h, w]`` with the VAE's latent channels;
            ``max_memory``/``tile`` < 1.
        TilePlanError: nothing fits ``max_memory`` (before any work).
        UnsupportedVAEError: a VAE or module the tiled VAE does not handle.

    Example::

        >>> from hrkernels.testing import tiny_pipeline
        >>> vae = tiny_pipeline("sdxl").vae
        >>> decode(vae, torch.randn(1, 4, 16, 16)).shape
        torch.Size([1, 3, 128, 128])
    """
    _check_latents(vae, latents)
    limits = _check_limits(max_memory, tile)
    program = decoder_program(vae)
    with _prepared(vae) as (device, dtype):
        plan = _plan(program, tuple(latents.shape), dtype, device, *limits, decoding=True)
        z = latents.to(device=device, dtype=dtype)
        mean, std = _latent_normalisation(vae, z.shape[1], z.device, z.dtype)
        if mean is not None:
            z = z * std / vae.config.scaling_factor + mean
        else:
            z = z / vae.config.scaling_factor + _shift(vae)
        return execute(program, plan, z, dtype, device, comm)


@torch.no_grad()
def encode(vae: Any, images: torch.Tensor, generator: torch.Generator | None = None,
           sample: bool = True, max_memory: int | None = None,
           tile: int | None = None) -> torch.Tensor:
    """Encode images into scaled latents, exactly and within a memory budget.

    Args:
        vae: a diffusers ``AutoencoderKL``.
        images: ``[B, 3, H, W]`` in [-1, 1], any float dtype, on any device (strips move to the
            VAE's device and dtype).
        generator: draws the posterior sample (the one source of randomness).
        sample: draw from the posterior (default, as the methods specify) or take its mode.
        max_memory: bytes of device memory for activations and workspace (not the weights, the
            images or the output); default :func:`default_budget`.
        tile: force the strip height (rows of each pass's output value); default: planned.

    Returns:
        ``[B, C, H / f, W / f]`` float32 scaled latents on the VAE's device.

    Raises:
        TypeError, ValueError, TilePlanError, UnsupportedVAEError: as :func:`decode`.
    """
    _check_images(vae, images)
    limits = _check_limits(max_memory, tile)
    program = encoder_program(vae)
    with _prepared(vae) as (device, dtype):
        plan = _plan(program, tuple(images.shape), dtype, device, *limits, decoding=False)
        posterior = _posterior(execute(program, plan, images, dtype, device))
        z = posterior.sample(generator) if sample else posterior.mode()
        z = z.float()
    mean, std = _latent_normalisation(vae, z.shape[1], z.device, z.dtype)
    if mean is not None:
        return (z - mean) * vae.config.scaling_factor / std
    return (z - _shift(vae)) * vae.config.scaling_factor


def _posterior(moments: torch.Tensor) -> Any:
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    return DiagonalGaussianDistribution(moments)

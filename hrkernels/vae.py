"""Latents <-> images with a diffusers VAE, for every sampler (decode at the end and for previews,
encode between the stages of the methods that relay through pixels).

``latents`` are as the samplers hold them: scaled (``scaling_factor``, and ``latents_mean`` /
``latents_std`` where the VAE config has them), ``[B, C, h, w]``, any float dtype. ``images`` are
``[B, 3, H, W]`` in the VAE's range (about [-1, 1]), the VAE's raw output (not clamped).

As the diffusers pipelines do, an fp16 VAE whose config says ``force_upcast`` runs in fp32 for the
call (and is put back). Latents larger than the VAE's native tile run with diffusers' tiling,
switched on for the call only, with tiles of half the native size (which keeps an fp32 decode of
a 1024^2 SDXL tile, about 5 GiB, below what the sampling needs). Diffusers' tiling normalises each
tile with its own GroupNorm statistics and blends the seams, so a tiled result differs slightly
from an untiled one; an exact tiled VAE with a memory bound is planned.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["decode", "encode", "scale_factor"]


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


@contextlib.contextmanager
def _prepared(vae: Any, latent_side: int) -> Iterator[None]:
    """Upcast (``force_upcast``) and tiling (latents above the native tile) for one call; both are
    undone on exit, also when the call raises."""
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    original_dtype = vae.dtype
    tile = getattr(vae, "tile_latent_min_size", None)
    tiling = (hasattr(vae, "use_tiling") and not vae.use_tiling and tile is not None
              and latent_side > tile)
    tile_sizes = (getattr(vae, "tile_sample_min_size", None), tile)
    if upcast:
        vae.to(dtype=torch.float32)
    try:
        if tiling:
            vae.enable_tiling()
            vae.tile_sample_min_size, vae.tile_latent_min_size = tile_sizes[0] // 2, tile // 2
        yield
    finally:
        if tiling:
            vae.disable_tiling()
            vae.tile_sample_min_size, vae.tile_latent_min_size = tile_sizes
        if upcast:
            vae.to(dtype=original_dtype)


@torch.no_grad()
def decode(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Decode scaled latents into images.

    Args:
        vae: a diffusers ``AutoencoderKL`` (``pipe.vae``).
        latents: ``[B, C, h, w]`` scaled latents (as a sampler holds them), any float dtype.

    Returns:
        ``[B, 3, h * f, w * f]`` images in the VAE's dtype for the call (fp32 when upcast), not
        clamped.

    Example::

        >>> from hrkernels.testing import tiny_pipeline
        >>> vae = tiny_pipeline("sdxl").vae
        >>> decode(vae, torch.randn(1, 4, 16, 16)).shape
        torch.Size([1, 3, 128, 128])
    """
    _check_vae(vae)
    _check_tensor(latents, "latents", None, "[B, C, h, w]")
    with _prepared(vae, max(latents.shape[-2:])):
        z = latents.to(vae.dtype)
        mean, std = _latent_normalisation(vae, z.shape[1], z.device, z.dtype)
        if mean is not None:
            z = z * std / vae.config.scaling_factor + mean
        else:
            z = z / vae.config.scaling_factor
        return vae.decode(z, return_dict=False)[0]


@torch.no_grad()
def encode(vae: Any, images: torch.Tensor, generator: torch.Generator | None = None,
           sample: bool = True) -> torch.Tensor:
    """Encode images into scaled latents.

    Args:
        vae: a diffusers ``AutoencoderKL``.
        images: ``[B, 3, H, W]`` in [-1, 1] (H, W multiples of the VAE's factor), any float dtype.
        generator: draws the posterior sample (the one source of randomness).
        sample: draw from the posterior (default, as the methods specify) or take its mode.

    Returns:
        ``[B, C, H / f, W / f]`` float32 scaled latents.
    """
    _check_tensor(images, "images", 3, "[B, 3, H, W]")
    with _prepared(vae, max(images.shape[-2:]) // scale_factor(vae)):
        posterior = vae.encode(images.to(vae.dtype)).latent_dist
        z = posterior.sample(generator) if sample else posterior.mode()
        z = z.float()
    mean, std = _latent_normalisation(vae, z.shape[1], z.device, z.dtype)
    if mean is not None:
        return (z - mean) * vae.config.scaling_factor / std
    return z * vae.config.scaling_factor

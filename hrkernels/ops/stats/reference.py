"""PyTorch reference of ``match_stats``: what CPU/MPS tensors run, and what the kernels are tested
against. Arguments arrive validated (see ``op.py``); the result never aliases the input.

The map is viewed as ``[B, sh, sw, C, H/sh, W/sw]`` (sub-lattice ``k = ki * sw + kj`` holds
``x[b, :, ki::sh, kj::sw]``), statistics come from ``torch.std_mean`` in fp32 over ``(C, h, w)``
(or ``(h, w)`` per channel), and the normalised values are written back in place of each
sub-lattice.
"""

from __future__ import annotations

import torch


def match_stats(
    x: torch.Tensor,
    mean: float | torch.Tensor,
    std: float | torch.Tensor,
    factor: tuple[int, int],
    per_channel: bool,
    memory_format: torch.memory_format,
) -> torch.Tensor:
    """``std / sigma_k * (x - mu_k) + mean`` per sub-lattice ``k``; ``mean`` where ``sigma_k == 0``.

    ``mean``/``std`` are floats or fp tensors of shape ``[B]`` (``[B, C]`` when ``per_channel``).
    ``sigma_k`` uses correction 1; a sub-lattice of one element has no spread (``sigma_k = 0``).
    """
    batch, channels, height, width = x.shape
    sh, sw = factor
    lattice = x.float().view(batch, channels, height // sh, sh, width // sw, sw)
    lattice = lattice.permute(0, 3, 5, 1, 2, 4)  # [B, sh, sw, C, h, w]
    dims = (4, 5) if per_channel else (3, 4, 5)
    group_size = (height // sh) * (width // sw) * (1 if per_channel else channels)
    if group_size > 1:
        sigma, mu = torch.std_mean(lattice, dim=dims, keepdim=True)
    else:  # torch.std of one element is nan (no degrees of freedom): treat it as no spread
        mu = lattice.mean(dim=dims, keepdim=True)
        sigma = torch.zeros_like(mu)
    target_shape = (batch, 1, 1, channels, 1, 1) if per_channel else (batch, 1, 1, 1, 1, 1)
    target_mean = torch.as_tensor(mean, dtype=torch.float32, device=x.device)
    target_std = torch.as_tensor(std, dtype=torch.float32, device=x.device)
    if target_mean.dim() > 0:
        target_mean = target_mean.reshape(target_shape)
    if target_std.dim() > 0:
        target_std = target_std.reshape(target_shape)
    spread = sigma > 0  # False for sigma == 0 and for nan
    scale = torch.where(spread, target_std / torch.where(spread, sigma, 1.0), 0.0)
    result = torch.where(spread, scale * (lattice - mu) + target_mean, target_mean)
    result = result.expand_as(lattice)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=memory_format)
    out.view(batch, channels, height // sh, sh, width // sw, sw).permute(0, 3, 5, 1, 2, 4).copy_(
        result)
    return out

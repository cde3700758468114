"""PyTorch references of the ``views`` ops: what CPU/MPS tensors run, and what the kernels are
tested against. Arguments arrive validated (see ``op.py``); results never alias the inputs."""

from __future__ import annotations

import torch


def _fresh(value: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
    """A new tensor (never a view of an input) with ``value``'s contents in ``memory_format``."""
    return torch.empty_like(value, memory_format=memory_format).copy_(value)


def gather_windows(
    x: torch.Tensor, starts: torch.Tensor, window: tuple[int, int], memory_format: torch.memory_format
) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[N*B, C, wh, ww]``; zeros where a window runs outside ``x``."""
    batch, channels, height, width = x.shape
    window_h, window_w = window
    starts = starts.to(torch.int64)
    rows = starts[:, 0, None] + torch.arange(window_h, device=x.device)  # [N, wh]
    cols = starts[:, 1, None] + torch.arange(window_w, device=x.device)  # [N, ww]
    inside = ((rows >= 0) & (rows < height))[:, :, None] & ((cols >= 0) & (cols < width))[:, None, :]
    values = x[:, :, rows.clamp(0, height - 1)[:, :, None], cols.clamp(0, width - 1)[:, None, :]]
    values = torch.where(inside, values, torch.zeros((), dtype=x.dtype, device=x.device))
    values = values.permute(2, 0, 1, 3, 4).reshape(-1, channels, window_h, window_w)  # [N*B, ...]
    return _fresh(values, memory_format)


def scatter_windows_mean(
    views: torch.Tensor,
    starts: torch.Tensor,
    size: tuple[int, int],
    weights: torch.Tensor | None,
    memory_format: torch.memory_format,
) -> torch.Tensor:
    """Put ``[N*B, C, wh, ww]`` views back into ``[B, C, H, W]``, averaging where they overlap.

    A loop over the views, as the authors' MultiDiffusion code does: it reads ``starts`` on the host.
    Sums are fp32, in view order.
    """
    count = starts.shape[0]
    batch = views.shape[0] // count
    channels, window_h, window_w = views.shape[1:]
    height, width = size
    total = torch.zeros(batch, channels, height, width, dtype=torch.float32, device=views.device)
    weight_sum = torch.zeros(height, width, dtype=torch.float32, device=views.device)
    weight_values = None if weights is None else weights.float()
    for n, (top, left) in enumerate(starts.tolist()):
        y0, y1 = max(top, 0), min(top + window_h, height)
        x0, x1 = max(left, 0), min(left + window_w, width)
        if y0 >= y1 or x0 >= x1:
            continue
        part = views[n * batch:(n + 1) * batch, :, y0 - top:y1 - top, x0 - left:x1 - left].float()
        weight = 1.0 if weight_values is None else weight_values[n]
        total[:, :, y0:y1, x0:x1] += part * weight
        weight_sum[y0:y1, x0:x1] += weight
    mean = torch.where(weight_sum != 0, total / weight_sum, torch.zeros((), device=views.device))
    return _fresh(mean.to(views.dtype), memory_format)


def gather_dilated(
    x: torch.Tensor, factor: tuple[int, int], memory_format: torch.memory_format
) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[sh*sw*B, C, H/sh, W/sw]``, sub-lattice ``k = ki*sw + kj`` outermost."""
    batch, channels, height, width = x.shape
    sh, sw = factor
    lattice = x.view(batch, channels, height // sh, sh, width // sw, sw).permute(3, 5, 0, 1, 2, 4)
    views = lattice.reshape(sh * sw * batch, channels, height // sh, width // sw)
    return _fresh(views, memory_format)


def scatter_dilated(
    views: torch.Tensor, factor: tuple[int, int], memory_format: torch.memory_format
) -> torch.Tensor:
    """The exact inverse of :func:`gather_dilated`: ``[sh*sw*B, C, h, w]`` -> ``[B, C, h*sh, w*sw]``."""
    sh, sw = factor
    channels, view_h, view_w = views.shape[1:]
    batch = views.shape[0] // (sh * sw)
    full = views.view(sh, sw, batch, channels, view_h, view_w).permute(2, 3, 4, 0, 5, 1)
    return _fresh(full.reshape(batch, channels, view_h * sh, view_w * sw), memory_format)

"""PyTorch references of the ``views`` ops: what CPU/MPS tensors run, and what the kernels are
tested against. Arguments arrive validated (see ``op.py``); results never alias the inputs."""

from __future__ import annotations

import torch


def _fresh(value: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
    """A new tensor (never a view of an input) with ``value``'s contents in ``memory_format``."""
    return torch.empty_like(value, memory_format=memory_format).copy_(value)


def _window_positions(
    starts: torch.Tensor, window: tuple[int, int], size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows ``[N, wh]`` and columns ``[N, ww]`` of every window, clamped into the map, and the mask
    ``[N, wh, ww]`` of the positions that really are inside it."""
    height, width = size
    starts = starts.to(torch.int64)
    rows = starts[:, 0, None] + torch.arange(window[0], device=starts.device)
    cols = starts[:, 1, None] + torch.arange(window[1], device=starts.device)
    inside = (((rows >= 0) & (rows < height))[:, :, None]
              & ((cols >= 0) & (cols < width))[:, None, :])
    return rows.clamp(0, height - 1), cols.clamp(0, width - 1), inside


def gather_windows(
    x: torch.Tensor,
    starts: torch.Tensor,
    window: tuple[int, int],
    memory_format: torch.memory_format,
) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[N*B, C, wh, ww]``; zeros where a window runs outside ``x``."""
    channels = x.shape[1]
    window_h, window_w = window
    rows, cols, inside = _window_positions(starts, window, tuple(x.shape[2:]))
    values = x[:, :, rows[:, :, None], cols[:, None, :]]
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

    A loop over the views, as the authors' MultiDiffusion code does: it reads ``starts`` on the
    host.
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


def scatter_windows_mean_indexed(
    views: torch.Tensor,
    starts: torch.Tensor,
    size: tuple[int, int],
    weights: torch.Tensor | None,
    memory_format: torch.memory_format,
) -> torch.Tensor:
    """The same as :func:`scatter_windows_mean` without a loop or a host read (``index_add_``).

    Sums run in the same order (view by view) on CPU. On CUDA ``index_add_`` uses atomics, so the
    result may vary in the last bit from run to run: it is the baseline ``torch.compile`` gets
    (compiling the loop unrolls one slice-add per view and takes minutes), not a dispatch path.
    """
    count = starts.shape[0]
    batch = views.shape[0] // count
    channels, window_h, window_w = views.shape[1:]
    height, width = size
    rows, cols, inside = _window_positions(starts, (window_h, window_w), size)
    index = rows[:, :, None] * width + cols[:, None, :]  # [N, wh, ww] flat positions
    weight = torch.ones(count, device=views.device) if weights is None else weights.float()
    weight = torch.where(inside, weight[:, None, None], 0.0)  # [N, wh, ww]
    values = views.float().view(count, batch, channels, window_h, window_w) * weight[:, None, None]
    values = values.permute(1, 2, 0, 3, 4).reshape(batch, channels, -1)  # [B, C, N*wh*ww]
    flat = index.reshape(-1)
    total = torch.zeros(batch, channels, height * width, device=views.device)
    total.index_add_(2, flat, values)
    weight_sum = torch.zeros(height * width, device=views.device).index_add_(0, flat,
                                                                             weight.reshape(-1))
    covered = weight_sum != 0
    mean = torch.where(covered, total / torch.where(covered, weight_sum, 1.0), 0.0)
    return _fresh(mean.view(batch, channels, height, width).to(views.dtype), memory_format)


def gather_dilated(
    x: torch.Tensor, factor: tuple[int, int], memory_format: torch.memory_format
) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[sh*sw*B, C, H/sh, W/sw]``, sub-lattice ``k = ki*sw + kj``
    outermost."""
    batch, channels, height, width = x.shape
    sh, sw = factor
    lattice = x.view(batch, channels, height // sh, sh, width // sw, sw).permute(3, 5, 0, 1, 2, 4)
    views = lattice.reshape(sh * sw * batch, channels, height // sh, width // sw)
    return _fresh(views, memory_format)


def scatter_dilated(
    views: torch.Tensor, factor: tuple[int, int], memory_format: torch.memory_format
) -> torch.Tensor:
    """The exact inverse of :func:`gather_dilated`:
    ``[sh*sw*B, C, h, w]`` -> ``[B, C, h*sh, w*sw]``."""
    sh, sw = factor
    channels, view_h, view_w = views.shape[1:]
    batch = views.shape[0] // (sh * sw)
    full = views.view(sh, sw, batch, channels, view_h, view_w).permute(2, 3, 4, 0, 5, 1)
    return _fresh(full.reshape(batch, channels, view_h * sh, view_w * sw), memory_format)

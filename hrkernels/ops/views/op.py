"""The ``views`` ops: cut a latent or feature map into windows or dilated sub-lattices and put the
results back. Public wrappers validate; each registered ``hrkernels::`` operator dispatches
through its implementation table (``"torch"``: ``reference.py``, ``"triton"``: the launchers here,
which pick tiles and grids; see ``hrkernels/ops/_backend.py``); each has its own fake (the output
shapes differ from the input's)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hrkernels.ops._backend import Implementation, dispatched_op
from hrkernels.ops._checks import (
    as_pair,
    check_feature_map,
    check_starts,
    output_memory_format,
)
from hrkernels.ops._launch import channels_contiguous, empty_output, launcher, row_tile
from hrkernels.ops.views import reference

IntPair = int | Sequence[int]


def _format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def _is_channels_last(tensor: torch.Tensor) -> bool:
    return output_memory_format(tensor) == torch.channels_last


# --------------------------------------------------------------------------------------------------
# window_grid
# --------------------------------------------------------------------------------------------------


def _axis_count(length: int, window: int, stride: int) -> int:
    return 1 if length <= window else -(-(length - window) // stride) + 1


def _axis_starts(length: int, window: int, stride: int) -> list[int]:
    if length <= window:
        return [0]
    return [min(k * stride, length - window) for k in range(_axis_count(length, window, stride))]


def window_count(height: int, width: int, window: IntPair, stride: IntPair) -> int:
    """How many windows :func:`window_grid` lists for these arguments, in closed form (nothing is
    enumerated: a view plan of any size is counted at once).

    Example::

        >>> window_count(256, 256, 128, 64)
        9
    """
    height, width = as_pair((height, width), "(height, width)")
    window_h, window_w = as_pair(window, "window")
    stride_h, stride_w = as_pair(stride, "stride")
    return _axis_count(height, window_h, stride_h) * _axis_count(width, window_w, stride_w)


def window_grid(
    height: int,
    width: int,
    window: IntPair,
    stride: IntPair,
    jitter: int = 0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The (top, left) starts of the MultiDiffusion window grid over a ``height x width`` map.

    Per axis of length ``L``: ``n = ceil((L - window) / stride) + 1`` windows (1 when
    ``L <= window``), starting at ``k * stride``, the last one clamped to ``L - window``. Windows
    are listed row-major (all windows of the first row first).

    With ``jitter = j > 0`` every start moves by an integer drawn uniformly from ``[-j, j]``, except
    that a window touching the start border only moves outward (``[-j, 0]``), one touching the end
    border only ``[0, j]`` (one touching both does not move), so every position stays covered; the
    parts of a window outside the map read zeros in :func:`gather_windows` and are dropped by
    :func:`scatter_windows_mean`. The draw is one ``torch.randint`` of shape ``[N, 2]`` (top, left
    for each window in order) from ``generator`` (the global RNG of its device when None), on the
    generator's device; no host synchronisation.

    Args:
        height, width: size of the map (e.g. latent size), ``>= 1``.
        window, stride: int or ``(h, w)``, ``>= 1``.
        jitter: maximum shift ``j >= 0``.
        generator: source of the jitter.
        device: where the result lives (default: the generator's device, else CPU).

    Returns:
        ``LongTensor[N, 2]`` of (top, left).

    Example::

        >>> window_grid(256, 256, 128, 64).tolist()[:3]
        [[0, 0], [0, 64], [0, 128]]
    """
    height, width = as_pair((height, width), "(height, width)")
    window_h, window_w = as_pair(window, "window")
    stride_h, stride_w = as_pair(stride, "stride")
    if isinstance(jitter, bool) or not isinstance(jitter, int) or jitter < 0:
        raise ValueError(f"jitter must be an int >= 0; got {jitter!r}")
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    device = torch.device(device)

    tops = _axis_starts(height, window_h, stride_h)
    lefts = _axis_starts(width, window_w, stride_w)
    base = torch.tensor([[t, s] for t in tops for s in lefts], dtype=torch.int64)
    if jitter == 0:
        return base.to(device)

    limits = torch.tensor([height - window_h, width - window_w], dtype=torch.int64)
    low = torch.where(base >= limits, 0, -jitter)  # touching the end border: only [0, j]
    high = torch.where(base <= 0, 0, jitter)  # touching the start border: only [-j, 0]
    # One draw in [0, (j+1)(2j+1)) reduced modulo the range size (j+1, 2j+1 or 1) is exactly
    # uniform, because both sizes divide (j+1)(2j+1).
    draw_device = generator.device if generator is not None else device
    draw = torch.randint(
        0, (jitter + 1) * (2 * jitter + 1), tuple(base.shape), generator=generator,
        device=draw_device, dtype=torch.int64,
    )
    low, high, base = low.to(draw_device), high.to(draw_device), base.to(draw_device)
    return (base + low + draw % (high - low + 1)).to(device)


# --------------------------------------------------------------------------------------------------
# gather_windows
# --------------------------------------------------------------------------------------------------


def _gather_windows_reference(
    x: torch.Tensor, starts: torch.Tensor, window_h: int, window_w: int, channels_last: bool
) -> torch.Tensor:
    return reference.gather_windows(x, starts, (window_h, window_w), _format(channels_last))


def _gather_windows_triton(x, starts, window_h, window_w, channels_last):
    from hrkernels.ops.views.kernels import _gather_windows_kernel

    count, (batch, channels, height, width) = starts.shape[0], x.shape
    out = empty_output((count * batch, channels, window_h, window_w), x.dtype, x.device,
                       _format(channels_last))
    tile = row_tile(channels, window_w, channels_contiguous(x, out))
    blocks_w, blocks_c = tile.blocks(window_w, channels)
    grid = (batch * count * window_h * blocks_w * blocks_c,)
    launcher(_gather_windows_kernel)[grid](
        x, starts, out, count, batch, channels, height, width, window_h, window_w,
        *x.stride(), *out.stride(), *starts.stride(),
        BLOCK_W=tile.block_w, BLOCK_C=tile.block_c, num_warps=tile.num_warps,
    )
    return out


def _gather_windows_fake(x, starts, window_h, window_w, channels_last):
    shape = (starts.shape[0] * x.shape[0], x.shape[1], window_h, window_w)
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=_format(channels_last))


_gather_windows_op = dispatched_op(
    "gather_windows",
    {"torch": Implementation(_gather_windows_reference),
     "triton": Implementation(_gather_windows_triton)},
    fake=_gather_windows_fake,
)


def gather_windows(
    x: torch.Tensor,
    starts: torch.Tensor,
    window: IntPair,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> torch.Tensor:
    """Cut windows out of a feature map: ``out[n*B + b, c, i, j] = x[b, c, top_n + i, left_n + j]``.

    Positions outside ``x`` (negative starts, or windows running past the border) read 0.

    Args:
        x: ``[B, C, H, W]``, fp32/fp16/bf16, any strides (a channels-last ``[B, H, W, C]`` tensor
            passed as ``x.permute(0, 3, 1, 2)`` is read in place).
        starts: ``[N, 2]`` int64/int32 (top, left) on ``x``'s device, e.g. from :func:`window_grid`.
            Read on the device: no host synchronisation.
        window: int or ``(wh, ww)``, each ``>= 1`` and at most ``x``'s size on that axis.
        memory_format: ``torch.contiguous_format`` (default) or ``torch.channels_last``: then the
            result is laid out ``[N*B, wh, ww, C]`` underneath, so attention can view it as
            ``[N*B, wh*ww, C]`` tokens without a copy.

    Returns:
        ``[N*B, C, wh, ww]`` with ``x``'s dtype, window-major (all images of window 0 first).

    Raises:
        TypeError: ``x`` not a float tensor, ``starts`` not integer, ``window`` not int(s).
        ValueError: wrong ranks, empty ``x``, ``starts`` not ``[N, 2]`` on ``x``'s device, a window
            larger than ``x``, or an unsupported ``memory_format``.

    Example::

        >>> x = torch.randn(2, 4, 256, 256)
        >>> starts = window_grid(256, 256, 128, 64)        # 9 windows
        >>> gather_windows(x, starts, 128).shape
        torch.Size([18, 4, 128, 128])
    """
    check_feature_map(x)
    check_starts(starts, x.device)
    window_h, window_w = as_pair(window, "window")
    if window_h > x.shape[2] or window_w > x.shape[3]:
        raise ValueError(f"window ({window_h}, {window_w}) is larger than x's spatial size "
                         f"{tuple(x.shape[2:])}; windows may only extend past the border through "
                         "their starts")
    if memory_format not in (torch.contiguous_format, torch.channels_last):
        raise ValueError("memory_format must be torch.contiguous_format or torch.channels_last; "
                         f"got {memory_format}")
    return _gather_windows_op(x, starts, window_h, window_w, memory_format == torch.channels_last)


# --------------------------------------------------------------------------------------------------
# scatter_windows_mean
# --------------------------------------------------------------------------------------------------


def _scatter_windows_mean_reference(
    views: torch.Tensor, starts: torch.Tensor, height: int, width: int,
    weights: torch.Tensor | None, channels_last: bool,
) -> torch.Tensor:
    return reference.scatter_windows_mean(views, starts, (height, width), weights,
                                          _format(channels_last))


def _scatter_windows_mean_triton(views, starts, height, width, weights, channels_last):
    from hrkernels.ops._backend import interpreter_enabled
    from hrkernels.ops.views.kernels import _scatter_windows_mean_kernel

    count = starts.shape[0]
    batch = views.shape[0] // count
    channels, window_h, window_w = views.shape[1:]
    out = empty_output((batch, channels, height, width), views.dtype, views.device,
                       _format(channels_last))
    tile = row_tile(channels, width, channels_contiguous(views, out), elements=2048)
    block_h = 1 if interpreter_enabled() else 4  # 4 rows amortise the loop over the views
    blocks_w, blocks_c = tile.blocks(width, channels)
    grid = (batch * -(-height // block_h) * blocks_w * blocks_c,)
    launcher(_scatter_windows_mean_kernel)[grid](
        views, starts, views if weights is None else weights, out,
        count, batch, channels, height, width, window_h, window_w,
        *views.stride(), *out.stride(), *starts.stride(),
        HAS_WEIGHTS=weights is not None,
        BLOCK_H=block_h, BLOCK_W=tile.block_w, BLOCK_C=tile.block_c,
        num_warps=max(tile.num_warps, 4) if block_h > 1 else tile.num_warps,
    )
    return out


def _scatter_windows_mean_fake(views, starts, height, width, weights, channels_last):
    shape = (views.shape[0] // starts.shape[0], views.shape[1], height, width)
    return torch.empty(shape, dtype=views.dtype, device=views.device,
                       memory_format=_format(channels_last))


_scatter_windows_mean_op = dispatched_op(
    "scatter_windows_mean",
    {"torch": Implementation(_scatter_windows_mean_reference),
     "triton": Implementation(_scatter_windows_mean_triton)},
    fake=_scatter_windows_mean_fake,
)


def scatter_windows_mean(
    views: torch.Tensor,
    starts: torch.Tensor,
    size: IntPair,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Put windows back with overlap averaging (the inverse of :func:`gather_windows`).

    ``out[b, c, y, x] = sum_n w_n * v_n[...] / sum_n w_n * covers_n(y, x)`` over the views that
    cover ``(y, x)``; 0 where no view covers (or the covering weights sum to 0). Parts of views that
    fall outside ``size`` are dropped. Sums run in fp32, in view order, without atomics: the same
    inputs give bitwise the same output on the same device.

    Args:
        views: ``[N*B, C, wh, ww]`` fp32/fp16/bf16, any strides, window-major as
            :func:`gather_windows` returns it.
        starts: ``[N, 2]`` int64/int32 (top, left) on ``views``' device.
        size: ``(H, W)`` of the output (or an int for a square).
        weights: optional ``[N]`` float tensor of per-view weights ``w_n`` (1 when None).

    Returns:
        ``[B, C, H, W]`` with ``views``' dtype; channels-last when ``views`` is.

    Raises:
        TypeError/ValueError: wrong ranks or dtypes, ``views.shape[0]`` not a multiple of N,
            ``weights`` not ``[N]`` float on the same device.

    Example::

        >>> starts = window_grid(256, 256, 128, 64)
        >>> x = torch.randn(1, 4, 256, 256)
        >>> torch.allclose(scatter_windows_mean(gather_windows(x, starts, 128), starts, 256), x)
        True
    """
    check_feature_map(views, "views")
    check_starts(starts, views.device)
    height, width = as_pair(size, "size")
    count = starts.shape[0]
    if views.shape[0] % count != 0:
        raise ValueError(f"views.shape[0] = {views.shape[0]} must be N*B for the N = {count} "
                         "windows in starts")
    if weights is not None:
        if not isinstance(weights, torch.Tensor) or not weights.is_floating_point():
            raise TypeError(f"weights must be a float tensor [N]; got {weights!r}")
        if weights.shape != (count,):
            raise ValueError(f"weights must have shape [N] = [{count}]; got {tuple(weights.shape)}")
        if weights.device != views.device:
            raise ValueError(f"weights is on {weights.device} but views is on {views.device}")
    return _scatter_windows_mean_op(views, starts, height, width, weights,
                                    _is_channels_last(views))


# --------------------------------------------------------------------------------------------------
# gather_dilated / scatter_dilated
# --------------------------------------------------------------------------------------------------


def _dilated_copy_triton(full, views, factor, to_views):
    from hrkernels.ops.views.kernels import _dilated_copy_kernel

    sh, sw = factor
    batch, channels = full.shape[:2]
    view_h, view_w = views.shape[2:]
    tile = row_tile(channels, view_w, channels_contiguous(full, views))
    blocks_w, blocks_c = tile.blocks(view_w, channels)
    grid = (batch * view_h * sh * sw * blocks_w * blocks_c,)
    launcher(_dilated_copy_kernel)[grid](
        full, views, batch, channels, view_h, view_w, sh, sw,
        *full.stride(), *views.stride(), TO_VIEWS=to_views,
        BLOCK_W=tile.block_w, BLOCK_C=tile.block_c, num_warps=tile.num_warps,
    )


def _gather_dilated_reference(x: torch.Tensor, sh: int, sw: int) -> torch.Tensor:
    return reference.gather_dilated(x, (sh, sw), output_memory_format(x))


def _gather_dilated_triton(x, sh, sw):
    batch, channels, height, width = x.shape
    views = empty_output((sh * sw * batch, channels, height // sh, width // sw), x.dtype,
                         x.device, output_memory_format(x))
    _dilated_copy_triton(x, views, (sh, sw), to_views=True)
    return views


def _gather_dilated_fake(x, sh, sw):
    batch, channels, height, width = x.shape
    return torch.empty((sh * sw * batch, channels, height // sh, width // sw), dtype=x.dtype,
                       device=x.device, memory_format=output_memory_format(x))


_gather_dilated_op = dispatched_op(
    "gather_dilated",
    {"torch": Implementation(_gather_dilated_reference),
     "triton": Implementation(_gather_dilated_triton)},
    fake=_gather_dilated_fake,
)


def _scatter_dilated_reference(views: torch.Tensor, sh: int, sw: int) -> torch.Tensor:
    return reference.scatter_dilated(views, (sh, sw), output_memory_format(views))


def _scatter_dilated_triton(views, sh, sw):
    count, channels, view_h, view_w = views.shape
    full = empty_output((count // (sh * sw), channels, view_h * sh, view_w * sw), views.dtype,
                        views.device, output_memory_format(views))
    _dilated_copy_triton(full, views, (sh, sw), to_views=False)
    return full


def _scatter_dilated_fake(views, sh, sw):
    count, channels, view_h, view_w = views.shape
    return torch.empty((count // (sh * sw), channels, view_h * sh, view_w * sw), dtype=views.dtype,
                       device=views.device, memory_format=output_memory_format(views))


_scatter_dilated_op = dispatched_op(
    "scatter_dilated",
    {"torch": Implementation(_scatter_dilated_reference),
     "triton": Implementation(_scatter_dilated_triton)},
    fake=_scatter_dilated_fake,
)


def gather_dilated(x: torch.Tensor, factor: IntPair) -> torch.Tensor:
    """Split a map into its dilated sub-lattices (DemoFusion's global views, APT, FreeScale's
    fast-mode attention).

    ``out[k*B + b, c, i, j] = x[b, c, i*sh + k // sw, j*sw + k % sw]`` with ``factor = (sh, sw)``.

    Args:
        x: ``[B, C, H, W]`` fp32/fp16/bf16, any strides; ``H % sh == 0`` and ``W % sw == 0``
            (callers pad).
        factor: int or ``(sh, sw)``, each ``>= 1``.

    Returns:
        ``[sh*sw*B, C, H//sh, W//sw]``; channels-last when ``x`` is.

    Example::

        >>> x = torch.arange(16.).view(1, 1, 4, 4)
        >>> gather_dilated(x, 2)[:, 0].tolist()[0]
        [[0.0, 2.0], [8.0, 10.0]]
    """
    check_feature_map(x)
    sh, sw = as_pair(factor, "factor")
    if x.shape[2] % sh or x.shape[3] % sw:
        raise ValueError(f"x's spatial size {tuple(x.shape[2:])} must be divisible by factor "
                         f"({sh}, {sw}); pad it first")
    return _gather_dilated_op(x, sh, sw)


def scatter_dilated(views: torch.Tensor, factor: IntPair) -> torch.Tensor:
    """The exact inverse of :func:`gather_dilated`:
    ``[sh*sw*B, C, h, w]`` -> ``[B, C, h*sh, w*sw]``.

    Args:
        views: ``[sh*sw*B, C, h, w]`` fp32/fp16/bf16, any strides.
        factor: int or ``(sh, sw)``, each ``>= 1``.

    Returns:
        ``[B, C, h*sh, w*sw]``; channels-last when ``views`` is.
    """
    check_feature_map(views, "views")
    sh, sw = as_pair(factor, "factor")
    if views.shape[0] % (sh * sw):
        raise ValueError(f"views.shape[0] = {views.shape[0]} must be a multiple of sh*sw = "
                         f"{sh * sw} (factor ({sh}, {sw}))")
    return _scatter_dilated_op(views, sh, sw)

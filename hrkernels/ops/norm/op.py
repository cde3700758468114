"""The ``norm`` ops: GroupNorm split into its two halves, so that a tiled network can normalise a
tile with the statistics of the whole image (``hrkernels.vae``).

* ``group_stats`` (``hrkernels::group_stats``): the fp32 ``(count, mean, M2)`` of each group of a
  tile; :func:`combine_group_stats` merges those of several tiles.
* ``group_norm_silu`` (``hrkernels::group_norm_silu``): the normalisation with given statistics,
  the affine map and an optional SiLU in one pass.

Public wrappers validate; each registered operator dispatches through its implementation table
(``"torch"``: ``reference.py``; ``"triton"``: the launchers here, which apply to images whose
in-image offsets fit int32; see ``hrkernels/ops/_backend.py``). ``group_norm_silu``'s output is
shaped like its input (the shared fake); ``group_stats`` has its own.
"""

from __future__ import annotations

import functools

import torch

from hrkernels._validate import check_bool, check_int
from hrkernels.ops._backend import (
    Implementation,
    dispatched_op,
    fake_like_first_input,
    interpreter_enabled,
)
from hrkernels.ops._checks import check_feature_map, output_memory_format
from hrkernels.ops._launch import (
    channels_contiguous,
    empty_output,
    image_offsets_fit_int32,
    launcher,
    multiprocessor_count,
    output_like,
    row_tile,
)
from hrkernels.ops.norm import reference

# Programs each launch aims for per SM (about 4 resident, several waves).
PROGRAMS_PER_SM = 8
# Rows the statistics kernel loads per loop iteration (2 under the interpreter).
UNROLL = 4
# Elements of a tile: 16 per thread of 4 warps (as the stats family).
TILE_ELEMENTS = 2048


@functools.cache
def _launchers():
    """The launchers of both kernels (imported on first use: Triton is optional)."""
    from hrkernels.ops.norm.kernels import _group_norm_silu_kernel, _group_partial_stats_kernel

    return launcher(_group_partial_stats_kernel), launcher(_group_norm_silu_kernel)


def _target_programs(device: torch.device) -> int:
    return 8 if interpreter_enabled() else PROGRAMS_PER_SM * multiprocessor_count(device)


def _offsets_fit_int32(x: torch.Tensor, *args: object) -> bool:
    return image_offsets_fit_int32(x)


# --------------------------------------------------------------------------------------------------
# group_stats
# --------------------------------------------------------------------------------------------------


def _group_stats_triton(x: torch.Tensor, groups: int) -> torch.Tensor:
    partial_stats, _ = _launchers()
    batch, channels, height, width = x.shape
    per_group = channels // groups
    tile = row_tile(per_group, width, channels_contiguous(x), TILE_ELEMENTS)
    blocks_w, blocks_c = tile.blocks(width, per_group)
    unroll = 2 if interpreter_enabled() else UNROLL
    # Chunks of rows per group: enough programs to fill the device, whole loop iterations each.
    chunks = max(1, min(height, -(-_target_programs(x.device) // (batch * groups))))
    rows_per_chunk = -(-height // chunks)
    rows_per_chunk = min(height, -(-rows_per_chunk // unroll) * unroll)
    chunks = -(-height // rows_per_chunk)
    partials = empty_output((batch, groups, chunks, 3), torch.float32, x.device)
    partial_stats[(batch * groups * chunks,)](
        x, partials, groups, per_group, height, width, blocks_w, blocks_c, chunks,
        rows_per_chunk, *x.stride(),
        EVEN=width % tile.block_w == 0 and per_group % tile.block_c == 0, UNROLL=unroll,
        BLOCK_W=tile.block_w, BLOCK_C=tile.block_c, num_warps=tile.num_warps,
    )
    return reference.combine_group_stats(partials, dim=2)


def _group_stats_fake(x: torch.Tensor, groups: int) -> torch.Tensor:
    return torch.empty((x.shape[0], groups, 3), dtype=torch.float32, device=x.device)


_group_stats_op = dispatched_op(
    "group_stats",
    {"torch": Implementation(reference.group_stats),
     "triton": Implementation(_group_stats_triton, applies=_offsets_fit_int32)},
    fake=_group_stats_fake,
)


def group_stats(x: torch.Tensor, groups: int) -> torch.Tensor:
    """The GroupNorm statistics of each group of ``x``: count, mean and sum of squared deviations.

    With ``n = C / G * H * W`` values per group, returns ``(n, mean, M2)`` where
    ``M2 = sum((x - mean)^2)`` (the biased variance is ``M2 / n``), accumulated in fp32. The
    statistics of a whole image from those of its tiles: :func:`combine_group_stats`. On CUDA one
    launch reduces chunks of rows (the ``stats`` family's shifted per-lane sums, see README.md);
    the chunks are merged with Chan's formula.

    Args:
        x: ``[B, C, H, W]`` fp32/fp16/bf16, any strides (channels-last too).
        groups: ``G >= 1``, dividing ``C``.

    Returns:
        ``[B, G, 3]`` float32 on ``x``'s device.

    Raises:
        TypeError: ``x`` not a float tensor; ``groups`` not an int.
        ValueError: ``x`` not 4-D or empty; ``groups < 1`` or not dividing ``C``.

    Example::

        >>> x = torch.randn(2, 8, 16, 16)
        >>> top, bottom = group_stats(x[:, :, :5], 4), group_stats(x[:, :, 5:], 4)
        >>> whole = combine_group_stats(torch.stack([top, bottom], dim=2), dim=2)
        >>> torch.allclose(whole, group_stats(x, 4), atol=1e-4)
        True
    """
    check_feature_map(x)
    _check_groups(groups, x.shape[1])
    return _group_stats_op(x, groups)


def combine_group_stats(stats: torch.Tensor, dim: int) -> torch.Tensor:
    """Merge ``(count, mean, M2)`` statistics (the last axis, as :func:`group_stats` returns them)
    along ``dim`` with the exact parallel formula (Chan, Golub and LeVeque), in the input's dtype.

    Args:
        stats: ``[..., K, ..., 3]`` float tensor; parts with count 0 add nothing.
        dim: the axis of the ``K`` parts (not the last).

    Returns:
        ``stats`` without the axis ``dim``.

    Example::

        >>> parts = torch.stack([group_stats(torch.randn(1, 4, 3, 8), 2) for _ in range(3)])
        >>> combine_group_stats(parts, dim=0).shape
        torch.Size([1, 2, 3])
    """
    if not isinstance(stats, torch.Tensor) or not stats.is_floating_point():
        raise TypeError(f"stats must be a float tensor [..., 3]; got {type(stats).__name__}")
    if stats.dim() < 2 or stats.shape[-1] != 3:
        raise ValueError(f"stats must have shape [..., K, ..., 3]; got {tuple(stats.shape)}")
    axis = check_int(dim, "dim", minimum=-stats.dim(), maximum=stats.dim() - 1) % stats.dim()
    if axis == stats.dim() - 1:
        raise ValueError("dim must not be the last axis (it holds count, mean, M2)")
    return reference.combine_group_stats(stats, axis)


def _check_groups(groups: int, channels: int) -> int:
    groups = check_int(groups, "groups", minimum=1)
    if channels % groups:
        raise ValueError(f"groups must divide the {channels} channels of x; got {groups}")
    return groups


# --------------------------------------------------------------------------------------------------
# group_norm_silu
# --------------------------------------------------------------------------------------------------


def _group_norm_silu_triton(x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                            weight: torch.Tensor | None, bias: torch.Tensor | None,
                            silu: bool) -> torch.Tensor:
    _, normalize = _launchers()
    batch, channels, height, width = x.shape
    out = output_like(x)
    tile = row_tile(channels, width, channels_contiguous(x, out), TILE_ELEMENTS)
    blocks_w, blocks_c = tile.blocks(width, channels)
    # Rows per program: as many as keep the grid at the target size (factors loaded once).
    row_blocks = max(1, min(height, -(-_target_programs(x.device)
                                      // (batch * blocks_w * blocks_c))))
    rows_per_program = -(-height // row_blocks)
    row_blocks = -(-height // rows_per_program)
    normalize[(batch * row_blocks, blocks_w * blocks_c)](
        x, out, mean, rstd, x if weight is None else weight, x if bias is None else bias,
        channels, channels // mean.shape[1], height, width, blocks_w, row_blocks,
        rows_per_program, *x.stride(), *out.stride(), *mean.stride(), *rstd.stride(),
        0 if weight is None else weight.stride(0), 0 if bias is None else bias.stride(0),
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, SILU=silu,
        EVEN=width % tile.block_w == 0 and channels % tile.block_c == 0,
        BLOCK_W=tile.block_w, BLOCK_C=tile.block_c, num_warps=tile.num_warps,
    )
    return out


def _group_norm_silu_reference(x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                               weight: torch.Tensor | None, bias: torch.Tensor | None,
                               silu: bool) -> torch.Tensor:
    return reference.group_norm_silu(x, mean, rstd, weight, bias, silu, output_memory_format(x))


_group_norm_silu_op = dispatched_op(
    "group_norm_silu",
    {"torch": Implementation(_group_norm_silu_reference),
     "triton": Implementation(_group_norm_silu_triton, applies=_offsets_fit_int32)},
    fake=fake_like_first_input,
)


def group_norm_silu(
    x: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    silu: bool = True,
) -> torch.Tensor:
    """GroupNorm with given statistics, then SiLU, in one pass::

        y = (x - mean[b, g]) * rstd[b, g] * weight[c] + bias[c]      # g = c // (C / G)
        out = y * sigmoid(y)                                         # only when silu

    ``torch.nn.GroupNorm`` followed by ``SiLU`` when ``mean``/``rstd`` are ``x``'s own statistics
    (``rstd = 1 / sqrt(M2 / n + eps)`` from :func:`group_stats`); given those of a whole image, it
    normalises a tile of it exactly as the whole image would be (the tiled VAE). Arithmetic in
    fp32, output in ``x``'s dtype.

    Args:
        x: ``[B, C, H, W]`` fp32/fp16/bf16, any strides (a ``[B, H, W, C]`` tensor seen through
            ``permute(0, 3, 1, 2)`` needs no copy).
        mean, rstd: ``[B, G]`` float32 on ``x``'s device, ``G`` dividing ``C``; any strides.
        weight, bias: ``[C]`` float tensors on ``x``'s device, or None (no scale / no shift).
        silu: apply SiLU (default) or return the normalised values.

    Returns:
        ``[B, C, H, W]`` in ``x``'s dtype; channels-last when ``x`` is.

    Raises:
        TypeError: ``x`` not a float tensor; ``mean``/``rstd`` not float32 tensors; ``weight``/
            ``bias`` neither None nor float tensors; ``silu`` not a bool.
        ValueError: ``x`` not 4-D or empty; a shape that does not match ``x`` (``[B, G]`` with
            ``G`` dividing ``C``, ``[C]``); a tensor on another device.

    Example::

        >>> x = torch.randn(1, 8, 4, 4)
        >>> stats = group_stats(x, 2)
        >>> rstd = torch.rsqrt(stats[..., 2] / stats[..., 0] + 1e-6)
        >>> gn = torch.nn.GroupNorm(2, 8, eps=1e-6)
        >>> out = group_norm_silu(x, stats[..., 1], rstd, gn.weight, gn.bias)
        >>> torch.allclose(out, torch.nn.functional.silu(gn(x)), atol=1e-5)
        True
    """
    check_feature_map(x)
    batch, channels = x.shape[:2]
    for name, value in (("mean", mean), ("rstd", rstd)):
        _check_parameter(value, name, x, torch.float32)
        if (value.dim() != 2 or value.shape[0] != batch or value.shape[1] < 1
                or channels % value.shape[1]):
            raise ValueError(f"{name} must be [B, G] = [{batch}, G] with G dividing the "
                             f"{channels} channels of x; got {tuple(value.shape)}")
    if mean.shape != rstd.shape:
        raise ValueError(f"mean and rstd must have the same shape; got {tuple(mean.shape)} and "
                         f"{tuple(rstd.shape)}")
    for name, value in (("weight", weight), ("bias", bias)):
        if value is not None:
            _check_parameter(value, name, x, None)
            if tuple(value.shape) != (channels,):
                raise ValueError(f"{name} must be [C] = [{channels}]; got {tuple(value.shape)}")
    return _group_norm_silu_op(x, mean, rstd, weight, bias, check_bool(silu, "silu"))


def _check_parameter(value: object, name: str, x: torch.Tensor, dtype: torch.dtype | None) -> None:
    """``value`` is a float tensor (of ``dtype`` when given) on ``x``'s device."""
    wanted = "a float32 tensor" if dtype is not None else "a float tensor or None"
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise TypeError(f"{name} must be {wanted}; got {type(value).__name__}"
                        + (f" of {value.dtype}" if isinstance(value, torch.Tensor) else ""))
    if dtype is not None and value.dtype != dtype:
        raise TypeError(f"{name} must be {wanted}; got {value.dtype}")
    if value.device != x.device:
        raise ValueError(f"{name} is on {value.device} but x is on {x.device}")

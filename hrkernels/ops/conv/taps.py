"""Tap tables of the fused fractional dilated convolution (host side, see README.md).

The stretch chain ``bilinear-down o conv(dilation D) o bilinear-up`` is linear and separable in the
two spatial axes, and each of its operators acts on every channel the same way. So the whole chain
equals a convolution on the *output* grid whose kernel tap ``(a, b)`` reads, instead of one input
pixel, a fixed blend of a few input pixels: ``T`` rows times ``T`` columns, with weights that depend
only on the output position and on the tap (``T = 3`` for stride 1, at most 4 for stride 2).

:func:`axis_taps` computes, for one axis, those blends exactly as torch's bilinear interpolation
(align_corners=False) composes them: for kernel tap ``a`` and output index ``p`` the window
``first[a, p] + j`` (``j < T``) of input indices and its weights ``weight[a, p, j]``. Weights of
windows that fall into the convolution's zero padding are 0.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

MAX_TAPS = 4


def stretched_size(length: int, dilation: float) -> int:
    """``round(length * s)`` with ``s = ceil(d) / d``: the stretched size of one axis."""
    return round(length * (math.ceil(dilation) / dilation))


def _bilinear_source(in_size: int, out_size: int) -> tuple[torch.Tensor, ...]:
    """Torch's bilinear (align_corners=False) source indices and weights for resizing one axis from
    ``in_size`` to ``out_size``: ``out[i] = w0[i] * in[i0[i]] + w1[i] * in[i1[i]]``.

    Computed in float32 like torch's kernels (``scale = in / out``,
    ``src = max(scale * (i + 0.5) - 0.5, 0)``), then widened to float64.
    """
    scale = torch.tensor(in_size, dtype=torch.float32) / torch.tensor(out_size, dtype=torch.float32)
    source = scale * (torch.arange(out_size, dtype=torch.float32) + 0.5) - 0.5
    source = source.clamp(min=0.0)
    index0 = source.to(torch.int64)  # source >= 0: truncation is floor
    index1 = torch.where(index0 < in_size - 1, index0 + 1, index0)
    weight1 = source - index0.to(torch.float32)
    weight0 = 1.0 - weight1
    return index0, index1, weight0.double(), weight1.double()


@dataclass(frozen=True)
class AxisTaps:
    """The blends of one axis: output ``p`` of kernel tap ``a`` reads input indices
    ``first[a, p] + j`` for ``j < taps`` with weights ``weight[a, p, j]`` (float64)."""

    first: torch.Tensor  # int64 [k, out]
    weight: torch.Tensor  # float64 [k, out, taps]
    taps: int


@functools.lru_cache(maxsize=256)
def axis_taps(length: int, dilation: float, stride: int, kernel_size: int) -> AxisTaps:
    """The exact blends of one axis of the fractional chain (see the module docstring).

    Args:
        length: input size ``L`` of the axis.
        dilation: the fractional factor ``d > 1`` (``D = ceil(d)``, stretched size
            ``round(L * D / d)``).
        stride: the convolution's stride on this axis.
        kernel_size: odd kernel size ``k``.
    """
    big = math.ceil(dilation)
    stretched = stretched_size(length, dilation)
    conv_length = (stretched - 1) // stride + 1
    out_length = (length - 1) // stride + 1
    # Final resize conv_length -> out_length, then the stretch length -> stretched read at u.
    down0, down1, down_w0, down_w1 = _bilinear_source(conv_length, out_length)
    up0, up1, up_w0, up_w1 = _bilinear_source(length, stretched)

    firsts, rows, weights = [], [], []
    for tap in range(kernel_size):
        offset = big * (tap - kernel_size // 2)
        # The window starts at the stretch source of the first conv row that output p reads; the
        # other rows it reads are at or after it, and the start is nondecreasing in p.
        first_u = (stride * down0 + offset).clamp(0, stretched - 1)
        firsts.append(up0[first_u])
        tap_rows, tap_weights = [], []
        for conv_row, conv_weight in ((down0, down_w0), (down1, down_w1)):
            u = stride * conv_row + offset  # the stretched row conv output `conv_row` reads
            inside = (u >= 0) & (u < stretched)  # outside: the convolution's zero padding
            clamped = u.clamp(0, stretched - 1)
            for source, source_weight in ((up0, up_w0), (up1, up_w1)):
                tap_rows.append(source[clamped])
                tap_weights.append(torch.where(inside, conv_weight * source_weight[clamped], 0.0))
        rows.append(torch.stack(tap_rows, dim=-1))  # [out, 4]
        weights.append(torch.stack(tap_weights, dim=-1))
    first = torch.stack(firsts)  # [k, out]
    row = torch.stack(rows)  # [k, out, 4] input index of each of the 4 contributions
    weight = torch.stack(weights)
    offset = row - first[..., None]
    used = weight != 0
    if bool((offset[used] < 0).any()):  # pragma: no cover - guaranteed by construction
        raise AssertionError("fractional conv taps: a window starts after one of its rows")
    taps = int(offset[used].max().item()) + 1 if bool(used.any()) else 1
    if taps > MAX_TAPS:  # pragma: no cover - guaranteed for stride <= 2
        raise ValueError(f"fractional dilated conv: stride {stride} needs {taps} taps per axis; "
                         f"at most {MAX_TAPS} are supported")
    table = torch.zeros(kernel_size, out_length, taps, dtype=torch.float64)
    table.scatter_add_(2, torch.where(used, offset, 0), weight)
    return AxisTaps(first, table, taps)


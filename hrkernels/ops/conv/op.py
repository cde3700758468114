"""The ``conv`` ops: ScaleCrafter's re-dilated (integer and fractional) convolution.

The public wrapper validates; the registered ``hrkernels::dilated_conv2d`` operator dispatches
through its implementation table (see ``hrkernels/ops/_backend.py``). ``"torch"``: ``reference.py``,
which for integer dilation is cuDNN/ATen's ``F.conv2d`` (already at parity with a plain
convolution; no kernel can win there) and for fractional dilation the unfused chain.
``"triton"``: the exact reformulation of README.md (Triton row blend -> one GEMM -> Triton column
blend), which applies to fractional dilation only: integer dilation runs the reference (cuDNN) on
every backend.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from numbers import Real

import torch

from hrkernels.ops._backend import Implementation, dispatched_op, interpreter_enabled
from hrkernels.ops._checks import as_pair, check_feature_map, output_memory_format
from hrkernels.ops._launch import (
    RowTile,
    channels_contiguous,
    empty_output,
    launcher,
    next_power_of_2,
    row_tile,
)
from hrkernels.ops.conv import reference
from hrkernels.ops.conv.taps import axis_taps

IntPair = int | Sequence[int]


# --------------------------------------------------------------------------------------------------
# Triton launcher of the fractional path
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=128)
def _device_tables(height: int, width: int, dilation: float, stride_h: int, stride_w: int,
                   kernel_size: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """The tap tables on ``device``: row/col window starts (int32 [k, out]) and weights (fp32
    [k, out, taps], both axes padded to the same number of taps)."""
    rows = axis_taps(height, dilation, stride_h, kernel_size)
    cols = axis_taps(width, dilation, stride_w, kernel_size)
    taps = max(rows.taps, cols.taps)

    def pad(weight: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(weight, (0, taps - weight.shape[-1]))

    return (rows.first.to(device=device, dtype=torch.int32),
            pad(rows.weight).to(device=device, dtype=torch.float32).contiguous(),
            cols.first.to(device=device, dtype=torch.int32),
            pad(cols.weight).to(device=device, dtype=torch.float32).contiguous(),
            taps)


def _blend_tile(channels: int, width: int, channels_fastest: bool) -> RowTile:
    """Tile of the blend passes. Their GEMM-side tensor is channels-fastest; when the feature map is
    too, the usual row tile; when it is NCHW, the pass transposes, and a square 64 x 64 tile keeps
    16-byte vectors on both sides."""
    if channels_fastest or interpreter_enabled():
        return row_tile(channels, width, channels_fastest)
    return RowTile(min(64, next_power_of_2(width)), min(64, next_power_of_2(channels)), 4)


# Bound on each temporary (the blended rows V and the GEMM's output G): larger maps run in bands
# of output rows, so the temporaries stay about the size of the input.
CHUNK_BYTES = 1 << 28


def _fractional_triton(x, weight, bias, dilation, stride_h, stride_w):
    from hrkernels.ops.conv.kernels import (
        _col_blend_kernel,
        _gemm_weight_kernel,
        _row_blend_kernel,
    )

    batch, channels_in, height, width = x.shape
    channels_out, kernel_size = weight.shape[0], weight.shape[-1]
    height_out, width_out = reference.output_size(height, width, (stride_h, stride_w))
    row_first, row_weight, col_first, col_weight, taps = _device_tables(
        height, width, dilation, stride_h, stride_w, kernel_size, x.device)
    # The GEMM's B operand: [(a, i), (b, o)] = weight[o, i, a, b] (torch's permute-copy of an
    # OIHW weight runs at a fraction of the bandwidth: a quarter of the op's time at C = 1280).
    w_cat = torch.empty((kernel_size * channels_in, kernel_size * channels_out), dtype=x.dtype,
                        device=x.device)
    block = 16 if interpreter_enabled() else 32
    launcher(_gemm_weight_kernel)[(-(-channels_in // block) * -(-channels_out // block),)](
        weight, w_cat, channels_out, channels_in, *weight.stride(),
        KERNEL=kernel_size, BLOCK_I=block, BLOCK_O=block, num_warps=4,
    )
    out = empty_output((batch, channels_out, height_out, width_out), x.dtype, x.device,
                       output_memory_format(x))
    rows = batch * height_out
    row_bytes = width * kernel_size * max(channels_in, channels_out) * x.element_size()
    chunk = max(1, min(rows, CHUNK_BYTES // row_bytes))
    before = _blend_tile(channels_in, width, channels_contiguous(x))
    after = _blend_tile(channels_out, width_out, channels_contiguous(out))
    for first_row in range(0, rows, chunk):
        count = min(chunk, rows - first_row)
        # [rows, W, k, I]: vertical blends of every output row, channels fastest.
        blended = torch.empty((count, width, kernel_size, channels_in), dtype=x.dtype,
                              device=x.device)
        blocks_w, blocks_c = before.blocks(width, channels_in)
        launcher(_row_blend_kernel)[(count * blocks_w * blocks_c,)](
            x, blended, row_first, row_weight,
            channels_in, height, width, height_out, first_row, *x.stride(),
            KERNEL=kernel_size, TAPS=taps, BLOCK_W=before.block_w, BLOCK_C=before.block_c,
            num_warps=before.num_warps,
        )
        # [rows * W, k * O]: all the FLOPs (those of a plain k x k convolution), in one GEMM: cuBLAS
    # on CUDA, with torch's matmul precision settings.
        gemm = torch.matmul(blended.view(count * width, kernel_size * channels_in), w_cat)
        del blended
        blocks_w, blocks_c = after.blocks(width_out, channels_out)
        launcher(_col_blend_kernel)[(count * blocks_w * blocks_c,)](
            gemm, bias if bias is not None else gemm, out, col_first, col_weight,
            channels_out, width, height_out, width_out, first_row, *out.stride(),
            KERNEL=kernel_size, TAPS=taps, HAS_BIAS=bias is not None,
            BLOCK_W=after.block_w, BLOCK_C=after.block_c, num_warps=after.num_warps,
        )
    return out


# --------------------------------------------------------------------------------------------------
# the registered operator
# --------------------------------------------------------------------------------------------------


def _dilated_conv2d_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dilation: float,
    stride_h: int, stride_w: int,
) -> torch.Tensor:
    return reference.dilated_conv2d(x, weight, bias, dilation, (stride_h, stride_w),
                                    output_memory_format(x))


def _is_fractional(x, weight, bias, dilation, stride_h, stride_w):
    # Integer dilation: cuDNN (or ATen on CPU) is at parity with a plain convolution already.
    return not float(dilation).is_integer()


def _dilated_conv2d_fake(x, weight, bias, dilation, stride_h, stride_w):
    height_out, width_out = reference.output_size(x.shape[2], x.shape[3], (stride_h, stride_w))
    return torch.empty((x.shape[0], weight.shape[0], height_out, width_out), dtype=x.dtype,
                       device=x.device, memory_format=output_memory_format(x))


_dilated_conv2d_op = dispatched_op(
    "dilated_conv2d",
    {"torch": Implementation(_dilated_conv2d_reference),
     "triton": Implementation(_fractional_triton, applies=_is_fractional)},
    fake=_dilated_conv2d_fake,
)


# --------------------------------------------------------------------------------------------------
# public wrapper
# --------------------------------------------------------------------------------------------------


def _check_dilation(dilation: float) -> float:
    if isinstance(dilation, bool) or not isinstance(dilation, Real):
        raise TypeError(f"dilation must be a Python int or float; got {dilation!r} "
                        f"(a {type(dilation).__name__})")
    value = float(dilation)
    if not math.isfinite(value) or value < 1:
        raise ValueError(f"dilation must be a finite number >= 1; got {dilation!r}")
    return value


def _check_weight(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor; got {type(weight).__name__}")
    if weight.dim() != 4:
        raise ValueError(f"weight must be 4-D [O, I, k, k]; got shape {tuple(weight.shape)}")
    if weight.shape[2] != weight.shape[3] or weight.shape[2] % 2 == 0:
        raise ValueError("weight must be a square kernel of odd size k x k (k = 1, 3, 5, ...); "
                         f"got {tuple(weight.shape[2:])}")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight.shape[1] = {weight.shape[1]} must equal x's channels "
                         f"{x.shape[1]}: grouped convolutions (groups != 1) are not supported")
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one output channel")
    if weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(f"weight ({weight.dtype}, {weight.device}) must have x's dtype and "
                         f"device ({x.dtype}, {x.device})")
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None; got {type(bias).__name__}")
    if bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape [O] = [{weight.shape[0]}]; got "
                         f"{tuple(bias.shape)}")
    if bias.dtype != x.dtype or bias.device != x.device:
        raise ValueError(f"bias ({bias.dtype}, {bias.device}) must have x's dtype and device "
                         f"({x.dtype}, {x.device})")


def dilated_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    dilation: float = 1.0,
    stride: IntPair = 1,
) -> torch.Tensor:
    """ScaleCrafter's re-dilated convolution of a pre-trained kernel, integer or fractional.

    Integer ``d`` (``2`` or ``2.0``): exactly
    ``F.conv2d(x, weight, bias, stride, padding=d * (k // 2), dilation=d)`` (cuDNN on CUDA).

    Fractional ``d > 1`` ("stretch", METHODS.md): ``D = ceil(d)``, ``s = D / d``; bilinear-resize
    ``x`` to ``(round(H * s), round(W * s))`` (align_corners=False; Python's ``round``), convolve
    with dilation ``D``, padding ``D * (k // 2)`` and ``stride``, and bilinear-resize the result to
    the size ``F.conv2d(x, weight, stride=stride, padding=k // 2)`` would have. On CUDA this runs as
    one fused Triton kernel that never materialises the stretched input or output (README.md); it
    equals the chain up to rounding (it rounds less: no fp16/bf16 intermediates).

    Args:
        x: ``[B, I, H, W]`` fp32/fp16/bf16, any strides (channels-last is the fast path; NCHW is
            read in place too).
        weight: ``[O, I, k, k]`` with ``k`` odd, same dtype and device as ``x`` (no groups).
        bias: optional ``[O]``, same dtype and device.
        dilation: a Python int or float ``>= 1`` (it decides shapes, so it is never a tensor).
        stride: int or ``(sh, sw)``, each ``>= 1``.

    Returns:
        ``[B, O, (H - 1) // sh + 1, (W - 1) // sw + 1]`` with ``x``'s dtype; channels-last when
        ``x`` is.

    Raises:
        TypeError: ``x``/``weight``/``bias`` not tensors, ``x`` not float, ``dilation`` not a
            number, ``stride`` not int(s).
        ValueError: ``dilation < 1``, a non-square or even kernel, grouped weights
            (``weight.shape[1] != x.shape[1]``), shape/dtype/device mismatches, ``stride < 1``.

    Example::

        >>> x = torch.randn(2, 320, 64, 64)
        >>> weight = torch.randn(320, 320, 3, 3)
        >>> dilated_conv2d(x, weight, dilation=1.5).shape
        torch.Size([2, 320, 64, 64])
    """
    check_feature_map(x)
    _check_weight(x, weight, bias)
    value = _check_dilation(dilation)
    stride_h, stride_w = as_pair(stride, "stride")
    return _dilated_conv2d_op(x, weight, bias, value, stride_h, stride_w)

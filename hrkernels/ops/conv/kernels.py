"""Triton kernels of the ``conv`` family: the memory-bound passes around the channel GEMM of the
fractional dilated convolution (README.md).

* ``_gemm_weight_kernel``: the GEMM's B operand ``[(a, i), (b, o)] = w[o, i, a, b]``.
* ``_row_blend_kernel`` (before the GEMM): for every output row ``p`` and kernel row tap ``a``,
  the vertical blend ``V[p, col, a, i] = sum_j row_weight[a, p, j] *
  x[row_first[a, p] + j, col, i]`` of ``TAPS`` input rows, written as the GEMM's A operand
  ``[rows, W, k, I]`` (channels fastest).
* ``_col_blend_kernel`` (after the GEMM ``G[p, col, b, o] = sum_{a, i} V[p, col, a, i] *
  w[o, i, a, b]``): the horizontal blend ``out[p, q, o] = bias[o] + sum_{b, l}
  col_weight[b, q, l] * G[p, col_first[b, q] + l, b, o]`` into the output, any layout.

Both run on a 1-D grid decomposed in-kernel, channel blocks fastest. A program moves a
``[BLOCK_W, BLOCK_C]`` tile of one row. Blends are fp32; sizes and strides are runtime arguments.
"""

import triton
import triton.language as tl

from hrkernels.ops._tiles import split_row_tile


@triton.jit
def _gemm_weight_kernel(
    w_ptr, out_ptr, C_OUT, C_IN,
    stride_wo, stride_wi, stride_wa, stride_wb,
    KERNEL: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_O: tl.constexpr,
):
    # out[a * C_IN + i, b * C_OUT + o] = w[o, i, a, b]; out is [KERNEL * C_IN, KERNEL * C_OUT].
    # A program moves a [BLOCK_I, BLOCK_O] block for every (a, b): the first tap's loads bring the
    # block's k*k taps into L1, the others hit there; stores are contiguous along o.
    pid = tl.program_id(0)
    num_o = tl.cdiv(C_OUT, BLOCK_O)
    o_block = pid % num_o
    i_block = pid // num_o
    os = o_block * BLOCK_O + tl.arange(0, BLOCK_O)  # [BLOCK_O]
    ins = i_block * BLOCK_I + tl.arange(0, BLOCK_I)  # [BLOCK_I]
    mask = (ins < C_IN)[:, None] & (os < C_OUT)[None, :]
    src = w_ptr + ins[:, None] * stride_wi + os[None, :].to(tl.int64) * stride_wo
    for a in tl.static_range(KERNEL):
        dst = out_ptr + (a * C_IN + ins)[:, None].to(tl.int64) * (KERNEL * C_OUT) + os[None, :]
        for b in tl.static_range(KERNEL):
            values = tl.load(src + a * stride_wa + b * stride_wb, mask=mask)
            tl.store(dst + b * C_OUT, values, mask=mask)


@triton.jit
def _row_blend_kernel(
    x_ptr, v_ptr, row_first_ptr, row_weight_ptr,
    C, H, W, H_OUT, FIRST_ROW,
    stride_xn, stride_xc, stride_xh, stride_xw,
    KERNEL: tl.constexpr, TAPS: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # grid: rows * cdiv(W, BLOCK_W) * cdiv(C, BLOCK_C); `rows` flattened (image, output row)
    # starting at FIRST_ROW; v is [rows, W, KERNEL, C] contiguous.
    c_block, w_block, local_row = split_row_tile(tl.program_id(0), C, W, BLOCK_C, BLOCK_W)
    row = FIRST_ROW + local_row
    image = row // H_OUT
    p = row % H_OUT

    cols = w_block * BLOCK_W + tl.arange(0, BLOCK_W)  # [BLOCK_W]
    chans = c_block * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    mask = (cols < W)[:, None] & (chans < C)[None, :]
    src = (x_ptr + image.to(tl.int64) * stride_xn + cols[:, None] * stride_xw
           + chans[None, :].to(tl.int64) * stride_xc)
    dst = (v_ptr + local_row.to(tl.int64) * W * KERNEL * C + cols[:, None] * (KERNEL * C)
           + chans[None, :])
    for a in tl.static_range(KERNEL):
        table = a * H_OUT + p
        first = tl.load(row_first_ptr + table)
        blend = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
        for j in tl.static_range(TAPS):
            weight = tl.load(row_weight_ptr + table * TAPS + j)
            source_row = tl.minimum(first + j, H - 1)  # rows past the border carry weight 0
            values = tl.load(src + source_row.to(tl.int64) * stride_xh, mask=mask, other=0.0)
            blend += weight * values.to(tl.float32)
        tl.store(dst + a * C, blend.to(v_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _col_blend_kernel(
    g_ptr, bias_ptr, out_ptr, col_first_ptr, col_weight_ptr,
    C_OUT, W, H_OUT, W_OUT, FIRST_ROW,
    stride_on, stride_oc, stride_oh, stride_ow,
    KERNEL: tl.constexpr, TAPS: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # grid: rows * cdiv(W_OUT, BLOCK_W) * cdiv(C_OUT, BLOCK_C); g is [rows, W, KERNEL, C_OUT]
    # contiguous (the GEMM's output), rows starting at FIRST_ROW.
    c_block, w_block, local_row = split_row_tile(tl.program_id(0), C_OUT, W_OUT, BLOCK_C,
                                                 BLOCK_W)
    row = FIRST_ROW + local_row
    image = row // H_OUT
    p = row % H_OUT

    qs = w_block * BLOCK_W + tl.arange(0, BLOCK_W)  # [BLOCK_W] output columns
    chans = c_block * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C] output channels
    q_ok = qs < W_OUT
    mask = q_ok[:, None] & (chans < C_OUT)[None, :]
    g_row = g_ptr + local_row.to(tl.int64) * W * KERNEL * C_OUT + chans[None, :]
    acc = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
    for b in tl.static_range(KERNEL):
        table = b * W_OUT + qs
        first = tl.load(col_first_ptr + table, mask=q_ok, other=0)
        for tap in tl.static_range(TAPS):
            weight = tl.load(col_weight_ptr + table * TAPS + tap, mask=q_ok, other=0.0)
            col = tl.minimum(first + tap, W - 1)  # columns past the border carry weight 0
            values = tl.load(g_row + (col * KERNEL + b)[:, None] * C_OUT, mask=mask, other=0.0)
            acc += weight[:, None] * values.to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + chans, mask=chans < C_OUT, other=0.0).to(tl.float32)[None, :]
    dst = (out_ptr + image.to(tl.int64) * stride_on + p.to(tl.int64) * stride_oh
           + qs[:, None] * stride_ow + chans[None, :].to(tl.int64) * stride_oc)
    tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=mask)

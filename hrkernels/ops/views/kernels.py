"""Triton kernels of the ``views`` family: gather/scatter of windows and of dilated sub-lattices.

Every kernel runs on a 1-D grid whose program id is decomposed in-kernel, channel blocks fastest, so
that programs that touch neighbouring memory run at the same time (they share L2 lines). A program
moves a ``[BLOCK_W, BLOCK_C]`` tile of one row (``[BLOCK_H, BLOCK_W, BLOCK_C]`` for the scatter).
All sizes and strides are runtime arguments; only the block sizes and feature flags are constexpr.
"""

import triton
import triton.language as tl

from hrkernels.ops._tiles import split_row_tile


@triton.jit
def _gather_windows_kernel(
    x_ptr, starts_ptr, out_ptr,
    N, B, C, H, W, WIN_H, WIN_W,
    stride_xb, stride_xc, stride_xh, stride_xw,
    stride_ob, stride_oc, stride_oh, stride_ow,
    stride_sn, stride_sk,
    BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # grid: B * N * WIN_H * cdiv(WIN_W, BLOCK_W) * cdiv(C, BLOCK_C); image outermost, so the windows
    # of one image (which overlap) are copied close together in time.
    c_block, w_block, rest = split_row_tile(tl.program_id(0), C, WIN_W, BLOCK_C, BLOCK_W)
    i = rest % WIN_H
    rest = rest // WIN_H
    n = rest % N
    b = rest // N

    top = tl.load(starts_ptr + n * stride_sn)
    left = tl.load(starts_ptr + n * stride_sn + stride_sk)
    y = top + i
    js = w_block * BLOCK_W + tl.arange(0, BLOCK_W)  # [BLOCK_W] columns of the window
    cs = c_block * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    xs = left + js
    c_ok = cs < C
    # The row test is made on a vector: Triton's interpreter rejects masks mixing scalar and vector.
    ys = y + tl.zeros([BLOCK_W], dtype=y.dtype)
    inside = (ys >= 0) & (ys < H) & (xs >= 0) & (xs < W)  # [BLOCK_W]: zeros outside x

    src = (x_ptr + b.to(tl.int64) * stride_xb + y * stride_xh
           + xs[:, None] * stride_xw + cs[None, :] * stride_xc)
    values = tl.load(src, mask=inside[:, None] & c_ok[None, :], other=0.0)
    dst = (out_ptr + (n * B + b).to(tl.int64) * stride_ob + i.to(tl.int64) * stride_oh
           + js[:, None] * stride_ow + cs[None, :] * stride_oc)
    tl.store(dst, values, mask=(js < WIN_W)[:, None] & c_ok[None, :])


@triton.jit
def _scatter_windows_mean_kernel(
    views_ptr, starts_ptr, weights_ptr, out_ptr,
    N, B, C, H, W, WIN_H, WIN_W,
    stride_vb, stride_vc, stride_vh, stride_vw,
    stride_ob, stride_oc, stride_oh, stride_ow,
    stride_sn, stride_sk,
    HAS_WEIGHTS: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Output-centric: each program owns a [BLOCK_H, BLOCK_W, BLOCK_C] tile of the output and sums,
    # in view order, every view that covers it. No atomics, so the result is bitwise reproducible.
    c_block, w_block, rest = split_row_tile(tl.program_id(0), C, W, BLOCK_C, BLOCK_W)
    num_h = tl.cdiv(H, BLOCK_H)
    h_block = rest % num_h
    b = rest // num_h

    y0 = h_block * BLOCK_H
    x0 = w_block * BLOCK_W
    ys = y0 + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    xs = x0 + tl.arange(0, BLOCK_W)  # [BLOCK_W]
    cs = c_block * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    c_ok = cs < C

    acc = tl.zeros([BLOCK_H, BLOCK_W, BLOCK_C], dtype=tl.float32)
    weight_sum = tl.zeros([BLOCK_H, BLOCK_W], dtype=tl.float32)
    for n in range(N):
        top = tl.load(starts_ptr + n * stride_sn)
        left = tl.load(starts_ptr + n * stride_sn + stride_sk)
        # Skip views that miss this tile (most of them): only scalar work is spent on those.
        if (top < y0 + BLOCK_H) & (top + WIN_H > y0) & (left < x0 + BLOCK_W) & (left + WIN_W > x0):
            i = ys - top  # [BLOCK_H] rows inside view n
            j = xs - left  # [BLOCK_W]
            covered = (((i >= 0) & (i < WIN_H) & (ys < H))[:, None]
                       & ((j >= 0) & (j < WIN_W) & (xs < W))[None, :])  # [BLOCK_H, BLOCK_W]
            if HAS_WEIGHTS:
                weight = tl.load(weights_ptr + n).to(tl.float32)
            else:
                weight = 1.0
            src = (views_ptr + (n * B + b).to(tl.int64) * stride_vb
                   + i[:, None, None] * stride_vh + j[None, :, None] * stride_vw
                   + cs[None, None, :] * stride_vc)
            values = tl.load(src, mask=covered[:, :, None] & c_ok[None, None, :], other=0.0)
            acc += values.to(tl.float32) * weight
            weight_sum += tl.where(covered, weight, 0.0)

    denominator = weight_sum[:, :, None]
    # 0 where nothing covers (or the weights cancel); dividing by 1 there avoids evaluating 0/0.
    covered_any = denominator != 0.0
    mean = tl.where(covered_any, acc / tl.where(covered_any, denominator, 1.0), 0.0)
    dst = (out_ptr + b.to(tl.int64) * stride_ob + ys[:, None, None].to(tl.int64) * stride_oh
           + xs[None, :, None] * stride_ow + cs[None, None, :] * stride_oc)
    in_bounds = ((ys < H)[:, None] & (xs < W)[None, :])[:, :, None] & c_ok[None, None, :]
    tl.store(dst, mean.to(out_ptr.dtype.element_ty), mask=in_bounds)


@triton.jit
def _dilated_copy_kernel(
    full_ptr, views_ptr,
    B, C, VIEW_H, VIEW_W, SH, SW,
    stride_fb, stride_fc, stride_fh, stride_fw,
    stride_vb, stride_vc, stride_vh, stride_vw,
    TO_VIEWS: tl.constexpr,
    BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # views[k*B + b, c, i, j] <-> full[b, c, i*SH + k // SW, j*SW + k % SW]; TO_VIEWS picks the
    # direction (gather_dilated when set, scatter_dilated otherwise). One program copies a tile of
    # one view row; the SW programs that share a full-resolution row run next to each other.
    c_block, w_block, rest = split_row_tile(tl.program_id(0), C, VIEW_W, BLOCK_C, BLOCK_W)
    kj = rest % SW
    rest = rest // SW
    ki = rest % SH
    rest = rest // SH
    i = rest % VIEW_H
    b = rest // VIEW_H
    k = ki * SW + kj

    js = w_block * BLOCK_W + tl.arange(0, BLOCK_W)  # [BLOCK_W] view columns
    cs = c_block * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    mask = (js < VIEW_W)[:, None] & (cs < C)[None, :]
    full = (full_ptr + b.to(tl.int64) * stride_fb + (i * SH + ki).to(tl.int64) * stride_fh
            + (js * SW + kj)[:, None] * stride_fw + cs[None, :] * stride_fc)
    view = (views_ptr + (k * B + b).to(tl.int64) * stride_vb + i.to(tl.int64) * stride_vh
            + js[:, None] * stride_vw + cs[None, :] * stride_vc)
    if TO_VIEWS:
        tl.store(view, tl.load(full, mask=mask), mask=mask)
    else:
        tl.store(full, tl.load(view, mask=mask), mask=mask)

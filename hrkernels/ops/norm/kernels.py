"""Triton kernels of the ``norm`` family: GroupNorm over a tile with statistics gathered elsewhere.

* ``_group_partial_stats_kernel``: per (image, group, chunk of rows) the ``(count, mean, M2)`` of
  the group's values, in fp32. A group is ``CPG`` consecutive channels; the walk over its rows,
  column blocks and channel blocks, the shifted per-lane sums and the exact merge of the lanes are
  the ``stats`` family's (``_lane_statistics``, ``_merge_lanes``: a GroupNorm group is a
  factor-(1, 1) sub-lattice of ``CPG`` channels). The host merges the chunks (Chan's formula).
* ``_group_norm_silu_kernel``: ``silu((x - mean[b, g]) * rstd[b, g] * weight[c] + bias[c])`` in one
  read and one write, ``mean``/``rstd`` precomputed ``[B, G]`` fp32 (the whole image's statistics
  while ``x`` is one strip of it).

A tile is ``[BLOCK_W, BLOCK_C]`` (columns x channels) of one row (``_launch.row_tile``). Sizes and
strides are runtime arguments; arithmetic is fp32, loads and stores are in the tensors' dtype.
"""

import triton
import triton.language as tl

from hrkernels.ops.stats.kernels import _lane_statistics, _merge_lanes, _pivot


@triton.jit
def _group_partial_stats_kernel(
    x_ptr, partial_ptr,
    G, CPG, H, W, NUM_WB, NUM_CB, NUM_CHUNKS, ROWS_PER_CHUNK,
    stride_xb, stride_xc, stride_xh, stride_xw,
    EVEN: tl.constexpr, UNROLL: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # grid: B * G * NUM_CHUNKS, chunk fastest. partial[pid, 0:3] = (count, mean, M2) of rows
    # [chunk * ROWS_PER_CHUNK, ...) of group g (channels [g * CPG, (g + 1) * CPG)) of image b.
    pid = tl.program_id(0)
    chunk = pid % NUM_CHUNKS
    group = pid // NUM_CHUNKS  # b * G + g
    batch = group // G
    group_ptr = (x_ptr + batch.to(tl.int64) * stride_xb
                 + ((group % G) * CPG).to(tl.int64) * stride_xc)
    # Sub-lattice (0, 0) of factor (1, 1), as tensors (the interpreter needs them typed).
    zero = pid * 0
    pivot = _pivot(group_ptr, zero, zero, zero, zero, stride_xc, stride_xh, stride_xw, False,
                   BLOCK_C, CPG)
    row_first = chunk * ROWS_PER_CHUNK
    row_last = tl.minimum(row_first + ROWS_PER_CHUNK, H)
    count, mean, m2 = _lane_statistics(group_ptr, pivot, row_first, row_last, zero, zero, zero,
                                       NUM_WB, NUM_CB, CPG, W, zero + 1, zero + 1, stride_xc,
                                       stride_xh, stride_xw, False, EVEN, UNROLL, BLOCK_W,
                                       BLOCK_C)
    count, mean, m2 = _merge_lanes(count, mean, m2, None)
    # Stored as a [3] vector (one lane each) so the store mask is a vector (interpreter).
    fields = tl.arange(0, 4)
    values = tl.where(fields == 0, count, tl.where(fields == 1, mean, m2))
    tl.store(partial_ptr + pid.to(tl.int64) * 3 + fields, values, mask=fields < 3)


@triton.jit
def _group_norm_silu_kernel(
    x_ptr, out_ptr, mean_ptr, rstd_ptr, weight_ptr, bias_ptr,
    C, CPG, H, W, NUM_WB, NUM_ROW_BLOCKS, ROWS_PER_PROGRAM,
    stride_xb, stride_xc, stride_xh, stride_xw,
    stride_ob, stride_oc, stride_oh, stride_ow,
    stride_sb, stride_sg, stride_rb, stride_rg, stride_wc, stride_bc,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, EVEN: tl.constexpr,
    BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # grid: (B * NUM_ROW_BLOCKS, NUM_WB * NUM_CB). A program normalises one [BLOCK_W, BLOCK_C]
    # block of ROWS_PER_PROGRAM consecutive rows of one image: the per-channel factors are loaded
    # once ([BLOCK_C]: the group's mean and rstd gathered by channel, weight, bias).
    batch = tl.program_id(0) // NUM_ROW_BLOCKS
    row_block = tl.program_id(0) % NUM_ROW_BLOCKS
    w_block = tl.program_id(1) % NUM_WB
    c_block = tl.program_id(1) // NUM_WB
    cs = c_block * BLOCK_C + tl.arange(0, BLOCK_C)
    ws = w_block * BLOCK_W + tl.arange(0, BLOCK_W)
    c_ok = cs < C
    groups = cs // CPG
    mean = tl.load(mean_ptr + batch * stride_sb + groups * stride_sg, mask=c_ok, other=0.0)
    scale = tl.load(rstd_ptr + batch * stride_rb + groups * stride_rg, mask=c_ok, other=0.0)
    mean = mean.to(tl.float32)
    scale = scale.to(tl.float32)
    if HAS_WEIGHT:
        scale = scale * tl.load(weight_ptr + cs * stride_wc, mask=c_ok, other=0.0).to(tl.float32)
    shift = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_BIAS:
        shift = tl.load(bias_ptr + cs * stride_bc, mask=c_ok, other=0.0).to(tl.float32)
    x_offsets = ws[:, None] * stride_xw + cs[None, :] * stride_xc
    out_offsets = ws[:, None] * stride_ow + cs[None, :] * stride_oc
    mask = (ws < W)[:, None] & c_ok[None, :]
    x_image = x_ptr + batch.to(tl.int64) * stride_xb
    out_image = out_ptr + batch.to(tl.int64) * stride_ob
    row_first = row_block * ROWS_PER_PROGRAM
    row_last = tl.minimum(row_first + ROWS_PER_PROGRAM, H)
    for row in range(row_first, row_last):
        x_row = x_image + row * stride_xh  # in-image offsets fit int32 (the op checks)
        if EVEN:
            values = tl.load(x_row + x_offsets).to(tl.float32)
        else:
            values = tl.load(x_row + x_offsets, mask=mask, other=0.0).to(tl.float32)
        result = (values - mean[None, :]) * scale[None, :] + shift[None, :]
        if SILU:
            result = result / (1.0 + tl.exp(-result))
        result = result.to(out_ptr.dtype.element_ty)
        out_row = out_image + row * stride_oh
        if EVEN:
            tl.store(out_row + out_offsets, result)
        else:
            tl.store(out_row + out_offsets, result, mask=mask)

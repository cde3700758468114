"""Triton kernels of the ``blur`` family: separable Gaussian blur and frequency fusion in one pass.

A program owns a strip of ``[BLOCK_W, BLOCK_C]`` (columns x channels) over ``ROWS`` output rows and
walks down it one input row at a time. For each input row it does the horizontal pass (``K`` shifted
loads of the row, served by L1/L2 after the first) and keeps the result in a ring of the ``K`` most
recent rows, a tuple of register tiles; the vertical pass is then ``K`` FMAs over the ring. Every
input element comes from DRAM once (plus the 2R halo rows shared with the strips above and below)
and every output element is written once.

For ``K <= 7`` the row loop advances ``K`` rows per iteration with the ``K`` sub-steps unrolled:
sub-step ``u`` writes ring slot ``u``, so the ring update is a renaming and costs nothing. Larger
kernels rotate the ring one row at a time (``K - 1`` register moves per row, but ``K`` times less
code to compile).

Zero padding without masked loads: a tap that falls outside the map reads a clamped (valid) address
and gets weight 0. The tap weights are computed in the kernel from ``sigma`` (a scalar argument, or
a 0-d tensor read through a pointer: no host sync). All sizes and strides are runtime arguments;
``K`` (the kernel size, a handful of odd values) and the block sizes are constexpr.
"""

import triton
import triton.language as tl

from hrkernels.ops._tiles import split_row_tile


@triton.jit
def _tap_weight(offset, inv_sigma):
    # Unnormalised Gaussian weight of a tap ``offset`` positions from the centre, fp32.
    scaled = offset * inv_sigma
    return tl.exp(-0.5 * scaled * scaled)


@triton.jit
def _load_source(a_ptr, b_ptr, offsets_a, offsets_b, lanes_ok, MASKED: tl.constexpr,
                 FUSION: tl.constexpr):
    # The blurred quantity: ``a`` (blur) or ``b - a`` (fusion). Only the channel lanes past C are
    # masked (when C is not a multiple of BLOCK_C); they only feed output lanes that are not stored.
    if MASKED:
        value = tl.load(a_ptr + offsets_a, mask=lanes_ok).to(tl.float32)
        if FUSION:
            value = tl.load(b_ptr + offsets_b, mask=lanes_ok).to(tl.float32) - value
    else:
        value = tl.load(a_ptr + offsets_a).to(tl.float32)
        if FUSION:
            value = tl.load(b_ptr + offsets_b).to(tl.float32) - value
    return value


@triton.jit
def _horizontal_pass(
    a_ptr, b_ptr, row_a, row_b, row_weight, xs, cs, c_ok, C, W,
    stride_aw, stride_ac, stride_bw, stride_bc, inv_sigma, inv_norm,
    K: tl.constexpr, FUSION: tl.constexpr, FEATURE_BLUR: tl.constexpr, EVEN_C: tl.constexpr,
    BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # One input row blurred along W (and C with FEATURE_BLUR): [1, BLOCK_W, BLOCK_C] fp32.
    # xs: [1, BLOCK_W, 1] columns; cs, c_ok: [1, 1, BLOCK_C] channels and cs < C (the channel index
    # is not clamped: that would hide its contiguity from the compiler and cost the 16-byte loads);
    # row_weight: 1.0, or 0.0 for a row outside the map (whose clamped address is read).
    R = K // 2
    acc = tl.zeros([1, BLOCK_W, BLOCK_C], dtype=tl.float32)
    for j in tl.static_range(K):
        cols = xs + (j - R)
        inside = (cols >= 0) & (cols < W)
        weight = tl.where(inside, row_weight * _tap_weight(j - R, inv_sigma) * inv_norm, 0.0)
        cols = tl.minimum(tl.maximum(cols, 0), W - 1)
        if FEATURE_BLUR:
            for m in range(K):  # channel taps: a channel halo, also zero padded
                chans = cs + (m - R)
                chan_ok = (chans >= 0) & (chans < C)
                chans = tl.minimum(tl.maximum(chans, 0), C - 1)
                value = _load_source(a_ptr, b_ptr, row_a + cols * stride_aw + chans * stride_ac,
                                     row_b + cols * stride_bw + chans * stride_bc, c_ok, False,
                                     FUSION)
                weight_m = tl.where(chan_ok, _tap_weight(m - R, inv_sigma) * inv_norm, 0.0)
                acc += (weight * weight_m) * value
        else:
            value = _load_source(a_ptr, b_ptr, row_a + cols * stride_aw + cs * stride_ac,
                                 row_b + cols * stride_bw + cs * stride_bc, c_ok, not EVEN_C,
                                 FUSION)
            acc += weight * value
    return acc


@triton.jit
def _input_row(
    a_ptr, b_ptr, batch, t, y0, H, C, W,
    stride_ab, stride_ah, stride_aw, stride_ac, stride_bb, stride_bh, stride_bw, stride_bc,
    xs, cs, c_ok, inv_sigma, inv_norm,
    K: tl.constexpr, FUSION: tl.constexpr, FEATURE_BLUR: tl.constexpr, EVEN_C: tl.constexpr,
    BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # The horizontal pass of input row y0 - R + t (zero when that row is outside [0, H)).
    y_in = y0 - K // 2 + t
    row_weight = tl.where((y_in >= 0) & (y_in < H), 1.0, 0.0)
    y_in = tl.minimum(tl.maximum(y_in, 0), H - 1).to(tl.int64)
    return _horizontal_pass(
        a_ptr, b_ptr, batch * stride_ab + y_in * stride_ah, batch * stride_bb + y_in * stride_bh,
        row_weight, xs, cs, c_ok, C, W, stride_aw, stride_ac, stride_bw, stride_bc,
        inv_sigma, inv_norm, K, FUSION, FEATURE_BLUR, EVEN_C, BLOCK_W, BLOCK_C)


@triton.jit
def _store_row(
    a_ptr, out_ptr, blurred, batch, t, y0, ROWS, H,
    stride_ab, stride_ah, stride_ob, stride_oh, a_cols, out_cols, c_ok, out_lanes_ok,
    K: tl.constexpr, FUSION: tl.constexpr, EVEN_C: tl.constexpr, BLOCK_W: tl.constexpr,
):
    # Write output row y0 + t - 2R (when it is one of this program's rows): G, or a + G for fusion.
    y_out = y0 + t - 2 * (K // 2)
    ys_out = y_out + tl.zeros([1, BLOCK_W, 1], dtype=tl.int32)  # masks are vectors (interpreter)
    mask = (ys_out >= y0) & (ys_out < H) & (ys_out < y0 + ROWS) & out_lanes_ok
    y_safe = tl.minimum(tl.maximum(y_out, 0), H - 1).to(tl.int64)
    if FUSION:
        if EVEN_C:
            centre = tl.load(a_ptr + batch * stride_ab + y_safe * stride_ah + a_cols)
        else:
            centre = tl.load(a_ptr + batch * stride_ab + y_safe * stride_ah + a_cols, mask=c_ok)
        blurred += centre.to(tl.float32)
    tl.store(out_ptr + batch * stride_ob + y_safe * stride_oh + out_cols,
             blurred.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _separable_blur_kernel(
    a_ptr, b_ptr, out_ptr, sigma_ptr, sigma_value,
    C, H, W, ROWS,
    stride_ab, stride_ac, stride_ah, stride_aw,
    stride_bb, stride_bc, stride_bh, stride_bw,
    stride_ob, stride_oc, stride_oh, stride_ow,
    K: tl.constexpr, K_PAD: tl.constexpr,
    FUSION: tl.constexpr, FEATURE_BLUR: tl.constexpr, SIGMA_FROM_PTR: tl.constexpr,
    EVEN_C: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # out = G(a)            (FUSION off: gaussian_blur2d, b unused)
    # out = a + G(b - a)    (FUSION on: frequency_fusion with a = global_, b = local)
    # G: separable Gaussian of K taps over (H, W) (and C with FEATURE_BLUR), zero padding K // 2.
    # grid: B * cdiv(H, ROWS) * cdiv(W, BLOCK_W) * cdiv(C, BLOCK_C), channel blocks fastest; ROWS
    # (output rows per program) is a runtime value, and ROWS + 2 * (K // 2) is a multiple of K (the
    # launcher picks it so), so no unrolled sub-step is wasted.
    R = K // 2
    c_block, w_block, rest = split_row_tile(tl.program_id(0), C, W, BLOCK_C, BLOCK_W)
    num_h = tl.cdiv(H, ROWS)
    h_block = rest % num_h
    batch = (rest // num_h).to(tl.int64)

    if SIGMA_FROM_PTR:
        sigma = tl.load(sigma_ptr).to(tl.float32)
    else:
        # fp32 (a Python float when interpreted)
        sigma = sigma_value + tl.zeros([], dtype=tl.float32)
    inv_sigma = 1.0 / sigma
    taps = tl.arange(0, K_PAD)
    inv_norm = 1.0 / tl.sum(tl.where(taps < K, _tap_weight(taps - R, inv_sigma), 0.0), axis=0)

    y0 = h_block * ROWS  # first output row of this program
    # Tiles are [1, BLOCK_W, BLOCK_C]: loads, ring and stores then share one register layout.
    xs = (w_block * BLOCK_W + tl.arange(0, BLOCK_W))[None, :, None]  # [1, BLOCK_W, 1]
    cs = (c_block * BLOCK_C + tl.arange(0, BLOCK_C))[None, None, :]  # [1, 1, BLOCK_C]
    c_ok = cs < C
    xs_load = tl.minimum(xs, W - 1)  # columns past W read column W - 1; they are never stored
    out_lanes_ok = (xs < W) & c_ok
    a_cols = xs_load * stride_aw + cs * stride_ac
    out_cols = xs_load * stride_ow + cs * stride_oc

    ring = (tl.zeros([1, BLOCK_W, BLOCK_C], dtype=tl.float32),) * K
    if K <= 7:
        # ring[s]: the horizontal pass of the newest input row t with t % K == s. Output row
        # y0 + t - 2R = sum_i g[i] * row(t - 2R + i); row t - 2R + i sits in slot (u + 1 + i) % K.
        for t0 in range(0, ROWS + 2 * R, K):
            for u in tl.static_range(K):
                h = _input_row(
                    a_ptr, b_ptr, batch, t0 + u, y0, H, C, W,
                    stride_ab, stride_ah, stride_aw, stride_ac,
                    stride_bb, stride_bh, stride_bw, stride_bc,
                    xs, cs, c_ok, inv_sigma, inv_norm, K, FUSION, FEATURE_BLUR, EVEN_C, BLOCK_W,
                    BLOCK_C)
                ring = ring[:u] + (h,) + ring[u + 1:]
                blurred = tl.zeros([1, BLOCK_W, BLOCK_C], dtype=tl.float32)
                for i in tl.static_range(K):
                    blurred += (_tap_weight(i - R, inv_sigma) * inv_norm) * ring[(u + 1 + i) % K]
                _store_row(a_ptr, out_ptr, blurred, batch, t0 + u, y0, ROWS, H,
                           stride_ab, stride_ah, stride_ob, stride_oh, a_cols, out_cols, c_ok,
                           out_lanes_ok, K, FUSION, EVEN_C, BLOCK_W)
    else:
        # ring[i]: the horizontal pass of input row t - 2R + i (oldest first).
        for t in range(0, ROWS + 2 * R):
            h = _input_row(
                a_ptr, b_ptr, batch, t, y0, H, C, W,
                stride_ab, stride_ah, stride_aw, stride_ac,
                stride_bb, stride_bh, stride_bw, stride_bc,
                xs, cs, c_ok, inv_sigma, inv_norm, K, FUSION, FEATURE_BLUR, EVEN_C, BLOCK_W,
                    BLOCK_C)
            ring = ring[1:] + (h,)
            blurred = tl.zeros([1, BLOCK_W, BLOCK_C], dtype=tl.float32)
            for i in tl.static_range(K):
                blurred += (_tap_weight(i - R, inv_sigma) * inv_norm) * ring[i]
            _store_row(a_ptr, out_ptr, blurred, batch, t, y0, ROWS, H,
                       stride_ab, stride_ah, stride_ob, stride_oh, a_cols, out_cols, c_ok,
                       out_lanes_ok, K, FUSION, EVEN_C, BLOCK_W)

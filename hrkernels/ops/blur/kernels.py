"""Triton kernels of the ``blur`` family: separable Gaussian blur and frequency fusion in one pass.

Both kernels walk down a strip of output rows and keep ``2R`` rows of the vertical pass in
registers (``R = K // 2``), as tuples of register tiles indexed by compile-time constants: the
rows kernel the horizontal pass of the last ``2R`` input rows, the columns kernel the partial sums
of the next ``2R`` output rows. Each iteration loads ``UNROLL`` new input rows *before* it stores
any output row: a load cannot be moved above a store that may alias it, so this order is
what keeps several rows of loads in flight; an optional L2 prefetch (PTX ``prefetch.global.L2``,
which has no result and is not held back by the stores) asks for the next iteration's rows. Every
input element comes from DRAM once (plus the ``2R`` halo rows shared with the strips above and
below, through L2) and every output element is written once.

* ``_separable_blur_kernel`` (any layout, and the channel blur of ``feature_blur``): a program
  owns ``[BLOCK_W, BLOCK_C]`` (columns x channels); the horizontal pass is ``K`` shifted loads of
  the row (the first from DRAM, the others from L1).
* ``_channels_last_blur_kernel`` (channel axis contiguous): a program owns ``TILE_W`` columns, each
  a ``[BLOCK_C]`` channel vector; an input row arrives as ``TILE_W + 2R`` vectors, each element
  loaded and converted once, and the horizontal pass is ``K`` FMAs between registers. For ``K >= 5``
  this needs about half the instructions of the shifted loads. Each new row is added into the
  partial sums of the ``K`` outputs it belongs to (no history rows to rotate), and the fusion adds
  ``a``'s centre term from the row it has just loaded (no second load of ``a``).

Zero padding: taps outside the map contribute 0 (clamped addresses with weight 0 in the rows
kernel, masked loads in the columns kernel). The tap weights are computed in the kernel from
``sigma`` (a scalar argument, or a 0-d tensor read through a pointer: no host sync). Sizes and
strides are runtime arguments; ``K`` and the tile shapes are constexpr.
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
def _strip(pid, C, H, W, ROWS, BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr):
    # Program id -> (channel block, column block, row block, image) of a strip; channel blocks
    # fastest, then columns, row blocks, images.
    c_block, w_block, rest = split_row_tile(pid, C, W, BLOCK_C, BLOCK_W)
    num_h = tl.cdiv(H, ROWS)
    return c_block, w_block, rest % num_h, (rest // num_h).to(tl.int64)


@triton.jit
def _gaussian(sigma_ptr, sigma_value, K: tl.constexpr, K_PAD: tl.constexpr,
              SIGMA_FROM_PTR: tl.constexpr):
    # (1 / sigma, 1 / sum of the K unnormalised tap weights), fp32; sigma is a scalar argument or
    # a 0-d tensor read through a pointer (no host sync).
    if SIGMA_FROM_PTR:
        sigma = tl.load(sigma_ptr).to(tl.float32)
    else:
        # fp32 (a Python float when interpreted)
        sigma = sigma_value + tl.zeros([], dtype=tl.float32)
    inv_sigma = 1.0 / sigma
    taps = tl.arange(0, K_PAD)
    weights = tl.where(taps < K, _tap_weight(taps - K // 2, inv_sigma), 0.0)
    return inv_sigma, 1.0 / tl.sum(weights, axis=0)


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
    R: tl.constexpr = K // 2
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
def _prefetch_rows(a_ptr, b_ptr, batch, y_first, H, stride_ab, stride_ah, stride_bb, stride_bh,
                   a_lines, b_lines, UNROLL: tl.constexpr, FUSION: tl.constexpr):
    # Ask L2 for the UNROLL input rows from y_first on (the next iteration's): a hint with no result
    # register, so, unlike a load, it is not held back behind this iteration's stores.
    for u in tl.static_range(UNROLL):
        y = tl.minimum(tl.maximum(y_first + u, 0), H - 1).to(tl.int64)
        _prefetch_l2(a_ptr + batch * stride_ab + y * stride_ah + a_lines)
        if FUSION:
            _prefetch_l2(b_ptr + batch * stride_bb + y * stride_bh + b_lines)


@triton.jit
def _prefetch_l2(pointers):
    # PTX prefetch into L2 (CUDA only; the launcher never sets PREFETCH under the interpreter).
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];", "=r,l", [pointers], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def _separable_blur_kernel(
    a_ptr, b_ptr, out_ptr, sigma_ptr, sigma_value,
    C, H, W, ROWS,
    stride_ab, stride_ac, stride_ah, stride_aw,
    stride_bb, stride_bc, stride_bh, stride_bw,
    stride_ob, stride_oc, stride_oh, stride_ow,
    K: tl.constexpr, K_PAD: tl.constexpr,
    FUSION: tl.constexpr, FEATURE_BLUR: tl.constexpr, SIGMA_FROM_PTR: tl.constexpr,
    EVEN_C: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr, UNROLL: tl.constexpr,
    PREFETCH: tl.constexpr, LINE_W: tl.constexpr, LINE_C: tl.constexpr,
):
    # out = G(a)            (FUSION off: gaussian_blur2d, b unused)
    # out = a + G(b - a)    (FUSION on: frequency_fusion with a = global_, b = local)
    # G: separable Gaussian of K taps over (H, W) (and C with FEATURE_BLUR), zero padding K // 2.
    # grid: B * cdiv(H, ROWS) * cdiv(W, BLOCK_W) * cdiv(C, BLOCK_C), channel blocks fastest. ROWS
    # (output rows per program) is a runtime value; the launcher makes ROWS + 2 * (K // 2) a
    # multiple of UNROLL, so that no unrolled sub-step is wasted.
    R: tl.constexpr = K // 2
    c_block, w_block, h_block, batch = _strip(tl.program_id(0), C, H, W, ROWS, BLOCK_C, BLOCK_W)
    inv_sigma, inv_norm = _gaussian(sigma_ptr, sigma_value, K, K_PAD, SIGMA_FROM_PTR)

    y0 = h_block * ROWS  # first output row of this program
    # Tiles are [1, BLOCK_W, BLOCK_C]: loads, rows and stores then share one register layout.
    xs = (w_block * BLOCK_W + tl.arange(0, BLOCK_W))[None, :, None]  # [1, BLOCK_W, 1]
    cs = (c_block * BLOCK_C + tl.arange(0, BLOCK_C))[None, None, :]  # [1, 1, BLOCK_C]
    c_ok = cs < C
    xs_load = tl.minimum(xs, W - 1)  # columns past W read column W - 1; they are never stored
    # Stored lanes. With EVEN_C every channel lane is valid: leaving c_ok out keeps the mask
    # constant along the channels, so the stores stay 16-byte vectors.
    out_lanes_ok = (xs < W) if EVEN_C else (xs < W) & c_ok
    a_cols = xs_load * stride_aw + cs * stride_ac
    out_cols = xs_load * stride_ow + cs * stride_oc
    if PREFETCH:
        # One address per cache line of the tile: LINE_W columns x LINE_C channels apart.
        line_xs = tl.minimum(w_block * BLOCK_W + tl.arange(0, BLOCK_W // LINE_W) * LINE_W, W - 1)
        line_cs = tl.minimum(c_block * BLOCK_C + tl.arange(0, BLOCK_C // LINE_C) * LINE_C, C - 1)
        a_lines = line_xs[:, None] * stride_aw + line_cs[None, :] * stride_ac
        b_lines = line_xs[:, None] * stride_bw + line_cs[None, :] * stride_bc
    else:
        a_lines = 0
        b_lines = 0

    # Each iteration takes UNROLL new input rows: rows[2R + u] is the horizontal pass of input row
    # t0 + u, rows[0:2R] those of the 2R rows before it (kept from the previous iteration). All
    # UNROLL rows are loaded before any output row is stored: a load cannot move above a store that
    # may alias it, so this order is what keeps UNROLL rows of loads in flight.
    history = ()
    for _ in tl.static_range(2 * R):
        history = history + (tl.zeros([1, BLOCK_W, BLOCK_C], dtype=tl.float32),)
    for t0 in range(0, ROWS + 2 * R, UNROLL):
        if PREFETCH:
            _prefetch_rows(a_ptr, b_ptr, batch, y0 - R + t0 + UNROLL, H, stride_ab, stride_ah,
                           stride_bb, stride_bh, a_lines, b_lines, UNROLL, FUSION)
        rows = history
        for u in tl.static_range(UNROLL):
            rows = rows + (_input_row(
                a_ptr, b_ptr, batch, t0 + u, y0, H, C, W,
                stride_ab, stride_ah, stride_aw, stride_ac,
                stride_bb, stride_bh, stride_bw, stride_bc,
                xs, cs, c_ok, inv_sigma, inv_norm, K, FUSION, FEATURE_BLUR, EVEN_C, BLOCK_W,
                BLOCK_C),)
        for u in tl.static_range(UNROLL):
            # Output row y0 + t0 + u - 2R = sum_i g[i] * (input row t0 + u - 2R + i) = rows[u + i].
            blurred = tl.zeros([1, BLOCK_W, BLOCK_C], dtype=tl.float32)
            for i in tl.static_range(K):
                blurred += (_tap_weight(i - R, inv_sigma) * inv_norm) * rows[u + i]
            _store_row(a_ptr, out_ptr, blurred, batch, t0 + u, y0, ROWS, H,
                       stride_ab, stride_ah, stride_ob, stride_oh, a_cols, out_cols, c_ok,
                       out_lanes_ok, K, FUSION, EVEN_C, BLOCK_W)
        history = rows[UNROLL:]


# --------------------------------------------------------------------------------------------------
# Channels-contiguous maps: register-blocked columns
# --------------------------------------------------------------------------------------------------


@triton.jit
def _column_vectors(a_ptr, b_ptr, row_a, row_b, x_first, W, stride_aw, stride_bw, a_chans, b_chans,
                    ok, lane_zeros, N: tl.constexpr, FUSION: tl.constexpr, R: tl.constexpr):
    # The channel vectors ([BLOCK_C], fp32) of input columns x_first .. x_first + N - 1 of one row:
    # a (blur) or b - a (fusion); zero for a column outside [0, W) or where ``ok`` is False (a row
    # outside the map, channel lanes past C). Each element is loaded and converted once. Also
    # returns, for the fusion, the a vectors of columns R .. N - R - 1 (the program's own columns:
    # the centre term of their outputs), else an empty tuple.
    # (Conditions on scalars are made vectors with lane_zeros: the interpreter needs vector masks.)
    columns = ()
    centres = ()
    for j in tl.static_range(N):
        x = lane_zeros + (x_first + j)
        lanes = ok & (x >= 0) & (x < W)
        value = tl.load(a_ptr + row_a + x * stride_aw + a_chans, mask=lanes, other=0.0)
        value = value.to(tl.float32)
        if FUSION:
            if j >= R and j < N - R:
                centres = centres + (value,)
            value = tl.load(b_ptr + row_b + x * stride_bw + b_chans, mask=lanes,
                            other=0.0).to(tl.float32) - value
        columns = columns + (value,)
    return columns, centres


@triton.jit
def _channels_last_blur_kernel(
    a_ptr, b_ptr, out_ptr, sigma_ptr, sigma_value,
    C, H, W, ROWS,
    stride_ab, stride_ac, stride_ah, stride_aw,
    stride_bb, stride_bc, stride_bh, stride_bw,
    stride_ob, stride_oc, stride_oh, stride_ow,
    K: tl.constexpr, K_PAD: tl.constexpr, FUSION: tl.constexpr, SIGMA_FROM_PTR: tl.constexpr,
    EVEN_C: tl.constexpr, BLOCK_C: tl.constexpr, TILE_W: tl.constexpr, UNROLL: tl.constexpr,
    PREFETCH: tl.constexpr, LINE_C: tl.constexpr,
):
    # The same function as _separable_blur_kernel (without FEATURE_BLUR) for maps whose channel
    # axis is contiguous. A program owns TILE_W output columns x BLOCK_C channels over ROWS output
    # rows. Each input row arrives as TILE_W + 2R channel vectors (one load and one conversion per
    # element); the horizontal pass is K FMAs per column between registers, the vertical pass one
    # FMA of the row into each of the K partial outputs it belongs to. Rows, columns and partial
    # outputs are tuples of [BLOCK_C] vectors, so every index below is a compile-time constant and
    # the loop carries the partial outputs in place (no register moves on sm_90: bench/NOTES.md).
    # grid: B * cdiv(H, ROWS) * cdiv(W, TILE_W) * cdiv(C, BLOCK_C), channel blocks fastest; the
    # launcher makes ROWS + 2R a multiple of UNROLL.
    R: tl.constexpr = K // 2
    c_block, w_block, h_block, batch = _strip(tl.program_id(0), C, H, W, ROWS, BLOCK_C, TILE_W)
    inv_sigma, inv_norm = _gaussian(sigma_ptr, sigma_value, K, K_PAD, SIGMA_FROM_PTR)
    weights = ()
    for i in tl.static_range(K):
        weights = weights + (_tap_weight(i - R, inv_sigma) * inv_norm,)

    cs = c_block * BLOCK_C + tl.arange(0, BLOCK_C)
    # Lanes to load and store: a constant vector when every lane is a channel, so that the masks
    # stay uniform along the vector and the accesses 16-byte wide.
    lane_zeros = tl.zeros([BLOCK_C], dtype=tl.int32)
    lanes_ok = (lane_zeros == 0) if EVEN_C else cs < C
    a_chans = cs * stride_ac
    b_chans = cs * stride_bc
    out_chans = cs * stride_oc
    x0 = w_block * TILE_W
    y0 = h_block * ROWS
    a_image = batch * stride_ab
    b_image = batch * stride_bb
    if PREFETCH:
        line_cs = tl.minimum(c_block * BLOCK_C + tl.arange(0, BLOCK_C // LINE_C) * LINE_C, C - 1)

    # Sub-step t loads input row y0 - R + t and completes output row y0 + t - 2R. The vertical
    # pass accumulates: acc[j * TILE_W + x] is the partial sum of the output completed at sub-step
    # t0 + j, column x0 + x. Input t adds g[t - s + 2R] * (its horizontal pass) to the outputs
    # s = t .. t + 2R and, for the fusion, its own columns of a to output s = t + R (their centre:
    # no second load of a). The 2R partial outputs of the next sub-steps carry over; UNROLL new
    # rows are loaded before any store (a load cannot move above a store that may alias it: this
    # order keeps UNROLL rows of loads in flight).
    acc = ()
    for _ in tl.static_range(2 * R * TILE_W):
        acc = acc + (tl.zeros([BLOCK_C], dtype=tl.float32),)
    for t0 in range(0, ROWS + 2 * R, UNROLL):
        if PREFETCH:
            for u in tl.static_range(UNROLL):
                y_next = tl.minimum(tl.maximum(y0 - R + t0 + UNROLL + u, 0), H - 1).to(tl.int64)
                for x in tl.static_range(TILE_W):
                    column = tl.minimum(x0 + x, W - 1)
                    _prefetch_l2(a_ptr + a_image + y_next * stride_ah + column * stride_aw
                                 + line_cs * stride_ac)
                    if FUSION:
                        _prefetch_l2(b_ptr + b_image + y_next * stride_bh + column * stride_bw
                                     + line_cs * stride_bc)
        for u in tl.static_range(UNROLL):
            y = y0 - R + t0 + u
            y_safe = tl.minimum(tl.maximum(y, 0), H - 1).to(tl.int64)
            ys = lane_zeros + y
            columns, centres = _column_vectors(
                a_ptr, b_ptr, a_image + y_safe * stride_ah, b_image + y_safe * stride_bh, x0 - R, W,
                stride_aw, stride_bw, a_chans, b_chans, lanes_ok & (ys >= 0) & (ys < H),
                lane_zeros, TILE_W + 2 * R, FUSION, R)
            rows = ()
            for x in tl.static_range(TILE_W):
                h = weights[0] * columns[x]
                for i in tl.static_range(1, K):
                    h += weights[i] * columns[x + i]
                rows = rows + (h,)
            # Entries j < u are complete; u <= j < u + 2R take tap u - j + 2R; j = u + 2R is new.
            updated = ()
            for j in tl.static_range(u + 2 * R + 1):
                for x in tl.static_range(TILE_W):
                    if j == u + 2 * R:
                        entry = weights[0] * rows[x]
                    elif j >= u:
                        entry = acc[j * TILE_W + x] + weights[u - j + 2 * R] * rows[x]
                    else:
                        entry = acc[j * TILE_W + x]
                    if FUSION and j == u + R:
                        entry += centres[x]
                    updated = updated + (entry,)
            acc = updated
        for u in tl.static_range(UNROLL):
            y_out = y0 + t0 + u - 2 * R
            ys = lane_zeros + y_out
            row_ok = lanes_ok & (ys >= y0) & (ys < y0 + ROWS) & (ys < H)
            y_safe = tl.minimum(tl.maximum(y_out, 0), H - 1).to(tl.int64)
            for x in tl.static_range(TILE_W):
                column = x0 + x
                ok = row_ok & ((lane_zeros + column) < W)
                tl.store(out_ptr + batch * stride_ob + y_safe * stride_oh + column * stride_ow
                         + out_chans, acc[u * TILE_W + x].to(out_ptr.dtype.element_ty), mask=ok)
        acc = acc[UNROLL * TILE_W:]

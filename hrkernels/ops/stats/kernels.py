"""Triton kernels of the ``stats`` family: per-sub-lattice statistics and renormalisation.

``match_stats`` never reads a statistic on the host. Large maps take two launches:

1. ``_lattice_partial_stats_kernel``: the elements of every group (image ``b``, sub-lattice ``k``,
   and channel when per-channel) are split into ``NUM_CHUNKS`` chunks of rows; each program reduces
   one chunk to ``(count, mean, M2)`` in fp32 and writes it to its own slot of a partials buffer.
2. ``_lattice_normalize_kernel``: each program combines the ``NUM_CHUNKS`` partials of its group
   (the same fixed-order tree in every program, so every program gets bit-identical statistics) and
   writes ``std / sigma_k * (x - mu_k) + mean`` for its chunk of rows.

Small groups (latents, where the host cost of a launch exceeds the kernels') take one launch,
``_lattice_fused_kernel``: every program reduces its whole group, then normalises its chunk.

No atomics: results are bitwise reproducible. Statistics are fp32 and numerically stable: every
lane (element position of a tile) sums the deviations of its values from its own first value and
their squares (no cross-thread reduction inside the loop); the lanes' ``(count, mean, M2)`` are
merged once at the end, and chunks across programs, with Chan's parallel formulas. A constant
sub-lattice has exactly M2 = 0 (and becomes the constant target mean).

A tile is ``[BLOCK_W, BLOCK_C]`` (sub-lattice columns x channels) of one sub-lattice row, the
contiguous axis wide (``_launch.row_tile``). A chunk is a range of sub-lattice rows; a program
walks its chunk block by block (a block: one column block and channel block), UNROLL rows at a
time, so a tile's address is the block's offsets plus a row term (no index arithmetic per tile)
and its mask is the block's (none when ``EVEN``). All sizes and strides are runtime arguments.
"""

import triton
import triton.language as tl


@triton.jit
def _decompose(pid, NUM_CB, NUM_CHUNKS, K):
    # program id -> (batch, lattice k, channel block of the group, chunk), sub-lattice fastest: the
    # sh * sw programs that read the same full-resolution rows run together and share L2 sectors.
    k = pid % K
    rest = pid // K
    group_cb = rest % NUM_CB
    rest = rest // NUM_CB
    chunk = rest % NUM_CHUNKS
    batch = rest // NUM_CHUNKS
    return batch, k, group_cb, chunk


@triton.jit
def _block_offsets(c_block, w_block, kj, C, WS, SW, stride_c, stride_w,
                   BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    # Offsets inside a sub-lattice row (add the row's) and mask of the block's [BLOCK_W, BLOCK_C]
    # tile: sub-lattice columns js of lattice column kj, channels cs.
    js = w_block * BLOCK_W + tl.arange(0, BLOCK_W)
    cs = c_block * BLOCK_C + tl.arange(0, BLOCK_C)
    offsets = (js * SW + kj)[:, None] * stride_w + cs[None, :] * stride_c
    mask = (js < WS)[:, None] & (cs < C)[None, :]
    return offsets, mask


@triton.jit
def _block(block, group_cb, NUM_WB, PER_CHANNEL: tl.constexpr):
    # (channel block, column block) of a program's block-th block: its own channel block per
    # channel, else every channel block of the group in turn.
    c_block = group_cb if PER_CHANNEL else block // NUM_WB
    return c_block, block % NUM_WB


@triton.jit
def _row_start(image_ptr, row, SH, ki, stride_h):
    # Pointer to sub-lattice row ``row`` (full-resolution row row * SH + ki) of one image.
    return image_ptr + (row * SH + ki).to(tl.int64) * stride_h


@triton.jit
def _load_tile(image_ptr, row, SH, ki, stride_h, offsets, mask, EVEN: tl.constexpr):
    if EVEN:
        return tl.load(_row_start(image_ptr, row, SH, ki, stride_h) + offsets).to(tl.float32)
    return tl.load(_row_start(image_ptr, row, SH, ki, stride_h) + offsets, mask=mask,
                   other=0.0).to(tl.float32)


@triton.jit
def _pivot(x_ptr, batch_offset, ki, kj, group_cb, stride_xc, stride_xh, stride_xw,
           PER_CHANNEL: tl.constexpr, BLOCK_C: tl.constexpr, C):
    # The value statistics are taken relative to: the group's first element, per lane [BLOCK_C].
    first = x_ptr + batch_offset + ki * stride_xh + kj * stride_xw
    if PER_CHANNEL:
        cs = group_cb * BLOCK_C + tl.arange(0, BLOCK_C)
        return tl.load(first + cs * stride_xc, mask=cs < C, other=0.0).to(tl.float32)
    return tl.load(first + tl.zeros([BLOCK_C], dtype=tl.int32)).to(tl.float32)


@triton.jit
def _chan_merge(count, mean, m2, other_count, other_mean, other_m2):
    # Merge two sets of (count, mean, M2) statistics (Chan, Golub and LeVeque); empty sets are fine.
    total = count + other_count
    fraction = other_count / tl.maximum(total, 1.0)
    delta = other_mean - mean
    return total, mean + delta * fraction, m2 + other_m2 + delta * delta * count * fraction


@triton.jit
def _deviation_sums(image_ptr, row, SH, ki, stride_h, offsets, mask, shift, total, squares,
                    EVEN: tl.constexpr):
    # Add one row's deviations from ``shift`` (0 where masked) and their squares.
    deviations = _load_tile(image_ptr, row, SH, ki, stride_h, offsets, mask, EVEN) - shift
    if not EVEN:
        deviations = tl.where(mask, deviations, 0.0)
    return total + deviations, squares + deviations * deviations


@triton.jit
def _lane_statistics(image_ptr, pivot, row_first, row_last, group_cb, ki, kj, NUM_WB,
                     NUM_CB_LOOP, C, WS, SH, SW, stride_xc, stride_xh, stride_xw,
                     PER_CHANNEL: tl.constexpr, EVEN: tl.constexpr, UNROLL: tl.constexpr,
                     BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    # Per-lane (count, mean, M2), each [BLOCK_W, BLOCK_C] fp32, over sub-lattice rows
    # [row_first, row_last) of every block of the group. Each lane sums d and d^2 of its values
    # shifted by its own first value (the pivot where it has none), so the sums stay near the
    # lane's spread: M2 = Q - S^2 / n has no cancellation worse than the shift's distance from the
    # mean. The loop body is a load, a subtraction, an add and an FMA per element, UNROLL rows in
    # flight; a lane's count is the rows times its mask, added per block.
    first_cb = group_cb if PER_CHANNEL else 0
    offsets, mask = _block_offsets(first_cb, 0, kj, C, WS, SW, stride_xc, stride_xw, BLOCK_W,
                                   BLOCK_C)
    first = _load_tile(image_ptr, row_first, SH, ki, stride_xh, offsets, mask, False)
    shift = tl.where(mask, first, pivot[None, :])
    count = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
    total = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
    squares = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
    rows = row_last - row_first
    unrolled_last = row_last - rows % UNROLL
    for block in range(NUM_CB_LOOP * NUM_WB):
        c_block, w_block = _block(block, group_cb, NUM_WB, PER_CHANNEL)
        offsets, mask = _block_offsets(c_block, w_block, kj, C, WS, SW, stride_xc, stride_xw,
                                       BLOCK_W, BLOCK_C)
        for row0 in range(row_first, unrolled_last, UNROLL):
            for u in tl.static_range(UNROLL):
                total, squares = _deviation_sums(image_ptr, row0 + u, SH, ki, stride_xh, offsets,
                                                 mask, shift, total, squares, EVEN)
        for row in range(unrolled_last, row_last):
            total, squares = _deviation_sums(image_ptr, row, SH, ki, stride_xh, offsets, mask,
                                             shift, total, squares, EVEN)
        count += tl.where(mask, rows.to(tl.float32), 0.0)
    inverse = 1.0 / tl.maximum(count, 1.0)
    mean = shift + total * inverse
    m2 = tl.maximum(squares - total * total * inverse, 0.0)
    return count, mean, m2


@triton.jit
def _merge_lanes(count, mean, m2, axis: tl.constexpr):
    # Merge per-lane statistics along ``axis`` (None: all lanes), exact parallel formula, in
    # Triton's fixed reduction order: (count, mean, M2).
    total = tl.sum(count, axis=axis)
    merged_mean = tl.sum(count * mean, axis=axis) / tl.maximum(total, 1.0)
    if axis is None:
        spread = mean - merged_mean
    else:
        spread = mean - tl.expand_dims(merged_mean, axis)
    # Lanes without values have mean = pivot and count 0: they add nothing.
    merged_m2 = tl.sum(m2 + count * spread * spread, axis=axis)
    return total, merged_mean, merged_m2


@triton.jit
def _scale_and_targets(batch, cs, lanes, sigma, mean_ptr, std_ptr, mean_value, std_value,
                       C, stride_mb, stride_mc, stride_sb, stride_sc, PER_CHANNEL: tl.constexpr,
                       MEAN_FROM_PTR: tl.constexpr, STD_FROM_PTR: tl.constexpr,
                       BLOCK_C: tl.constexpr):
    # The target mean and the factor std / sigma per lane [BLOCK_C] (0 where sigma is 0 or NaN),
    # and whether the lane has any spread.
    if PER_CHANNEL:
        target_offsets_m = batch * stride_mb + cs * stride_mc
        target_offsets_s = batch * stride_sb + cs * stride_sc
        target_ok = cs < C
    else:
        target_offsets_m = batch * stride_mb + tl.zeros([BLOCK_C], dtype=tl.int32)
        target_offsets_s = batch * stride_sb + tl.zeros([BLOCK_C], dtype=tl.int32)
        target_ok = lanes >= 0
    if MEAN_FROM_PTR:
        target_mean = tl.load(mean_ptr + target_offsets_m, mask=target_ok, other=0.0)
        target_mean = target_mean.to(tl.float32)
    else:
        target_mean = mean_value + tl.zeros([BLOCK_C], dtype=tl.float32)
    if STD_FROM_PTR:
        target_std = tl.load(std_ptr + target_offsets_s, mask=target_ok, other=0.0).to(tl.float32)
    else:
        target_std = std_value + tl.zeros([BLOCK_C], dtype=tl.float32)
    spread_ok = sigma > 0.0  # False for sigma == 0 (constant sub-lattice) and for NaN
    scale = tl.where(spread_ok, target_std / tl.where(spread_ok, sigma, 1.0), 0.0)
    return target_mean, scale, spread_ok


@triton.jit
def _normalize_row(out_image, row, SH, ki, stride_oh, out_offsets, mask, values, mu, scale,
                   target_mean, spread_ok, EVEN: tl.constexpr):
    # Store one row: scale * (x - mu) + target_mean (target_mean where the lane has no spread).
    result = tl.where(spread_ok[None, :],
                      scale[None, :] * (values - mu[None, :]) + target_mean[None, :],
                      target_mean[None, :])
    result = result.to(out_image.dtype.element_ty)
    if EVEN:
        tl.store(_row_start(out_image, row, SH, ki, stride_oh) + out_offsets, result)
    else:
        tl.store(_row_start(out_image, row, SH, ki, stride_oh) + out_offsets, result, mask=mask)


@triton.jit
def _write_normalized(x_image, out_image, row_first, row_last, group_cb, ki, kj, mu, scale,
                      target_mean, spread_ok, NUM_WB, NUM_CB_LOOP, C, WS, SH, SW,
                      stride_xc, stride_xh, stride_xw, stride_oc, stride_oh, stride_ow,
                      PER_CHANNEL: tl.constexpr, EVEN: tl.constexpr, UNROLL: tl.constexpr,
                      BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    # The normalised output of sub-lattice rows [row_first, row_last) of every block of the group;
    # mu, scale, target_mean, spread_ok are [BLOCK_C] lanes. UNROLL rows are loaded before the
    # first of their stores.
    unrolled_last = row_last - (row_last - row_first) % UNROLL
    for block in range(NUM_CB_LOOP * NUM_WB):
        c_block, w_block = _block(block, group_cb, NUM_WB, PER_CHANNEL)
        offsets, mask = _block_offsets(c_block, w_block, kj, C, WS, SW, stride_xc, stride_xw,
                                       BLOCK_W, BLOCK_C)
        out_offsets, mask = _block_offsets(c_block, w_block, kj, C, WS, SW, stride_oc, stride_ow,
                                           BLOCK_W, BLOCK_C)
        for row0 in range(row_first, unrolled_last, UNROLL):
            tiles = ()
            for u in tl.static_range(UNROLL):
                tiles = tiles + (_load_tile(x_image, row0 + u, SH, ki, stride_xh, offsets, mask,
                                            EVEN),)
            for u in tl.static_range(UNROLL):
                _normalize_row(out_image, row0 + u, SH, ki, stride_oh, out_offsets, mask,
                               tiles[u], mu, scale, target_mean, spread_ok, EVEN)
        for row in range(unrolled_last, row_last):
            values = _load_tile(x_image, row, SH, ki, stride_xh, offsets, mask, EVEN)
            _normalize_row(out_image, row, SH, ki, stride_oh, out_offsets, mask, values, mu,
                           scale, target_mean, spread_ok, EVEN)


@triton.jit
def _program_group(pid, x_ptr, NUM_CB, NUM_CHUNKS, C, SH, SW, stride_xb, stride_xc, stride_xh,
                   stride_xw, PER_CHANNEL: tl.constexpr, BLOCK_C: tl.constexpr):
    # What a program of either pass works on: image, sub-lattice (k, and its row/column offsets),
    # channel block of the group, chunk, the image's offset and the group's pivot [BLOCK_C].
    batch, k, group_cb, chunk = _decompose(pid, NUM_CB, NUM_CHUNKS, SH * SW)
    ki = k // SW
    kj = k % SW
    batch_offset = batch.to(tl.int64) * stride_xb
    pivot = _pivot(x_ptr, batch_offset, ki, kj, group_cb, stride_xc, stride_xh, stride_xw,
                   PER_CHANNEL, BLOCK_C, C)
    return batch, k, group_cb, chunk, ki, kj, batch_offset, pivot


@triton.jit
def _lattice_partial_stats_kernel(
    x_ptr, partial_ptr,
    C, WS, SH, SW, NUM_WB, NUM_CB, NUM_CB_LOOP, NUM_CHUNKS, HS, ROWS_PER_CHUNK,
    stride_xb, stride_xc, stride_xh, stride_xw,
    stride_pg, stride_pp,
    PER_CHANNEL: tl.constexpr, EVEN: tl.constexpr, UNROLL: tl.constexpr, BLOCK_W: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # grid: B * K * NUM_CB * NUM_CHUNKS. partial[group, chunk, 0:3] = (count, mean - pivot, M2)
    # where group = b * K + k, or (b * K + k) * C + c per channel.
    batch, k, group_cb, chunk, ki, kj, batch_offset, pivot = _program_group(
        tl.program_id(0), x_ptr, NUM_CB, NUM_CHUNKS, C, SH, SW, stride_xb, stride_xc, stride_xh,
        stride_xw, PER_CHANNEL, BLOCK_C)
    row_first = chunk * ROWS_PER_CHUNK
    row_last = tl.minimum(row_first + ROWS_PER_CHUNK, HS)
    count, mean, m2 = _lane_statistics(x_ptr + batch_offset, pivot, row_first, row_last,
                                       group_cb, ki, kj, NUM_WB, NUM_CB_LOOP, C, WS, SH, SW,
                                       stride_xc, stride_xh, stride_xw, PER_CHANNEL, EVEN, UNROLL,
                                       BLOCK_W, BLOCK_C)
    mean -= pivot[None, :]  # partials are stored relative to the pivot (every program has it)
    lanes = tl.arange(0, BLOCK_C)
    if PER_CHANNEL:
        count, mean, m2 = _merge_lanes(count, mean, m2, 0)  # [BLOCK_C]
        cs = group_cb * BLOCK_C + lanes
        groups = (batch * SH * SW + k) * C + cs
        slot = partial_ptr + groups.to(tl.int64) * stride_pg + chunk * stride_pp
        tl.store(slot, count, mask=cs < C)
        tl.store(slot + 1, mean, mask=cs < C)
        tl.store(slot + 2, m2, mask=cs < C)
    else:
        count, mean, m2 = _merge_lanes(count, mean, m2, None)
        slot = partial_ptr + (batch * SH * SW + k).to(tl.int64) * stride_pg + chunk * stride_pp
        # Stored as [3] vectors (one lane each) so the store mask is a vector (interpreter).
        fields = tl.arange(0, 4)
        values = tl.where(fields == 0, count, tl.where(fields == 1, mean, m2))
        tl.store(slot + fields, values, mask=fields < 3)


@triton.jit
def _lattice_normalize_kernel(
    x_ptr, partial_ptr, out_ptr, mean_ptr, std_ptr, mean_value, std_value,
    C, WS, SH, SW, NUM_WB, NUM_CB, NUM_CB_LOOP, NUM_CHUNKS, HS, ROWS_PER_CHUNK, GROUP_SIZE,
    stride_xb, stride_xc, stride_xh, stride_xw,
    stride_ob, stride_oc, stride_oh, stride_ow,
    stride_pg, stride_pp,
    stride_mb, stride_mc, stride_sb, stride_sc,
    PER_CHANNEL: tl.constexpr, MEAN_FROM_PTR: tl.constexpr, STD_FROM_PTR: tl.constexpr,
    CHUNK_BLOCK: tl.constexpr, EVEN: tl.constexpr, UNROLL: tl.constexpr,
    BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # grid: B * K * NUM_CB * NUM_CHUNKS, the same chunks as the statistics pass but in reverse
    # order: the tiles the statistics pass read last (still in L2) are normalised first.
    batch, k, group_cb, chunk, ki, kj, batch_offset, pivot = _program_group(
        tl.num_programs(0) - 1 - tl.program_id(0), x_ptr, NUM_CB, NUM_CHUNKS, C, SH, SW,
        stride_xb, stride_xc, stride_xh, stride_xw, PER_CHANNEL, BLOCK_C)

    # Combine the group's partials, CHUNK_BLOCK chunks at a time: [BLOCK_C, CHUNK_BLOCK] per
    # channel, [1, CHUNK_BLOCK] otherwise (exact parallel formula in a block, Chan merge across).
    lanes = tl.arange(0, BLOCK_C)
    cs = group_cb * BLOCK_C + lanes
    if PER_CHANNEL:
        groups = ((batch * SH * SW + k) * C + cs)[:, None]
        lane_ok = (cs < C)[:, None]
        count = tl.zeros([BLOCK_C], dtype=tl.float32)
    else:
        groups = (batch * SH * SW + k) + tl.zeros([1, 1], dtype=tl.int32)
        lane_ok = groups >= 0
        count = tl.zeros([1], dtype=tl.float32)
    mean = count
    m2 = count
    for first_chunk in range(0, NUM_CHUNKS, CHUNK_BLOCK):
        chunks = first_chunk + tl.arange(0, CHUNK_BLOCK)[None, :]
        slots = partial_ptr + groups.to(tl.int64) * stride_pg + chunks * stride_pp
        ok = lane_ok & (chunks < NUM_CHUNKS)
        block_count, block_mean, block_m2 = _merge_lanes(
            tl.load(slots, mask=ok, other=0.0), tl.load(slots + 1, mask=ok, other=0.0),
            tl.load(slots + 2, mask=ok, other=0.0), 1)
        count, mean, m2 = _chan_merge(count, mean, m2, block_count, block_mean, block_m2)
    # Unbiased std (correction 1). A one-element sub-lattice has M2 = 0 exactly, so sigma = 0 (where
    # torch.std would give nan) and it becomes the target mean.
    sigma = tl.sqrt(m2 / tl.maximum(GROUP_SIZE - 1, 1).to(tl.float32))
    mu = pivot + mean  # [BLOCK_C] (or [1], broadcast over the lanes)
    target_mean, scale, spread_ok = _scale_and_targets(
        batch, cs, lanes, sigma, mean_ptr, std_ptr, mean_value, std_value, C,
        stride_mb, stride_mc, stride_sb, stride_sc, PER_CHANNEL, MEAN_FROM_PTR, STD_FROM_PTR,
        BLOCK_C)
    row_first = chunk * ROWS_PER_CHUNK
    row_last = tl.minimum(row_first + ROWS_PER_CHUNK, HS)
    _write_normalized(x_ptr + batch_offset, out_ptr + batch.to(tl.int64) * stride_ob, row_first,
                      row_last, group_cb, ki, kj, mu + tl.zeros([BLOCK_C], dtype=tl.float32),
                      scale, target_mean, spread_ok, NUM_WB, NUM_CB_LOOP, C, WS, SH, SW,
                      stride_xc, stride_xh, stride_xw, stride_oc, stride_oh, stride_ow,
                      PER_CHANNEL, EVEN, UNROLL, BLOCK_W, BLOCK_C)


@triton.jit
def _lattice_fused_kernel(
    x_ptr, out_ptr, mean_ptr, std_ptr, mean_value, std_value,
    C, WS, SH, SW, NUM_WB, NUM_CB, NUM_CB_LOOP, NUM_CHUNKS, HS, ROWS_PER_CHUNK, GROUP_SIZE,
    stride_xb, stride_xc, stride_xh, stride_xw,
    stride_ob, stride_oc, stride_oh, stride_ow,
    stride_mb, stride_mc, stride_sb, stride_sc,
    PER_CHANNEL: tl.constexpr, MEAN_FROM_PTR: tl.constexpr, STD_FROM_PTR: tl.constexpr,
    EVEN: tl.constexpr, UNROLL: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # One launch for small groups (latents): every program reduces its whole group (a few hundred
    # KB, from L2 after the first reads; the same order in every program, so the group's programs
    # get bit-identical statistics) and writes the normalised output of its chunk of rows.
    # grid: B * K * NUM_CB * NUM_CHUNKS, as in the two-pass kernels.
    batch, k, group_cb, chunk, ki, kj, batch_offset, pivot = _program_group(
        tl.program_id(0), x_ptr, NUM_CB, NUM_CHUNKS, C, SH, SW, stride_xb, stride_xc, stride_xh,
        stride_xw, PER_CHANNEL, BLOCK_C)
    count, mean, m2 = _lane_statistics(x_ptr + batch_offset, pivot, 0, HS, group_cb, ki, kj,
                                       NUM_WB, NUM_CB_LOOP, C, WS, SH, SW, stride_xc, stride_xh,
                                       stride_xw, PER_CHANNEL, EVEN, UNROLL, BLOCK_W, BLOCK_C)
    lanes = tl.arange(0, BLOCK_C)
    if PER_CHANNEL:
        count, mu, m2 = _merge_lanes(count, mean, m2, 0)  # [BLOCK_C]
    else:
        count, mu, m2 = _merge_lanes(count, mean, m2, None)
    zeros = tl.zeros([BLOCK_C], dtype=tl.float32)  # per-image statistics, one per lane
    sigma = tl.sqrt(m2 / tl.maximum(GROUP_SIZE - 1, 1).to(tl.float32)) + zeros
    target_mean, scale, spread_ok = _scale_and_targets(
        batch, group_cb * BLOCK_C + lanes, lanes, sigma, mean_ptr, std_ptr, mean_value, std_value,
        C, stride_mb, stride_mc, stride_sb, stride_sc, PER_CHANNEL, MEAN_FROM_PTR, STD_FROM_PTR,
        BLOCK_C)
    row_first = chunk * ROWS_PER_CHUNK
    row_last = tl.minimum(row_first + ROWS_PER_CHUNK, HS)
    _write_normalized(x_ptr + batch_offset, out_ptr + batch.to(tl.int64) * stride_ob, row_first,
                      row_last, group_cb, ki, kj, mu + zeros, scale, target_mean, spread_ok,
                      NUM_WB, NUM_CB_LOOP, C, WS, SH, SW, stride_xc, stride_xh, stride_xw,
                      stride_oc, stride_oh, stride_ow, PER_CHANNEL, EVEN, UNROLL, BLOCK_W, BLOCK_C)

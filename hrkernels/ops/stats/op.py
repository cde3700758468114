"""The ``stats`` op: statistical matching of dilated sub-lattices (APT) and global renormalisation
(DemoFusion). The public wrapper validates; the registered ``hrkernels::match_stats`` operator
dispatches through its implementation table (``"torch"``: ``reference.py``; ``"triton"``: the
launcher here, which sizes the launches and applies to images whose in-image offsets fit int32;
see ``hrkernels/ops/_backend.py``). The output is shaped like the input: the shared fake."""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hrkernels.ops._backend import (
    Implementation,
    dispatched_op,
    fake_like_first_input,
    interpreter_enabled,
)
from hrkernels.ops._checks import (
    as_pair,
    check_feature_map,
    check_tensor_values,
    output_memory_format,
)
from hrkernels.ops._launch import (
    channels_contiguous,
    image_offsets_fit_int32,
    launcher,
    multiprocessor_count,
    output_like,
    row_tile,
)
from hrkernels.ops.stats import reference

Target = float | torch.Tensor

# Chunks (programs) per group at most, and how many partials the normalisation pass combines at a
# time (a constexpr: one compile).
MAX_CHUNKS = 256
CHUNK_BLOCK = 64
# Maps of at most FUSED_ELEMENTS whose programs each reduce at most FUSED_GROUP_ELEMENTS (a group,
# or BLOCK_C channel groups) take the one-launch kernel: every program re-reads its group (from L2),
# which costs less than a second launch on the host.
FUSED_GROUP_ELEMENTS = 2**17
FUSED_ELEMENTS = 2**22
FUSED_CHUNKS = 8
# Elements of a tile: 16 per thread of 4 warps; the statistics pass keeps 4 fp32 per element
# (shift, count, sums) in registers.
TILE_ELEMENTS = 2048


def _check_target(value: Target, name: str, x: torch.Tensor,
                  per_channel: bool) -> tuple[float, torch.Tensor | None]:
    """``(value, None)`` for a number; ``(0.0, view)`` for a tensor, broadcast (without a copy) to
    ``[B]`` or ``[B, C]`` and left on the device."""
    if isinstance(value, torch.Tensor):
        view = _target_view(value, name, x, per_channel)
        if name == "std":
            check_tensor_values(value, name, minimum=0)
        return 0.0, view
    if type(value) not in (float, int) and (isinstance(value, bool)
                                            or not isinstance(value, numbers.Real)):
        raise TypeError(f"{name} must be a float or a tensor; got {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite; got {value!r}")
    if name == "std" and number < 0:
        raise ValueError(f"std must be >= 0; got {value!r}")
    return number, None


def _target_view(value: torch.Tensor, name: str, x: torch.Tensor,
                 per_channel: bool) -> torch.Tensor:
    batch, channels = x.shape[:2]
    shape = (batch, channels) if per_channel else (batch,)
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a float or a floating-point tensor; got {value.dtype}")
    if value.device != x.device:
        raise ValueError(f"{name} is on {value.device} but x is on {x.device}")
    try:
        return torch.broadcast_to(value, shape)
    except RuntimeError:
        wanted = "[B, C] (per-image targets are [B, 1])" if per_channel else "[B]"
        raise ValueError(f"{name} must be broadcastable to {wanted} = {list(shape)}; got shape "
                         f"{tuple(value.shape)}") from None


# --------------------------------------------------------------------------------------------------
# Triton launcher
# --------------------------------------------------------------------------------------------------


def _chunk_block(per_channel: bool, block_c: int) -> int:
    """Partials the normalisation pass combines at a time: ``CHUNK_BLOCK`` for per-image groups,
    about 2048 values (``BLOCK_C`` channels x chunks) per step per channel, to stay in registers.
    Under the interpreter 2, so that the tiny test maps also go through the merge across steps."""
    if interpreter_enabled():
        return 2
    if not per_channel:
        return CHUNK_BLOCK
    return max(1, min(CHUNK_BLOCK, 2048 // block_c))


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclass(frozen=True)
class MatchStatsPlan:
    """How ``match_stats`` launches for one shape/layout (``op._plan``): tiles, chunks, grid,
    kernel sizes."""

    block_w: int
    block_c: int
    num_warps: int
    sizes: tuple[int, ...]  # C, WS, SH, SW, NUM_WB, NUM_CB, NUM_CB_LOOP, NUM_CHUNKS, HS, RPC
    even: bool  # tiles cover the sub-lattice columns and channels exactly: no masks
    fused: bool  # one launch (_lattice_fused_kernel) instead of two
    groups: int
    chunks: int
    group_size: int
    chunk_block: int
    grid: tuple[int]
    unroll_stats: int  # rows loaded per loop iteration of the statistics pass ...
    unroll_normalize: int  # ... and of the normalisation pass


@functools.lru_cache(maxsize=256)
def _plan(shape: tuple[int, ...], channels_last_tiles: bool, sh: int, sw: int, per_channel: bool,
          device: torch.device, programs_per_sm: int | None = None, unroll_stats: int | None = None,
          unroll_normalize: int = 4) -> MatchStatsPlan:
    """The launch plan (cached: the op is launch-bound at latent sizes, so a repeated call only
    allocates and launches). Knobs (``bench/tune_stats.py`` sweeps them): programs per SM the
    chunks aim for, rows per loop iteration of each pass (2 under the interpreter). Tuned on the
    H100: 4 programs per SM and 4 rows for whole-row groups (``factor = (1, 1)``); 8 and 8 for
    dilated sub-lattices, whose loads use a fraction of each sector (more of them in flight); the
    fused kernel reads its whole group 16 rows at a time (8 warps)."""
    batch, channels, height, width = shape
    lattice_h, lattice_w = height // sh, width // sw
    tile = row_tile(channels, lattice_w, channels_last_tiles, TILE_ELEMENTS)
    blocks_w, blocks_c = tile.blocks(lattice_w, channels)
    group_blocks_c = blocks_c if per_channel else 1  # channel blocks that are separate groups
    loop_blocks_c = 1 if per_channel else blocks_c  # channel blocks inside one group
    tiles = lattice_h * loop_blocks_c * blocks_w  # tiles per (image, sub-lattice, group block)
    units = batch * sh * sw * group_blocks_c

    # Chunks (ranges of sub-lattice rows) per group: enough programs to fill the GPU, at
    # most MAX_CHUNKS. Per channel every program of the normalisation pass reads [BLOCK_C, chunks]
    # partials, so chunks are also kept small against the tile data each program moves. The fused
    # kernel reads a group once per chunk: FUSED_CHUNKS at most.
    group_size = lattice_h * lattice_w * (1 if per_channel else channels)
    reduced = lattice_h * lattice_w * (min(channels, tile.block_c) if per_channel else channels)
    fused = (reduced <= FUSED_GROUP_ELEMENTS
             and batch * channels * height * width <= FUSED_ELEMENTS)
    dilated = sh > 1 or sw > 1
    programs_per_sm = programs_per_sm or (8 if dilated else 4)
    unroll_stats = unroll_stats or (16 if fused else 8 if dilated else 4)
    if interpreter_enabled():
        unroll_stats = unroll_normalize = 2
    target = 8 if interpreter_enabled() else programs_per_sm * multiprocessor_count(device)
    chunks = max(1, min(-(-target // units), FUSED_CHUNKS if fused else MAX_CHUNKS, lattice_h))
    if per_channel:
        chunks = max(1, min(chunks, math.isqrt(tiles * tile.block_w // 48)))
    # Whole loop iterations per chunk (only the last chunk of a group has a remainder).
    rows_per_chunk = min(lattice_h, _round_up(-(-lattice_h // chunks), unroll_stats))
    chunks = -(-lattice_h // rows_per_chunk)
    num_warps = tile.num_warps
    if fused:  # each program reads its whole group: 8 warps of loads in flight
        num_warps = max(num_warps, min(8, tile.block_w * tile.block_c // 64))
    return MatchStatsPlan(
        block_w=tile.block_w, block_c=tile.block_c, num_warps=num_warps,
        sizes=(channels, lattice_w, sh, sw, blocks_w, group_blocks_c, loop_blocks_c, chunks,
               lattice_h, rows_per_chunk),
        even=lattice_w % tile.block_w == 0 and channels % tile.block_c == 0, fused=fused,
        groups=batch * sh * sw * (channels if per_channel else 1), chunks=chunks,
        group_size=group_size,
        chunk_block=_chunk_block(per_channel, tile.block_c), grid=(units * chunks,),
        unroll_stats=unroll_stats, unroll_normalize=unroll_normalize,
    )


@functools.cache
def _launchers():
    """The launchers of the two passes and of the fused kernel (kernels imported on first use:
    Triton is optional)."""
    from hrkernels.ops.stats.kernels import (
        _lattice_fused_kernel,
        _lattice_normalize_kernel,
        _lattice_partial_stats_kernel,
    )

    return (launcher(_lattice_partial_stats_kernel), launcher(_lattice_normalize_kernel),
            launcher(_lattice_fused_kernel))


def _match_stats_triton(
    x: torch.Tensor, mean_value: float, mean_tensor: torch.Tensor | None, std_value: float,
    std_tensor: torch.Tensor | None, sh: int, sw: int, per_channel: bool,
    plan: MatchStatsPlan | None = None,
) -> torch.Tensor:
    partial_stats, normalize, fused = _launchers()
    out = output_like(x)
    if plan is None:
        plan = _plan(tuple(x.shape), channels_contiguous(x, out), sh, sw, per_channel, x.device)
    # Strides of the [B] / [B, C] target views (stride 0 where broadcast); unused for floats.
    mean_strides = (*mean_tensor.stride(), 0)[:2] if mean_tensor is not None else (0, 0)
    std_strides = (*std_tensor.stride(), 0)[:2] if std_tensor is not None else (0, 0)
    mean_arg = x if mean_tensor is None else mean_tensor
    std_arg = x if std_tensor is None else std_tensor
    if plan.fused:
        fused[plan.grid](
            x, out, mean_arg, std_arg, mean_value, std_value, *plan.sizes, plan.group_size,
            *x.stride(), *out.stride(), *mean_strides, *std_strides,
            PER_CHANNEL=per_channel, MEAN_FROM_PTR=mean_tensor is not None,
            STD_FROM_PTR=std_tensor is not None, EVEN=plan.even, UNROLL=plan.unroll_stats,
            BLOCK_W=plan.block_w, BLOCK_C=plan.block_c, num_warps=plan.num_warps,
        )
        return out
    partials = torch.empty((plan.groups, plan.chunks, 3), dtype=torch.float32, device=x.device)
    partial_stats[plan.grid](
        x, partials, *plan.sizes, *x.stride(), plan.chunks * 3, 3,
        PER_CHANNEL=per_channel, EVEN=plan.even, UNROLL=plan.unroll_stats, BLOCK_W=plan.block_w,
        BLOCK_C=plan.block_c, num_warps=plan.num_warps,
    )
    normalize[plan.grid](
        x, partials, out, mean_arg, std_arg, mean_value, std_value,
        *plan.sizes, plan.group_size, *x.stride(), *out.stride(), plan.chunks * 3, 3,
        *mean_strides, *std_strides,
        PER_CHANNEL=per_channel, MEAN_FROM_PTR=mean_tensor is not None,
        STD_FROM_PTR=std_tensor is not None, CHUNK_BLOCK=plan.chunk_block, EVEN=plan.even,
        UNROLL=plan.unroll_normalize, BLOCK_W=plan.block_w, BLOCK_C=plan.block_c,
        num_warps=plan.num_warps,
    )
    return out


# --------------------------------------------------------------------------------------------------
# match_stats
# --------------------------------------------------------------------------------------------------


def _match_stats_reference(
    x: torch.Tensor, mean_value: float, mean_tensor: torch.Tensor | None, std_value: float,
    std_tensor: torch.Tensor | None, sh: int, sw: int, per_channel: bool,
) -> torch.Tensor:
    mean = mean_value if mean_tensor is None else mean_tensor
    std = std_value if std_tensor is None else std_tensor
    return reference.match_stats(x, mean, std, (sh, sw), per_channel, output_memory_format(x))


def _offsets_fit_int32(x, mean_value, mean_tensor, std_value, std_tensor, sh, sw, per_channel):
    return image_offsets_fit_int32(x)


# The launcher takes the operator's arguments (then an optional plan): it is the Triton entry.
_match_stats_op = dispatched_op(
    "match_stats",
    {"torch": Implementation(_match_stats_reference),
     "triton": Implementation(_match_stats_triton, applies=_offsets_fit_int32)},
    fake=fake_like_first_input,
)


def match_stats(
    x: torch.Tensor,
    mean: Target,
    std: Target,
    factor: int | Sequence[int] = (1, 1),
    per_channel: bool = False,
) -> torch.Tensor:
    """Give every dilated sub-lattice of ``x`` a target mean and standard deviation.

    For each image ``b`` and sub-lattice ``k`` of ``factor = (sh, sw)``
    (``x[b, :, ki::sh, kj::sw]``, ``k = ki * sw + kj``, the order of :func:`gather_dilated`), with
    ``mu_k``, ``sigma_k`` the mean and standard deviation of that sub-lattice (over C, h, w; over
    h, w for each channel when ``per_channel``; torch's default correction 1)::

        out = std / sigma_k * (x - mu_k) + mean

    written back in place of the sub-lattice (the output has ``x``'s shape). Where ``sigma_k == 0``
    (a constant sub-lattice, or one of a single element, whose unbiased std is undefined) the
    sub-lattice becomes the constant ``mean``; so does a sub-lattice holding NaN.

    ``factor=(1, 1)`` is DemoFusion's global renormalisation; the stage's factor is APT's
    statistical matching. Statistics are fp32 and deterministic (bitwise the same run to run). On
    CUDA it is two Triton launches with no host synchronisation: statistics per chunk of each
    sub-lattice, then a pass that combines them and writes the output (see ``stats/README.md``).

    Args:
        x: ``[B, C, H, W]`` fp32/fp16/bf16, any strides; ``H % sh == 0`` and ``W % sw == 0``.
        mean, std: targets; finite floats (``std >= 0``), or float tensors on ``x``'s device
            broadcastable to ``[B]`` (``[B, C]`` when ``per_channel``; a per-image target is then
            ``[B, 1]``). Tensors are read on the device; a CPU ``std`` tensor is checked
            (``>= 0``), a GPU one is not (reading it would synchronise the device); NaN targets
            give NaN, as NaN in ``x`` does.
        factor: int or ``(sh, sw)``, each ``>= 1``.
        per_channel: statistics per channel instead of over all channels.

    Returns:
        ``[B, C, H, W]`` with ``x``'s dtype; channels-last when ``x`` is.

    Raises:
        TypeError: ``x`` not a float tensor; ``mean``/``std`` not a number or float tensor;
            ``factor`` not int(s); ``per_channel`` not a bool.
        ValueError: ``x`` not 4-D or empty; ``H``/``W`` not divisible by the factor; a non-finite
            float target, or ``std < 0`` (a float, or a CPU tensor's value); a target tensor on
            another device or of a shape that does not broadcast.

    Example::

        >>> z = torch.randn(1, 4, 256, 256) * 3 + 1
        >>> ref = torch.randn(1, 4, 128, 128)
        >>> out = match_stats(z, ref.mean(), ref.std(), factor=(2, 2))   # APT, stage 2
        >>> out[:, :, 0::2, 1::2].std().item()  # doctest: +SKIP
        1.0...
    """
    return _match_stats_op(*_match_stats_arguments(x, mean, std, factor, per_channel))


def _match_stats_arguments(
    x: torch.Tensor, mean: Target, std: Target, factor: int | Sequence[int], per_channel: bool,
) -> tuple[torch.Tensor, float, torch.Tensor | None, float, torch.Tensor | None, int, int, bool]:
    """:func:`match_stats`'s checks; its operator's arguments."""
    check_feature_map(x)
    sh, sw = as_pair(factor, "factor")
    if x.shape[2] % sh or x.shape[3] % sw:
        raise ValueError(f"x's spatial size {tuple(x.shape[2:])} must be divisible by factor "
                         f"({sh}, {sw}); pad it first")
    if not isinstance(per_channel, bool):
        raise TypeError(f"per_channel must be a bool; got {per_channel!r}")
    mean_value, mean_tensor = _check_target(mean, "mean", x, per_channel)
    std_value, std_tensor = _check_target(std, "std", x, per_channel)
    return x, mean_value, mean_tensor, std_value, std_tensor, sh, sw, per_channel

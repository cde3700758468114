"""The ``blur`` ops: separable Gaussian blur and FreeScale's frequency fusion. Public wrappers
validate; each registered ``hrkernels::`` operator dispatches through its implementation table
(``"torch"``: ``reference.py``; ``"triton"``: the launcher here, which picks the kernel, tiles and
grid, and applies to kernel sizes up to ``MAX_TRITON_KERNEL_SIZE`` and images whose in-image
offsets fit int32; see ``hrkernels/ops/_backend.py``). Both outputs are shaped like the first
input: the shared fake."""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass

import torch

from hrkernels.ops._backend import (
    Implementation,
    dispatched_op,
    fake_like_first_input,
    interpreter_enabled,
)
from hrkernels.ops._checks import check_feature_map, check_tensor_values, output_memory_format
from hrkernels.ops._launch import (
    channels_contiguous,
    image_offsets_fit_int32,
    launcher,
    multiprocessor_count,
    next_power_of_2,
    output_like,
)
from hrkernels.ops.blur import reference

# Kernel sizes the Triton kernel is compiled for (K is a constexpr: its K sub-steps and K taps are
# unrolled). Larger kernels run the PyTorch reference on every backend.
MAX_TRITON_KERNEL_SIZE = 15
# The largest kernel: tap offsets are fp32 integers (exact up to 2**24) in the kernels and the
# reference. Taps beyond a map's extent only read zero padding: the reference drops them, so a
# large kernel on a small map costs what the map needs (``reference.blur_fp32``).
MAX_KERNEL_SIZE = 2**24 + 1

Sigma = float | torch.Tensor


def default_kernel_size(sigma: float) -> int:
    """``2 * ceil(3 * sigma) + 1``: the odd size that covers +-3 sigma."""
    return 2 * math.ceil(3 * sigma) + 1


def _check_sigma(sigma: Sigma, device: torch.device) -> tuple[float, torch.Tensor | None]:
    """``(value, None)`` for a number, ``(1.0, tensor)`` for a 0-d tensor (read on the device)."""
    if isinstance(sigma, torch.Tensor):
        if sigma.dim() != 0:
            raise ValueError(f"sigma must be a float or a 0-d tensor; got a tensor of shape "
                             f"{tuple(sigma.shape)}")
        if not sigma.is_floating_point():
            raise TypeError(f"sigma must be a floating-point tensor; got {sigma.dtype}")
        if sigma.device != device:
            raise ValueError(f"sigma is on {sigma.device} but the feature map is on {device}")
        check_tensor_values(sigma, "sigma", greater_than=0)
        return 1.0, sigma
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real):
        raise TypeError(f"sigma must be a float or a 0-d tensor; got {type(sigma).__name__}")
    value = float(sigma)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"sigma must be a finite number > 0; got {sigma!r}")
    return value, None


def _check_kernel_size(kernel_size: int | None, sigma_value: float,
                       sigma_tensor: torch.Tensor | None) -> int:
    if kernel_size is None:
        if sigma_tensor is not None:
            raise ValueError("kernel_size is required when sigma is a tensor (its default "
                             "2 * ceil(3 * sigma) + 1 would read sigma on the host)")
        if 6 * sigma_value + 1 > MAX_KERNEL_SIZE:
            raise ValueError(f"sigma must be <= {(MAX_KERNEL_SIZE - 3) // 6} for the default "
                             f"kernel_size 2 * ceil(3 * sigma) + 1 (at most {MAX_KERNEL_SIZE} "
                             f"taps); got {sigma_value!r}")
        return default_kernel_size(sigma_value)
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, numbers.Integral):
        raise TypeError(f"kernel_size must be an odd int >= 1 or None; got {kernel_size!r}")
    if kernel_size < 1 or kernel_size % 2 == 0 or kernel_size > MAX_KERNEL_SIZE:
        raise ValueError(f"kernel_size must be odd, >= 1 and <= {MAX_KERNEL_SIZE} (tap offsets "
                         f"are exact fp32 integers); got {kernel_size}")
    return int(kernel_size)


def _sigma_arg(sigma_value: float, sigma_tensor: torch.Tensor | None) -> Sigma:
    return sigma_value if sigma_tensor is None else sigma_tensor


def gaussian_kernel1d(
    sigma: Sigma, kernel_size: int | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """The normalised 1-D Gaussian the blur ops use: ``g[i] = exp(-(i - (k-1)/2)^2 / (2 sigma^2))``
    divided by its sum, as an fp32 ``[k]`` tensor.

    Args:
        sigma: a finite float ``> 0`` or a 0-d float tensor (used on its device, not read on the
            host).
        kernel_size: odd ``k >= 1``; default ``2 * ceil(3 * sigma) + 1`` (a float ``sigma`` only).
        device: where the weights live; default ``sigma``'s device (CPU for a float).

    Example::

        >>> gaussian_kernel1d(1.0, 3)
        tensor([0.2741, 0.4519, 0.2741])
    """
    sigma_device = sigma.device if isinstance(sigma, torch.Tensor) else torch.device("cpu")
    sigma_value, sigma_tensor = _check_sigma(sigma, sigma_device)
    kernel_size = _check_kernel_size(kernel_size, sigma_value, sigma_tensor)
    return reference.gaussian_kernel1d(_sigma_arg(sigma_value, sigma_tensor), kernel_size,
                                       device if device is not None else sigma_device)


# --------------------------------------------------------------------------------------------------
# Triton launcher
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BlurPlan:
    """How the blur runs on one shape and layout (``op._plan``): which kernel, tiles and grid."""

    columns: bool  # _channels_last_blur_kernel (else _separable_blur_kernel)
    block_w: int  # columns of a program's strip (TILE_W of the columns kernel)
    block_c: int  # channels of a program's strip
    num_warps: int
    unroll: int  # input rows per loop iteration (all loaded before the iteration's stores)
    rows: int  # output rows per program; rows + 2 * (k // 2) is a multiple of unroll
    programs: int  # 1-D grid
    prefetch: bool  # L2 prefetch of the next iteration's rows (CUDA only)
    line_w: int  # prefetch one address per line_w columns ...
    line_c: int  # ... and line_c channels (a 32-byte sector along the unit-stride axis)
    max_registers: int | None = None  # ptxas register cap per thread (None: ptxas decides)


def _blur_tile(channels: int, width: int, contiguous_channels: bool, element_size: int,
               per_thread: int) -> tuple[int, int, int]:
    """``(BLOCK_W, BLOCK_C, num_warps)`` of a strip of ``per_thread * 32 * num_warps`` elements.

    Channels-last: ``BLOCK_C`` is the largest power of two <= 128 that divides ``C`` (no idle
    lanes: 640 -> 128, 320 -> 64), ``BLOCK_W`` the rest. NCHW: ``BLOCK_W`` takes the elements.
    """
    elements = 64 if interpreter_enabled() else per_thread * 128
    if contiguous_channels:
        lowest_bit = channels & -channels
        if channels <= 128:
            block_c = next_power_of_2(channels)
        else:
            block_c = min(128, lowest_bit) if lowest_bit >= 32 else 128
        block_c = min(block_c, elements)
        block_w = max(1, min(next_power_of_2(width), elements // block_c))
    else:
        block_w = min(next_power_of_2(width), elements)
        block_c = max(1, min(next_power_of_2(channels), elements // block_w))
    num_warps = max(1, min(4, block_w * block_c // (32 * per_thread)))
    return block_w, block_c, num_warps


def _default_knobs(channels: int, contiguous_channels: bool, element_size: int,
                   kernel_size: int, fusion: bool, feature_blur: bool) -> dict:
    """The tuned plan knobs (``bench/tune_blur.py`` on the H100; ``blur/README.md``).

    * Channels-contiguous maps, ``k >= 5``: the register-blocked columns kernel (each element
      loaded and converted once), 2 rows per iteration and L2 prefetch; for ``k <= 7`` the
      fusion takes 5 columns x 2 channels per thread in 64-channel programs (2-5% faster than
      3 x 4 in 128 at k = 7), the blur 3 columns x 4 channels with at most 200 registers (ptxas
      then schedules it 3-8% faster); ``k >= 9`` 2 x 2 and 1 row per iteration (more partial
      rows to carry).
    * Channels-contiguous maps, ``k <= 3`` (and the channel blur): the rows kernel, 16-byte
      vectors (8 fp16) per thread for the blur, 4 elements for the fusion, ``2k`` rows per
      iteration, no prefetch (the ``k`` shifted loads hit L1 anyway).
    * Other layouts (NCHW latents, unaligned ``C``): the rows kernel, 1 element per thread (many
      short programs: the maps are small), 4 rows per iteration.
    """
    vector = 16 // element_size
    if contiguous_channels and channels % vector == 0:
        if kernel_size >= 5 and not feature_blur:
            if kernel_size <= 7 and fusion:
                return dict(tile_w=5, block_c=64, per_thread=2, unroll=2, prefetch=True)
            if kernel_size <= 7:
                return dict(tile_w=3, per_thread=4, unroll=2, prefetch=True, max_registers=200)
            return dict(tile_w=2, per_thread=2, unroll=1, prefetch=True)
        return dict(per_thread=vector // 2 if fusion else vector, unroll=2 * kernel_size,
                    prefetch=False)
    return dict(per_thread=1, unroll=4, prefetch=False)


def _rows_per_program(height: int, kernel_size: int, unroll: int, programs_per_row_block: int,
                      target_programs: int, rows: int = 32) -> int:
    """Output rows per program: ``iterations * unroll - 2r`` (no unrolled sub-step wasted), about
    ``rows`` (halo overhead ``(rows + 2r) / rows``), fewer while the grid has fewer than
    ``target_programs`` programs."""
    halo = 2 * (kernel_size // 2)
    most = -(-(height + halo) // unroll)  # one program covers every row
    if interpreter_enabled():
        return most * unroll - halo
    least = -(-(halo + 1) // unroll)  # at least one output row
    iterations = max(least, min(most, -(-(rows + halo) // unroll)))
    while iterations > least and (programs_per_row_block
                                  * -(-height // (iterations * unroll - halo))) < target_programs:
        iterations -= 1
    return iterations * unroll - halo


# Resident programs per SM of the columns kernel: one warp of about 250 registers for the fusion;
# the blur, capped at 200, could hold 10, which the wave model leaves out.
COLUMN_PROGRAMS_PER_SM = 8


def _wave_balanced_rows(height: int, kernel_size: int, unroll: int, programs_per_row_block: int,
                        target_programs: int, slots: int) -> int:
    """Rows per program of the columns kernel: about 32 rows (fewer on small grids) or about 64,
    whichever the model ``ceil(programs / slots) * (rows + 2r)`` (waves of resident programs, each
    as long as the rows it reads) says is faster. A partial last wave costs a whole one: at
    ``[2, 640, 128, 128]`` 32-row strips are 1.6 waves, 64-row strips one (-10% time on the H100),
    while at ``[2, 640, 256, 256]`` 32 rows (6.5 waves) stay best."""
    halo = 2 * (kernel_size // 2)

    def cost(rows: int) -> int:
        return -(-programs_per_row_block * -(-height // rows) // slots) * (rows + halo)

    candidates = [_rows_per_program(height, kernel_size, unroll, programs_per_row_block,
                                    target_programs, rows) for rows in (32, 64)]
    return min(candidates, key=cost)


def prefetch_supported(device: torch.device) -> bool:
    """The kernel's L2 prefetch is PTX: NVIDIA GPUs only (not the interpreter, not ROCm)."""
    return device.type == "cuda" and torch.version.hip is None and not interpreter_enabled()


@functools.lru_cache(maxsize=256)
def _plan(shape: tuple[int, ...], contiguous_channels: bool, element_size: int, kernel_size: int,
          device: torch.device, per_thread: int | None = None, unroll: int | None = None,
          programs_per_sm: int = 6, prefetch: bool | None = None,
          iterations: int | None = None, fusion: bool = False, feature_blur: bool = False,
          tile_w: int | None = None, max_registers: int | None = None,
          block_c: int | None = None) -> BlurPlan:
    """The launch plan for one shape and layout (cached).

    With no knob given, the tuned choice (``_default_knobs``). Knobs (``bench/tune_blur.py``
    sweeps them): ``tile_w`` picks the columns kernel with that many columns per program (only for
    channels-contiguous maps without ``feature_blur``), ``per_thread`` elements per thread,
    ``unroll`` input rows per iteration, ``programs_per_sm`` the grid size below which strips get
    shorter, ``prefetch`` the L2 prefetch, ``max_registers`` a register cap (more programs per SM),
    ``block_c`` the channels of a columns-kernel program (at most ``_blur_tile``'s, its default);
    ``iterations`` fixes the loop iterations of a program (``rows = iterations * unroll - 2r``).
    """
    batch, channels, height, width = shape
    if per_thread is None and unroll is None and tile_w is None and prefetch is None:
        knobs = _default_knobs(channels, contiguous_channels, element_size, kernel_size, fusion,
                               feature_blur)
        per_thread, unroll = knobs["per_thread"], knobs["unroll"]
        tile_w, prefetch = knobs.get("tile_w"), knobs["prefetch"]
        max_registers = max_registers or knobs.get("max_registers")
        block_c = block_c or knobs.get("block_c")
    per_thread = per_thread or 2
    unroll = unroll or kernel_size
    prefetch = bool(prefetch) and prefetch_supported(device)
    block_w, tile_c, num_warps = _blur_tile(channels, width, contiguous_channels, element_size,
                                            per_thread)
    columns = tile_w is not None and contiguous_channels and not feature_blur
    if columns:
        block_w = tile_w
        block_c = min(block_c, tile_c) if block_c else tile_c
        num_warps = max(1, block_c // (32 * per_thread))
    else:
        block_c = tile_c
    per_row_block = batch * -(-width // block_w) * -(-channels // block_c)
    target = programs_per_sm * multiprocessor_count(device)
    if iterations is None and columns:
        rows = _wave_balanced_rows(height, kernel_size, unroll, per_row_block, target,
                                   COLUMN_PROGRAMS_PER_SM * multiprocessor_count(device))
    elif iterations is None:
        rows = _rows_per_program(height, kernel_size, unroll, per_row_block, target)
    else:
        rows = iterations * unroll - 2 * (kernel_size // 2)
        if rows < 1:
            raise ValueError(f"{iterations} iterations of {unroll} rows leave no output row")
    sector = 32 // element_size
    line_c = min(block_c, sector) if contiguous_channels else 1
    line_w = 1 if contiguous_channels else min(block_w, sector)
    return BlurPlan(columns, block_w, block_c, num_warps, unroll, rows,
                    per_row_block * -(-height // rows), prefetch, line_w, line_c, max_registers)


def _blur_triton(
    a: torch.Tensor,
    b: torch.Tensor | None,
    sigma_value: float,
    sigma_tensor: torch.Tensor | None,
    kernel_size: int,
    feature_blur: bool,
    plan: BlurPlan | None = None,
) -> torch.Tensor:
    from hrkernels.ops.blur.kernels import _channels_last_blur_kernel, _separable_blur_kernel

    batch, channels, height, width = a.shape
    fusion = b is not None
    other = b if fusion else a
    out = output_like(a)
    if plan is None:
        plan = _plan(tuple(a.shape), channels_contiguous(a, other, out), a.element_size(),
                     kernel_size, a.device, fusion=fusion, feature_blur=feature_blur)
    if plan.columns:
        launcher(_channels_last_blur_kernel)[(plan.programs,)](
            a, other, out, a if sigma_tensor is None else sigma_tensor, sigma_value,
            channels, height, width, plan.rows,
            *a.stride(), *other.stride(), *out.stride(),
            K=kernel_size, K_PAD=next_power_of_2(kernel_size), FUSION=fusion,
            SIGMA_FROM_PTR=sigma_tensor is not None, EVEN_C=channels % plan.block_c == 0,
            BLOCK_C=plan.block_c, TILE_W=plan.block_w, UNROLL=plan.unroll, PREFETCH=plan.prefetch,
            LINE_C=plan.line_c, num_warps=plan.num_warps, maxnreg=plan.max_registers,
        )
        return out
    launcher(_separable_blur_kernel)[(plan.programs,)](
        a, other, out, a if sigma_tensor is None else sigma_tensor, sigma_value,
        channels, height, width, plan.rows,
        *a.stride(), *other.stride(), *out.stride(),
        K=kernel_size, K_PAD=next_power_of_2(kernel_size),
        FUSION=fusion, FEATURE_BLUR=feature_blur, SIGMA_FROM_PTR=sigma_tensor is not None,
        EVEN_C=channels % plan.block_c == 0, BLOCK_W=plan.block_w, BLOCK_C=plan.block_c,
        UNROLL=plan.unroll, PREFETCH=plan.prefetch, LINE_W=plan.line_w, LINE_C=plan.line_c,
        num_warps=plan.num_warps, maxnreg=plan.max_registers,
    )
    return out


def _kernel_applies(kernel_size: int, *tensors: torch.Tensor) -> bool:
    """The Triton kernel covers ``K <= MAX_TRITON_KERNEL_SIZE`` and images whose in-image offsets
    fit int32; other calls run the reference (same result)."""
    return kernel_size <= MAX_TRITON_KERNEL_SIZE and image_offsets_fit_int32(*tensors)


# --------------------------------------------------------------------------------------------------
# gaussian_blur2d
# --------------------------------------------------------------------------------------------------


def _gaussian_blur2d_reference(
    x: torch.Tensor, sigma_value: float, sigma_tensor: torch.Tensor | None, kernel_size: int
) -> torch.Tensor:
    return reference.gaussian_blur2d(x, _sigma_arg(sigma_value, sigma_tensor), kernel_size,
                                     output_memory_format(x))


def _gaussian_blur2d_triton(x, sigma_value, sigma_tensor, kernel_size):
    return _blur_triton(x, None, sigma_value, sigma_tensor, kernel_size, False)


def _gaussian_blur2d_applies(x, sigma_value, sigma_tensor, kernel_size):
    return _kernel_applies(kernel_size, x)


_gaussian_blur2d_op = dispatched_op(
    "gaussian_blur2d",
    {"torch": Implementation(_gaussian_blur2d_reference),
     "triton": Implementation(_gaussian_blur2d_triton, applies=_gaussian_blur2d_applies)},
    fake=fake_like_first_input,
)


def gaussian_blur2d(x: torch.Tensor, sigma: Sigma, kernel_size: int | None = None) -> torch.Tensor:
    """Separable Gaussian blur over (H, W) with zero padding; the output has ``x``'s size.

    ``out = G(x)``, ``G`` the 1-D kernel ``g[i] = exp(-(i - (k-1)/2)^2 / (2 sigma^2))`` (normalised
    to sum 1) applied along W and along H, with ``k // 2`` zeros padded on each side. Arithmetic is
    fp32; the result is rounded once to ``x``'s dtype. On CUDA one Triton kernel reads ``x`` once
    and writes the output once (see ``blur/README.md``).

    Args:
        x: ``[B, C, H, W]`` fp32/fp16/bf16, any strides (a channels-last ``[B, H, W, C]`` tensor
            passed as ``x.permute(0, 3, 1, 2)`` is read in place).
        sigma: standard deviation, a finite float ``> 0`` or a 0-d float tensor on ``x``'s device.
            A tensor is read on the device (no host sync; under ``torch.compile`` it also avoids a
            recompile per value). A CPU tensor's value is checked (``> 0``: 0 would give NaN); on a
            GPU it is not (reading it would synchronise the device), and must be ``> 0``.
        kernel_size: odd ``1 <= k <= 2**24 + 1``; default ``2 * ceil(3 * sigma) + 1``, which needs
            sigma's value, so it is required when ``sigma`` is a tensor. Sizes above 15 run the
            PyTorch reference, which drops the taps farther than ``max(H, W) - 1`` from the centre
            (they only read zero padding; the weights keep the full kernel's normalisation, so the
            output is the same and a huge ``sigma`` on a small map costs what the map needs).

    Returns:
        ``[B, C, H, W]`` with ``x``'s dtype; channels-last when ``x`` is.

    Raises:
        TypeError: ``x`` not a float tensor; ``sigma`` or ``kernel_size`` of the wrong type.
        ValueError: ``x`` not 4-D or empty; ``sigma <= 0`` (a CPU tensor's too) or not finite;
            ``sigma`` a tensor that is not 0-d or on another device; ``kernel_size`` even, ``< 1``
            or above ``2**24 + 1`` (also as the default of a float ``sigma``); ``kernel_size``
            None with a tensor ``sigma``.

    Example::

        >>> x = torch.randn(1, 4, 128, 128)
        >>> gaussian_blur2d(x, 0.8).shape          # kernel_size 2 * ceil(2.4) + 1 = 7
        torch.Size([1, 4, 128, 128])
        >>> out = gaussian_blur2d(x, torch.tensor(0.8), kernel_size=7)
    """
    return _gaussian_blur2d_op(*_blur_arguments(x, sigma, kernel_size))


def _blur_arguments(x: torch.Tensor, sigma: Sigma, kernel_size: int | None,
                    ) -> tuple[torch.Tensor, float, torch.Tensor | None, int]:
    """:func:`gaussian_blur2d`'s checks; its operator's arguments."""
    check_feature_map(x)
    sigma_value, sigma_tensor = _check_sigma(sigma, x.device)
    kernel_size = _check_kernel_size(kernel_size, sigma_value, sigma_tensor)
    return x, sigma_value, sigma_tensor, kernel_size


# --------------------------------------------------------------------------------------------------
# frequency_fusion
# --------------------------------------------------------------------------------------------------


def _frequency_fusion_reference(
    global_: torch.Tensor, local: torch.Tensor, sigma_value: float,
    sigma_tensor: torch.Tensor | None, kernel_size: int, feature_blur: bool,
) -> torch.Tensor:
    return reference.frequency_fusion(global_, local, _sigma_arg(sigma_value, sigma_tensor),
                                      kernel_size, feature_blur, output_memory_format(global_))


def _frequency_fusion_applies(global_, local, sigma_value, sigma_tensor, kernel_size,
                              feature_blur):
    return _kernel_applies(kernel_size, global_, local)


# The launcher takes the operator's arguments (then an optional plan): it is the Triton entry.
_frequency_fusion_op = dispatched_op(
    "frequency_fusion",
    {"torch": Implementation(_frequency_fusion_reference),
     "triton": Implementation(_blur_triton, applies=_frequency_fusion_applies)},
    fake=fake_like_first_input,
)


def frequency_fusion(
    global_: torch.Tensor,
    local: torch.Tensor,
    sigma: Sigma,
    kernel_size: int | None,
    feature_blur: bool = False,
) -> torch.Tensor:
    """FreeScale's Scale Fusion: the low frequencies of ``global_`` with the high ones of ``local``.

    ``out = global_ + G(local - global_)``, which equals the paper's
    ``G(local) + global_ - G(global_)`` (``G`` is linear), computed in one pass: both inputs are
    read once and the output is written once. ``G`` is :func:`gaussian_blur2d`'s blur over (H, W);
    with ``feature_blur=True`` it also blurs along C with the same 1-D kernel and zero padding (a
    3-D Gaussian, as the authors' current code does). fp32 arithmetic, one rounding at the end.

    Args:
        global_: ``[B, C, H, W]`` fp32/fp16/bf16, any strides (attention features are usually
            channels-last: ``[B, h, w, C]`` passed as ``.permute(0, 3, 1, 2)``).
        local: same shape, dtype and device as ``global_``, any strides.
        sigma: as in :func:`gaussian_blur2d` (FreeScale uses 1.0).
        kernel_size: odd ``k >= 1`` (FreeScale: ``2 * max(s_h, s_w) - 1``); None means
            ``2 * ceil(3 * sigma) + 1`` and needs a float ``sigma``.
        feature_blur: also blur along the channel axis.

    Returns:
        ``[B, C, H, W]`` with ``global_``'s dtype; channels-last when ``global_`` is.

    Raises:
        TypeError/ValueError: as :func:`gaussian_blur2d`; ``local`` of another shape, dtype or
            device than ``global_``; ``feature_blur`` not a bool.

    Example::

        >>> g = torch.randn(2, 128, 128, 640).permute(0, 3, 1, 2)   # channels-last features
        >>> l = torch.randn(2, 128, 128, 640).permute(0, 3, 1, 2)
        >>> frequency_fusion(g, l, 1.0, 3).shape
        torch.Size([2, 640, 128, 128])
    """
    return _frequency_fusion_op(*_fusion_arguments(global_, local, sigma, kernel_size,
                                                   feature_blur))


def _fusion_arguments(
    global_: torch.Tensor, local: torch.Tensor, sigma: Sigma, kernel_size: int | None,
    feature_blur: bool,
) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor | None, int, bool]:
    """:func:`frequency_fusion`'s checks; its operator's arguments."""
    check_feature_map(global_, "global_")
    check_feature_map(local, "local")
    if local.shape != global_.shape:
        raise ValueError(f"local must have global_'s shape {tuple(global_.shape)}; got "
                         f"{tuple(local.shape)}")
    if local.dtype != global_.dtype:
        raise TypeError(f"local must have global_'s dtype {global_.dtype}; got {local.dtype}")
    if local.device != global_.device:
        raise ValueError(f"local is on {local.device} but global_ is on {global_.device}")
    if not isinstance(feature_blur, bool):
        raise TypeError(f"feature_blur must be a bool; got {feature_blur!r}")
    sigma_value, sigma_tensor = _check_sigma(sigma, global_.device)
    kernel_size = _check_kernel_size(kernel_size, sigma_value, sigma_tensor)
    return global_, local, sigma_value, sigma_tensor, kernel_size, feature_blur

"""The ``blur`` ops: separable Gaussian blur and FreeScale's frequency fusion. Public wrappers
validate, registered ``hrkernels::`` operators dispatch (see ``hrkernels/ops/_backend.py``), the
Triton launcher picks tiles and grids."""

from __future__ import annotations

import functools
import math
import numbers

import torch

from hrkernels.ops._backend import interpreter_enabled, select_backend
from hrkernels.ops._checks import check_feature_map, output_memory_format
from hrkernels.ops._launch import (
    channels_contiguous,
    empty_output,
    image_offsets_fit_int32,
    multiprocessor_count,
    next_power_of_2,
)
from hrkernels.ops.blur import reference

# Kernel sizes the Triton kernel is compiled for (K is a constexpr: its K sub-steps and K taps are
# unrolled). Larger kernels run the PyTorch reference on every backend.
MAX_TRITON_KERNEL_SIZE = 15

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
        return default_kernel_size(sigma_value)
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, numbers.Integral):
        raise TypeError(f"kernel_size must be an odd int >= 1 or None; got {kernel_size!r}")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd and >= 1; got {kernel_size}")
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

def _blur_tile(channels: int, width: int, contiguous_channels: bool, element_size: int,
               kernel_size: int) -> tuple[int, int, int]:
    """``(BLOCK_W, BLOCK_C, num_warps)`` of the strip a program walks down.

    Channels-last maps whose channel count is a multiple of the 16-byte vector get 8 elements per
    thread (a 16-byte fp16 vector per load; the ring of K rows holds 8 * K fp32 registers) for
    K <= 7, 4 for larger K. Other layouts load element by element (a shifted column breaks the
    alignment) and get 2 per thread: more would only be spilled (checked with ptxas for sm_90).
    """
    vector = 16 // element_size
    if contiguous_channels and channels % vector == 0:
        per_thread = 8 if kernel_size <= 7 else 4
    else:
        per_thread = 2
    elements = 64 if interpreter_enabled() else per_thread * 128
    if contiguous_channels:
        lowest_bit = channels & -channels
        if channels <= 128:
            block_c = next_power_of_2(channels)
        else:  # a power of two that divides C wastes no lanes (320 -> 64, 640 -> 128)
            block_c = min(128, lowest_bit) if lowest_bit >= 32 else 128
        block_c = min(block_c, elements)
        block_w = max(1, min(next_power_of_2(width), elements // block_c))
    else:
        block_w = min(next_power_of_2(width), elements)
        block_c = max(1, min(next_power_of_2(channels), elements // block_w))
    num_warps = max(1, min(4, block_w * block_c // (32 * per_thread)))
    return block_w, block_c, num_warps


def _rows_per_program(height: int, kernel_size: int, programs_per_row_block: int,
                      device: torch.device) -> int:
    """Output rows per program: ``iterations * K - 2R`` (so that no unrolled sub-step is wasted),
    about 32 rows (halo overhead (32 + 2R) / 32), fewer when the grid would not fill the GPU."""
    halo = 2 * (kernel_size // 2)
    most = -(-(height + halo) // kernel_size)  # one program covers every row
    if interpreter_enabled():
        return most * kernel_size - halo
    iterations = min(most, max(1, -(-(32 + halo) // kernel_size)))
    target = 6 * multiprocessor_count(device)
    while iterations > 2 and (programs_per_row_block
                              * -(-height // (iterations * kernel_size - halo))) < target:
        iterations -= 1
    return iterations * kernel_size - halo


@functools.lru_cache(maxsize=256)
def _plan(shape: tuple[int, ...], contiguous_channels: bool, element_size: int, kernel_size: int,
          device: torch.device) -> tuple[int, int, int, int, int]:
    """``(BLOCK_W, BLOCK_C, num_warps, ROWS, programs)`` for one shape and layout (cached)."""
    batch, channels, height, width = shape
    block_w, block_c, num_warps = _blur_tile(channels, width, contiguous_channels, element_size,
                                             kernel_size)
    per_row_block = batch * -(-width // block_w) * -(-channels // block_c)
    rows = _rows_per_program(height, kernel_size, per_row_block, device)
    return block_w, block_c, num_warps, rows, per_row_block * -(-height // rows)


def _blur_triton(
    a: torch.Tensor,
    b: torch.Tensor | None,
    sigma_value: float,
    sigma_tensor: torch.Tensor | None,
    kernel_size: int,
    feature_blur: bool,
) -> torch.Tensor:
    from hrkernels.ops.blur.kernels import _separable_blur_kernel

    batch, channels, height, width = a.shape
    fusion = b is not None
    other = b if fusion else a
    out = empty_output(tuple(a.shape), a.dtype, a.device, output_memory_format(a))
    block_w, block_c, num_warps, rows, programs = _plan(
        tuple(a.shape), channels_contiguous(a, other, out), a.element_size(), kernel_size,
        a.device)
    _separable_blur_kernel[(programs,)](
        a, other, out, a if sigma_tensor is None else sigma_tensor, sigma_value,
        channels, height, width, rows,
        *a.stride(), *other.stride(), *out.stride(),
        K=kernel_size, K_PAD=next_power_of_2(kernel_size),
        FUSION=fusion, FEATURE_BLUR=feature_blur, SIGMA_FROM_PTR=sigma_tensor is not None,
        EVEN_C=channels % block_c == 0, BLOCK_W=block_w, BLOCK_C=block_c, num_warps=num_warps,
    )
    return out


def _use_triton(op: str, kernel_size: int, *tensors: torch.Tensor) -> bool:
    """The Triton kernel runs when the backend says so, for ``K <= 15`` and images whose in-image
    offsets fit int32; otherwise the reference (same result)."""
    backend = select_backend(op, tensors[0].device)
    return (backend == "triton" and kernel_size <= MAX_TRITON_KERNEL_SIZE
            and image_offsets_fit_int32(*tensors))


# --------------------------------------------------------------------------------------------------
# gaussian_blur2d
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("hrkernels::gaussian_blur2d", mutates_args=())
def _gaussian_blur2d_op(
    x: torch.Tensor, sigma_value: float, sigma_tensor: torch.Tensor | None, kernel_size: int
) -> torch.Tensor:
    if _use_triton("gaussian_blur2d", kernel_size, x):
        return _blur_triton(x, None, sigma_value, sigma_tensor, kernel_size, False)
    return reference.gaussian_blur2d(x, _sigma_arg(sigma_value, sigma_tensor), kernel_size,
                                     output_memory_format(x))


@_gaussian_blur2d_op.register_fake
def _(x, sigma_value, sigma_tensor, kernel_size):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device,
                       memory_format=output_memory_format(x))


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
            recompile per value). A tensor's value is not checked: it must be ``> 0``.
        kernel_size: odd ``k >= 1``; default ``2 * ceil(3 * sigma) + 1``, which needs sigma's value,
            so it is required when ``sigma`` is a tensor. Sizes above 15 run the PyTorch reference.

    Returns:
        ``[B, C, H, W]`` with ``x``'s dtype; channels-last when ``x`` is.

    Raises:
        TypeError: ``x`` not a float tensor; ``sigma`` or ``kernel_size`` of the wrong type.
        ValueError: ``x`` not 4-D or empty; ``sigma <= 0`` or not finite; ``sigma`` a tensor that is
            not 0-d or on another device; ``kernel_size`` even or ``< 1``; ``kernel_size`` None
            with a tensor ``sigma``.

    Example::

        >>> x = torch.randn(1, 4, 128, 128)
        >>> gaussian_blur2d(x, 0.8).shape          # kernel_size 2 * ceil(2.4) + 1 = 7
        torch.Size([1, 4, 128, 128])
        >>> out = gaussian_blur2d(x, torch.tensor(0.8), kernel_size=7)
    """
    check_feature_map(x)
    sigma_value, sigma_tensor = _check_sigma(sigma, x.device)
    kernel_size = _check_kernel_size(kernel_size, sigma_value, sigma_tensor)
    return _gaussian_blur2d_op(x, sigma_value, sigma_tensor, kernel_size)


# --------------------------------------------------------------------------------------------------
# frequency_fusion
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("hrkernels::frequency_fusion", mutates_args=())
def _frequency_fusion_op(
    global_: torch.Tensor, local: torch.Tensor, sigma_value: float,
    sigma_tensor: torch.Tensor | None, kernel_size: int, feature_blur: bool,
) -> torch.Tensor:
    if _use_triton("frequency_fusion", kernel_size, global_, local):
        return _blur_triton(global_, local, sigma_value, sigma_tensor, kernel_size, feature_blur)
    return reference.frequency_fusion(global_, local, _sigma_arg(sigma_value, sigma_tensor),
                                      kernel_size, feature_blur, output_memory_format(global_))


@_frequency_fusion_op.register_fake
def _(global_, local, sigma_value, sigma_tensor, kernel_size, feature_blur):
    return torch.empty(global_.shape, dtype=global_.dtype, device=global_.device,
                       memory_format=output_memory_format(global_))


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
    return _frequency_fusion_op(global_, local, sigma_value, sigma_tensor, kernel_size,
                                feature_blur)

"""ScaleCrafter's dispersed convolution: the linear map R that enlarges a pre-trained k x k kernel
to k' x k' (``k' = scale * (k - 1) + 1``), solved by least squares (paper eq. 4; README.md).

R depends only on (k, scale, eta) and torch's bilinear interpolation; it is solved once in float64
on the CPU and cached.
"""

from __future__ import annotations

import functools
from numbers import Real

import torch
import torch.nn.functional as F

from hrkernels.ops._backend import registered_op


def _check_int(value: int, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int; got {value!r} (a {type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}")
    return value


def _check_arguments(kernel_size: int, scale: int, eta: float) -> tuple[int, int, float]:
    _check_int(kernel_size, "kernel_size", 1)
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd; got {kernel_size}")
    _check_int(scale, "scale", 1)
    if isinstance(eta, bool) or not isinstance(eta, Real):
        raise TypeError(f"eta must be a number; got {eta!r}")
    eta = float(eta)
    if not eta >= 0 or eta == float("inf"):
        raise ValueError(f"eta must be a finite number >= 0; got {eta!r}")
    return kernel_size, scale, eta


def _one_hot_kernels(size: int) -> torch.Tensor:
    """``[size^2, 1, size, size]`` float64: kernel ``e`` is 1 at entry ``e`` (row-major)."""
    return torch.eye(size * size, dtype=torch.float64).view(size * size, 1, size, size)


@functools.lru_cache(maxsize=64)
def _solve(kernel_size: int, scale: int, eta: float) -> torch.Tensor:
    """R as ``[k'^2, k^2]`` float64 (cached; callers get clones)."""
    enlarged = scale * (kernel_size - 1) + 1
    # One interior one-hot input (see README.md): its footprint, after the kernels and the
    # upsampling, stays `enlarged + 1` pixels away from every border, so neither the convolutions'
    # zero padding nor the interpolation's border clamp takes part.
    size = 2 * (enlarged + 2) + 1
    fine = scale * size
    impulse = torch.zeros(1, 1, size, size, dtype=torch.float64)
    impulse[0, 0, size // 2, size // 2] = 1.0

    def upsample(h: torch.Tensor) -> torch.Tensor:
        return F.interpolate(h, size=(fine, fine), mode="bilinear", align_corners=False)

    small, large = _one_hot_kernels(kernel_size), _one_hot_kernels(enlarged)
    # Column e of a matrix: the response to the one-hot kernel e, flattened over output pixels.
    def conv(h: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
        return F.conv2d(h, kernels, padding=kernels.shape[-1] // 2)

    structure_a = conv(upsample(impulse), large).view(-1, fine * fine).T  # [fine^2, k'^2]
    structure_b = upsample(conv(impulse, small)).view(-1, fine * fine).T  # [fine^2, k^2]
    pixel_a = conv(impulse, large).view(-1, size * size).T
    pixel_b = conv(impulse, small).view(-1, size * size).T
    weight = eta ** 0.5
    system = torch.cat([structure_a, weight * pixel_a])  # [rows, k'^2]
    target = torch.cat([structure_b, weight * pixel_b])  # [rows, k^2]: one column per entry of k
    # gelsd (SVD) returns the minimum-norm solution if the system is rank-deficient (eta = 0).
    return torch.linalg.lstsq(system, target, driver="gelsd").solution  # [k'^2, k^2]


def dispersion_matrix(kernel_size: int = 3, scale: int = 2, eta: float = 0.05) -> torch.Tensor:
    """The map R of ScaleCrafter's dispersed convolution: ``k' = R @ k`` (kernels flattened
    row-major), ``k' = scale * (k - 1) + 1``.

    R minimises, over all one-hot inputs ``h`` away from borders (equivalently: per pixel for
    white-noise inputs on an unbounded plane),

        ``|| up(conv_k(h)) - conv_k'(up(h)) ||^2 + eta * || conv_k(h) - conv_k'(h) ||^2``

    for every kernel ``k`` at once (the problem is linear in ``k``: column ``c`` of R is the
    solution for the one-hot kernel ``c``). ``up`` is ``F.interpolate(..., scale x,
    mode="bilinear", align_corners=False)``; the convolutions are cross-correlations with "same"
    zero padding. The first term is the structure-level calibration, the second the pixel-level
    one. ``eta -> 0`` gives the dilated kernel (which satisfies the structure term exactly),
    ``eta -> inf`` the zero-padded original.

    Args:
        kernel_size: odd ``k >= 1``.
        scale: integer upsampling factor ``>= 1`` (2 for ScaleCrafter's 3x3 -> 5x5).
        eta: weight of the pixel-level term, finite and ``>= 0`` (paper default 0.05).

    Returns:
        ``[k'^2, k^2]`` float64 on the CPU: a fresh copy (the solution is cached).

    Raises:
        TypeError/ValueError: a non-int or even ``kernel_size``, ``scale < 1``, ``eta`` negative
            or not finite.

    Example::

        >>> dispersion_matrix(3, 2).shape
        torch.Size([25, 9])
    """
    return _solve(*_check_arguments(kernel_size, scale, eta)).clone()


def disperse_kernel(weight: torch.Tensor, scale: int = 2, eta: float = 0.05) -> torch.Tensor:
    """Enlarge convolution kernels with :func:`dispersion_matrix`: ``[O, I, k, k] ->
    [O, I, k', k']``, ``k' = scale * (k - 1) + 1`` (3x3 -> 5x5 for scale 2).

    The dispersed kernel is meant to run with ``1 / scale`` of the dilation the original would
    get (ScaleCrafter). Computed in float32 (float64 for float64 weights) on ``weight``'s device.

    Args:
        weight: ``[O, I, k, k]`` floating point, ``k`` odd.
        scale, eta: as in :func:`dispersion_matrix`.

    Returns:
        ``[O, I, k', k']``, ``weight``'s dtype and device, contiguous; a new tensor.

    Example::

        >>> disperse_kernel(torch.randn(8, 4, 3, 3)).shape
        torch.Size([8, 4, 5, 5])
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor; got {type(weight).__name__}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor; got {weight.dtype}")
    if weight.dim() != 4 or weight.shape[2] != weight.shape[3]:
        raise ValueError(f"weight must be [O, I, k, k] (square kernels); got "
                         f"{tuple(weight.shape)}")
    _, scale, eta = _check_arguments(weight.shape[-1], scale, eta)
    return _disperse_kernel_op(weight, scale, eta)


@functools.lru_cache(maxsize=64)
def _matrix_on(kernel_size: int, scale: int, eta: float, device: torch.device,
               dtype: torch.dtype) -> torch.Tensor:
    """R on ``device`` in ``dtype``, copied there once (no host-to-device copy per call)."""
    return _solve(kernel_size, scale, eta).to(device=device, dtype=dtype)


# A registered op, so that torch.compile does not trace into the least-squares solve (a dynamic
# shape operator) and the patched UNet compiles with fullgraph=True.
@registered_op("disperse_kernel")
def _disperse_kernel_op(weight: torch.Tensor, scale: int, eta: float) -> torch.Tensor:
    kernel_size = weight.shape[-1]
    enlarged = scale * (kernel_size - 1) + 1
    compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
    matrix = _matrix_on(kernel_size, scale, eta, weight.device, compute)
    flat = weight.reshape(-1, kernel_size * kernel_size).to(compute)
    out = (flat @ matrix.T).to(weight.dtype)
    return out.reshape(*weight.shape[:2], enlarged, enlarged)


@_disperse_kernel_op.register_fake
def _(weight, scale, eta):
    enlarged = scale * (weight.shape[-1] - 1) + 1
    return weight.new_empty((*weight.shape[:2], enlarged, enlarged))

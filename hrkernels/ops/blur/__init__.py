"""The ``blur`` op family: separable Gaussian blur and frequency fusion (see README.md)."""

from hrkernels.ops.blur.op import (
    default_kernel_size,
    frequency_fusion,
    gaussian_blur2d,
    gaussian_kernel1d,
)

__all__ = ["default_kernel_size", "frequency_fusion", "gaussian_blur2d", "gaussian_kernel1d"]

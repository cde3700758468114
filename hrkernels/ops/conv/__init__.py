"""The ``conv`` op family: re-dilated (integer and fractional) and dispersed convolution
(ScaleCrafter; see README.md)."""

from hrkernels.ops.conv.dispersion import disperse_kernel, dispersion_matrix
from hrkernels.ops.conv.op import dilated_conv2d

__all__ = ["dilated_conv2d", "disperse_kernel", "dispersion_matrix"]

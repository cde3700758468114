"""PyTorch references of the ``conv`` ops: what CPU/MPS tensors run, what the kernels are tested
against and what the benchmarks compare with. Arguments arrive validated (see ``op.py``); results
never alias the inputs."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from hrkernels.ops.conv.taps import stretched_size


def output_size(height: int, width: int, stride: tuple[int, int]) -> tuple[int, int]:
    """Spatial size of ``F.conv2d(x, weight, stride=stride, padding=k // 2)`` for an odd ``k``."""
    return (height - 1) // stride[0] + 1, (width - 1) // stride[1] + 1


def dilated_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    dilation: float,
    stride: tuple[int, int],
    memory_format: torch.memory_format = torch.contiguous_format,
) -> torch.Tensor:
    """ScaleCrafter's re-dilated convolution, unfused (METHODS.md, "Re-dilation").

    Integer ``d``: ``F.conv2d(x, weight, bias, stride, padding=d * (k // 2), dilation=d)``.
    Fractional ``d > 1``: ``D = ceil(d)``, ``s = D / d``; bilinear-resize ``x`` to
    ``(round(H * s), round(W * s))``, convolve with dilation ``D`` and padding ``D * (k // 2)``,
    bilinear-resize the result to the size of the undilated convolution (align_corners=False).
    """
    kernel_size = weight.shape[-1]
    if float(dilation).is_integer():
        factor = int(dilation)
        out = F.conv2d(x, weight, bias, stride, padding=factor * (kernel_size // 2),
                       dilation=factor)
        return out.contiguous(memory_format=memory_format)
    big = math.ceil(dilation)
    height, width = x.shape[-2:]
    stretched = F.interpolate(x, size=(stretched_size(height, dilation),
                                       stretched_size(width, dilation)),
                              mode="bilinear", align_corners=False)
    conv = F.conv2d(stretched, weight, bias, stride, padding=big * (kernel_size // 2),
                    dilation=big)
    out = F.interpolate(conv, size=output_size(height, width, stride), mode="bilinear",
                        align_corners=False)
    return out.contiguous(memory_format=memory_format)

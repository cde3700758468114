"""Benchmark cases of the ``conv`` family (issue shapes: SDXL's 3x3 convolutions at 2048^2 and
4096^2 with CFG, re-dilated by d in {1.5, 2, 2.5, 3}).

The reference is the unfused chain (bilinear -> cuDNN dilated conv -> bilinear) in the same layout
as the input. NCHW is what diffusers runs (and what the issue's "2.7x to 6.9x a plain conv" was
measured on); channels-last cases are listed for the fractional factors. ``flops`` counts the work
of the stretched convolution, ``2 * B * O * I * 9 * Hs * Ws`` (the plain size for integer ``d``);
the ``conv2d`` cases time a plain 3x3 convolution of the same input, for context.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from hrkernels import ops
from hrkernels.bench.registry import BenchCase, Inputs
from hrkernels.ops.conv import reference
from hrkernels.ops.conv.taps import stretched_size

SHAPES = [(2, 320, 256, 256), (2, 640, 128, 128), (2, 1280, 64, 64), (2, 1280, 128, 128)]


def _label(shape: tuple[int, ...], channels_last: bool, dilation: float | None = None) -> str:
    text = "[" + ",".join(str(size) for size in shape) + "]"
    if dilation is not None:
        text += f" d={dilation:g}"
    return text + (" cl" if channels_last else "")


def _inputs(shape, dilation, channels_last):
    def make(device: torch.device, dtype: torch.dtype) -> Inputs:
        batch, channels, height, width = shape
        x = torch.randn(shape, device=device, dtype=dtype)
        weight = torch.randn(channels, channels, 3, 3, device=device, dtype=dtype)
        weight /= math.sqrt(9 * channels)
        memory_format = torch.contiguous_format
        if channels_last:
            memory_format = torch.channels_last
            x = x.contiguous(memory_format=memory_format)
        return {"x": x, "weight": weight, "bias": torch.randn(channels, device=device, dtype=dtype),
                "dilation": dilation, "memory_format": memory_format}
    return make


def _flops(inputs: Inputs) -> int:
    batch, channels, height, width = inputs["x"].shape
    out_channels, _, kernel, _ = inputs["weight"].shape
    dilation = inputs["dilation"]
    if not float(dilation).is_integer():
        height, width = stretched_size(height, dilation), stretched_size(width, dilation)
    return 2 * batch * out_channels * channels * kernel * kernel * height * width


def _dilated_case(shape, dilation, channels_last=False, cpu=False) -> BenchCase:
    return BenchCase(
        "dilated_conv2d", _label(shape, channels_last, dilation),
        _inputs(shape, dilation, channels_last),
        run=lambda i: ops.dilated_conv2d(i["x"], i["weight"], i["bias"], i["dilation"]),
        reference=lambda i: reference.dilated_conv2d(i["x"], i["weight"], i["bias"],
                                                     i["dilation"], (1, 1), i["memory_format"]),
        flops=_flops,
        cpu=cpu,
    )


def _plain_case(shape, channels_last=False) -> BenchCase:
    def conv(i: Inputs) -> torch.Tensor:
        return F.conv2d(i["x"], i["weight"], i["bias"], padding=1)

    return BenchCase("conv2d", _label(shape, channels_last) + " plain 3x3",
                     _inputs(shape, 1, channels_last), run=conv, reference=conv, flops=_flops)


CASES = [
    *[_dilated_case(shape, dilation) for shape in SHAPES for dilation in (1.5, 2, 2.5, 3)],
    *[_dilated_case(shape, dilation, channels_last=True) for shape in SHAPES
      for dilation in (1.5, 2.5)],
    *[_plain_case(shape, channels_last) for shape in SHAPES for channels_last in (False, True)],
    # Small cases for a CPU run.
    _dilated_case((1, 8, 16, 16), 1.5, cpu=True),
    _dilated_case((1, 8, 16, 16), 2, cpu=True),
]

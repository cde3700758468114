"""Benchmark cases of the ``blur`` family (issue shapes: FreeScale's Scale Fusion on attention
features at 2048^2 and 4096^2, ``[2, 128, 128, 640]`` and ``[2, 256, 256, 640]`` channels-last,
kernel 3 and 7, sigma 1; plus DemoFusion's latent blur at 4096^2, ``[1, 4, 512, 512]``, kernel 7,
sigma 0.8).

``bytes_moved`` counts each input read once and the output written once: ``2 * |x|`` for the blur,
``3 * |x|`` for the fusion (two inputs, one output).
"""

from __future__ import annotations

import torch

from hrkernels import ops
from hrkernels.bench.registry import BenchCase, Inputs, tensor_bytes
from hrkernels.ops.blur import reference


def _feature_map(shape: tuple[int, int, int, int], channels_last: bool, device, dtype, seed: int):
    generator = torch.Generator(device).manual_seed(seed)
    batch, channels, height, width = shape
    if channels_last:
        return torch.randn(batch, height, width, channels, device=device, dtype=dtype,
                           generator=generator).permute(0, 3, 1, 2)
    return torch.randn(shape, device=device, dtype=dtype, generator=generator)


def _format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def _cases(label, shape, kernel_size, sigma, channels_last, feature_blur=False, cpu=False):
    def make(device: torch.device, dtype: torch.dtype) -> Inputs:
        return {"global_": _feature_map(shape, channels_last, device, dtype, 0),
                "local": _feature_map(shape, channels_last, device, dtype, 1)}

    memory_format = _format(channels_last)
    tag = f"{label} k{kernel_size}" + (" +C" if feature_blur else "")
    cases = [
        BenchCase(
            "frequency_fusion", tag, make,
            run=lambda i: ops.frequency_fusion(i["global_"], i["local"], sigma, kernel_size,
                                               feature_blur),
            reference=lambda i: reference.frequency_fusion(i["global_"], i["local"], sigma,
                                                           kernel_size, feature_blur,
                                                           memory_format),
            bytes_moved=lambda i: tensor_bytes(i["global_"], i["local"], i["global_"]),
            cpu=cpu,
        ),
    ]
    if not feature_blur:
        cases.append(BenchCase(
            "gaussian_blur2d", tag, make,
            run=lambda i: ops.gaussian_blur2d(i["local"], sigma, kernel_size),
            reference=lambda i: reference.gaussian_blur2d(i["local"], sigma, kernel_size,
                                                          memory_format),
            bytes_moved=lambda i: 2 * tensor_bytes(i["local"]),
            cpu=cpu,
        ))
    return cases


CASES = [
    # FreeScale Scale Fusion, kernel 2 * max(s) - 1 (3 at 2x, 7 at 4x), sigma 1, channels-last.
    *_cases("feat [2,128,128,640] cl", (2, 640, 128, 128), 3, 1.0, True),
    *_cases("feat [2,128,128,640] cl", (2, 640, 128, 128), 7, 1.0, True),
    *_cases("feat [2,256,256,640] cl", (2, 640, 256, 256), 3, 1.0, True),
    *_cases("feat [2,256,256,640] cl", (2, 640, 256, 256), 7, 1.0, True),
    # The authors' current code also blurs along the features (reported, no target).
    *_cases("feat [2,128,128,640] cl", (2, 640, 128, 128), 3, 1.0, True, feature_blur=True),
    # DemoFusion's latent blur at 4096^2 (stage 4: kernel 2s - 1 = 7, sigma 0.8 * c3).
    *_cases("latent [1,4,512,512]", (1, 4, 512, 512), 7, 0.8, False),
    # Small cases for a CPU run.
    *_cases("cpu [1,64,32,32] cl", (1, 64, 32, 32), 3, 1.0, True, cpu=True),
]

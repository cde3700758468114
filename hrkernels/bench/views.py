"""Benchmark cases of the ``views`` family (issue shapes: DemoFusion latents at 4096^2 with CFG,
FreeScale attention features at 4096^2, channels-last)."""

from __future__ import annotations

import torch

from hrkernels import ops
from hrkernels.bench.registry import BenchCase, Inputs, tensor_bytes
from hrkernels.ops.views import reference


def _feature_map(shape: tuple[int, int, int, int], channels_last: bool, device, dtype):
    batch, channels, height, width = shape
    if channels_last:
        return torch.randn(batch, height, width, channels, device=device,
                           dtype=dtype).permute(0, 3, 1, 2)
    return torch.randn(shape, device=device, dtype=dtype)


def _window_inputs(shape, window, stride, jitter, channels_last):
    def make(device: torch.device, dtype: torch.dtype) -> Inputs:
        x = _feature_map(shape, channels_last, device, dtype)
        generator = torch.Generator(device).manual_seed(0)
        starts = ops.window_grid(*shape[2:], window, stride, jitter, generator=generator,
                                 device=device)
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        views = ops.gather_windows(x, starts, window, memory_format)
        return {"x": x, "starts": starts, "window": window, "views": views,
                "memory_format": memory_format}
    return make


def _gather_windows_cases(label, shape, window, stride, jitter, channels_last, cpu=False):
    make = _window_inputs(shape, window, stride, jitter, channels_last)
    window_pair = (window, window)
    return [
        BenchCase(
            "gather_windows", label, make,
            run=lambda i: ops.gather_windows(i["x"], i["starts"], i["window"], i["memory_format"]),
            reference=lambda i: reference.gather_windows(i["x"], i["starts"], window_pair,
                                                         i["memory_format"]),
            bytes_moved=lambda i: tensor_bytes(i["x"], i["views"]),
            cpu=cpu,
        ),
        BenchCase(
            "scatter_windows_mean", label, make,
            run=lambda i: ops.scatter_windows_mean(i["views"], i["starts"], i["x"].shape[2:]),
            reference=lambda i: reference.scatter_windows_mean(
                i["views"], i["starts"], tuple(i["x"].shape[2:]), None, i["memory_format"]),
            # Compiling the per-view loop unrolls one slice-add per view (minutes of compilation);
            # the loop-free index_add formulation is the stronger compiled baseline.
            compiled_reference=lambda i: reference.scatter_windows_mean_indexed(
                i["views"], i["starts"], tuple(i["x"].shape[2:]), None, i["memory_format"]),
            bytes_moved=lambda i: tensor_bytes(i["x"], i["views"]),
            cpu=cpu,
        ),
    ]


def _dilated_cases(label, shape, factor, channels_last, cpu=False):
    def make(device: torch.device, dtype: torch.dtype) -> Inputs:
        x = _feature_map(shape, channels_last, device, dtype)
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        return {"x": x, "views": ops.gather_dilated(x, factor), "memory_format": memory_format}

    return [
        BenchCase(
            "gather_dilated", label, make,
            run=lambda i: ops.gather_dilated(i["x"], factor),
            reference=lambda i: reference.gather_dilated(i["x"], factor, i["memory_format"]),
            bytes_moved=lambda i: 2 * tensor_bytes(i["x"]),
            cpu=cpu,
        ),
        BenchCase(
            "scatter_dilated", label, make,
            run=lambda i: ops.scatter_dilated(i["views"], factor),
            reference=lambda i: reference.scatter_dilated(i["views"], factor, i["memory_format"]),
            bytes_moved=lambda i: 2 * tensor_bytes(i["x"]),
            cpu=cpu,
        ),
    ]


CASES = [
    # DemoFusion 4096^2 with CFG: latent [2, 4, 512, 512], 49 windows of 128 at stride 64,
    # jitter 16, and its 4x4 dilated sub-lattices.
    *_gather_windows_cases("latent [2,4,512,512] w128 s64", (2, 4, 512, 512), 128, 64, 16, False),
    *_dilated_cases("latent [2,4,512,512] f4", (2, 4, 512, 512), (4, 4), False),
    # FreeScale attention features at 4096^2, channels-last.
    *_gather_windows_cases("feat [2,256,256,640] cl w64 s32", (2, 640, 256, 256), 64, 32, 8, True),
    *_gather_windows_cases("feat [2,128,128,1280] cl w32 s16", (2, 1280, 128, 128), 32, 16, 4,
                           True),
    *_dilated_cases("feat [2,256,256,640] cl f2", (2, 640, 256, 256), (2, 2), True),
    *_dilated_cases("feat [2,128,128,1280] cl f2", (2, 1280, 128, 128), (2, 2), True),
    # Small cases for a CPU run.
    *_gather_windows_cases("cpu [1,4,64,64] w32 s16", (1, 4, 64, 64), 32, 16, 4, False, cpu=True),
    *_dilated_cases("cpu [1,4,64,64] f2", (1, 4, 64, 64), (2, 2), False, cpu=True),
]

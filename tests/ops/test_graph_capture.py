"""Every op runs inside a CUDA graph: no host synchronisation, no allocation outside the pool."""

from __future__ import annotations

import pytest
import torch

from hrkernels import ops

pytestmark = pytest.mark.gpu


def _op_calls(x: torch.Tensor, starts: torch.Tensor, sigma: torch.Tensor):
    views = ops.gather_windows(x, starts, 16, torch.channels_last)
    return [
        views,
        ops.scatter_windows_mean(views, starts, x.shape[2:]),
        ops.scatter_dilated(ops.gather_dilated(x, 2), 2),
        ops.gaussian_blur2d(x, sigma, 5),
        ops.frequency_fusion(x, x * 2, 1.0, 3),
        ops.match_stats(x, 0.5, 2.0, (2, 2)),
    ]


def test_ops_are_cuda_graph_capturable():
    x = torch.randn(2, 8, 48, 40, device="cuda", dtype=torch.float16)
    starts = ops.window_grid(48, 40, 16, 8, 4, generator=torch.Generator("cuda").manual_seed(0),
                             device="cuda")
    sigma = torch.tensor(0.8, device="cuda")
    eager = _op_calls(x, starts, sigma)  # also compiles the kernels
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _op_calls(x, starts, sigma)
    graph.replay()
    torch.cuda.synchronize()
    for expected, actual in zip(eager, captured, strict=True):
        assert torch.equal(actual, expected)

"""Bad and edge input to the ops (issue 20): huge blur kernels cost what the map needs, tensor
arguments are checked where reading them costs no device sync, and the ops say they have no
backward."""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch.nn.functional as F

from hrkernels import ops
from hrkernels.ops.blur import reference as blur_reference
from hrkernels.ops.blur.op import MAX_KERNEL_SIZE


def full_kernel_blur(x: torch.Tensor, sigma: float, kernel_size: int,
                     feature_blur: bool = False) -> torch.Tensor:
    """The blur with every tap of the kernel (zero padding), as the reference computed it before
    taps beyond the map were dropped."""
    weights = blur_reference.gaussian_kernel1d(sigma, kernel_size)
    channels, pad = x.shape[1], kernel_size // 2
    out = F.conv2d(x, weights.view(1, 1, 1, -1).expand(channels, 1, 1, -1), padding=(0, pad),
                   groups=channels)
    out = F.conv2d(out, weights.view(1, 1, -1, 1).expand(channels, 1, -1, 1), padding=(pad, 0),
                   groups=channels)
    if feature_blur:
        padded = F.pad(out, (0, 0, 0, 0, pad, pad))
        out = sum(weights[m] * padded[:, m:m + channels] for m in range(kernel_size))
    return out


def test_a_kernel_larger_than_the_map_gives_the_full_kernels_output(torch_backend):
    x = torch.randn(2, 3, 5, 7)
    torch.testing.assert_close(ops.gaussian_blur2d(x, 10.0), full_kernel_blur(x, 10.0, 61))
    local = torch.randn(2, 3, 5, 7)
    expected = x + full_kernel_blur(local - x, 10.0, 61, feature_blur=True)
    torch.testing.assert_close(ops.frequency_fusion(x, local, 10.0, 61, feature_blur=True),
                               expected)


def test_a_huge_sigma_costs_what_the_map_needs():
    x = torch.randn(1, 4, 64, 64)
    started = time.perf_counter()
    out = ops.gaussian_blur2d(x, 1e6)  # a 6,000,001-tap kernel
    assert time.perf_counter() - started < 5 and torch.isfinite(out).all()


@pytest.mark.parametrize("call, message", [
    (lambda x: ops.gaussian_blur2d(x, 1e9), "sigma must be <= "),
    (lambda x: ops.gaussian_blur2d(x, 1.0, MAX_KERNEL_SIZE + 2), "kernel_size must be odd"),
])
def test_kernels_beyond_exact_fp32_offsets_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call(torch.randn(1, 1, 4, 4))


@pytest.mark.parametrize("sigma", [0.0, -1.0])
def test_a_cpu_sigma_tensor_is_checked(sigma):
    x = torch.randn(1, 2, 8, 8)
    with pytest.raises(ValueError, match=f"sigma must be > 0; got {sigma}"):
        ops.gaussian_blur2d(x, torch.tensor(sigma), kernel_size=3)
    with pytest.raises(ValueError, match="sigma must be > 0"):
        ops.frequency_fusion(x, x.clone(), torch.tensor(sigma), 3)


def test_a_cpu_std_tensor_of_match_stats_is_checked():
    x = torch.randn(2, 4, 8, 8)
    with pytest.raises(ValueError, match=r"std must be >= 0; got \[1.0, -1.0\]"):
        ops.match_stats(x, 0.0, torch.tensor([1.0, -1.0]))
    ops.match_stats(x, torch.tensor(0.5), torch.tensor([1.0, 0.0]))  # std 0 is allowed
    # NaN targets flow through as NaN inputs do (a sampler reports them with stage and step).
    assert ops.match_stats(x, torch.tensor(math.nan), 1.0).isnan().all()


def test_the_ops_run_under_grad_mode_and_refuse_a_backward():
    x = torch.randn(1, 2, 8, 8, requires_grad=True)
    out = ops.gaussian_blur2d(x, 1.0)  # a forward works (a patched UNet's weights need grad)
    with pytest.raises(RuntimeError, match="gaussian_blur2d is inference-only: it has no backward"):
        out.sum().backward()
    weight = torch.randn(2, 2, 3, 3, requires_grad=True)
    with pytest.raises(RuntimeError, match="dilated_conv2d is inference-only"):
        ops.dilated_conv2d(x.detach(), weight, dilation=1.5).sum().backward()


@pytest.mark.parametrize("height, width, window, stride", [
    (1, 1, 4, 2), (17, 5, 16, 8), (100, 257, (64, 32), (8, 3)), (128, 128, 128, 64)])
def test_window_count_is_the_grids_length(height, width, window, stride):
    count = ops.window_count(height, width, window, stride)
    assert count == ops.window_grid(height, width, window, stride).shape[0]

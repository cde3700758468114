"""``hrkernels.bench.tuning``: plans and runs under a plan give the ops' results (Triton through the
interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, make_layout

from hrkernels import ops
from hrkernels.bench import tuning
from hrkernels.ops import BackendUnavailableError

pytestmark = pytest.mark.usefixtures("triton_backend")


def random_map(shape, device, layout="contiguous", seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator) * 2 + 0.5
    return make_layout(x.to(device=device, dtype=dtype), layout)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("kernel_size", [3, 5])
def test_run_gaussian_blur2d_is_the_op(device, layout, kernel_size):
    x = random_map((1, 4, 7, 5), device, layout)
    expected = ops.gaussian_blur2d(x, 1.1, kernel_size)
    assert torch.equal(tuning.run_gaussian_blur2d(x, 1.1, kernel_size), expected)
    plan = tuning.blur_plan(x, kernel_size)
    assert torch.equal(tuning.run_gaussian_blur2d(x, 1.1, kernel_size, plan=plan), expected)
    other = tuning.blur_plan(x, kernel_size, per_thread=1, unroll=2, iterations=4)
    assert other != plan
    assert_close(tuning.run_gaussian_blur2d(x, 1.1, kernel_size, plan=other), expected)


@pytest.mark.parametrize("feature_blur", [False, True])
def test_run_frequency_fusion_is_the_op(device, feature_blur):
    a = random_map((1, 8, 6, 5), device, "channels_last", dtype=torch.float16)
    b = random_map((1, 8, 6, 5), device, "channels_last", seed=1, dtype=torch.float16)
    expected = ops.frequency_fusion(a, b, 1.0, 5, feature_blur)
    assert torch.equal(tuning.run_frequency_fusion(a, b, 1.0, 5, feature_blur), expected)
    columns = tuning.blur_plan(a, 5, fusion=True, tile_w=3, per_thread=2, unroll=2)
    if not feature_blur:  # the columns kernel has no channel blur: the rows kernel runs it
        assert columns.columns
    plan = tuning.blur_plan(a, 5, fusion=True, feature_blur=feature_blur, tile_w=3,
                            per_thread=2, unroll=2)
    assert_close(tuning.run_frequency_fusion(a, b, 1.0, 5, feature_blur, plan=plan), expected)


def test_default_blur_knobs_are_the_plan_without_knobs(device):
    x = random_map((1, 8, 6, 5), device, "channels_last")
    for fusion in (False, True):
        knobs = tuning.default_blur_knobs(x, 7, fusion=fusion)
        assert set(knobs) <= set(tuning.BLUR_KNOBS)
        assert tuning.blur_plan(x, 7, fusion=fusion, **knobs) == tuning.blur_plan(x, 7,
                                                                                 fusion=fusion)


@pytest.mark.parametrize("factor, per_channel", [((1, 1), False), ((2, 2), False), (2, True)])
def test_run_match_stats_is_the_op(device, factor, per_channel):
    x = random_map((2, 3, 8, 6), device, "channels_last")
    mean = torch.tensor(0.2, device=device)
    expected = ops.match_stats(x, mean, 1.5, factor, per_channel)
    assert torch.equal(tuning.run_match_stats(x, mean, 1.5, factor, per_channel), expected)
    plan = tuning.match_stats_plan(x, factor, per_channel=per_channel)
    assert torch.equal(tuning.run_match_stats(x, mean, 1.5, factor, per_channel, plan=plan),
                       expected)
    other = tuning.match_stats_plan(x, factor, per_channel=per_channel, programs_per_sm=1,
                                    unroll_stats=4, unroll_normalize=2)
    assert_close(tuning.run_match_stats(x, mean, 1.5, factor, per_channel, plan=other), expected)


def test_bad_arguments():
    x = torch.randn(1, 2, 4, 4)
    with pytest.raises(TypeError, match="unknown knobs \\['rows'\\]"):
        tuning.blur_plan(x, 3, rows=4)
    with pytest.raises(TypeError, match="unknown knobs"):
        tuning.match_stats_plan(x, per_thread=2)
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        tuning.blur_plan(x, 4)
    with pytest.raises(ValueError, match="kernel_size must be an int >= 1 and <= 15"):
        tuning.default_blur_knobs(x, 17)
    with pytest.raises(TypeError, match="fusion must be True or False"):
        tuning.blur_plan(x, 3, fusion=1)
    with pytest.raises(TypeError, match="plan must be a BlurPlan or None"):
        tuning.run_gaussian_blur2d(x, 1.0, 3, plan=tuning.match_stats_plan(x))
    with pytest.raises(TypeError, match="plan must be a MatchStatsPlan or None"):
        tuning.run_match_stats(x, 0.0, 1.0, plan=tuning.blur_plan(x, 3))
    with pytest.raises(ValueError, match="Triton kernel does not cover"):
        tuning.run_gaussian_blur2d(x, 3.0, 17)
    with pytest.raises(ValueError, match="divisible by factor"):  # the op's own checks
        tuning.run_match_stats(x, 0.0, 1.0, 3)


def test_runs_need_the_triton_kernels(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="gaussian_blur2d's Triton kernel"):
        tuning.run_gaussian_blur2d(torch.randn(1, 2, 4, 4), 1.0, 3)

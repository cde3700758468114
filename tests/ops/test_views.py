"""The ``views`` ops against their references: Triton (interpreter on CPU) and the PyTorch path."""

from __future__ import annotations

import pytest
import torch
from conftest import DTYPES, LAYOUTS, assert_close, make_layout

from hrkernels.ops import (
    gather_dilated,
    gather_windows,
    scatter_dilated,
    scatter_windows_mean,
    use_backend,
    window_grid,
)
from hrkernels.ops.views import reference

pytestmark = pytest.mark.usefixtures("triton_backend")


def random_map(shape, dtype, device, layout="contiguous", seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
    return make_layout(x, layout)


# --------------------------------------------------------------------------------------------------
# window_grid
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "length, window, stride, expected",
    [
        (256, 128, 64, [0, 64, 128]),
        (200, 128, 64, [0, 64, 72]),
        (128, 128, 64, [0]),
        (100, 128, 64, [0]),
        (17, 8, 5, [0, 5, 9]),
        (9, 4, 4, [0, 4, 5]),
    ],
)
def test_window_grid_axis(length, window, stride, expected):
    starts = window_grid(length, 3, (window, 3), (stride, 1))
    assert starts.dtype == torch.int64
    assert starts[:, 0].tolist() == expected
    assert starts[:, 1].tolist() == [0] * len(expected)


def test_window_grid_row_major():
    starts = window_grid(20, 30, (10, 12), (5, 9))
    tops, lefts = [0, 5, 10], [0, 9, 18]
    assert starts.tolist() == [[t, s] for t in tops for s in lefts]


@pytest.mark.parametrize("seed", range(4))
def test_window_grid_jitter_bounds_and_coverage(seed):
    height, width, window, stride, jitter = 96, 80, 32, 16, 4
    base = window_grid(height, width, window, stride)
    moved = window_grid(height, width, window, stride, jitter,
                        generator=torch.Generator().manual_seed(seed))
    shift = moved - base
    assert shift.abs().max() <= jitter
    limits = torch.tensor([height - window, width - window])
    assert (shift[base == 0] <= 0).all(), "a window at the start border may only move outward"
    assert (shift[base == limits] >= 0).all(), "a window at the end border may only move outward"
    covered = torch.zeros(height, width, dtype=torch.bool)
    for top, left in moved.tolist():
        covered[max(top, 0):top + window, max(left, 0):left + window] = True
    assert covered.all()


def test_window_grid_jitter_is_uniform_and_seeded():
    grid = lambda seed: window_grid(64, 64, 16, 8, 2, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(grid(3), grid(3))
    assert not torch.equal(grid(3), grid(4))
    base = window_grid(64, 64, 16, 8)
    interior = (base > 0) & (base < 48)
    shifts = torch.cat([(grid(seed) - base)[interior] for seed in range(200)])
    counts = torch.bincount(shifts + 2, minlength=5).float()
    assert counts.min() > 0.8 * counts.mean(), counts  # all of -2..2, about equally often


def test_window_grid_device_follows_generator():
    starts = window_grid(64, 64, 16, 8, 2, generator=torch.Generator().manual_seed(0))
    assert starts.device.type == "cpu"


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"window": 0}, ValueError),
        ({"window": (8, 8, 8)}, TypeError),
        ({"window": 8.0}, TypeError),
        ({"stride": -1}, ValueError),
        ({"jitter": -1}, ValueError),
        ({"jitter": 1.5}, ValueError),
    ],
)
def test_window_grid_bad_input(kwargs, error):
    arguments = {"height": 32, "width": 32, "window": 8, "stride": 4, **kwargs}
    with pytest.raises(error):
        window_grid(**arguments)


# --------------------------------------------------------------------------------------------------
# gather_windows
# --------------------------------------------------------------------------------------------------

WINDOW_CASES = [
    # shape, window, starts (some outside the map)
    ((1, 1, 5, 7), (3, 4), [[0, 0], [2, 3], [-2, -3], [4, 6]]),
    ((2, 3, 9, 11), 4, [[0, 0], [0, 7], [5, 0], [5, 7], [-1, 9], [8, -4]]),
    ((2, 5, 12, 10), (5, 3), [[-5, -3], [12, 10], [3, 4]]),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape, window, starts", WINDOW_CASES)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_gather_windows_matches_reference(device, dtype, layout, shape, window, starts,
                                          memory_format):
    x = random_map(shape, dtype, device, layout)
    starts = torch.tensor(starts, device=device)
    out = gather_windows(x, starts, window, memory_format=memory_format)
    window = window if isinstance(window, tuple) else (window, window)
    expected = reference.gather_windows(x, starts, window, torch.contiguous_format)
    assert out.shape == (starts.shape[0] * shape[0], shape[1], *window)
    assert out.is_contiguous(memory_format=memory_format)
    assert torch.equal(out, expected)  # a copy: bitwise


def test_gather_windows_definition(device):
    x = random_map((2, 3, 6, 6), torch.float32, device)
    starts = torch.tensor([[1, 2], [-1, 4]], device=device)
    out = gather_windows(x, starts, (3, 3))
    assert torch.equal(out[0:2], x[:, :, 1:4, 2:5])
    assert torch.equal(out[2:4, :, 1:, :2], x[:, :, 0:2, 4:6])
    assert (out[2:4, :, 0] == 0).all() and (out[2:4, :, :, 2] == 0).all()


def test_gather_windows_int32_starts(device):
    x = random_map((1, 2, 8, 8), torch.float32, device)
    starts = torch.tensor([[1, -1], [4, 5]], device=device)
    assert torch.equal(gather_windows(x, starts.int(), 4), gather_windows(x, starts, 4))


# --------------------------------------------------------------------------------------------------
# scatter_windows_mean
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape, window, starts", WINDOW_CASES)
@pytest.mark.parametrize("weighted", [False, True])
def test_scatter_windows_mean_matches_reference(device, dtype, layout, shape, window, starts,
                                                weighted):
    window = window if isinstance(window, tuple) else (window, window)
    count = len(starts)
    views = random_map((count * shape[0], shape[1], *window), dtype, device, layout, seed=1)
    starts = torch.tensor(starts, device=device)
    weights = torch.rand(count, device=device) + 0.1 if weighted else None
    out = scatter_windows_mean(views, starts, shape[2:], weights)
    expected = reference.scatter_windows_mean(views, starts, shape[2:], weights,
                                              torch.contiguous_format)
    assert out.shape == shape
    assert_close(out, expected)


def test_scatter_windows_mean_inverts_gather_on_a_covering_grid(device):
    x = random_map((2, 3, 13, 17), torch.float32, device)
    starts = window_grid(13, 17, 6, 4, device=device)
    views = gather_windows(x, starts, 6)
    assert_close(scatter_windows_mean(views, starts, (13, 17)), x)


def test_scatter_windows_mean_zero_where_uncovered(device):
    views = random_map((2, 2, 3, 3), torch.float32, device)
    starts = torch.tensor([[0, 0], [4, 4]], device=device)
    out = scatter_windows_mean(views, starts, (8, 8))
    assert (out[:, :, 3:4, :] == 0).all() and (out[:, :, :, 3] == 0).all()
    assert torch.equal(out[:, :, :3, :3], views[0:1])


def test_scatter_windows_mean_is_deterministic(device):
    starts = window_grid(20, 20, 8, 3, 1, generator=torch.Generator().manual_seed(0), device=device)
    views = random_map((starts.shape[0], 4, 8, 8), torch.float16, device)
    first = scatter_windows_mean(views, starts, 20)
    for _ in range(3):
        assert torch.equal(scatter_windows_mean(views, starts, 20), first)


def test_scatter_windows_mean_keeps_channels_last(device):
    views = random_map((4, 3, 4, 4), torch.float32, device, "channels_last")
    starts = torch.tensor([[0, 0], [0, 2], [2, 0], [2, 2]], device=device)
    out = scatter_windows_mean(views, starts, 6)
    assert out.is_contiguous(memory_format=torch.channels_last)


# --------------------------------------------------------------------------------------------------
# gather_dilated / scatter_dilated
# --------------------------------------------------------------------------------------------------

DILATED_CASES = [((1, 1, 4, 4), (2, 2)), ((2, 3, 6, 9), (3, 3)), ((2, 5, 8, 6), (4, 1)),
                 ((1, 2, 5, 7), (1, 1)), ((3, 4, 6, 10), (2, 5))]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape, factor", DILATED_CASES)
def test_gather_dilated_matches_reference_and_definition(device, dtype, layout, shape, factor):
    x = random_map(shape, dtype, device, layout)
    views = gather_dilated(x, factor)
    sh, sw = factor
    batch = shape[0]
    assert views.shape == (sh * sw * batch, shape[1], shape[2] // sh, shape[3] // sw)
    assert torch.equal(views, reference.gather_dilated(x, factor, torch.contiguous_format))
    for k in range(sh * sw):
        assert torch.equal(views[k * batch:(k + 1) * batch], x[:, :, k // sw::sh, k % sw::sw])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape, factor", DILATED_CASES)
def test_scatter_dilated_inverts_gather(device, dtype, layout, shape, factor):
    x = random_map(shape, dtype, device)
    views = make_layout(reference.gather_dilated(x, factor, torch.contiguous_format), layout)
    full = scatter_dilated(views, factor)
    assert torch.equal(full, x)
    assert torch.equal(full, reference.scatter_dilated(views, factor, torch.contiguous_format))


def test_dilated_ops_keep_channels_last(device):
    x = random_map((2, 3, 4, 6), torch.float32, device, "channels_last")
    views = gather_dilated(x, 2)
    assert views.is_contiguous(memory_format=torch.channels_last)
    assert scatter_dilated(views, 2).is_contiguous(memory_format=torch.channels_last)


# --------------------------------------------------------------------------------------------------
# bad input, dispatch, registration
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda x, s: gather_windows(x[0], s, 4), ValueError, "4-D"),
        (lambda x, s: gather_windows(x, s[0], 4), ValueError, r"\[N, 2\]"),
        (lambda x, s: gather_windows(x, s.float(), 4), TypeError, "int64"),
        (lambda x, s: gather_windows(x, s, 9), ValueError, "larger"),
        (lambda x, s: gather_windows(x, s, (2, 0)), ValueError, "window"),
        (lambda x, s: gather_windows(x[:, :, :0], s, 2), ValueError, "empty"),
        (lambda x, s: gather_windows(x.int(), s, 2), TypeError, "float"),
        (lambda x, s: gather_windows(x, s, 2, memory_format=torch.preserve_format), ValueError,
         "memory_format"),
        (lambda x, s: scatter_windows_mean(x.repeat(2, 1, 1, 1)[:3], s, 8), ValueError, "N\\*B"),
        (lambda x, s: scatter_windows_mean(x, s, 8, weights=torch.ones(3)), ValueError, r"\[N\]"),
        (lambda x, s: scatter_windows_mean(x, s, 8, weights=torch.ones(2, dtype=torch.long)),
         TypeError, "float"),
        (lambda x, s: gather_dilated(x, 3), ValueError, "divisible"),
        (lambda x, s: gather_dilated(x, 1.5), TypeError, "factor"),
        (lambda x, s: gather_dilated(x, (2, 2, 2)), TypeError, "factor"),
        (lambda x, s: scatter_dilated(x, 4), ValueError, "multiple"),
    ],
)
def test_bad_input(call, error, message):
    x = torch.randn(2, 3, 8, 8)
    starts = torch.tensor([[0, 0], [4, 4]])
    with pytest.raises(error, match=message):
        call(x, starts)


def test_torch_backend_matches_triton(device):
    x = random_map((2, 3, 8, 10), torch.float32, device, "channels_last")
    starts = window_grid(8, 10, 4, 3, device=device)
    results = []
    for backend in ("torch", "triton"):
        with use_backend(backend):
            views = gather_windows(x, starts, 4)
            results.append((views, scatter_windows_mean(views, starts, (8, 10)),
                            gather_dilated(x, 2), scatter_dilated(gather_dilated(x, 2), 2)))
    for ours, theirs in zip(*results, strict=True):
        assert_close(ours, theirs)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck(device, backend):
    x = random_map((2, 3, 6, 8), torch.float32, device)
    starts = torch.tensor([[0, 0], [2, 4], [-1, 5]], device=device)
    views = gather_windows(x, starts, 4)
    with use_backend(backend):
        for op, args in [
            (torch.ops.hrkernels.gather_windows.default, (x, starts, 4, 4, True)),
            (torch.ops.hrkernels.scatter_windows_mean.default, (views, starts, 6, 8, None, False)),
            (torch.ops.hrkernels.gather_dilated.default, (x, 2, 2)),
            (torch.ops.hrkernels.scatter_dilated.default, (gather_dilated(x, 2), 2, 2)),
        ]:
            torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_compiles_without_graph_break(device):
    def roundtrip(x, starts):
        views = gather_windows(x, starts, 4, memory_format=torch.channels_last)
        fused = scatter_windows_mean(views * 2, starts, x.shape[2:])
        return scatter_dilated(gather_dilated(fused, 2), 2)

    x = random_map((1, 3, 8, 8), torch.float32, device)
    starts = window_grid(8, 8, 4, 2, device=device)
    compiled = torch.compile(roundtrip, fullgraph=True, backend="aot_eager")
    assert_close(compiled(x, starts), roundtrip(x, starts))


@pytest.mark.parametrize("weighted", [False, True])
def test_indexed_reference_matches_the_loop(weighted):
    views = torch.randn(10, 3, 6, 7)
    starts = torch.tensor([[0, 0], [-2, 3], [5, 9], [9, 12], [20, 20]])
    weights = torch.rand(5) if weighted else None
    loop = reference.scatter_windows_mean(views, starts, (13, 17), weights, torch.contiguous_format)
    indexed = reference.scatter_windows_mean_indexed(views, starts, (13, 17), weights,
                                                     torch.contiguous_format)
    assert torch.equal(loop, indexed)  # same fp32 sums in the same order on CPU

"""``match_stats`` against its reference: Triton (interpreter on CPU) and the PyTorch path."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DTYPES, LAYOUTS, assert_close, make_layout

from hrkernels.ops import match_stats, use_backend
from hrkernels.ops.stats import op as stats_op
from hrkernels.ops.stats import reference

pytestmark = pytest.mark.usefixtures("triton_backend")


@pytest.fixture(autouse=True, params=["two passes", "fused"])
def launch_path(request, monkeypatch):
    """Every test runs through both Triton paths: two launches (large maps) and the one-launch
    kernel (small maps; every test map is small enough for it)."""
    if request.param == "two passes":
        monkeypatch.setattr(stats_op, "FUSED_ELEMENTS", 0)
    stats_op._plan.cache_clear()
    yield request.param
    stats_op._plan.cache_clear()


def random_map(shape, dtype, device, layout="contiguous", seed=0, scale=3.0, offset=1.0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator) * scale + offset
    return make_layout(x.to(device=device, dtype=dtype), layout)


def expected(x, mean, std, factor, per_channel):
    """The reference, with the targets broadcast the way the public op broadcasts them."""
    shape = x.shape[:2] if per_channel else x.shape[:1]
    if isinstance(mean, torch.Tensor):
        mean = torch.broadcast_to(mean, shape)
    if isinstance(std, torch.Tensor):
        std = torch.broadcast_to(std, shape)
    return reference.match_stats(x, mean, std, factor, per_channel, torch.contiguous_format)


def lattices(x, factor):
    """``[B, C, H, W]`` -> fp64 ``[sh*sw*B, C, H/sh, W/sw]``, sub-lattice ``k = ki*sw + kj``
    outermost (the order of ``gather_dilated``)."""
    batch, channels, height, width = x.shape
    sh, sw = factor
    view = x.double().reshape(batch, channels, height // sh, sh, width // sw, sw)
    return view.permute(3, 5, 0, 1, 2, 4).reshape(sh * sw * batch, channels, height // sh, -1)


def lattice_stats(out, factor, per_channel):
    """fp64 mean and std (correction 1) of every sub-lattice: [sh*sw*B] or [sh*sw*B, C]."""
    views = lattices(out, factor)
    dims = (2, 3) if per_channel else (1, 2, 3)
    std, mean = torch.std_mean(views, dim=dims)
    return mean, std


# shape, factor, per_channel: sub-lattices of many elements, odd sizes, factor 1, sh != sw.
STATS_CASES = [
    ((2, 3, 8, 8), (2, 2), False),
    ((2, 3, 8, 12), (2, 3), True),
    ((1, 5, 6, 6), (1, 1), False),
    ((1, 4, 4, 4), (4, 4), False),
    ((1, 6, 9, 5), (3, 1), True),
    ((2, 2, 4, 10), (1, 5), False),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape, factor, per_channel", STATS_CASES)
def test_match_stats_matches_reference(device, dtype, layout, shape, factor, per_channel):
    x = random_map(shape, dtype, device, layout)
    batch, channels = shape[:2]
    mean = torch.randn(batch, channels, device=device) if per_channel else -0.5
    std = torch.rand(batch, 1, device=device) + 0.5 if per_channel else 1.7
    out = match_stats(x, mean, std, factor, per_channel)
    assert out.shape == shape and out.dtype == dtype
    assert_close(out, expected(x, mean, std, factor, per_channel), scale=2)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("factor", [(1, 1), (2, 2), (2, 1)])
def test_match_stats_reaches_the_targets(device, factor, per_channel):
    x = random_map((2, 3, 8, 6), torch.float32, device, "channels_last", scale=5.0, offset=-3.0)
    shape = (2, 3) if per_channel else (2,)
    mean = torch.randn(shape, device=device)
    std = torch.rand(shape, device=device) + 0.2
    out = match_stats(x, mean, std, factor, per_channel)
    lattice_mean, lattice_std = lattice_stats(out, factor, per_channel)
    count = factor[0] * factor[1]
    torch.testing.assert_close(lattice_mean, mean.double().repeat(count, *[1] * (len(shape) - 1)),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lattice_std, std.double().repeat(count, *[1] * (len(shape) - 1)),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize(
    "shape, factor, layout",
    [((1, 3, 5, 300), (1, 1), "contiguous"),  # two column blocks (256 + 44) per row
     ((1, 160, 5, 3), (1, 1), "channels_last"),  # two channel blocks (128 + 32)
     ((2, 160, 6, 4), (2, 2), "channels_last")],
)
def test_sub_lattices_of_several_blocks(device, shape, factor, layout, per_channel):
    """Rows wider than one tile: every program walks several column or channel blocks."""
    x = random_map(shape, torch.float32, device, layout)
    batch, channels = shape[:2]
    mean = torch.randn(batch, channels, device=device) if per_channel else 0.3
    out = match_stats(x, mean, 1.2, factor, per_channel)
    assert_close(out, expected(x, mean, 1.2, factor, per_channel), scale=2)


@pytest.mark.parametrize(
    "shape, factor, per_channel",
    [((2, 3, 2, 2), (2, 2), True), ((1, 1, 2, 4), (2, 4), False), ((2, 1, 3, 3), (3, 3), False)],
)
def test_one_element_sub_lattices_become_the_mean(device, shape, factor, per_channel):
    """A sub-lattice of one element has no (unbiased) spread: it becomes the target mean."""
    x = random_map(shape, torch.float32, device)
    mean = torch.randn(shape[:2] if per_channel else shape[:1], device=device)
    out = match_stats(x, mean, 2.0, factor, per_channel)
    target = mean[:, :, None, None] if per_channel else mean[:, None, None, None]
    assert torch.equal(out, target.expand(shape))
    assert torch.equal(expected(x, mean, 2.0, factor, per_channel), out)


@pytest.mark.parametrize("dtype", DTYPES)
def test_constant_sub_lattices_become_the_mean(device, dtype):
    x = random_map((2, 3, 6, 4), dtype, device)
    x[:, :, 0::2, 1::2] = 0.1  # sub-lattice k = 1 is constant (0.1 is inexact in binary)
    out = match_stats(x, 0.25, 3.0, (2, 2))
    assert (out[:, :, 0::2, 1::2] == torch.tensor(0.25, dtype=dtype)).all()
    assert_close(out, expected(x, 0.25, 3.0, (2, 2), False), scale=2)


def test_nan_sub_lattice_becomes_the_mean_and_stays_local(device):
    x = random_map((1, 2, 4, 4), torch.float32, device)
    x[0, 1, 2, 2] = math.nan  # in sub-lattice (0, 0) of factor 2
    out = match_stats(x, 0.5, 1.0, (2, 2))
    assert (out[:, :, 0::2, 0::2] == 0.5).all()
    assert_close(out, expected(x, 0.5, 1.0, (2, 2), False))
    assert not out.isnan().any()


def test_statistics_are_stable_for_large_offsets(device):
    """A mean 1e4 times the spread: sum-of-squares statistics would lose every digit."""
    x = random_map((2, 4, 8, 8), torch.float32, device, scale=1.0, offset=1e4)
    out = match_stats(x, 0.0, 1.0, (2, 2))
    views = lattices(x, (2, 2))
    std, mean = torch.std_mean(views, dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(lattices(out, (2, 2)), (views - mean) / std, atol=5e-3, rtol=0)


@pytest.mark.parametrize(
    "shape, factor, per_channel, fused",
    [((1, 4, 512, 512), (4, 4), False, True),  # a latent: 65536-element groups, one launch
     ((1, 4, 512, 512), (4, 4), True, True),
     ((1, 4, 512, 512), (1, 1), False, False),  # one group of 2^20 elements: two passes
     ((8, 64, 512, 512), (1, 1), False, False)],
)
def test_small_maps_take_one_launch(launch_path, shape, factor, per_channel, fused):
    if launch_path != "fused":
        pytest.skip("the choice is made with the real limits")
    assert stats_op._plan(shape, False, *factor, per_channel, torch.device("cpu")).fused == fused


def test_match_stats_is_deterministic(device):
    # Several chunks per sub-lattice, so the merge of partials is exercised.
    x = random_map((1, 3, 32, 16), torch.float16, device)
    first = match_stats(x, 0.1, 0.9, (2, 2))
    for _ in range(2):
        assert torch.equal(match_stats(x, 0.1, 0.9, (2, 2)), first)


@pytest.mark.parametrize("per_channel", [False, True])
def test_target_forms(device, per_channel):
    """Floats, 0-d tensors, broadcastable and full-shape tensors (any float dtype) agree."""
    x = random_map((2, 3, 4, 6), torch.float32, device, "channels_last")
    full = (2, 3) if per_channel else (2,)
    reference_out = match_stats(x, 0.25, 1.5, (2, 2), per_channel)  # exact in fp16 too
    for mean, std in [
        (torch.tensor(0.25, device=device), torch.tensor(1.5, dtype=torch.float64, device=device)),
        (torch.full(full, 0.25, device=device), torch.full(full, 1.5, device=device)),
        (torch.full((1,), 0.25, dtype=torch.float16, device=device), 1.5),
    ]:
        assert_close(match_stats(x, mean, std, (2, 2), per_channel), reference_out)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda x: match_stats(x[0], 0.0, 1.0), ValueError, "4-D"),
        (lambda x: match_stats(x.int(), 0.0, 1.0), TypeError, "float"),
        (lambda x: match_stats(x, 0.0, 1.0, 3), ValueError, "divisible"),
        (lambda x: match_stats(x, 0.0, 1.0, (2, 0)), ValueError, "factor"),
        (lambda x: match_stats(x, 0.0, 1.0, 1.5), TypeError, "factor"),
        (lambda x: match_stats(x, "0", 1.0), TypeError, "mean"),
        (lambda x: match_stats(x, 0.0, None), TypeError, "std"),
        (lambda x: match_stats(x, math.nan, 1.0), ValueError, "mean.*finite"),
        (lambda x: match_stats(x, 0.0, -1.0), ValueError, "std"),
        (lambda x: match_stats(x, 0.0, math.inf), ValueError, "std.*finite"),
        (lambda x: match_stats(x, torch.zeros(2, dtype=torch.long), 1.0), TypeError, "mean"),
        (lambda x: match_stats(x, torch.zeros(3), 1.0), ValueError, r"mean.*\[B\]"),
        (lambda x: match_stats(x, torch.zeros(2, 3), 1.0), ValueError, r"mean.*\[B\]"),
        (lambda x: match_stats(x, 0.0, torch.ones(3, 2), per_channel=True), ValueError,
         r"std.*\[B, C\]"),
        (lambda x: match_stats(x, torch.zeros(2, device="meta"), 1.0), ValueError, "mean"),
        (lambda x: match_stats(x, 0.0, 1.0, per_channel=1), TypeError, "per_channel"),
    ],
)
def test_bad_input(call, error, message):
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(error, match=message):
        call(x)


def test_torch_backend_matches_triton(device):
    x = random_map((2, 4, 6, 8), torch.float32, device, "channels_last")
    mean = torch.randn(2, 4, device=device)
    results = []
    for backend in ("torch", "triton"):
        with use_backend(backend):
            results.append((match_stats(x, mean, 2.0, (2, 2), per_channel=True),
                            match_stats(x, 0.0, 1.0)))
    for ours, theirs in zip(*results, strict=True):
        assert_close(ours, theirs, scale=2)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck(device, backend):
    x = random_map((2, 3, 4, 6), torch.float32, device, "channels_last")
    mean = torch.randn(2, 3, device=device)
    std = torch.rand(2, device=device) + 0.5
    with use_backend(backend):
        for args in [
            (x, 0.5, None, 2.0, None, 1, 1, False),
            (x, 0.0, std, 0.0, std, 2, 3, False),
            (x, 0.0, mean, 1.0, None, 2, 2, True),
        ]:
            torch.library.opcheck(torch.ops.hrkernels.match_stats.default, args,
                                  test_utils=("test_schema", "test_faketensor"))


def test_compiles_without_graph_break(device):
    def renormalise(x, reference_latent):
        return match_stats(x * 2, reference_latent.mean(), reference_latent.std(), (2, 2)) + 1

    x = random_map((1, 4, 8, 8), torch.float32, device)
    reference_latent = random_map((1, 4, 4, 4), torch.float32, device, seed=1)
    compiled = torch.compile(renormalise, fullgraph=True, backend="aot_eager")
    assert_close(compiled(x, reference_latent), renormalise(x, reference_latent))


# --------------------------------------------------------------------------------------------------
# GPU: the benchmark shapes
# --------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    "shape, factor, per_channel, layout",
    [((1, 4, 512, 512), (4, 4), False, "contiguous"),
     ((1, 4, 512, 512), (4, 4), True, "contiguous"),
     ((2, 64, 256, 256), (1, 1), False, "contiguous"),
     ((2, 64, 256, 256), (2, 2), True, "strided"),
     ((2, 640, 128, 128), (1, 1), True, "channels_last")],
)
def test_large_shapes_on_gpu(dtype, shape, factor, per_channel, layout):
    x = random_map(shape, dtype, "cuda", layout)
    mean = torch.tensor(0.2, device="cuda")
    std = torch.tensor(0.9, device="cuda")
    out = match_stats(x, mean, std, factor, per_channel)
    assert_close(out, expected(x, mean, std, factor, per_channel), scale=2)
    assert torch.equal(out, match_stats(x, mean, std, factor, per_channel))

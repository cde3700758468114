"""The ``blur`` ops against their references: Triton (interpreter on CPU) and the PyTorch path."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import DTYPES, LAYOUTS, assert_close, make_layout

from hrkernels.ops import frequency_fusion, gaussian_blur2d, gaussian_kernel1d, use_backend
from hrkernels.ops.blur import reference
from hrkernels.ops.blur.op import MAX_TRITON_KERNEL_SIZE

pytestmark = pytest.mark.usefixtures("triton_backend")


def random_map(shape, dtype, device, layout="contiguous", seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
    return make_layout(x, layout)


def blur_2d_definition(x: torch.Tensor, sigma: float, kernel_size: int) -> torch.Tensor:
    """An independent definition: one 2-D convolution with the outer product of the 1-D kernel,
    zero padding, in float64."""
    offsets = torch.arange(kernel_size, dtype=torch.float64) - kernel_size // 2
    g = torch.exp(-offsets**2 / (2 * sigma**2))
    g = g / g.sum()
    channels = x.shape[1]
    weight = torch.outer(g, g).expand(channels, 1, kernel_size, kernel_size)
    return F.conv2d(x.double(), weight.to(x.device), padding=kernel_size // 2, groups=channels)


# --------------------------------------------------------------------------------------------------
# gaussian_kernel1d
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma, kernel_size", [(1.0, 3), (0.8, 7), (2.5, 9), (1e-3, 5), (1e4, 3)])
def test_gaussian_kernel1d(sigma, kernel_size):
    g = gaussian_kernel1d(sigma, kernel_size)
    offsets = torch.arange(kernel_size, dtype=torch.float64) - (kernel_size - 1) / 2
    expected = torch.exp(-offsets**2 / (2 * sigma**2))
    torch.testing.assert_close(g, (expected / expected.sum()).float())
    assert g.dtype == torch.float32 and torch.equal(g, g.flip(0))
    assert_close(g.sum(), torch.tensor(1.0))


def test_gaussian_kernel1d_default_size_and_tensor_sigma():
    assert gaussian_kernel1d(0.8).numel() == 7  # 2 * ceil(2.4) + 1
    assert gaussian_kernel1d(1.0).numel() == 7
    assert gaussian_kernel1d(1.01).numel() == 9
    assert_close(gaussian_kernel1d(torch.tensor(1.3), 5), gaussian_kernel1d(1.3, 5))
    with pytest.raises(ValueError, match="kernel_size is required"):
        gaussian_kernel1d(torch.tensor(1.3))


# --------------------------------------------------------------------------------------------------
# gaussian_blur2d
# --------------------------------------------------------------------------------------------------

# shape, kernel_size, sigma: odd sizes, kernels larger than the map, K = 1 (identity), sigma tiny
# and large (every launch plan of both kernels: test_every_launch_plan_computes_the_same_blur).
BLUR_CASES = [
    ((2, 3, 9, 11), 3, 1.0),
    ((1, 5, 7, 6), 5, 0.8),
    ((1, 4, 5, 13), 7, 2.0),
    ((1, 1, 6, 6), 1, 1.0),
    ((1, 2, 7, 5), 3, 1e-4),
    ((1, 3, 4, 9), 5, 1e4),
]
SLOW_BLUR_CASES = [((1, 2, 5, 4), 9, 1.5), ((1, 2, 4, 4), 15, 3.0)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape, kernel_size, sigma", BLUR_CASES)
def test_gaussian_blur2d_matches_reference(device, dtype, layout, shape, kernel_size, sigma):
    x = random_map(shape, dtype, device, layout)
    out = gaussian_blur2d(x, sigma, kernel_size)
    assert out.shape == x.shape and out.dtype == dtype
    assert_close(out, reference.gaussian_blur2d(x, sigma, kernel_size, torch.contiguous_format))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape, kernel_size, sigma", SLOW_BLUR_CASES)
def test_gaussian_blur2d_large_kernels(device, layout, shape, kernel_size, sigma):
    x = random_map(shape, torch.float32, device, layout)
    out = gaussian_blur2d(x, sigma, kernel_size)
    assert_close(out, reference.gaussian_blur2d(x, sigma, kernel_size, torch.contiguous_format))


# unroll x iterations: strips of 1 to 12 output rows, unroll below, at and above k (k = 1: no halo).
PLAN_CASES = [(1, 2, 3), (3, 1, 3), (3, 6, 2), (5, 3, 3), (7, 4, 2), (7, 9, 2), (9, 4, 3)]


@pytest.mark.parametrize("kernel_size, unroll, iterations", PLAN_CASES)
@pytest.mark.parametrize("fusion", [False, True])
@pytest.mark.parametrize("tile_w", [None, 3, 5])
def test_every_launch_plan_computes_the_same_blur(device, kernel_size, unroll, iterations, fusion,
                                                  tile_w):
    """Either kernel (rows, or register-blocked columns of tile_w), strips of any height (several
    per map, the last one partial), any unroll: the same result."""
    from hrkernels.ops._launch import channels_contiguous
    from hrkernels.ops.blur.op import _blur_triton, _plan

    x = random_map((2, 3, 13, 6), torch.float32, device, "channels_last")
    y = random_map((2, 3, 13, 6), torch.float32, device, "channels_last", seed=1)
    plan = _plan(tuple(x.shape), channels_contiguous(x), x.element_size(), kernel_size, x.device,
                 unroll=unroll, iterations=iterations, tile_w=tile_w)
    assert plan.columns == (tile_w is not None)
    out = _blur_triton(x, y if fusion else None, 1.3, None, kernel_size, False, plan)
    expected = (reference.frequency_fusion(x, y, 1.3, kernel_size, False, torch.contiguous_format)
                if fusion else reference.gaussian_blur2d(x, 1.3, kernel_size,
                                                         torch.contiguous_format))
    assert_close(out, expected)


def test_plan_knobs_given_alone_override_the_defaults(device):
    """The tuned plan of the fusion (64-channel columns programs) takes a block_c or a register
    cap given on their own; block_c never exceeds the tile's channels."""
    from hrkernels.ops.blur.op import _plan

    key = ((2, 640, 16, 16), True, 2, 7, torch.device(device))
    default = _plan(*key, fusion=True)
    assert default.columns and default.block_c == 64 and default.max_registers is None
    given = _plan(*key, fusion=True, block_c=32, max_registers=168)
    assert (given.block_c, given.max_registers, given.block_w) == (32, 168, default.block_w)
    assert _plan(*key, fusion=True, block_c=4096).block_c <= 128


@pytest.mark.parametrize("shape, kernel_size, sigma",
                         [((1, 3, 8, 10), 5, 1.2), ((2, 2, 4, 7), 7, 0.7)])
def test_gaussian_blur2d_definition(device, shape, kernel_size, sigma):
    """Kernel and reference both equal one zero-padded 2-D convolution with g g^T."""
    x = random_map(shape, torch.float32, device)
    expected = blur_2d_definition(x, sigma, kernel_size)
    assert_close(gaussian_blur2d(x, sigma, kernel_size), expected)
    assert_close(reference.gaussian_blur2d(x, sigma, kernel_size, torch.contiguous_format),
                 expected)


def test_gaussian_blur2d_limits(device):
    x = random_map((1, 2, 6, 7), torch.float32, device)
    assert torch.equal(gaussian_blur2d(x, 1e-4, 5), x)  # the taps off the centre are exactly 0
    assert torch.equal(gaussian_blur2d(x, 3.0, 1), x)
    box = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=True)  # zero padding
    assert_close(gaussian_blur2d(x, 1e6, 3), box)


def test_gaussian_blur2d_default_kernel_size(device):
    x = random_map((1, 2, 9, 9), torch.float32, device)
    assert_close(gaussian_blur2d(x, 0.6), gaussian_blur2d(x, 0.6, 5))  # 2 * ceil(1.8) + 1


def test_gaussian_blur2d_tensor_sigma(device):
    x = random_map((2, 3, 6, 8), torch.float16, device, "channels_last")
    sigma = torch.tensor(0.9, device=device)
    assert torch.equal(gaussian_blur2d(x, sigma, 5), gaussian_blur2d(x, 0.9, 5))
    double = torch.tensor(0.9, dtype=torch.float64, device=device)
    assert torch.equal(gaussian_blur2d(x, double, 5), gaussian_blur2d(x, 0.9, 5))


def test_gaussian_blur2d_keeps_channels_last(device):
    x = random_map((1, 4, 5, 6), torch.float32, device, "channels_last")
    assert gaussian_blur2d(x, 1.0, 3).is_contiguous(memory_format=torch.channels_last)
    x = random_map((1, 4, 5, 6), torch.float32, device, "strided")
    assert gaussian_blur2d(x, 1.0, 3).is_contiguous()


def test_kernels_above_the_triton_limit_run_the_reference(device):
    x = random_map((1, 2, 6, 5), torch.float32, device)
    size = MAX_TRITON_KERNEL_SIZE + 2
    assert_close(gaussian_blur2d(x, 4.0, size),
                 reference.gaussian_blur2d(x, 4.0, size, torch.contiguous_format))


# --------------------------------------------------------------------------------------------------
# frequency_fusion
# --------------------------------------------------------------------------------------------------

FUSION_CASES = [
    ((2, 3, 9, 11), 3, 1.0, False),
    ((1, 6, 7, 5), 7, 1.0, False),
    ((1, 5, 6, 7), 3, 1.0, True),
    ((1, 3, 5, 4), 5, 0.7, True),
    ((1, 8, 9, 12), 7, 1.0, False),  # channels-last: the default columns plan of the fusion
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape, kernel_size, sigma, feature_blur", FUSION_CASES)
def test_frequency_fusion_matches_reference(device, dtype, layout, shape, kernel_size, sigma,
                                            feature_blur):
    global_ = random_map(shape, dtype, device, layout, seed=0)
    local = random_map(shape, dtype, device, "contiguous", seed=1)  # layouts may differ
    out = frequency_fusion(global_, local, sigma, kernel_size, feature_blur)
    assert out.shape == shape and out.dtype == dtype
    expected = reference.frequency_fusion(global_, local, sigma, kernel_size, feature_blur,
                                          torch.contiguous_format)
    assert_close(out, expected)


@pytest.mark.parametrize("feature_blur", [False, True])
def test_frequency_fusion_identity(device, feature_blur):
    """global_ + G(local - global_) == G(local) + global_ - G(global_) (FreeScale's form)."""
    global_ = random_map((1, 5, 8, 6), torch.float32, device, "channels_last", seed=2)
    local = random_map((1, 5, 8, 6), torch.float32, device, "channels_last", seed=3)
    fused = frequency_fusion(global_, local, 1.0, 3, feature_blur)
    if feature_blur:
        weights = gaussian_kernel1d(1.0, 3)
        blur = lambda t: reference.blur_fp32(t, weights, feature_blur=True)
    else:
        blur = lambda t: gaussian_blur2d(t, 1.0, 3)
    assert_close(fused, blur(local) + global_ - blur(global_), scale=4)


def test_frequency_fusion_feature_blur_is_a_3d_gaussian(device):
    shape = (1, 5, 6, 7)
    global_ = random_map(shape, torch.float32, device, seed=4)
    local = random_map(shape, torch.float32, device, seed=5)
    g = gaussian_kernel1d(0.9, 3).double()
    weight = (g[:, None, None] * g[None, :, None] * g[None, None, :]).view(1, 1, 3, 3, 3)
    blurred = F.conv3d((local - global_).double().unsqueeze(1), weight.to(device), padding=1)
    expected = global_.double() + blurred.squeeze(1)
    assert_close(frequency_fusion(global_, local, 0.9, 3, feature_blur=True), expected)


def test_frequency_fusion_tensor_sigma_and_determinism(device):
    global_ = random_map((2, 8, 5, 6), torch.float16, device, "channels_last", seed=6)
    local = random_map((2, 8, 5, 6), torch.float16, device, "channels_last", seed=7)
    first = frequency_fusion(global_, local, torch.tensor(1.0, device=device), 3)
    assert torch.equal(first, frequency_fusion(global_, local, 1.0, 3))
    assert torch.equal(first, frequency_fusion(global_, local, torch.tensor(1.0, device=device), 3))


# --------------------------------------------------------------------------------------------------
# bad input, dispatch, registration
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda x: gaussian_blur2d(x[0], 1.0, 3), ValueError, "4-D"),
        (lambda x: gaussian_blur2d(x.int(), 1.0, 3), TypeError, "float"),
        (lambda x: gaussian_blur2d(x, 0.0, 3), ValueError, "sigma"),
        (lambda x: gaussian_blur2d(x, -1.0, 3), ValueError, "sigma"),
        (lambda x: gaussian_blur2d(x, math.nan, 3), ValueError, "sigma"),
        (lambda x: gaussian_blur2d(x, math.inf, 3), ValueError, "sigma"),
        (lambda x: gaussian_blur2d(x, "1", 3), TypeError, "sigma"),
        (lambda x: gaussian_blur2d(x, True, 3), TypeError, "sigma"),
        (lambda x: gaussian_blur2d(x, torch.ones(1), 3), ValueError, "sigma.*0-d"),
        (lambda x: gaussian_blur2d(x, torch.tensor(1), 3), TypeError, "sigma"),
        (lambda x: gaussian_blur2d(x, torch.tensor(1.0, device="meta"), 3), ValueError, "sigma"),
        (lambda x: gaussian_blur2d(x, torch.tensor(1.0)), ValueError, "kernel_size is required"),
        (lambda x: gaussian_blur2d(x, 1.0, 4), ValueError, "kernel_size"),
        (lambda x: gaussian_blur2d(x, 1.0, 0), ValueError, "kernel_size"),
        (lambda x: gaussian_blur2d(x, 1.0, 3.0), TypeError, "kernel_size"),
        (lambda x: frequency_fusion(x, x[:, :2], 1.0, 3), ValueError, "local.*shape"),
        (lambda x: frequency_fusion(x, x.half(), 1.0, 3), TypeError, "local.*dtype"),
        (lambda x: frequency_fusion(x, x.to("meta"), 1.0, 3), ValueError, "local"),
        (lambda x: frequency_fusion(x[0], x[0], 1.0, 3), ValueError, "global_"),
        (lambda x: frequency_fusion(x, x, 1.0, 3, feature_blur=1), TypeError, "feature_blur"),
        (lambda x: frequency_fusion(x, x, 1.0, 2), ValueError, "kernel_size"),
    ],
)
def test_bad_input(call, error, message):
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(error, match=message):
        call(x)


def test_torch_backend_matches_triton(device):
    global_ = random_map((2, 6, 7, 9), torch.float32, device, "channels_last", seed=8)
    local = random_map((2, 6, 7, 9), torch.float32, device, "channels_last", seed=9)
    results = []
    for backend in ("torch", "triton"):
        with use_backend(backend):
            results.append((gaussian_blur2d(local, 0.8, 5),
                            frequency_fusion(global_, local, 1.0, 3, feature_blur=True)))
    for ours, theirs in zip(*results, strict=True):
        assert_close(ours, theirs)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck(device, backend):
    x = random_map((1, 3, 5, 6), torch.float32, device, "channels_last")
    y = random_map((1, 3, 5, 6), torch.float32, device, "channels_last", seed=1)
    sigma = torch.tensor(1.0, device=device)
    with use_backend(backend):
        for op, args in [
            (torch.ops.hrkernels.gaussian_blur2d.default, (x, 0.8, None, 3)),
            (torch.ops.hrkernels.gaussian_blur2d.default, (x, 1.0, sigma, 5)),
            (torch.ops.hrkernels.frequency_fusion.default, (x, y, 1.0, None, 3, False)),
            (torch.ops.hrkernels.frequency_fusion.default, (x, y, 1.0, sigma, 3, True)),
        ]:
            torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_compiles_without_graph_break(device):
    def fuse(global_, local, sigma):
        return frequency_fusion(global_, gaussian_blur2d(local, sigma, 3), sigma, 3) * 2

    global_ = random_map((1, 4, 6, 6), torch.float32, device, "channels_last")
    local = random_map((1, 4, 6, 6), torch.float32, device, "channels_last", seed=1)
    sigma = torch.tensor(1.0, device=device)
    compiled = torch.compile(fuse, fullgraph=True, backend="aot_eager")
    assert_close(compiled(global_, local, sigma), fuse(global_, local, sigma))


# --------------------------------------------------------------------------------------------------
# GPU: the benchmark shapes
# --------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kernel_size", [3, 7, 15])
def test_feature_shapes_on_gpu(dtype, kernel_size):
    shape = (2, 128, 128, 640)
    generator = torch.Generator("cuda").manual_seed(0)
    global_ = torch.randn(shape, device="cuda", dtype=dtype, generator=generator)
    local = torch.randn(shape, device="cuda", dtype=dtype, generator=generator)
    global_, local = global_.permute(0, 3, 1, 2), local.permute(0, 3, 1, 2)
    fused = frequency_fusion(global_, local, 1.0, kernel_size)
    expected = reference.frequency_fusion(global_, local, 1.0, kernel_size, False,
                                          torch.channels_last)
    assert_close(fused, expected)
    assert_close(gaussian_blur2d(local, 1.0, kernel_size),
                 reference.gaussian_blur2d(local, 1.0, kernel_size, torch.channels_last))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 4, 512, 512), (2, 320, 67, 45), (1, 300, 33, 70)])
def test_other_layouts_on_gpu(shape):
    for layout in ("contiguous", "channels_last"):
        x = random_map(shape, torch.float16, "cuda", layout)
        y = random_map(shape, torch.float16, "cuda", layout, seed=1)
        assert_close(gaussian_blur2d(x, 0.8, 7),
                     reference.gaussian_blur2d(x, 0.8, 7, torch.contiguous_format))
        assert_close(frequency_fusion(x, y, 1.0, 3, feature_blur=True),
                     reference.frequency_fusion(x, y, 1.0, 3, True, torch.contiguous_format))

"""``dilated_conv2d`` against the unfused reference chain: the fused Triton kernel (interpreter on
CPU), the exact tap tables behind it, the integer (cuDNN/ATen) path, validation and registration."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import DTYPES, assert_close_to_fp32, make_layout

from hrkernels.ops import dilated_conv2d, use_backend
from hrkernels.ops.conv import op as conv_op
from hrkernels.ops.conv import reference
from hrkernels.ops.conv.taps import axis_taps, stretched_size

pytestmark = pytest.mark.usefixtures("triton_backend")

TINY = (1, 4, 9, 11)  # [B, I, H, W]; 3 output channels
DILATIONS = [1, 1.5, 2, 2.5, 3, 4]


def make_inputs(shape, out_channels, dtype, device, layout="contiguous", kernel_size=3,
                bias=True, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator)
    fan_in = shape[1] * kernel_size * kernel_size
    weight = torch.randn(out_channels, shape[1], kernel_size, kernel_size,
                         generator=generator) / math.sqrt(fan_in)
    b = torch.randn(out_channels, generator=generator) if bias else None
    x = make_layout(x.to(device=device, dtype=dtype), layout)
    weight = weight.to(device=device, dtype=dtype)
    b = b.to(device=device, dtype=dtype) if bias else None
    return x, weight, b


def as_pair(stride):
    return stride if isinstance(stride, tuple) else (stride, stride)


def check_against_chain(out, x, weight, bias, dilation, stride):
    """``out`` is within ~2x the error of the reference chain run in ``out``'s dtype, both measured
    against the chain in float64 (the fused kernel rounds less often than the chain does)."""
    stride = as_pair(stride)
    exact = reference.dilated_conv2d(x.double(), weight.double(),
                                     None if bias is None else bias.double(), dilation, stride)
    same_dtype = reference.dilated_conv2d(x, weight, bias, dilation, stride)
    assert out.shape == exact.shape and out.dtype == x.dtype
    assert_close_to_fp32(out, exact, same_dtype)


# --------------------------------------------------------------------------------------------------
# the fused kernel (Triton; the interpreter on CPU) against the chain
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("dilation", DILATIONS)
def test_matches_reference(device, dilation, stride, layout, dtype):
    x, weight, bias = make_inputs(TINY, 3, dtype, device, layout)
    out = dilated_conv2d(x, weight, bias, dilation, stride)
    if float(dilation).is_integer():  # cuDNN / ATen: exactly F.conv2d
        d = int(dilation)
        assert torch.equal(out, F.conv2d(x, weight, bias, stride, padding=d, dilation=d))
    else:
        check_against_chain(out, x, weight, bias, dilation, stride)
    assert out.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")


@pytest.mark.parametrize(
    "shape, out_channels, dilation, stride, kernel_size, layout",
    [
        ((2, 5, 7, 13), 4, 1.5, 1, 3, "strided"),
        ((1, 3, 1, 6), 2, 2.5, 1, 3, "contiguous"),  # a single row
        ((1, 2, 16, 5), 3, 3.7, (1, 2), 3, "channels_last"),
        ((1, 3, 6, 7), 2, 1.25, 2, 5, "contiguous"),  # 5x5 kernel
        ((2, 3, 5, 4), 2, 1.8, 1, 1, "strided"),  # 1x1 kernel: only the two resizes remain
    ],
)
def test_odd_shapes_kernels_and_layouts(device, shape, out_channels, dilation, stride,
                                        kernel_size, layout):
    x, weight, bias = make_inputs(shape, out_channels, torch.float32, device, layout, kernel_size)
    check_against_chain(dilated_conv2d(x, weight, bias, dilation, stride), x, weight, bias,
                        dilation, stride)


def test_without_bias_and_more_channels_than_one_block(device):
    # 20 input and 18 output channels: more than one channel block under the interpreter (16).
    x, weight, _ = make_inputs((1, 20, 6, 7), 18, torch.float16, device, "channels_last",
                               bias=False)
    check_against_chain(dilated_conv2d(x, weight, None, 2.5), x, weight, None, 2.5, 1)


def test_large_maps_run_in_bands(device, monkeypatch):
    # A tiny temporary budget forces one band of output rows per pass (and a ragged last band).
    x, weight, bias = make_inputs((2, 3, 7, 6), 2, torch.float32, device)
    expected = dilated_conv2d(x, weight, bias, 1.5)
    row_bytes = 6 * 3 * 3 * x.element_size()
    for rows_per_band in (1, 3):
        monkeypatch.setattr(conv_op, "CHUNK_BYTES", rows_per_band * row_bytes)
        # Same arithmetic per element; only the GEMM's kernel (its summation order) may change.
        torch.testing.assert_close(dilated_conv2d(x, weight, bias, 1.5), expected, atol=1e-5,
                                   rtol=1e-5)


def test_torch_backend_matches_triton(device):
    x, weight, bias = make_inputs((2, 3, 8, 10), 4, torch.float32, device, "channels_last")
    with use_backend("torch"):
        expected = dilated_conv2d(x, weight, bias, 1.5, 2)
    torch.testing.assert_close(dilated_conv2d(x, weight, bias, 1.5, 2), expected, atol=1e-4,
                               rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dilation, stride", [(1.5, 1), (2.5, 1), (1.5, 2), (3.5, 1)])
def test_matches_reference_at_unet_sizes(device, dilation, stride, layout, dtype):
    x, weight, bias = make_inputs((2, 320, 64, 48), 320, dtype, device, layout)
    check_against_chain(dilated_conv2d(x, weight, bias, dilation, stride), x, weight, bias,
                        dilation, stride)


# --------------------------------------------------------------------------------------------------
# the exact reformulation behind the kernel (pure PyTorch, float64)
# --------------------------------------------------------------------------------------------------


def blend_matrix(length: int, dilation: float, stride: int, kernel_size: int) -> torch.Tensor:
    """The tables of one axis as a dense ``[k, out, length]`` operator."""
    taps = axis_taps(length, dilation, stride, kernel_size)
    matrix = torch.zeros(kernel_size, taps.weight.shape[1], length, dtype=torch.float64)
    for j in range(taps.taps):
        index = (taps.first + j).clamp(max=length - 1)[..., None]
        matrix.scatter_add_(2, index, taps.weight[..., j:j + 1])
    return matrix


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("kernel_size", [1, 3, 5])
def test_tap_tables_reproduce_the_chain(stride, kernel_size):
    # out[o, p, q] = sum_{i, a, b} w[o, i, a, b] * sum_{r, t} Mh[a, p, r] Mw[b, q, t] x[i, r, t]
    generator = torch.Generator().manual_seed(0)
    for height, width, dilation in itertools.product([1, 2, 16], [5, 13],
                                                     [1.1, 1.5, 1.9, 2.5, 3.3, 7.5]):
        x = torch.randn(2, 2, height, width, generator=generator, dtype=torch.float64)
        weight = torch.randn(3, 2, kernel_size, kernel_size, generator=generator,
                             dtype=torch.float64)
        rows = blend_matrix(height, dilation, stride, kernel_size)
        cols = blend_matrix(width, dilation, stride, kernel_size)
        blended = torch.einsum("aph,bqw,nihw->nabipq", rows, cols, x)  # the "doubly
        fused = torch.einsum("nabipq,oiab->nopq", blended, weight)     # interpolated" input
        chain = reference.dilated_conv2d(x, weight, None, dilation, (stride, stride))
        assert fused.shape == chain.shape
        # The tables use torch's float32 source coordinates (as its fp32/fp16/bf16 kernels do), the
        # float64 chain float64 ones: they differ by ~1e-7 of a coordinate; a wrong tap by O(1).
        torch.testing.assert_close(fused, chain, atol=2e-4, rtol=1e-4)


def test_tap_counts_and_stretched_size():
    assert stretched_size(64, 1.5) == round(64 * 2 / 1.5) == 85
    assert stretched_size(128, 2.5) == round(128 * 3 / 2.5) == 154
    for length, dilation in itertools.product([7, 64, 256], [1.25, 1.5, 2.5, 3.5]):
        assert axis_taps(length, dilation, 1, 3).taps <= 3
        assert axis_taps(length, dilation, 2, 3).taps <= 4


# --------------------------------------------------------------------------------------------------
# bad input, registration, compile
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, error, message",
    [
        ({"dilation": 0.5}, ValueError, "dilation"),
        ({"dilation": float("nan")}, ValueError, "dilation"),
        ({"dilation": True}, TypeError, "dilation"),
        ({"dilation": torch.tensor(1.5)}, TypeError, "dilation"),
        ({"weight": torch.randn(3, 4, 2, 2)}, ValueError, "weight"),
        ({"weight": torch.randn(3, 4, 3, 1)}, ValueError, "weight"),
        ({"weight": torch.randn(3, 2, 3, 3)}, ValueError, "groups"),
        ({"weight": torch.randn(3, 4, 3)}, ValueError, "weight"),
        ({"weight": torch.randn(3, 4, 3, 3).half()}, ValueError, "dtype"),
        ({"bias": torch.randn(4)}, ValueError, "bias"),
        ({"bias": [0.0, 0.0, 0.0]}, TypeError, "bias"),
        ({"stride": 0}, ValueError, "stride"),
        ({"stride": 1.5}, TypeError, "stride"),
        ({"x": torch.randn(4, 9, 11)}, ValueError, "4-D"),
        ({"x": torch.randint(0, 3, (1, 4, 9, 11))}, TypeError, "float"),
    ],
)
def test_bad_input(change, error, message):
    arguments = {"x": torch.randn(TINY), "weight": torch.randn(3, 4, 3, 3), "bias": None,
                 "dilation": 1.5, "stride": 1, **change}
    with pytest.raises(error, match=message):
        dilated_conv2d(**arguments)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dilation, stride", [(1.5, 1), (2.5, 2), (2.0, 1)])
def test_opcheck(device, backend, dilation, stride):
    x, weight, bias = make_inputs((1, 3, 6, 7), 2, torch.float32, device, "channels_last")
    with use_backend(backend):
        torch.library.opcheck(torch.ops.hrkernels.dilated_conv2d.default,
                              (x, weight, bias, dilation, stride, stride),
                              test_utils=("test_schema", "test_faketensor"))


def test_compiles_without_graph_break(device):
    def block(x, weight, bias):
        fractional = dilated_conv2d(x, weight, bias, 1.5)
        integer = dilated_conv2d(x, weight, bias, 2)
        return dilated_conv2d(fractional + integer, weight, None, 2.5, stride=2)

    x, weight, bias = make_inputs((1, 3, 7, 9), 3, torch.float32, device, "channels_last")
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, weight, bias), block(x, weight, bias))

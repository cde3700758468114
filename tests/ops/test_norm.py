"""``group_stats`` / ``group_norm_silu`` against their references and ``torch.nn.GroupNorm``: Triton
(interpreter on CPU) and the PyTorch path."""

from __future__ import annotations

import pytest
import torch
from conftest import DTYPES, LAYOUTS, assert_close, assert_close_to_fp32, make_layout

from hrkernels.ops import combine_group_stats, group_norm_silu, group_stats, use_backend
from hrkernels.ops.norm import reference

pytestmark = pytest.mark.usefixtures("triton_backend")


def random_map(shape, dtype, device, layout="contiguous", seed=0, scale=2.0, offset=0.5):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator) * scale + offset
    return make_layout(x.to(device=device, dtype=dtype), layout)


def own_statistics(x, groups, eps=1e-6):
    """``x``'s group mean and rstd from the fp64 data (the ground truth the ops approximate)."""
    values = x.double().unflatten(1, (groups, -1))
    variance, mean = torch.var_mean(values, dim=(2, 3, 4), correction=0)
    return mean.float(), torch.rsqrt(variance + eps).float()


def affine(channels, device, seed=1):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(channels, generator=generator).to(device)
    bias = torch.randn(channels, generator=generator).to(device)
    return weight, bias


# shape, groups: tiny, odd and non-power-of-two sizes; one group; one channel per group; a group of
# channels wider than one tile (the interpreter's 64-element tiles).
CASES = [
    ((2, 8, 4, 4), 4),
    ((1, 6, 5, 7), 3),
    ((2, 3, 3, 9), 1),
    ((1, 5, 2, 3), 5),
    ((1, 96, 3, 2), 2),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape, groups", CASES)
def test_group_stats_matches_reference(device, dtype, layout, shape, groups):
    x = random_map(shape, dtype, device, layout)
    stats = group_stats(x, groups)
    assert stats.shape == (shape[0], groups, 3) and stats.dtype == torch.float32
    expected = reference.group_stats(x, groups)
    assert torch.equal(stats[..., 0], expected[..., 0])
    torch.testing.assert_close(stats, expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("silu", [True, False])
@pytest.mark.parametrize("shape, groups", CASES)
def test_group_norm_silu_matches_reference(device, dtype, layout, silu, shape, groups):
    x = random_map(shape, dtype, device, layout)
    mean, rstd = own_statistics(x, groups)
    weight, bias = affine(shape[1], device)
    out = group_norm_silu(x, mean, rstd, weight, bias, silu=silu)
    assert out.shape == shape and out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
    expected = reference.group_norm_silu(x, mean, rstd, weight, bias, silu,
                                         torch.contiguous_format)
    assert_close(out, expected, scale=2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_equals_torch_group_norm_and_silu(device, dtype):
    """With the whole map's statistics both ops make ``SiLU(GroupNorm(x))``; fp16 within twice the
    error of torch's own fp16 GroupNorm against fp32."""
    x = random_map((2, 12, 6, 10), torch.float32, device, "channels_last")
    norm = torch.nn.GroupNorm(3, 12, eps=1e-6).to(device)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    stats = group_stats(x.to(dtype), 3)
    rstd = torch.rsqrt(stats[..., 2] / stats[..., 0] + norm.eps)
    with torch.no_grad():
        out = group_norm_silu(x.to(dtype), stats[..., 1], rstd, norm.weight.to(dtype),
                              norm.bias.to(dtype))
        expected = torch.nn.functional.silu(norm(x))
        if dtype == torch.float32:
            assert_close(out, expected, scale=2)
        else:
            lowp = torch.nn.functional.silu(norm.to(dtype)(x.to(dtype)))
            assert_close_to_fp32(out, expected, lowp)


@pytest.mark.parametrize("weight, bias", [(True, False), (False, True), (False, False)])
def test_optional_affine(device, weight, bias):
    x = random_map((1, 6, 3, 5), torch.float32, device)
    mean, rstd = own_statistics(x, 2)
    scale, shift = affine(6, device)
    scale, shift = scale if weight else None, shift if bias else None
    out = group_norm_silu(x, mean, rstd, scale, shift)
    normalised = (x - mean.repeat_interleave(3, 1)[:, :, None, None]) \
        * rstd.repeat_interleave(3, 1)[:, :, None, None]
    if scale is not None:
        normalised = normalised * scale[:, None, None]
    if shift is not None:
        normalised = normalised + shift[:, None, None]
    assert_close(out, torch.nn.functional.silu(normalised), scale=2)


def test_strided_statistics_and_affine(device):
    """``mean``/``rstd`` and ``weight``/``bias`` may be views with any strides."""
    x = random_map((2, 8, 3, 4), torch.float32, device)
    stats = group_stats(x, 4)  # [B, G, 3]: stats[..., 1] is a strided [B, G] view
    rstd = torch.rsqrt(stats[..., 2] / stats[..., 0] + 1e-6)
    parameters = torch.randn(2, 8, device=device)
    out = group_norm_silu(x, stats[..., 1], rstd, parameters[0], parameters[1, :])
    expected = reference.group_norm_silu(x, stats[..., 1].contiguous(), rstd,
                                         parameters[0].contiguous(), parameters[1].contiguous(),
                                         True, torch.contiguous_format)
    assert_close(out, expected)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_statistics_of_tiles_combine_into_the_whole(device, layout):
    """Row strips of uneven heights merge into the whole map's statistics, also with a mean far
    from zero (the shifted sums and Chan's merge keep the digits)."""
    x = random_map((2, 6, 11, 5), torch.float32, device, layout, scale=1.0, offset=300.0)
    parts = [group_stats(x[:, :, start:stop], 3) for start, stop in [(0, 4), (4, 5), (5, 11)]]
    whole = combine_group_stats(torch.stack(parts, dim=0), dim=0)
    mean, rstd = own_statistics(x, 3, eps=0.0)
    torch.testing.assert_close(whole[..., 1], mean, atol=1e-4, rtol=1e-6)
    torch.testing.assert_close(torch.rsqrt(whole[..., 2] / whole[..., 0]), rstd, rtol=1e-4,
                               atol=0)
    assert (whole[..., 0] == 2 * 11 * 5).all()


def test_combine_ignores_empty_parts():
    stats = group_stats(torch.randn(1, 4, 3, 3), 2)
    empty = torch.zeros_like(stats)
    assert torch.equal(combine_group_stats(torch.stack([empty, stats, empty], dim=1), dim=1),
                       stats)


def test_poisoned_outputs_are_all_written(device):
    """conftest poisons kernel outputs with NaN: a forgotten element or partial would show."""
    x = random_map((3, 10, 7, 9), torch.float16, device, "strided")
    mean, rstd = own_statistics(x, 5)
    assert not group_norm_silu(x, mean, rstd).isnan().any()
    assert not group_stats(x, 5).isnan().any()


def test_torch_backend_matches_triton(device):
    x = random_map((2, 6, 5, 4), torch.float32, device, "channels_last")
    mean, rstd = own_statistics(x, 3)
    weight, bias = affine(6, device)
    results = []
    for backend in ("torch", "triton"):
        with use_backend(backend):
            results.append((group_stats(x, 3), group_norm_silu(x, mean, rstd, weight, bias)))
    for ours, theirs in zip(*results, strict=True):
        assert_close(ours, theirs, scale=4)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda x, m, r: group_stats(x[0], 2), ValueError, "4-D"),
        (lambda x, m, r: group_stats(x.int(), 2), TypeError, "float"),
        (lambda x, m, r: group_stats(x, 3), ValueError, "groups must divide"),
        (lambda x, m, r: group_stats(x, 0), ValueError, "groups"),
        (lambda x, m, r: group_stats(x, 2.0), TypeError, "groups"),
        (lambda x, m, r: group_norm_silu(x, m.double(), r), TypeError, "mean.*float32"),
        (lambda x, m, r: group_norm_silu(x, m, None), TypeError, "rstd"),
        (lambda x, m, r: group_norm_silu(x, m[:1], r), ValueError, r"mean must be \[B, G\]"),
        (lambda x, m, r: group_norm_silu(x, torch.zeros(2, 3), r), ValueError, "mean"),
        (lambda x, m, r: group_norm_silu(x, m, r[:, :1]), ValueError, "same shape"),
        (lambda x, m, r: group_norm_silu(x, m, r, torch.ones(3)), ValueError, r"weight.*\[C\]"),
        (lambda x, m, r: group_norm_silu(x, m, r, None, torch.ones(4).long()), TypeError, "bias"),
        (lambda x, m, r: group_norm_silu(x, m, r, torch.ones(4, device="meta")), ValueError,
         "weight"),
        (lambda x, m, r: group_norm_silu(x, m, r, silu=1), TypeError, "silu"),
        (lambda x, m, r: combine_group_stats(torch.zeros(2, 3), dim=1), ValueError, "last axis"),
        (lambda x, m, r: combine_group_stats(torch.zeros(2, 4), dim=0), ValueError, "3"),
    ],
)
def test_bad_input(call, error, message):
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(error, match=message):
        call(x, torch.zeros(2, 2), torch.ones(2, 2))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck(device, backend):
    x = random_map((2, 4, 3, 5), torch.float32, device, "channels_last")
    mean, rstd = own_statistics(x, 2)
    weight, bias = affine(4, device)
    with use_backend(backend):
        for op, args in [
            (torch.ops.hrkernels.group_stats.default, (x, 2)),
            (torch.ops.hrkernels.group_norm_silu.default, (x, mean, rstd, weight, bias, True)),
            (torch.ops.hrkernels.group_norm_silu.default, (x, mean, rstd, None, None, False)),
        ]:
            torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_compiles_without_graph_break(device):
    def norm_act(x, weight, bias):
        stats = group_stats(x * 2, 2)
        rstd = torch.rsqrt(stats[..., 2] / stats[..., 0] + 1e-6)
        return group_norm_silu(x * 2, stats[..., 1], rstd, weight, bias) + 1

    x = random_map((1, 4, 4, 4), torch.float32, device)
    weight, bias = affine(4, device)
    compiled = torch.compile(norm_act, fullgraph=True, backend="aot_eager")
    assert_close(compiled(x, weight, bias), norm_act(x, weight, bias))


# --------------------------------------------------------------------------------------------------
# GPU: VAE-sized strips
# --------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape, layout", [((1, 128, 64, 1024), "contiguous"),
                                           ((2, 512, 18, 128), "contiguous"),
                                           ((1, 256, 32, 256), "channels_last")])
def test_vae_strips_on_gpu(dtype, shape, layout):
    x = random_map(shape, dtype, "cuda", layout)
    stats = group_stats(x, 32)
    torch.testing.assert_close(stats, reference.group_stats(x, 32), atol=1e-2, rtol=1e-4)
    mean, rstd = own_statistics(x, 32)
    weight, bias = affine(shape[1], "cuda")
    out = group_norm_silu(x, mean, rstd, weight, bias)
    assert_close(out, reference.group_norm_silu(x, mean, rstd, weight, bias, True,
                                                torch.contiguous_format), scale=2)

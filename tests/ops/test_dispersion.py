"""``dispersion_matrix`` / ``disperse_kernel``: the properties that make R right (structure-level
and pixel-level calibration and their trade-off in eta), shapes, dtypes and the cache."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hrkernels.ops import disperse_kernel, dispersion_matrix
from hrkernels.ops.conv import dispersion

SIZE = 64  # feature maps of the property tests; errors are measured away from their borders
MARGIN = 12


def random_kernels(count: int, kernel_size: int = 3, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, 1, kernel_size, kernel_size, generator=generator,
                       dtype=torch.float64)


def feature_map(sigma: float, seed: int = 0, size: int = SIZE) -> torch.Tensor:
    """``[1, 1, size, size]`` float64 noise, Gaussian-smoothed with ``sigma`` (0: white)."""
    generator = torch.Generator().manual_seed(seed)
    h = torch.randn(1, 1, size, size, generator=generator, dtype=torch.float64)
    if sigma == 0:
        return h
    radius = int(3 * sigma) + 1
    taps = torch.exp(-torch.arange(-radius, radius + 1, dtype=torch.float64) ** 2 / (2 * sigma**2))
    taps = taps / taps.sum()
    h = F.conv2d(h, taps.view(1, 1, -1, 1), padding=(radius, 0))
    return F.conv2d(h, taps.view(1, 1, 1, -1), padding=(0, radius))


def conv(h: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    return F.conv2d(h, kernels, padding=kernels.shape[-1] // 2)


def upsample(h: torch.Tensor, scale: int = 2) -> torch.Tensor:
    return F.interpolate(h, scale_factor=scale, mode="bilinear", align_corners=False)


def interior(y: torch.Tensor, margin: int) -> torch.Tensor:
    return y[..., margin:-margin, margin:-margin]


def relative(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Relative L2 error of each kernel's map (dim 1), ``[count]``."""
    return (a - b).flatten(2).norm(dim=-1)[0] / b.flatten(2).norm(dim=-1)[0]


def structure_error(kernels, enlarged, h, scale=2):
    """``|| conv_k'(up(h)) - up(conv_k(h)) || / || up(conv_k(h)) ||`` away from the borders."""
    target = interior(upsample(conv(h, kernels), scale), scale * MARGIN)
    return relative(interior(conv(upsample(h, scale), enlarged), scale * MARGIN), target)


def pixel_error(kernels, enlarged, h):
    """``|| conv_k'(h) - conv_k(h) || / || conv_k(h) ||`` away from the borders."""
    return relative(interior(conv(h, enlarged), MARGIN), interior(conv(h, kernels), MARGIN))


def dilated(kernels: torch.Tensor, scale: int = 2) -> torch.Tensor:
    """The kernels spread with zeros between their taps (dilation ``scale``)."""
    count, _, size, _ = kernels.shape
    out = torch.zeros(count, 1, scale * (size - 1) + 1, scale * (size - 1) + 1,
                      dtype=kernels.dtype)
    out[..., ::scale, ::scale] = kernels
    return out


def padded(kernels: torch.Tensor, scale: int = 2) -> torch.Tensor:
    """The kernels in the middle of a zero k' x k' kernel."""
    pad = (scale - 1) * (kernels.shape[-1] // 2)
    return F.pad(kernels, (pad, pad, pad, pad))


def dispersed(kernels: torch.Tensor, eta: float, scale: int = 2) -> torch.Tensor:
    return disperse_kernel(kernels, scale=scale, eta=eta)


# --------------------------------------------------------------------------------------------------
# the limits of the trade-off
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel_size, scale", [(3, 2), (3, 3), (5, 2)])
def test_eta_zero_is_the_structure_only_solution(kernel_size, scale):
    # Bilinear upsampling by an integer scale commutes exactly with the dilated kernel, so the
    # structure-only problem is solved exactly (residual 0) by dilation; eta -> 0 converges to it.
    kernels = random_kernels(6, kernel_size)
    exact = dilated(kernels, scale)
    torch.testing.assert_close(dispersed(kernels, 0.0, scale), exact, atol=1e-9, rtol=0)
    deviation = [(dispersed(kernels, eta, scale) - exact).abs().max().item()
                 for eta in (1e-4, 1e-6, 1e-8, 1e-10)]
    assert all(a > b for a, b in zip(deviation[:-1], deviation[1:], strict=True)), deviation
    assert deviation[-1] < 1e-4, deviation
    h = feature_map(0)
    assert structure_error(kernels, exact, h, scale).max() < 1e-12


def test_large_eta_is_the_pixel_only_solution():
    kernels = random_kernels(6)
    torch.testing.assert_close(dispersed(kernels, 1e9), padded(kernels), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------------
# structure-level and pixel-level calibration at the default eta, and as eta varies
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma", [0, 2])
def test_structure_level_calibration(sigma):
    # conv_k' on an upsampled map ~ the upsampled conv_k output: far closer than the original
    # (zero-padded) kernel gets, and close in absolute terms.
    kernels = random_kernels(8)
    h = feature_map(sigma)
    ours = structure_error(kernels, dispersed(kernels, 0.05), h)
    original = structure_error(kernels, padded(kernels), h)
    assert (ours < 0.5 * original).all(), (ours, original)
    assert (ours < 0.1).all(), ours


@pytest.mark.parametrize("sigma", [2, 4])
def test_pixel_level_calibration_on_low_frequency_inputs(sigma):
    # On smooth inputs conv_k' -> conv_k as the pixel-level term takes over. At the default eta
    # the structure term dominates (R is close to dilation): the low-frequency gain of each tap
    # stays within ~5% of the original's (README.md), the fit of the gradient terms is partial.
    kernels = random_kernels(8)
    h = feature_map(sigma)
    default, strong, stronger = (pixel_error(kernels, dispersed(kernels, eta), h)
                                 for eta in (0.05, 1e2, 1e4))
    assert (stronger < strong).all() and (stronger < 1e-3).all(), (strong, stronger)
    assert (default < 1.0).all(), default
    tap_gain = dispersion_matrix().sum(dim=0)  # response of each dispersed tap to a constant
    assert (tap_gain > 0.94).all() and (tap_gain <= 1 + 1e-12).all(), tap_gain


def test_larger_eta_trades_structure_for_pixel_fit():
    # Guaranteed for a least-squares trade-off on the objective's own inputs (white noise).
    kernels = random_kernels(8)
    white = feature_map(0)
    etas = [0.0, 0.01, 0.05, 0.2, 1.0, 10.0]
    pixel = torch.stack([pixel_error(kernels, dispersed(kernels, eta), white) for eta in etas])
    structure = torch.stack([structure_error(kernels, dispersed(kernels, eta), white)
                             for eta in etas])
    assert (pixel[1:] < pixel[:-1]).all(), pixel  # [eta, kernel]: better pixel fit ...
    assert (structure[1:] > structure[:-1]).all(), structure  # ... worse structure fit


def test_solves_eq4_on_a_white_noise_map():
    # Eq. 4 solved directly, by least squares over the 25 taps of k', on one random white-noise
    # feature map (another basis than R's one-hot inputs, with the same expectation): R k lands
    # within sampling error of that solution, and R with another eta does not.
    kernels = random_kernels(4)
    h = feature_map(0, seed=5, size=96)
    eta = 0.05
    taps = torch.eye(25, dtype=torch.float64).view(25, 1, 5, 5)

    def rows(structure, pixel):
        return torch.cat([interior(structure, 2 * MARGIN).flatten(2)[0].T,
                          eta**0.5 * interior(pixel, MARGIN).flatten(2)[0].T])

    system = rows(conv(upsample(h), taps), conv(h, taps))  # [pixels, 25]
    target = rows(upsample(conv(h, kernels)), conv(h, kernels))  # [pixels, kernels]
    direct = torch.linalg.lstsq(system, target).solution.T.reshape(4, 1, 5, 5)

    def distance(candidate):
        return (candidate - direct).flatten(1).norm(dim=1) / direct.flatten(1).norm(dim=1)

    assert (distance(dispersed(kernels, eta)) < 0.05).all(), distance(dispersed(kernels, eta))
    for other in (eta / 20, eta * 4):  # e.g. eta**2 instead of eta, or a 4x weighting slip
        assert (distance(dispersed(kernels, other)) > 0.15).all()


def test_constant_input_keeps_the_centre_tap_exactly():
    # R maps the centre tap to the centre tap (both terms agree on it): a kernel that is a pure
    # centre tap is left unchanged at every eta.
    centre = torch.zeros(1, 1, 3, 3, dtype=torch.float64)
    centre[..., 1, 1] = 1.0
    for eta in (0.0, 0.05, 1.0):
        torch.testing.assert_close(dispersed(centre, eta), padded(centre), atol=1e-12, rtol=0)


# --------------------------------------------------------------------------------------------------
# shapes, dtypes, cache, bad input
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel_size, scale, enlarged", [(3, 2, 5), (3, 3, 7), (5, 2, 9),
                                                          (1, 2, 1), (3, 1, 3)])
def test_shapes(kernel_size, scale, enlarged):
    matrix = dispersion_matrix(kernel_size, scale)
    assert matrix.shape == (enlarged**2, kernel_size**2)
    assert matrix.dtype == torch.float64 and matrix.device.type == "cpu"
    if scale == 1:
        torch.testing.assert_close(matrix, torch.eye(kernel_size**2, dtype=torch.float64))


def test_cache_returns_fresh_copies():
    first = dispersion_matrix(3, 2, 0.05)
    hits = dispersion._solve.cache_info().hits
    first.zero_()  # a caller corrupting its copy must not corrupt the cache
    second = dispersion_matrix(3, 2, 0.05)
    assert dispersion._solve.cache_info().hits == hits + 1
    assert second.abs().sum() > 0
    assert torch.equal(second, dispersion_matrix(3, 2, 0.05))
    assert not torch.equal(second, dispersion_matrix(3, 2, 0.2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_disperse_kernel_shapes_and_dtypes(dtype):
    weight = torch.randn(6, 4, 3, 3).to(dtype)
    out = disperse_kernel(weight)
    assert out.shape == (6, 4, 5, 5) and out.dtype == dtype and out.is_contiguous()
    expected = (weight.double().reshape(24, 9) @ dispersion_matrix().T).reshape(6, 4, 5, 5)
    torch.testing.assert_close(out.double(), expected, atol=1e-2 if dtype != torch.float32
                               else 1e-5, rtol=1e-2)


@pytest.mark.gpu
def test_disperse_kernel_on_gpu():
    weight = torch.randn(8, 4, 3, 3, device="cuda")
    out = disperse_kernel(weight)
    assert out.device == weight.device
    torch.testing.assert_close(out.cpu(), disperse_kernel(weight.cpu()))


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: dispersion_matrix(2), ValueError, "odd"),
        (lambda: dispersion_matrix(3.0), TypeError, "kernel_size"),
        (lambda: dispersion_matrix(3, 0), ValueError, "scale"),
        (lambda: dispersion_matrix(3, 1.5), TypeError, "scale"),
        (lambda: dispersion_matrix(3, 2, -0.1), ValueError, "eta"),
        (lambda: dispersion_matrix(3, 2, float("nan")), ValueError, "eta"),
        (lambda: dispersion_matrix(3, 2, "0.05"), TypeError, "eta"),
        (lambda: disperse_kernel(torch.randn(2, 2, 4, 4)), ValueError, "odd"),
        (lambda: disperse_kernel(torch.randn(2, 2, 3, 5)), ValueError, "square"),
        (lambda: disperse_kernel(torch.randn(2, 3, 3)), ValueError, "weight"),
        (lambda: disperse_kernel(torch.ones(2, 2, 3, 3, dtype=torch.int64)), TypeError,
         "floating"),
        (lambda: disperse_kernel([[1.0]]), TypeError, "weight"),
    ],
)
def test_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()

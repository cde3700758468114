"""``hrkernels.schedules``: cosine decay, APT's scale-aware betas and default eta, stage sizes,
MegaFusion++'s re-scheduled noise tables."""

from __future__ import annotations

import math

import diffusers
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

from hrkernels.schedules import (
    apt_default_eta,
    cosine_decay,
    rescheduled_alphas_cumprod,
    rescheduled_betas,
    rescheduled_scheduler,
    scale_aware_betas,
    stage_sizes,
    sublattice_factor,
)
from hrkernels.testing import tiny_pipeline


@pytest.mark.parametrize("alpha", [1.0, 3.0, 0.5])
def test_cosine_decay_values(alpha):
    assert cosine_decay(1000, 1000, alpha) == pytest.approx(1.0)
    assert cosine_decay(0, 1000, alpha) == pytest.approx(0.0, abs=1e-12)
    assert cosine_decay(500, 1000, alpha) == pytest.approx(0.5**alpha)
    t = 281.0
    expected = (0.5 * (1 + math.cos(math.pi * (1000 - t) / 1000))) ** alpha
    assert cosine_decay(t, 1000, alpha) == pytest.approx(expected, rel=1e-12)


def test_cosine_decay_tensor_matches_scalar_and_is_monotonic():
    timesteps = torch.tensor([999, 700, 421, 100, 1])
    values = cosine_decay(timesteps, 1000, 3.0)
    assert values.dtype == torch.float64
    assert values.tolist() == pytest.approx([cosine_decay(int(t), 1000, 3.0) for t in timesteps])
    assert torch.all(values[:-1] > values[1:])


def test_cosine_decay_rejects_bad_arguments():
    with pytest.raises(ValueError, match="alpha"):
        cosine_decay(10, 1000, -1.0)
    with pytest.raises(ValueError, match="num_train_timesteps"):
        cosine_decay(10, 0)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_scale_aware_betas_reproduce_the_models_scaled_linear_table(kind):
    # The model's own table, as its (scaled_linear) scheduler builds it: bitwise equal at eta 0.5.
    scheduler = tiny_pipeline(kind).scheduler
    config = scheduler.config
    assert config.beta_schedule == "scaled_linear"
    betas = scale_aware_betas(config.beta_start, config.beta_end, 0.5, config.num_train_timesteps)
    assert betas.dtype == torch.float32
    assert torch.equal(betas, scheduler.betas)
    ddim = DDIMScheduler.from_config(config)
    assert torch.equal(betas, ddim.betas)


def test_scale_aware_betas_eta_one_is_linear_and_shape():
    linear = DDIMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear")
    assert torch.equal(scale_aware_betas(0.0001, 0.02, 1.0), linear.betas)
    betas = scale_aware_betas(0.00085, 0.012, 2.0, 1000)
    assert betas.shape == (1000,)
    assert betas[0].item() == pytest.approx(0.00085, rel=1e-5)
    assert betas[-1].item() == pytest.approx(0.012, rel=1e-5)
    # Larger eta: the noise grows faster (larger betas in between, same ends), so the signal of a
    # noised latent decays faster: lower alpha_bar at every inner timestep.
    low, high = scale_aware_betas(0.00085, 0.012, 0.5), scale_aware_betas(0.00085, 0.012, 3.0)
    assert torch.all(high[1:-1] > low[1:-1])
    assert torch.all(torch.cumprod(1 - high, 0)[1:] < torch.cumprod(1 - low, 0)[1:])


def test_scale_aware_betas_drive_a_scheduler():
    betas = scale_aware_betas(0.00085, 0.012, 2.0)
    scheduler = EulerDiscreteScheduler(trained_betas=betas.tolist())
    assert torch.equal(scheduler.betas, betas)


@pytest.mark.parametrize("bad", [{"eta": 0}, {"beta_start": -1.0}, {"num_train_timesteps": 1}])
def test_scale_aware_betas_rejects_bad_arguments(bad):
    kwargs = {"beta_start": 0.00085, "beta_end": 0.012, "eta": 2.0, "num_train_timesteps": 1000}
    kwargs.update(bad)
    with pytest.raises(ValueError, match=next(iter(bad))):
        scale_aware_betas(**kwargs)


def test_apt_default_eta_table_interpolation_and_clamping():
    assert apt_default_eta(2.0) == 2.0
    assert apt_default_eta(1.5) == 3.0
    assert apt_default_eta(4 / 3) == 3.5
    assert apt_default_eta(1.75) == pytest.approx(2.5)
    assert apt_default_eta(1.5 + (4 / 3 - 1.5) / 2) == pytest.approx(3.25)
    assert apt_default_eta(3.0) == 2.0
    assert apt_default_eta(1.25) == 3.5
    assert apt_default_eta(1.33) == 3.5
    with pytest.raises(ValueError, match="upscale_factor"):
        apt_default_eta(0)


@pytest.mark.parametrize(
    "height, width, base, expected",
    [
        (4096, 4096, 1024, [(1024, 1024), (2048, 2048), (3072, 3072), (4096, 4096)]),
        (2048, 2048, 1024, [(1024, 1024), (2048, 2048)]),
        (1024, 1024, 1024, [(1024, 1024)]),
        (2048, 1536, 1024, [(1024, 768), (2048, 1536)]),
        (1024, 2048, 1024, [(512, 1024), (1024, 2048)]),
        (3000, 2000, 1024, [(1024, 680), (2048, 1368), (3000, 2000)]),
        (1536, 1536, 512, [(512, 512), (1024, 1024), (1536, 1536)]),
        # Just above a multiple of the base: stage 1 at the base size, not far below it.
        (1032, 1032, 1024, [(1024, 1024), (1032, 1032)]),
        (2056, 1024, 1024, [(1024, 512), (2048, 1024), (2056, 1024)]),
        (1544, 1032, 512, [(512, 344), (1024, 688), (1536, 1024), (1544, 1032)]),
        (4096, 512, 1024, [(1024, 128), (2048, 256), (3072, 384), (4096, 512)]),
    ],
)
def test_stage_sizes(height, width, base, expected):
    sizes = stage_sizes(height, width, base)
    assert sizes == expected
    assert len(sizes) == math.ceil(max(height, width) / base)
    assert all(h % 8 == 0 and w % 8 == 0 for h, w in sizes)
    assert max(sizes[0]) == base  # stage 1: the base size, the target's aspect ratio


@pytest.mark.parametrize(
    "height, width, match",
    [(2050, 2048, "multiple of 8"), (512, 1000, "base size"), (0, 1024, ">= 1")],
)
def test_stage_sizes_rejects_bad_sizes(height, width, match):
    with pytest.raises(ValueError, match=match):
        stage_sizes(height, width, 1024)


def test_sublattice_factor():
    assert sublattice_factor((256, 256), 128) == (2, 2)
    assert sublattice_factor((384, 256), 128) == (3, 2)
    assert sublattice_factor((256, 192), 128) == (2, 2)  # 1.5 rounds half up
    assert sublattice_factor((256, 160), 128) == (2, 1)
    assert sublattice_factor((64, 40), 128) == (1, 1)


def test_wrong_types_raise_type_errors_naming_the_argument():
    with pytest.raises(TypeError, match="alpha"):
        cosine_decay(10, 1000, "1")
    with pytest.raises(TypeError, match="eta"):
        scale_aware_betas(0.00085, 0.012, True)
    with pytest.raises(TypeError, match="upscale_factor"):
        apt_default_eta("2")
    with pytest.raises(TypeError, match="height"):
        stage_sizes(2048.0, 2048, 1024)


# -- MegaFusion++ noise re-scheduling ------------------------------------------------------------

RESCHEDULED_CLASSES = ("DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "EulerDiscreteScheduler",
                       "EulerAncestralDiscreteScheduler", "LMSDiscreteScheduler",
                       "DPMSolverMultistepScheduler", "UniPCMultistepScheduler")


@pytest.mark.parametrize("gamma", [2.25, 4.0])
def test_rescheduled_alphas_cumprod_against_the_formula(gamma):
    abar = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                   beta_end=0.012).alphas_cumprod
    expected = [float(a) / (gamma - (gamma - 1) * float(a)) for a in abar]  # independent, in Python
    table = rescheduled_alphas_cumprod(abar, gamma)
    assert table.dtype == torch.float64
    assert torch.allclose(table, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)
    # gamma = (stage / base)^2: the SNR abar / (1 - abar) is divided by gamma.
    snr = abar.double() / (1 - abar.double())
    assert torch.allclose(table / (1 - table), snr / gamma, rtol=1e-9)
    betas = rescheduled_betas(abar, gamma)
    assert betas.dtype == torch.float32 and bool(((betas > 0) & (betas < 1)).all())
    for name in RESCHEDULED_CLASSES:
        template = getattr(diffusers, name)(beta_schedule="scaled_linear", beta_start=0.00085,
                                             beta_end=0.012)
        scheduler = rescheduled_scheduler(template, gamma)
        assert type(scheduler) is type(template)
        assert torch.allclose(scheduler.alphas_cumprod.double(), table, rtol=2e-6, atol=0), name
    assert torch.equal(rescheduled_alphas_cumprod(abar, 1.0), abar.double())


def test_rescheduled_bad_input():
    with pytest.raises(ValueError, match="gamma"):
        rescheduled_alphas_cumprod(torch.tensor([0.5]), 0.0)
    with pytest.raises(TypeError, match="alphas_cumprod"):
        rescheduled_alphas_cumprod([0.5], 2.0)
    with pytest.raises(ValueError, match="alphas_cumprod"):
        rescheduled_alphas_cumprod(torch.tensor([1.5]), 2.0)
    with pytest.raises(TypeError, match="trained_betas"):
        rescheduled_scheduler(FlowMatchEulerDiscreteScheduler(), 4.0)

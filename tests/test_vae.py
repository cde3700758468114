"""hrkernels.vae: decode/encode as the pipelines do (scaling, upcast), exact at any size."""

from __future__ import annotations

import pytest
import torch

from hrkernels import vae
from hrkernels.testing import tiny_pipeline


@pytest.fixture(scope="module")
def sdxl_vae():
    return tiny_pipeline("sdxl").vae


def test_decode_unscales_and_equals_the_vae(sdxl_vae):
    latents = torch.randn(2, 4, 16, 12, generator=torch.Generator().manual_seed(0))
    images = vae.decode(sdxl_vae, latents)
    assert images.shape == (2, 3, 128, 96)
    expected = sdxl_vae.decode(latents / sdxl_vae.config.scaling_factor, return_dict=False)[0]
    torch.testing.assert_close(images, expected)


def test_large_latents_decode_exactly_without_diffusers_tiling(sdxl_vae, monkeypatch):
    """Latents above the VAE's native tile decode as one image (no per-tile GroupNorm, no
    blending): diffusers' tiling is neither used nor switched on."""
    monkeypatch.setattr(type(sdxl_vae), "enable_tiling", lambda self: pytest.fail("tiling"))
    tile = sdxl_vae.tile_latent_min_size
    latents = torch.randn(1, 4, tile + 8, tile, generator=torch.Generator().manual_seed(0))
    images = vae.decode(sdxl_vae, latents)
    assert images.shape == (1, 3, (tile + 8) * 8, tile * 8)
    with torch.no_grad():
        expected = sdxl_vae.decode(latents / sdxl_vae.config.scaling_factor).sample
    assert ((images - expected).norm() / expected.norm()).item() < 1e-5
    assert not sdxl_vae.use_tiling


def test_encode_samples_the_posterior_from_the_generator_and_scales(sdxl_vae):
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    first = vae.encode(sdxl_vae, images, generator=torch.Generator().manual_seed(2))
    second = vae.encode(sdxl_vae, images, generator=torch.Generator().manual_seed(2))
    assert first.shape == (1, 4, 8, 8) and first.dtype == torch.float32
    assert torch.equal(first, second)
    assert not torch.equal(first, vae.encode(sdxl_vae, images,
                                             generator=torch.Generator().manual_seed(3)))
    mode = vae.encode(sdxl_vae, images, sample=False)
    expected = sdxl_vae.encode(images).latent_dist.mode() * sdxl_vae.config.scaling_factor
    torch.testing.assert_close(mode, expected)


def test_bad_input(sdxl_vae):
    with pytest.raises(TypeError, match="vae"):
        vae.decode(object(), torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match="latents"):
        vae.decode(sdxl_vae, torch.zeros(4, 8, 8))
    with pytest.raises(TypeError, match="latents"):
        vae.decode(sdxl_vae, [[0.0]])
    with pytest.raises(ValueError, match="images"):
        vae.encode(sdxl_vae, torch.zeros(1, 4, 64, 64))


def test_an_fp16_vae_with_force_upcast_decodes_in_fp32_and_stays_fp16():
    vae_16 = tiny_pipeline("sdxl").vae.half()
    assert vae_16.config.force_upcast
    images = vae.decode(vae_16, torch.randn(1, 4, 8, 8))
    assert images.dtype == torch.float32 and vae_16.dtype == torch.float16
    latents = vae.encode(vae_16, images.clamp(-1, 1), generator=torch.Generator().manual_seed(0))
    assert latents.dtype == torch.float32 and vae_16.dtype == torch.float16


def test_scale_factor(sdxl_vae):
    assert vae.scale_factor(sdxl_vae) == 8

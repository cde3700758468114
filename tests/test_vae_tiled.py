"""The exact, memory-bounded tiled VAE (``hrkernels.vae``): equality with the untiled diffusers
VAE at every size and plan, the memory bound (measured), the planner and its errors.

Everything runs on the tiny SDXL / SD 1.5 VAEs of ``hrkernels.testing`` (channels 8-16-32-32, the
ratios of the real ones). These tests run with one CPU thread: the tiled VAE makes many small
ops, which OpenMP threads only slow down on the shared 2-core machine.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import weakref

import pytest
import torch
from diffusers import AutoencoderKL
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from hrkernels import vae
from hrkernels.ops import group_stats, use_backend
from hrkernels.testing import tiny_pipeline
from hrkernels.vae.executor import execute
from hrkernels.vae.program import decoder_program

# fp32 on CPU: the tiled result equals the untiled one up to reordering (relative L2).
EXACT = 1e-5


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def vaes():
    return {"sdxl": tiny_pipeline("sdxl").vae, "sd15": tiny_pipeline("sd15").vae}


@pytest.fixture(scope="module")
def vae_fp16(vaes):
    """The SDXL tiny VAE in fp16 without ``force_upcast``, so that the call runs in fp16."""
    half = AutoencoderKL.from_config({**vaes["sdxl"].config, "force_upcast": False})
    half.load_state_dict(vaes["sdxl"].state_dict())
    return half.half().eval()


def relative_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def random(shape, seed=0, scale=1.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def images(shape, seed=1):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@torch.no_grad()
def untiled_decode(model, latents):
    return model.decode(latents.to(model.dtype) / model.config.scaling_factor).sample


@torch.no_grad()
def untiled_posterior(model, pixels):
    return model.encode(pixels.to(model.dtype)).latent_dist


class AllocationTracker(TorchDispatchMode):
    """Device memory a call allocates, as ATen ops see it.

    Counts every storage an op's output holds that none of its inputs held (new allocations, not
    views or in-place results), from the op until the storage is freed (a finalizer on the
    storage); ``peak`` is the most bytes alive at once. Not counted: what existed before (weights,
    the caller's tensors) and memory an op uses internally without returning it (convolution and
    attention workspaces, temporaries inside ``hrkernels::`` ops).
    """

    def __init__(self):
        super().__init__()
        self.events: list[tuple[int, int]] = []  # (storage pointer, +bytes / -bytes)
        self.alive: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        held = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                if isinstance(t, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if key in held or key in self.alive or size == 0:
                continue
            self.alive.add(key)
            self.events.append((key, size))
            weakref.finalize(storage, self._freed, key, size)
        return out

    def _freed(self, key: int, size: int) -> None:
        self.alive.discard(key)
        self.events.append((key, -size))

    def peak(self, exclude: torch.Tensor) -> int:
        """Peak bytes alive, without ``exclude``'s storage (the call's output)."""
        skip = exclude.untyped_storage().data_ptr()
        alive = peak = 0
        for key, delta in self.events:
            if key != skip:
                alive += delta
                peak = max(peak, alive)
        return peak

    def largest(self, exclude: torch.Tensor) -> int:
        skip = exclude.untyped_storage().data_ptr()
        return max(size for key, size in self.events if size > 0 and key != skip)


# --------------------------------------------------------------------------------------------------
# Exactness
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, shape, max_memory, tile",
    [
        ("sdxl", (1, 4, 16, 16), None, None),  # everything fits: one strip, nothing recomputed
        ("sd15", (2, 4, 12, 20), None, 3),  # non-square batch, many strips
        ("sdxl", (1, 4, 13, 9), None, 5),  # odd sizes; strips that do not divide the heights
        ("sd15", (1, 4, 7, 10), None, 1),  # one-row strips: the largest halos
        ("sdxl", (1, 4, 16, 16), 1_000_000, None),  # 2 full-resolution activations: recomputation
    ],
)
def test_decode_equals_the_untiled_vae(vaes, kind, shape, max_memory, tile):
    model = vaes[kind]
    latents = random(shape)
    plan = vae.plan_decode(model, shape, max_memory=max_memory, tile=tile)
    if tile is not None:
        assert {segment.rows for segment in plan.segments} <= set(range(1, tile + 1))
    if max_memory is not None:
        assert plan.flops > 1.5 * plan.untiled_flops  # GroupNorm statistics passes recompute
    out = vae.decode(model, latents, max_memory=max_memory, tile=tile)
    assert out.shape == (shape[0], 3, 8 * shape[2], 8 * shape[3]) and out.dtype == torch.float32
    assert relative_l2(out, untiled_decode(model, latents)) < EXACT


@pytest.mark.parametrize(
    "kind, shape, max_memory, tile",
    [
        ("sdxl", (1, 3, 64, 64), None, None),
        ("sd15", (2, 3, 40, 56), None, 7),
        ("sdxl", (1, 3, 96, 64), 160_000, None),  # 0.8 of a full-resolution activation
    ],
)
def test_encode_equals_the_untiled_vae(vaes, kind, shape, max_memory, tile):
    model = vaes[kind]
    pixels = images(shape)
    posterior = untiled_posterior(model, pixels)
    scale = model.config.scaling_factor
    mode = vae.encode(model, pixels, sample=False, max_memory=max_memory, tile=tile)
    assert mode.shape == (shape[0], 4, shape[2] // 8, shape[3] // 8)
    assert mode.dtype == torch.float32
    assert relative_l2(mode, posterior.mode() * scale) < EXACT
    sample = vae.encode(model, pixels, generator=torch.Generator().manual_seed(5),
                        max_memory=max_memory, tile=tile)
    expected = posterior.sample(torch.Generator().manual_seed(5)) * scale
    assert relative_l2(sample, expected) < EXACT


def test_encode_samples_deterministically_from_the_generator(vaes):
    model, pixels = vaes["sdxl"], images((2, 3, 32, 48))
    first = vae.encode(model, pixels, generator=torch.Generator().manual_seed(2), tile=3)
    again = vae.encode(model, pixels, generator=torch.Generator().manual_seed(2), tile=3)
    other = vae.encode(model, pixels, generator=torch.Generator().manual_seed(3), tile=3)
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_host_checkpoints_give_the_same_result(vaes):
    """Checkpoints kept on the host (the CUDA plan for small budgets; forced here) read back in
    strips exactly."""
    model, latents = vaes["sdxl"], random((2, 4, 9, 12))
    program = decoder_program(model)
    plan = vae.plan_decode(model, latents.shape, max_memory=1_500_000)
    on_host = dataclasses.replace(plan, host=frozenset(plan.checkpoints))
    z = latents / model.config.scaling_factor
    with torch.no_grad():
        out = execute(program, on_host, z, torch.float32, torch.device("cpu"))
    assert relative_l2(out, untiled_decode(model, latents)) < EXACT


@pytest.mark.usefixtures("triton_backend")
def test_the_fused_triton_kernel_in_the_tiled_vae(vaes, monkeypatch):
    """The same with ``group_norm_silu``'s Triton kernel (the interpreter on CPU: a tiny image).
    The statistics run the reference here: the interpreter would take ~0.3 s a strip, and their
    kernel is compared with it in tests/ops/test_norm.py."""
    import hrkernels.vae.executor as executor

    def reference_statistics(x, groups):
        with use_backend("torch"):
            return group_stats(x, groups)

    monkeypatch.setattr(executor, "group_stats", reference_statistics)
    model, latents = vaes["sdxl"], random((1, 4, 2, 1))
    decoded = vae.decode(model, latents, tile=4)
    assert relative_l2(decoded, untiled_decode(model, latents)) < EXACT


def test_fp16_within_twice_the_untiled_fp16_error(vaes, vae_fp16):
    """An fp16 VAE runs in fp16 (statistics in fp32): compared with the untiled fp32 result, the
    tiled fp16 error is at most twice the untiled fp16 one (plus 1e-4), and below 1% anyway."""
    reference = vaes["sdxl"]
    latents = random((1, 4, 12, 8))
    fp32 = untiled_decode(reference, latents)
    untiled_error = relative_l2(untiled_decode(vae_fp16, latents), fp32)
    for options in ({}, {"tile": 4}, {"max_memory": 600_000}):
        out = vae.decode(vae_fp16, latents, **options)
        assert out.dtype == torch.float16
        error = relative_l2(out, fp32)
        assert error <= 2 * untiled_error + 1e-4 and error < 1e-2, (options, error, untiled_error)
    pixels = images((1, 3, 48, 32))
    fp32 = untiled_posterior(reference, pixels).mode()
    untiled_error = relative_l2(untiled_posterior(vae_fp16, pixels).mode(), fp32)
    encoded = vae.encode(vae_fp16, pixels, sample=False, tile=3) / reference.config.scaling_factor
    error = relative_l2(encoded, fp32)
    assert error <= 2 * untiled_error + 1e-4 and error < 1e-2, (error, untiled_error)


def test_shift_factor_and_latent_statistics_scale_as_the_pipelines(vaes):
    shifted = copy.deepcopy(vaes["sd15"])
    shifted.register_to_config(shift_factor=0.25)
    latents = random((1, 4, 6, 5))
    expected = untiled_decode(shifted, latents + 0.25 * shifted.config.scaling_factor)
    assert relative_l2(vae.decode(shifted, latents), expected) < EXACT
    pixels = images((1, 3, 48, 40))
    mode = untiled_posterior(shifted, pixels).mode()
    assert relative_l2(vae.encode(shifted, pixels, sample=False),
                       (mode - 0.25) * shifted.config.scaling_factor) < EXACT

    normalised = copy.deepcopy(vaes["sd15"])
    mean, std = [0.1, -0.2, 0.3, 0.0], [0.5, 1.5, 1.0, 2.0]
    normalised.register_to_config(latents_mean=mean, latents_std=std)
    mean_, std_ = torch.tensor(mean).view(1, 4, 1, 1), torch.tensor(std).view(1, 4, 1, 1)
    scale = normalised.config.scaling_factor
    expected = untiled_decode(normalised, (latents * std_ / scale + mean_) * scale)
    assert relative_l2(vae.decode(normalised, latents), expected) < EXACT
    mode = untiled_posterior(normalised, pixels).mode()
    assert relative_l2(vae.encode(normalised, pixels, sample=False),
                       (mode - mean_) * scale / std_) < EXACT


# --------------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------------


def test_decode_memory_stays_within_a_budget_below_one_full_resolution_activation(vaes):
    """A budget of 0.9 of one full-resolution activation (``[1, 8, 768, 96]`` fp32, 2.25 MiB; a
    tall image, as the halos' share falls with the height): the measured peak of everything the
    decode allocates, but its output, stays within it, and so does the plan's estimate."""
    model, latents = vaes["sdxl"], random((1, 4, 96, 12))
    activation = 8 * (8 * 96) * (8 * 12) * 4
    budget = int(0.9 * activation)
    plan = vae.plan_decode(model, latents.shape, max_memory=budget)
    with AllocationTracker() as tracker:
        out = vae.decode(model, latents, max_memory=budget)
    assert tracker.peak(exclude=out) <= plan.peak_bytes <= budget < activation
    assert tracker.largest(exclude=out) < activation
    assert relative_l2(out, untiled_decode(model, latents)) < EXACT


def test_encode_memory_stays_within_the_budget(vaes):
    model, pixels = vaes["sdxl"], images((1, 3, 384, 64))
    activation = 8 * 384 * 64 * 4
    budget = activation // 2
    plan = vae.plan_encode(model, pixels.shape, max_memory=budget)
    with AllocationTracker() as tracker:
        latents = vae.encode(model, pixels, sample=False, max_memory=budget)
    assert tracker.peak(exclude=latents) <= plan.peak_bytes <= budget
    expected = untiled_posterior(model, pixels).mode() * model.config.scaling_factor
    assert relative_l2(latents, expected) < EXACT


def test_the_untiled_plan_when_everything_fits(vaes):
    plan = vae.plan_decode(vaes["sdxl"], (2, 4, 16, 16), max_memory=2**30)
    assert plan.batch == 2 and not plan.host and plan.flops == plan.untiled_flops
    grids = decoder_program(vaes["sdxl"]).grids(16, 16)
    assert all(segment.rows >= grids[segment.stop].height for segment in plan.segments)


def test_smaller_budgets_cost_more_and_fit(vaes):
    model = vaes["sdxl"]
    plans = [vae.plan_decode(model, (1, 4, 32, 16), max_memory=budget)
             for budget in (2**30, 6_000_000, 3_000_000, 2_000_000)]
    for larger, smaller in zip(plans, plans[1:], strict=False):
        assert smaller.peak_bytes <= smaller.budget
        assert smaller.seconds >= larger.seconds and smaller.flops >= larger.flops


def test_a_batch_that_does_not_fit_runs_in_chunks(vaes):
    model, latents = vaes["sd15"], random((3, 4, 8, 8))
    one = vae.plan_decode(model, (1, 4, 8, 8), max_memory=2**30).peak_bytes
    plan = vae.plan_decode(model, latents.shape, max_memory=int(1.5 * one))
    assert plan.batch < 3 and plan.peak_bytes <= int(1.5 * one)
    out = vae.decode(model, latents, max_memory=int(1.5 * one))
    assert relative_l2(out, untiled_decode(model, latents)) < EXACT


def test_a_budget_that_nothing_fits_raises_before_any_work(vaes):
    upcast = copy.deepcopy(vaes["sdxl"]).half()
    calls = []
    handle = upcast.decoder.conv_in.register_forward_hook(lambda *args: calls.append(args))
    with pytest.raises(vae.TilePlanError, match=r"max_memory=1000 bytes.*need at least"):
        vae.decode(upcast, random((1, 4, 8, 8)), max_memory=1000)
    with pytest.raises(vae.TilePlanError, match="attention"):
        vae.plan_decode(upcast, (1, 4, 64, 64), max_memory=500_000)
    handle.remove()
    assert upcast.dtype == torch.float16 and not calls


# --------------------------------------------------------------------------------------------------
# What is handled, and bad input
# --------------------------------------------------------------------------------------------------


def test_unsupported_vaes_and_modules_are_named(vaes):
    from diffusers import AutoencoderTiny
    from diffusers.models.attention_processor import AttnProcessor2_0

    tiny = AutoencoderTiny(encoder_block_out_channels=(4, 4), decoder_block_out_channels=(4, 4),
                           num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1),
                           latent_channels=4)
    with pytest.raises(vae.UnsupportedVAEError, match="AutoencoderTiny"):
        vae.decode(tiny, random((1, 4, 4, 4)))

    class CustomProcessor(AttnProcessor2_0):
        pass

    custom = copy.deepcopy(vaes["sdxl"])
    custom.decoder.mid_block.attentions[0].set_processor(CustomProcessor())
    with pytest.raises(vae.UnsupportedVAEError, match="mid_block.attentions.0.*CustomProcessor"):
        vae.decode(custom, random((1, 4, 4, 4)))
    custom.encoder.down_blocks[0].resnets[1].conv1 = torch.nn.utils.parametrizations.weight_norm(
        torch.nn.Conv2d(8, 8, 3, padding=1))
    with pytest.raises(vae.UnsupportedVAEError, match="down_blocks.0.resnets.1.conv1"):
        vae.encode(custom, images((1, 3, 16, 16)))


def test_the_offload_hook_runs_first(vaes):
    model = copy.deepcopy(vaes["sd15"])
    calls = []
    model._hf_hook = types.SimpleNamespace(pre_forward=calls.append)
    vae.decode(model, random((1, 4, 4, 4)))
    assert calls == [model]


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda m: vae.decode(m, random((1, 4, 4, 4)), max_memory=0), ValueError, "max_memory"),
        (lambda m: vae.decode(m, random((1, 4, 4, 4)), max_memory=1e9), TypeError, "max_memory"),
        (lambda m: vae.decode(m, random((1, 4, 4, 4)), tile=0), ValueError, "tile"),
        (lambda m: vae.encode(m, images((1, 3, 8, 8)), tile=True), TypeError, "tile"),
        (lambda m: vae.decode(m, random((1, 3, 4, 4))), ValueError, "4 latent channels"),
        (lambda m: vae.decode(m, torch.ones(1, 4, 4, 4, dtype=torch.long)), TypeError, "float"),
        (lambda m: vae.plan_decode(m, "1x4x8x8"), TypeError, "shape"),
        (lambda m: vae.plan_encode(m, (1, 4, 8, 8)), ValueError, "images"),
    ],
)
def test_bad_input(vaes, call, error, message):
    with pytest.raises(error, match=message):
        call(vaes["sd15"])


# --------------------------------------------------------------------------------------------------
# GPU: SDXL's VAE topology
# --------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sdxl_topology_on_gpu(dtype):
    """SDXL's VAE topology (random weights) at 1024x768 with the Triton kernels: decode and encode
    equal the untiled VAE (fp32 with TF32 off, within 1e-4: cuDNN picks other algorithms for other
    shapes; fp16 within twice the untiled fp16 error against fp32), and a decode with a budget of
    half a full-resolution activation peaks (``torch.cuda.max_memory_allocated`` less the weights,
    the latents and the output) within the budget and the default's headroom for what plans do not
    count (cuDNN workspaces)."""
    from hrkernels.testing import random_pipeline

    config = random_pipeline("sdxl", device="meta", with_text_encoders=False).vae.config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoencoderKL.from_config({**config, "force_upcast": False}).to("cuda").eval()
    latents, pixels = random((1, 4, 128, 96)).cuda(), images((1, 3, 1024, 768)).cuda()
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        decoded, encoded = untiled_decode(model, latents), untiled_posterior(model, pixels).mode()
        decode_bound = encode_bound = 1e-4
        if dtype == torch.float16:
            model.half()
            decode_bound += 2 * relative_l2(untiled_decode(model, latents), decoded)
            encode_bound += 2 * relative_l2(untiled_posterior(model, pixels).mode(), encoded)
        budget = 128 * 1024 * 768 * dtype.itemsize // 2
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = vae.decode(model, latents, max_memory=budget)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before - out.numel() * out.element_size()
        assert peak <= budget / (1 - vae.CUDA_HEADROOM), (peak, budget)
        assert relative_l2(out, decoded) < decode_bound
        mode = vae.encode(model, pixels, sample=False, tile=64) / model.config.scaling_factor
        assert relative_l2(mode, encoded) < encode_bound
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32

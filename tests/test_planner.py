"""The memory planner (``hrkernels.plan``): the UNet walk and whole calls against the live tensors
they allocate, the choices it makes to fit (view batch, FreeScale's window chunk, the VAE budget),
``MemoryPlanError`` before any UNet call, monotonicity, chunked window attention, ``generate
--plan``."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import hrkernels
from hrkernels import MemoryPlanError, ops, planner
from hrkernels.cli import main
from hrkernels.nn.attention import _local_attention
from hrkernels.planner import transformer_call_bytes, unet_call_bytes
from hrkernels.samplers import APT, DemoFusion, FreeScale, MegaFusion, ScaleCrafter, StageResult
from hrkernels.samplers.base import Sampler
from hrkernels.samplers.stages import denoising_step, initial_latents, run_stage, stage_schedule

SAMPLERS = [DemoFusion, APT, ScaleCrafter, FreeScale, MegaFusion]
# |estimate / measured - 1| of a whole call on the CPU (measured: 3.7-6.0% at 256^2-384^2), and
# of one UNet call (measured: 1.0-1.6%).
CALL_TOLERANCE = 0.10
UNET_TOLERANCE = 0.02


class LiveBytes(TorchDispatchMode):
    """The peak bytes of storages ATen ops allocate while the mode is on (a storage counts from
    the op that returns it until it is freed; views and in-place results allocate nothing).
    What existed before (weights, inputs) is not counted."""

    def __init__(self) -> None:
        super().__init__()
        self.alive: set[int] = set()
        self.bytes = self.peak = 0

    @staticmethod
    def key(storage) -> int:
        return storage.data_ptr()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        held = {self.key(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0]
                if isinstance(t, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key, size = self.key(storage), storage.nbytes()
            if key in held or key in self.alive or size == 0:
                continue
            self.alive.add(key)
            self.bytes += size
            self.peak = max(self.peak, self.bytes)
            weakref.finalize(storage, self._freed, key, size)
        return out

    def _freed(self, key: int, size: int) -> None:
        self.alive.discard(key)
        self.bytes -= size


def call(sampler, size, **kwargs):
    kwargs.setdefault("output_type", "pt")
    return sampler(prompt="a cat", height=size[0], width=size[1], num_inference_steps=2,
                   progress=False, generator=torch.Generator().manual_seed(0), **kwargs)


# --------------------------------------------------------------------------------------------------
# Estimates against the live tensors
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
@pytest.mark.parametrize("rows, height, width", [(2, 32, 32), (3, 48, 40)])
def test_the_unet_walk_matches_the_live_tensors_of_one_call(kind, rows, height, width, request):
    unet = request.getfixturevalue(kind).unet
    config = unet.config
    sample = torch.randn(rows, 4, height, width)
    text = torch.randn(rows, 77, config.cross_attention_dim)
    added = None
    if kind == "sdxl":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        added = {"text_embeds": torch.randn(rows, pooled), "time_ids": torch.zeros(rows, 6)}
    live = LiveBytes()
    with torch.no_grad(), live:
        unet(sample, torch.tensor(500.0), encoder_hidden_states=text, added_cond_kwargs=added,
             return_dict=False)
    # The walk counts the input sample too (the caller holds it).
    measured = live.peak + sample.numel() * 4
    estimate = unet_call_bytes(config, rows, height, width, 4).peak
    assert abs(estimate / measured - 1) <= UNET_TOLERANCE, (estimate, measured)


@pytest.mark.parametrize("rows, height, width, text",
                         [(2, 48, 40, 333), (1, 64, 32, 120), (2, 24, 24, 400)])
def test_the_transformer_walk_matches_the_live_tensors_of_one_sd3_call(rows, height, width, text):
    # Sizes and text lengths other than those SD3_PEAKS were fitted on (the last: the text
    # branch's peak).
    from hrkernels.testing import tiny_pipeline

    transformer = tiny_pipeline("sd3").transformer
    config = transformer.config
    sample = torch.randn(rows, config.in_channels, height, width)
    inputs = {"timestep": torch.full((rows,), 500.0),
              "encoder_hidden_states": torch.randn(rows, text, config.joint_attention_dim),
              "pooled_projections": torch.randn(rows, config.pooled_projection_dim)}
    live = LiveBytes()
    with torch.no_grad(), live:
        transformer(hidden_states=sample, return_dict=False, **inputs)
    measured = live.peak + sample.numel() * 4
    estimate = transformer_call_bytes(config, rows, height, width, 4, text_tokens=text).peak
    assert abs(estimate / measured - 1) <= UNET_TOLERANCE, (estimate, measured)


def test_megafusion_plans_every_family():
    # SD3: the transformer walk; IF (pixel space): no VAE phase at all.
    from hrkernels.testing import tiny_pipeline

    sd3 = hrkernels.plan(MegaFusion(tiny_pipeline("sd3")), 512, 512, num_inference_steps=3)
    assert any(p.name.startswith("VAE decode") for p in sd3.phases)
    pixels = hrkernels.plan(MegaFusion(tiny_pipeline("if")), 32, 32, num_inference_steps=3)
    assert not any("VAE" in p.name for p in pixels.phases)
    assert pixels.peak > 0


class MetaLiveBytes(LiveBytes):
    """:class:`LiveBytes` on the meta device (no data pointers: storages are told apart by
    their Python objects, which live as long as the storage)."""

    @staticmethod
    def key(storage) -> int:
        return id(storage)


def _flash_like(query, key, value, *args, **kwargs):
    """SDPA's memory with a fused backend: the output only (the meta device would otherwise take
    the math path and build the N x N scores)."""
    return torch.empty_like(query)


@pytest.mark.parametrize("kind, rows, size", [("sdxl", 2, 128), ("sd15", 2, 64)])
def test_the_unet_walk_matches_the_full_topologies_on_the_meta_device(kind, rows, size,
                                                                       monkeypatch):
    from diffusers import UNet2DConditionModel

    from hrkernels import testing

    config = {"sdxl": testing._SDXL_UNET_CONFIG, "sd15": testing._SD15_UNET_CONFIG}[kind]
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config).to(torch.float16)
    config = unet.config
    meta = {"device": "meta", "dtype": torch.float16}
    sample = torch.empty(rows, 4, size, size, **meta)
    added = None
    if kind == "sdxl":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        added = {"text_embeds": torch.empty(rows, pooled, **meta),
                 "time_ids": torch.empty(rows, 6, **meta)}
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", _flash_like)
    live = MetaLiveBytes()
    with torch.no_grad(), live:
        unet(sample, torch.tensor(500.0, device="meta"),
             encoder_hidden_states=torch.empty(rows, 77, config.cross_attention_dim, **meta),
             added_cond_kwargs=added, return_dict=False)
    measured = live.peak + sample.numel() * 2
    estimate = unet_call_bytes(config, rows, size, size, 2).peak
    assert abs(estimate / measured - 1) <= 0.01, (estimate, measured)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_the_estimate_matches_the_live_tensors_of_a_call(sdxl, sampler):
    live = LiveBytes()
    with live:
        out = call(sampler(sdxl), (256, 192))
    memory = out.memory
    estimate = memory.peak - memory.phases[0].bytes  # the weights existed before the call
    assert memory.phases[0].name == "weights"
    assert abs(estimate / live.peak - 1) <= CALL_TOLERANCE, (estimate, live.peak, str(memory))


def test_the_sampling_estimate_matches_without_the_decode(sdxl):
    live = LiveBytes()
    with live:
        out = call(DemoFusion(sdxl), (256, 256), output_type="latent")
    memory = out.memory
    sampling = max(p.bytes for p in memory.phases if "VAE" not in p.name)
    estimate = sampling - memory.phases[0].bytes
    assert abs(estimate / live.peak - 1) <= CALL_TOLERANCE, (estimate, live.peak)


# --------------------------------------------------------------------------------------------------
# Failing before the work
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_memory_plan_error_comes_before_the_first_unet_call(sdxl, sampler, monkeypatch):
    calls = []
    forward = sdxl.unet.forward
    monkeypatch.setattr(sdxl.unet, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    weights = hrkernels.plan(sampler(sdxl), height=256, width=256).phases[0].bytes
    budget = weights + 2**16
    with pytest.raises(MemoryPlanError) as raised:
        call(sampler(sdxl), (256, 256), max_memory=budget)
    assert calls == []
    message = str(raised.value)
    assert "phase 'stage 1 UNet (" in message
    assert f"but the budget is {budget / 2**20:.1f} MiB" in message
    assert "needs an estimated" in message and "To fit: " in message and "smaller size" in message
    assert raised.value.plan.phases[-1].name.startswith("stage 1 UNet")
    assert isinstance(raised.value, MemoryError) and isinstance(raised.value, ValueError)


def test_a_user_view_batch_that_does_not_fit_says_so(sdxl):
    sampler = DemoFusion(sdxl, view_batch_size=8)
    loose = hrkernels.plan(sampler, height=384, width=384)
    stage = next(p for p in loose.phases if p.name.startswith("stage 3 UNet"))
    with pytest.raises(MemoryPlanError, match=r"a smaller view_batch_size \(this plan runs \d "
                                              r"views per call\)"):
        hrkernels.plan(sampler, height=384, width=384, max_memory=stage.bytes - 1)


# --------------------------------------------------------------------------------------------------
# Monotonic in size and batch
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_the_plan_grows_with_size_and_batch(sdxl, sampler):
    instance = sampler(sdxl)
    sizes = [(128, 128), (256, 128), (256, 256), (384, 256), (384, 384), (512, 512)]
    peaks = [hrkernels.plan(instance, height=h, width=w).peak for h, w in sizes]
    assert peaks == sorted(peaks) and peaks[0] < peaks[-1]
    by_batch = [hrkernels.plan(instance, height=256, width=256, batch_size=b) for b in (1, 2, 3)]
    for name in ("VAE decode", "stage 1 UNet (256x256)" if sampler is ScaleCrafter else
                 "stage 1 UNet (128x128)"):
        phase = [next(p.bytes for p in plan.phases if p.name == name) for plan in by_batch]
        assert phase[0] < phase[1] < phase[2], (name, phase)
    assert [plan.peak for plan in by_batch] == sorted(plan.peak for plan in by_batch)


# --------------------------------------------------------------------------------------------------
# Choices: the view batch, the VAE budget, FreeScale's window chunk
# --------------------------------------------------------------------------------------------------


def _budget_for(sampler, height, width, accept):
    """The largest of a geometric sequence of budgets under the loose plan's peak whose plan
    satisfies ``accept``."""
    peak = hrkernels.plan(sampler, height=height, width=width).peak
    for step in range(1, 100):
        budget = int(peak * 0.97**step)
        try:
            memory = hrkernels.plan(sampler, height=height, width=width, max_memory=budget)
        except MemoryPlanError:
            break
        if accept(memory):
            return budget, memory
    raise AssertionError("no budget gave the plan looked for")


def test_auto_view_batch_resolves_through_the_plan(sdxl):
    # With a budget, "auto" is the largest batch that fits (without one, 8 on a CPU); the tiny
    # model's views are cheap next to its VAE, so the budget that limits them is a narrow band.
    sampler = DemoFusion(sdxl)
    budget, memory = _budget_for(sampler, 384, 384, lambda m: 8 < m.view_batch_size < 30)
    assert all(phase.bytes <= budget for phase in memory.phases)
    loose = hrkernels.plan(sampler, height=384, width=384, max_memory=budget * 10)
    assert loose.view_batch_size > memory.view_batch_size
    out = call(sampler, (384, 384), max_memory=budget)
    assert out.memory.view_batch_size == memory.view_batch_size
    window_rows = [rows for (rows, h, w) in out.unet_calls if (h, w) == (16, 16)]
    assert 2 * 8 < max(window_rows) <= 2 * memory.view_batch_size
    assert out.memory.vae_max_memory is not None and out.memory.vae_max_memory < budget


def test_freescale_chunks_windows_when_the_budget_says_so_with_the_same_result(sdxl,
                                                                              monkeypatch):
    # On the tiny model the VAE's floor (its whole-latent attention) is above the UNet's stages,
    # so no budget leaves the VAE room and the windows none: plan the UNet stages alone (the VAE
    # runs with its own default budget in both calls).
    monkeypatch.setattr(planner._Planner, "vae_phases", lambda self: [])
    sampler = FreeScale(sdxl)
    budget, memory = _budget_for(sampler, 512, 512, lambda m: m.window_chunk is not None)
    assert "window chunk: " in str(memory) and memory.window_chunk >= 1
    chunked = call(sampler, (512, 512), output_type="latent", max_memory=budget)
    assert chunked.memory.window_chunk == memory.window_chunk
    whole = call(sampler, (512, 512), output_type="latent", max_memory=budget * 100)
    assert whole.memory.window_chunk is None
    assert torch.equal(chunked.latents, whole.latents)


@pytest.mark.parametrize("chunk", [1, 3, 5, 100])
def test_chunked_window_attention_equals_all_windows_at_once(chunk):
    generator = torch.Generator().manual_seed(0)
    grid, window, heads = (12, 10), (6, 6), 2
    query, key, value = (torch.randn(2, grid[0] * grid[1], 8, generator=generator)
                         for _ in range(3))
    starts = ops.window_grid(grid[0], grid[1], window, (3, 3), 1, generator=generator)
    assert starts.shape[0] > 5
    whole = _local_attention(query, key, value, grid, starts, window, heads, None)
    chunked = _local_attention(query, key, value, grid, starts, window, heads, chunk)
    assert torch.equal(chunked, whole)


# --------------------------------------------------------------------------------------------------
# The API and the command line
# --------------------------------------------------------------------------------------------------


def test_plan_checks_its_arguments(sdxl):
    sampler = ScaleCrafter(sdxl)
    with pytest.raises(ValueError, match="batch_size"):
        hrkernels.plan(sampler, height=256, width=256, batch_size=0)
    with pytest.raises(ValueError, match="max_memory"):
        hrkernels.plan(sampler, height=256, width=256, max_memory=0)
    with pytest.raises(TypeError, match="sampler"):
        hrkernels.plan(sdxl, height=256, width=256)
    with pytest.raises(ValueError, match="height"):
        hrkernels.plan(sampler, height=250, width=256)


def test_the_plan_follows_the_decodes_a_call_makes(sdxl):
    sampler = DemoFusion(sdxl)
    names = {key: [p.name for p in hrkernels.plan(sampler, height=256, width=256, **kwargs).phases
                   if "VAE" in p.name]
             for key, kwargs in {"latent": {"output_type": "latent"}, "pil": {},
                                 "previews": {"decode_stages": True}}.items()}
    assert names == {"latent": [], "pil": ["VAE decode"],
                     "previews": ["VAE decode", "VAE decode (preview, stage 1)"]}


def test_the_plan_prints_a_table_of_its_phases(sdxl):
    memory = hrkernels.plan(FreeScale(sdxl), height=256, width=256)
    text = str(memory).splitlines()
    assert text[0].startswith("FreeScale memory plan: 256x256 (W x H), batch 1, cpu")
    for phase in memory.phases:
        assert any(line.strip().startswith(phase.name) for line in text)
    assert [p.name for p in memory.phases][:5] == [
        "weights", "stage 1 UNet (128x128)", "VAE decode (stage 1)", "VAE encode (stage 2)",
        "stage 2 UNet (256x256)"]


def test_generate_plan_prints_the_plan_and_exits(capsys):
    args = ["generate", "--model", "tiny-sdxl", "--method", "demofusion", "--prompt", "a",
            "--height", "256", "--width", "256", "--plan"]
    assert main(args) == 0
    printed = capsys.readouterr()
    assert "DemoFusion memory plan: 256x256 (W x H)" in printed.out and "VAE decode" in printed.out
    assert main(args + ["--max-memory", "0.001"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert error.startswith("hrkernels generate: DemoFusion: 256x256 (W x H), batch 1: phase ")
    assert "the budget is 1.0 MiB" in error


class PlainSampler(Sampler):
    """A new method with no planner code of its own: plain sampling at the target size."""

    name = "Plain"

    def stage_sizes(self, height, width):
        return [(height, width)]

    def generate(self, run, sizes):
        f = self.adapter.vae_scale_factor
        latent = (sizes[0][0] // f, sizes[0][1] // f)
        schedule = stage_schedule(self.scheduler_template, run.num_inference_steps, run.device,
                                  scheduler_class=self.scheduler_class())
        batch = run.engine.plan({latent: [run.batch]}, self.view_batch_size, run.guidance)
        z = run_stage(run, 1, latent, schedule, initial_latents(run, latent, schedule.scheduler),
                      denoising_step(run, schedule, batch))
        return [StageResult(1, *sizes[0], z)]


def test_a_new_sampler_gets_its_plan_from_the_base_class(sdxl):
    out = call(PlainSampler(sdxl), (192, 128), output_type="latent")
    assert [p.name for p in out.memory.phases] == [
        "weights", "stage 1 UNet (128x192)", "attention (largest layer, stage 1)"]
    assert out.unet_calls == {(2, 24, 16): 2}
    with pytest.raises(MemoryPlanError, match="phase 'stage 1 UNet"):
        call(PlainSampler(sdxl), (192, 128), max_memory=out.memory.phases[0].bytes + 1)


def test_the_gpu_check_formats_its_table_and_needs_cuda():
    from hrkernels.bench import plan as bench_plan

    result = {"case": "demofusion-2048", "choices": "view_batch_size=12",
              "sampling": bench_plan.ratio_row("demofusion-2048", 11 * 2**30, 10 * 2**30),
              "decode": bench_plan.ratio_row("demofusion-2048", 5 * 2**30, 5 * 2**30),
              "call": bench_plan.ratio_row("demofusion-2048", 12 * 2**30, 10 * 2**30)}
    table = bench_plan.markdown([result]).splitlines()
    assert "| demofusion-2048 | sampling | 11.00 | 10.00 | 1.100 | yes |  |" in table
    assert "| demofusion-2048 | call | 12.00 | 10.00 | 1.200 | no | view_batch_size=12 |" in table
    assert len(bench_plan.CASES) == 8
    if not torch.cuda.is_available():
        assert bench_plan.main(None) == 2

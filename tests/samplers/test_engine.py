"""The engine: guidance strategies, the executor as the one way to the model, fixed shapes."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch

import hrkernels
from hrkernels.samplers import DemoFusion
from hrkernels.samplers.engine import (
    CFG,
    Engine,
    LocalExecutor,
    NoGuidance,
    NoiseDampedCFG,
    ViewSet,
    guidance_for,
)
from hrkernels.samplers.pipelines import ModelCall, adapter_for


def _engine(pipe, guided, executor=None, batch=1):
    adapter = adapter_for(pipe, "test")
    prompts = ["a photo of a cat", "a dog"][:batch]
    cond = adapter.encode_prompts(guided=guided, size=(256, 256), num_images_per_prompt=1,
                                  prompt=prompts, negative_prompt=["blurry"] * batch)
    return Engine(adapter, cond, executor), adapter, cond


def _direct(adapter, cond, branch, views, timestep, config=None):
    """One model call per view on one guidance branch (no batching, no engine)."""
    rows = []
    for index in range(views.shape[0]):
        image = index % cond.batch
        text = {name: value[image:image + 1] for name, value in cond.branch(branch).items()}
        micro = adapter.micro_conditioning(cond, torch.zeros(1, 2, dtype=torch.int64))
        call = ModelCall(views[index:index + 1], timestep, text, micro)
        if config is None:
            rows.append(adapter.denoise(call))
        else:
            with hrkernels.variant(adapter.model, config):
                rows.append(adapter.denoise(call))
    return torch.cat(rows).float()


class Recording:
    """An executor that records every call it runs and delegates to the local one."""

    def __init__(self):
        self.shapes = []
        self.variants = []

    def run(self, evaluate, calls, consume):
        for call in calls:
            self.shapes.append(call.shape)
            self.variants.append(call.variant)
        LocalExecutor().run(evaluate, calls, consume)


def test_guidance_for():
    assert isinstance(guidance_for(7.5), CFG) and guidance_for(7.5).scale == 7.5
    assert isinstance(guidance_for(1.0), NoGuidance)
    with pytest.raises(TypeError, match="guidance_scale"):
        guidance_for("7.5")


@pytest.mark.parametrize("batch", [1, 2])
def test_cfg_is_u_plus_w_times_c_minus_u(sdxl, batch):
    engine, adapter, cond = _engine(sdxl, guided=True, batch=batch)
    views = torch.randn(5 * batch, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    timestep = torch.tensor(501.0)
    guidance = CFG(4.0)
    sizes = engine.plan({(16, 16): [views.shape[0]]}, 3, guidance)
    (eps,) = engine(timestep, [ViewSet(views)], sizes, guidance)
    uncond = _direct(adapter, cond, "uncond", views, timestep)
    text = _direct(adapter, cond, "cond", views, timestep)
    assert not torch.allclose(uncond, text)
    torch.testing.assert_close(eps, uncond + 4.0 * (text - uncond), atol=1e-4, rtol=1e-4)
    # 2 rows per view, views padded to calls of exactly k.
    k = sizes[(16, 16)]
    assert engine.calls == Counter({(2 * k, 16, 16): -(-views.shape[0] // k)})


def test_no_guidance_runs_the_cond_branch_alone(sdxl):
    recording = Recording()
    engine, adapter, cond = _engine(sdxl, guided=False, executor=recording)
    assert cond.uncond is None
    views = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    guidance = NoGuidance()
    sizes = engine.plan({(16, 16): [4]}, 4, guidance)
    (eps,) = engine(torch.tensor(301.0), [ViewSet(views)], sizes, guidance)
    assert recording.shapes == [(4, 16, 16)]
    torch.testing.assert_close(eps, _direct(adapter, cond, "cond", views, torch.tensor(301.0)),
                               atol=1e-5, rtol=1e-5)


def test_noise_damped_cfg_takes_the_uncond_base_pass_alone(sdxl):
    # Main configuration: mid_block and up_blocks.0 re-dilated by 2; base: mid_block by 3. The
    # guided prediction is u_base + w (c - u), with the base pass on the uncond rows only.
    pipe = copy.copy(sdxl)
    pipe.unet = copy.deepcopy(sdxl.unet)
    main = hrkernels.ReDilation({"mid_block": 2, "up_blocks.0": 2})
    base = hrkernels.ReDilation({"mid_block": 3})
    hrkernels.patch(pipe.unet, main)
    hrkernels.patch(pipe.unet, base, variant="base")
    recording = Recording()
    engine, adapter, cond = _engine(pipe, guided=True, executor=recording)
    views = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    timestep = torch.tensor(801.0)
    guidance = NoiseDampedCFG(5.0)
    sizes = engine.plan({(16, 16): [3]}, 3, guidance)
    (eps,) = engine(timestep, [ViewSet(views)], sizes, guidance)
    assert recording.shapes == [(6, 16, 16), (3, 16, 16)]
    assert recording.variants == [None, "base"]

    # Independent: two separately patched copies of the UNet.
    only_main, only_base = (copy.deepcopy(sdxl.unet) for _ in range(2))
    hrkernels.patch(only_main, main)
    hrkernels.patch(only_base, base)
    copies = {}
    for name, unet in (("main", only_main), ("base", only_base)):
        clone = copy.copy(pipe)
        clone.unet = unet
        copies[name] = adapter_for(clone, "test")
    uncond = _direct(copies["main"], cond, "uncond", views, timestep)
    text = _direct(copies["main"], cond, "cond", views, timestep)
    uncond_base = _direct(copies["base"], cond, "uncond", views, timestep)
    assert not torch.allclose(uncond, uncond_base)
    torch.testing.assert_close(eps, uncond_base + 5.0 * (text - uncond), atol=1e-4, rtol=1e-4)
    # The engine left the UNet in its default configuration.
    assert hrkernels.patching.patch_state(pipe.unet).active_variant == "default"


def test_every_model_call_of_a_run_goes_through_the_executor(sdxl, monkeypatch):
    forward = sdxl.unet.forward
    model_calls = []

    def counted(sample, timestep, **kwargs):
        model_calls.append(tuple(sample.shape))
        return forward(sample, timestep, **kwargs)

    monkeypatch.setattr(sdxl.unet, "forward", counted)
    recording = Recording()
    out = DemoFusion(sdxl, view_batch_size=16, executor=recording)(
        prompt="a cat", height=384, width=384, num_inference_steps=2, output_type="latent",
        progress=False, generator=torch.Generator().manual_seed(0))
    assert len(model_calls) == len(recording.shapes)
    assert Counter(recording.shapes) == Counter(out.unet_calls)
    # The planned fixed shapes: stage 1 one image (2 rows), stages 2-3 batches of 13 views.
    assert set(recording.shapes) == {(2, 16, 16), (26, 16, 16)}


def test_rows_are_built_before_the_step_loop(sdxl):
    engine, _, _ = _engine(sdxl, guided=True, batch=2)
    guidance = CFG(7.5)
    sizes = engine.plan({(16, 16): [13, 34]}, 5, guidance)
    built = dict(engine._text)
    views = torch.randn(34, 4, 16, 16)
    engine(torch.tensor(1.0), [ViewSet(views)], sizes, guidance)
    assert engine._text == built  # nothing new inside the step

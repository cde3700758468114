"""Composable ``patch`` calls (keyed by spec type) and named configurations switched per UNet call
(``hrkernels.patching.variant`` / ``set_variant``) on the tiny SD 1.5 UNet (CPU, fp32).

Every "as if patched alone" is checked bit for bit against the same UNet patched with that spec
alone; restoring against a snapshot of the unpatched UNet (see ``test_patch.assert_restored``).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close
from test_patch import (
    assert_restored,
    conv_of,
    lora_config,
    make_unet,
    merged_kernel,
    random_input,
    redilated_layers,
    small_unet,
    snapshot,
    unet_inputs,
)
from torch import nn

from hrkernels import ReDilation, is_patched, ops, patch, patched, set_step, unpatch
from hrkernels.patching import patch_state, register_spec_type, set_variant, variant
from hrkernels.patching import registry as patch_registry

ATTENTION = "mid_block.attentions.0.transformer_blocks.0.attn1"

# ScaleCrafter's noise-damped guidance on SD 1.5 (in the tiny UNet's block names): the main UNet
# re-dilates (and partly disperses) mid_block and up_blocks.0; the "base" UNet re-dilates
# mid_block less, part of up_blocks.0, and a block the main one leaves alone.
MAIN = ReDilation({"mid_block": 4, "up_blocks.0": 4}, until_step=2,
                  dispersed={"mid_block.resnets.0.conv1": 2})
BASE = ReDilation({"mid_block": 2, "up_blocks.0.resnets.0": 2, "down_blocks.3": 2}, until_step=3)


def one_image_inputs(unet: nn.Module) -> dict:
    """``unet_inputs`` for a batch of one 4x16x16 latent."""
    inputs = unet_inputs(unet)
    one = {key: value[:1] for key, value in inputs.items() if isinstance(value, torch.Tensor)}
    return {**inputs, **one}


def run(unet: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return unet(**inputs).sample


def alone(unet: nn.Module, inputs: dict, spec) -> torch.Tensor:
    """The output of ``unet`` patched with ``spec`` alone (at step 0)."""
    with patched(unet, spec):
        return run(unet, inputs)


# --------------------------------------------------------------------------------------------------
# A second spec type: scales the output of one attention module (wraps its forward)
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AttentionScale:
    factor: float
    layer: str = ATTENTION
    fail: bool = False


class _AttentionScaleInstalled:
    def __init__(self, module: nn.Module, factor: float) -> None:
        self.module, self.active = module, False
        original = module.forward

        def forward(*args, **kwargs):
            output = original(*args, **kwargs)
            return output * factor if self.active else output

        module.forward = forward

    def set_step(self, step_index, timestep):
        pass

    def set_active(self, active):
        self.active = active

    def remove(self):
        del self.module.forward


class _AttentionScalePlan:
    def __init__(self, spec: AttentionScale, unet: nn.Module) -> None:
        self.spec, self.module = spec, unet.get_submodule(spec.layer)
        self.targets = frozenset({spec.layer})

    def install(self, variant):
        if self.spec.fail:
            raise RuntimeError("install failed")
        return _AttentionScaleInstalled(self.module, self.spec.factor)


@pytest.fixture
def attention_scale(monkeypatch):
    monkeypatch.setattr(patch_registry, "_SPEC_TYPES", dict(patch_registry._SPEC_TYPES))
    register_spec_type(AttentionScale, _AttentionScalePlan)
    return AttentionScale


def test_patch_calls_compose_and_unpatch_by_type(attention_scale):
    unet = make_unet("sd15")
    inputs = one_image_inputs(unet)
    redilation, scale = ReDilation({"mid_block": 2, "up_blocks.0": 3}), AttentionScale(1.5)
    before = snapshot(unet)
    reference = run(unet, inputs)
    redilated_alone = alone(unet, inputs, redilation)
    scaled_alone = alone(unet, inputs, scale)

    patch(unet, redilation)
    patch(unet, scale)  # a second call, another type: both installed
    assert is_patched(unet, ReDilation) and is_patched(unet, AttentionScale)
    assert patch_state(unet).specs == {"default": {ReDilation: redilation, AttentionScale: scale}}
    both = run(unet, inputs)
    for other in (reference, redilated_alone, scaled_alone):
        assert not torch.allclose(both, other, atol=1e-4)

    unpatch(unet, ReDilation)
    assert not is_patched(unet, ReDilation) and redilated_layers(unet) == []
    assert torch.equal(run(unet, inputs), scaled_alone)
    with pytest.raises(ValueError, match="no ReDilation is installed.*AttentionScale in 'default'"):
        unpatch(unet, ReDilation)
    patch(unet, redilation)
    unpatch(unet, AttentionScale)
    assert torch.equal(run(unet, inputs), redilated_alone)
    patch(unet, scale)
    assert torch.equal(run(unet, inputs), both)

    unpatch(unet)
    assert not is_patched(unet)
    assert_restored(unet, before)
    assert torch.equal(run(unet, inputs), reference)


def test_a_failing_patch_on_a_patched_unet_changes_nothing(attention_scale):
    unet = make_unet("sd15")
    patch(unet, ReDilation({"mid_block": 2}))
    before = snapshot(unet)
    conv = conv_of(unet, "mid_block.resnets.0.conv1")
    # Installs into forwards the default configuration holds, then fails: all of it is undone.
    with pytest.raises(RuntimeError, match="install failed"):
        patch(unet, [ReDilation({"mid_block": 3}), AttentionScale(2.0, fail=True)],
              variant="base")
    assert_restored(unet, before)
    assert conv.forward.variants == ("default",)
    assert patch_state(unet).variants == ("default",)
    with pytest.raises(ValueError, match="does not exist"):
        patch(unet, [AttentionScale(2.0), ReDilation({"down_blocks.9": 2})], variant="base")
    assert_restored(unet, before)
    unpatch(unet)


def test_unpatch_arguments_are_checked(attention_scale):
    unet = make_unet("sd15")
    patch(unet, ReDilation({"mid_block": 2}))
    with pytest.raises(ValueError, match="no AttentionScale is installed"):
        unpatch(unet, AttentionScale)
    with pytest.raises(ValueError, match="no configuration 'base'; its configurations: 'default'"):
        unpatch(unet, variant="base")
    with pytest.raises(TypeError, match="spec_type must be a spec class"):
        unpatch(unet, "ReDilation")
    with pytest.raises(TypeError, match="variant must be a str"):
        unpatch(unet, variant=0)
    with pytest.raises(TypeError, match="spec_type must be a spec class"):
        is_patched(unet, ReDilation({"mid_block": 2}))
    assert is_patched(unet) and is_patched(unet, ReDilation, variant="default")
    assert not is_patched(unet, AttentionScale) and not is_patched(unet, variant="base")
    unpatch(unet, variant="default")
    assert not is_patched(unet)


# --------------------------------------------------------------------------------------------------
# Configurations
# --------------------------------------------------------------------------------------------------


def test_two_configurations_in_one_step_match_each_spec_alone():
    unet = make_unet("sd15")
    inputs = one_image_inputs(unet)
    before = snapshot(unet)
    reference = run(unet, inputs)
    main_alone = alone(unet, inputs, MAIN)
    base_alone = alone(unet, inputs, BASE)
    assert not torch.allclose(main_alone, base_alone, atol=1e-4)

    patch(unet, MAIN)
    patch(unet, BASE, variant="base")
    state = patch_state(unet)
    assert state.variants == ("default", "base") and state.active_variant == "default"
    assert state.specs == {"default": {ReDilation: MAIN}, "base": {ReDilation: BASE}}
    # One forward per convolution, whichever configurations re-dilate it.
    shared = conv_of(unet, "mid_block.resnets.0.conv1").forward
    assert shared.variants == ("default", "base")
    assert len(redilated_layers(unet)) == 4 + 7 + 4  # mid_block, up_blocks.0, down_blocks.3

    assert torch.equal(run(unet, inputs), main_alone)
    with variant(unet, "base") as switched:
        assert switched is unet and patch_state(unet).active_variant == "base"
        assert torch.equal(run(unet, inputs), base_alone)
    assert patch_state(unet).active_variant == "default"
    assert torch.equal(run(unet, inputs), main_alone)
    # Step 2: MAIN (until_step 2) is off, BASE (until_step 3) still on. Step 3: both off.
    for step, main_expected, base_expected in [(2, reference, base_alone),
                                               (3, reference, reference)]:
        set_step(unet, step, 999 - step)
        assert torch.equal(run(unet, inputs), main_expected), step
        with variant(unet, "base"):
            assert torch.equal(run(unet, inputs), base_expected), step

    set_step(unet, 0)
    unpatch(unet, variant="base")
    assert not is_patched(unet, variant="base") and shared.variants == ("default",)
    assert torch.equal(run(unet, inputs), main_alone)
    with pytest.raises(ValueError, match="no configuration 'base'; its configurations: 'default'"):
        set_variant(unet, "base")
    unpatch(unet)
    assert_restored(unet, before)
    assert torch.equal(run(unet, inputs), reference)


def test_configuration_switch_per_layer_and_step():
    """What one shared convolution computes in each configuration, step by step (progressive
    schedules with different until_steps, dispersion in one configuration only)."""
    unet = make_unet("sd15")
    name = "mid_block.resnets.0.conv1"
    conv = conv_of(unet, name)
    x = random_input(conv, 12, 12)
    original = conv(x)
    dispersed = ops.disperse_kernel(conv.weight, 2, 0.05)

    def dilated(factor):
        return F.conv2d(x, conv.weight, conv.bias, padding=factor, dilation=factor)

    patch(unet, ReDilation({"mid_block": 4}, until_step=4, progressive=True))
    patch(unet, ReDilation({name: 4}, until_step=2, dispersed={name: 2}), variant="dispersed")
    patch(unet, ReDilation({"mid_block": 3}), variant="base")
    # default: ceil(4 * (4 - i) / 4) >= 2 -> 4, 3, 2, 2, off; dispersed: 5x5 at 2, 2, off;
    # base: 3 at every step.
    for step in range(5):
        set_step(unet, step)
        default_factor = [4, 3, 2, 2, None][step]
        assert_close(conv(x), original if default_factor is None else dilated(default_factor))
        with variant(unet, "dispersed"):
            expected = F.conv2d(x, dispersed, conv.bias, padding=4, dilation=2)
            assert_close(conv(x), expected if step < 2 else original)
            with variant(unet, "base"):  # nested switches restore in order
                assert_close(conv(x), dilated(3))
            assert patch_state(unet).active_variant == "dispersed"
    # A spec patched later starts at the current step (4) and in the active configuration only.
    other = conv_of(unet, "down_blocks.3.resnets.0.conv1")
    y = random_input(other)
    other_original = other(y)
    patch(unet, ReDilation({"down_blocks.3": 2}, until_step=4), variant="late")
    patch(unet, ReDilation({"down_blocks.3": 2}, until_step=5), variant="later")
    with variant(unet, "late"):
        assert torch.equal(other(y), other_original)
        assert torch.equal(conv(x), original)  # "late" does not touch mid_block
    with variant(unet, "later"):
        assert_close(other(y), F.conv2d(y, other.weight, other.bias, padding=2, dilation=2))
    assert torch.equal(other(y), other_original)
    unpatch(unet)
    assert redilated_layers(unet) == []
    assert torch.equal(conv(x), original)


def test_variant_restores_on_exception_and_refuses_unknown_names():
    unet = make_unet("sd15")
    name = "mid_block.resnets.1.conv2"
    conv = conv_of(unet, name)
    x = random_input(conv)
    original = conv(x)
    with pytest.raises(ValueError, match="only configuration|configurations: 'default'"):
        set_variant(unet, "base")
    assert set_variant(unet, "default") == "default"  # every UNet has "default"
    patch(unet, ReDilation({name: 2}))
    patch(unet, ReDilation({name: 3}), variant="base")
    with pytest.raises(RuntimeError, match="inside"):
        with variant(unet, "base"):
            assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=3, dilation=3))
            raise RuntimeError("inside")
    assert patch_state(unet).active_variant == "default"
    assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=2, dilation=2))
    with pytest.raises(ValueError, match="no configuration 'bsae'; its configurations: "
                                         "'default', 'base'"):
        with variant(unet, "bsae"):
            pass
    with pytest.raises(TypeError, match="variant must be a str"):
        set_variant(unet, None)
    with pytest.raises(ValueError, match="non-empty"):
        patch(unet, ReDilation({name: 2}), variant="")
    # The active configuration cannot lose its last spec while others stay.
    assert set_variant(unet, "base") == "default"
    with pytest.raises(ValueError, match="'base' is active"):
        unpatch(unet, variant="base")
    assert set_variant(unet, "default") == "base"
    # "default" exists even when it holds nothing (it is then the original UNet).
    unpatch(unet, variant="default")
    assert patch_state(unet).variants == ("default", "base")
    with pytest.raises(ValueError, match="no spec is installed in configuration 'default'"):
        unpatch(unet, variant="default")
    assert torch.equal(conv(x), original)
    with variant(unet, "base"):
        unpatch(unet)  # everything: allowed anywhere; leaving the block returns to "default"
    assert not is_patched(unet) and torch.equal(conv(x), original)


def test_patched_removes_only_its_own_specs():
    unet = make_unet("sd15")
    name = "mid_block.resnets.0.conv2"
    conv = conv_of(unet, name)
    x = random_input(conv)
    patch(unet, ReDilation({name: 2}))
    with patched(unet, ReDilation({"mid_block": 3}), variant="base"):
        with variant(unet, "base"):
            assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=3, dilation=3))
    assert patch_state(unet).variants == ("default",)
    assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=2, dilation=2))
    assert redilated_layers(unet) == [name]
    unpatch(unet)


def test_lora_adapters_in_two_configurations():
    unet = make_unet("sd15")
    unet.add_adapter(lora_config())
    name = "mid_block.resnets.1.conv1"
    layer = unet.get_submodule(name)
    x = random_input(layer.base_layer)
    before_layer = layer(x)
    before = snapshot(unet)

    def expected(factor):
        return F.conv2d(x, merged_kernel(layer), layer.base_layer.bias, padding=factor,
                        dilation=factor)

    patch(unet, ReDilation({"mid_block": 2}))
    patch(unet, ReDilation({name: 3}), variant="base")
    # One forward per convolution (base layer and lora_A), holding both configurations.
    assert sorted(redilated_layers(unet)) == sorted(
        [f"mid_block.resnets.{i}.conv{j}.{part}" for i in range(2) for j in (1, 2)
         for part in ("base_layer", "lora_A.default")]
    )
    assert layer.lora_A["default"].forward.variants == ("default", "base")
    assert_close(layer(x), expected(2))
    with variant(unet, "base"):
        assert_close(layer(x), expected(3))
    unpatch(unet, variant="default")
    assert layer.lora_A["default"].forward.variants == ("base",)
    assert torch.equal(layer(x), before_layer)
    with variant(unet, "base"):
        assert_close(layer(x), expected(3))
    unpatch(unet)
    assert_restored(unet, before)
    assert torch.equal(layer(x), before_layer)


# --------------------------------------------------------------------------------------------------
# torch.compile: one graph per distinct configuration, none per switch or step
# --------------------------------------------------------------------------------------------------


def test_compile_once_per_configuration_when_switching_every_call():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    unet = small_unet()
    inputs = unet_inputs(unet, size=8)
    patch(unet, ReDilation({"down_blocks.1": 3, "mid_block": 2}, until_step=2))
    patch(unet, ReDilation({"mid_block": 3, "up_blocks.0": 2}, until_step=3), variant="base")
    compiled = torch.compile(unet, backend="eager", fullgraph=True)
    try:
        # Two sampling runs of five steps, each step evaluating both configurations.
        for step in [*range(5), *range(5)]:
            set_step(compiled, step)
            assert_close(run(compiled, inputs), run(unet, inputs))
            with variant(compiled, "base"):
                assert_close(run(compiled, inputs), run(unet, inputs))
        # Graphs: default with its re-dilation (steps 0-1), base with its re-dilation (steps 0-2),
        # and the original UNet (default from step 2, base from step 3), which both
        # configurations share since every layer then runs its original forward.
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 3
    finally:
        unpatch(unet)
        torch._dynamo.reset()

"""``hrkernels.patch`` with ``ReDilation`` on tiny SD 1.5 / SDXL UNets (CPU).

What a patched convolution computes is checked against ``hrkernels.ops.dilated_conv2d`` /
``F.conv2d`` called directly; what ``unpatch`` restores is checked bit for bit (outputs, state_dict,
parameter storage, module classes, instance attributes).
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, assert_close_to_fp32
from diffusers import UNet2DConditionModel
from torch import nn
from torch._dynamo.testing import CompileCounter

from hrkernels import ReDilation, is_patched, ops, patch, patched, set_step, unpatch
from hrkernels.nn import ReDilatedConvForward
from hrkernels.patching import patch_state, redilation_factor, register_spec_type
from hrkernels.patching import registry as patch_registry
from hrkernels.patching.names import block_names, resolve_convs
from hrkernels.testing import tiny_pipeline

# The ScaleCrafter plans of METHODS.md, in this library's spec (layers of a dispersed block keep
# their factor in `layers`: a dispersed layer runs the enlarged kernel at factor / scale).
SDXL_2048 = ReDilation({"mid_block": 2, "up_blocks.0": 2}, until_step=30)
SDXL_4096 = ReDilation(
    {"down_blocks.2": 4, "mid_block": 4, "up_blocks.0": 4, "up_blocks.1": 3, "up_blocks.2": 2},
    until_step=35,
    progressive=True,
)
SD15_1024 = ReDilation({"down_blocks.3": 2, "mid_block": 2, "up_blocks.0": 2}, until_step=30)
SD15_2048 = ReDilation(
    {
        "down_blocks.0": 2, "down_blocks.1": 4, "down_blocks.2": 4, "down_blocks.3": 4,
        "mid_block": 4, "up_blocks.0": 4, "up_blocks.1": 4, "up_blocks.2": 4, "up_blocks.3": 2,
    },
    until_step=35,
    progressive=True,
    dispersed={name: 2 for name in
               ("down_blocks.2", "down_blocks.3", "mid_block", "up_blocks.0", "up_blocks.1")},
)


def make_unet(kind: str = "sd15") -> UNet2DConditionModel:
    return tiny_pipeline(kind).unet.eval()


def small_unet() -> UNet2DConditionModel:
    """A UNet2DConditionModel without attention (two levels), for the compile tests: tracing the
    tiny SD UNets takes ~8 s per graph on a 2-core CPU, this one ~1 s."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return UNet2DConditionModel(
            sample_size=8,
            down_block_types=("DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D"),
            mid_block_type="UNetMidBlock2D",
            block_out_channels=(8, 16),
            layers_per_block=1,
            cross_attention_dim=8,
            norm_num_groups=4,
        ).eval()


def unet_inputs(unet: UNet2DConditionModel, size: int = 16, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    config = unet.config
    inputs = {
        "sample": torch.randn(2, 4, size, size, generator=generator),
        "timestep": torch.tensor([500, 500]),
        "encoder_hidden_states": torch.randn(2, 7, config.cross_attention_dim, generator=generator),
    }
    if config.addition_embed_type == "text_time":
        text = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, text, generator=generator),
            "time_ids": torch.tensor([[128.0, 128, 0, 0, 128, 128]] * 2),
        }
    return inputs


def run(unet: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return unet(**inputs).sample


def random_input(conv: nn.Conv2d, height: int = 9, width: int = 11, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, conv.in_channels, height, width, generator=generator)


def conv_of(unet: nn.Module, name: str) -> nn.Conv2d:
    module = unet.get_submodule(name)
    return getattr(module, "base_layer", module)


def redilated_layers(unet: nn.Module) -> list[str]:
    """Names of the convolutions whose forward is a ReDilatedConvForward now."""
    return [
        name for name, module in unet.named_modules()
        if isinstance(module.__dict__.get("forward"), ReDilatedConvForward)
    ]


def snapshot(unet: nn.Module) -> dict:
    """Everything patch must not change or must restore: parameters and buffers (values and
    storage), module classes and instance attributes."""
    return {
        "state": {key: value.clone() for key, value in unet.state_dict().items()},
        "storage": {key: value.data_ptr() for key, value in unet.state_dict().items()},
        "classes": {name: type(module) for name, module in unet.named_modules()},
        "attributes": {name: dict(vars(module)) for name, module in unet.named_modules()},
    }


def assert_restored(unet: nn.Module, before: dict) -> None:
    after = snapshot(unet)
    assert after["classes"] == before["classes"]
    assert after["storage"] == before["storage"]
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key
    for name, attributes in before["attributes"].items():
        assert after["attributes"][name].keys() == attributes.keys(), name
        for key, value in attributes.items():
            assert after["attributes"][name][key] is value, (name, key)


# --------------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------------

BLOCK_CONVS = {
    # block -> (number of resnets, has a down/upsampler)
    "sd15": {
        "down_blocks.0": (2, True), "down_blocks.1": (2, True), "down_blocks.2": (2, True),
        "down_blocks.3": (2, False), "mid_block": (2, False),
        "up_blocks.0": (3, True), "up_blocks.1": (3, True), "up_blocks.2": (3, True),
        "up_blocks.3": (3, False),
    },
    "sdxl": {
        "down_blocks.0": (2, True), "down_blocks.1": (2, True), "down_blocks.2": (2, False),
        "mid_block": (2, False), "up_blocks.0": (3, True), "up_blocks.1": (3, True),
        "up_blocks.2": (3, False),
    },
}


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_block_stands_for_its_3x3_convolutions(kind):
    unet = make_unet(kind)
    assert sorted(block_names(unet)) == sorted(BLOCK_CONVS[kind])
    for block, (resnets, has_sampler) in BLOCK_CONVS[kind].items():
        expected = [f"{block}.resnets.{i}.conv{j}" for i in range(resnets) for j in (1, 2)]
        if has_sampler:
            sampler = "downsamplers" if block.startswith("down") else "upsamplers"
            expected.append(f"{block}.{sampler}.0.conv")
        assert sorted(slot.name for slot in resolve_convs(unet, block)) == sorted(expected)
    # A part of a block, and a single layer.
    assert [s.name for s in resolve_convs(unet, "up_blocks.0.resnets.1")] == [
        "up_blocks.0.resnets.1.conv1", "up_blocks.0.resnets.1.conv2"]
    assert [s.name for s in resolve_convs(unet, "conv_in")] == ["conv_in"]


def test_scalecrafter_sdxl_2048_plan_resolves():
    unet = make_unet("sdxl")
    patch(unet, SDXL_2048)
    expected = [f"mid_block.resnets.{i}.conv{j}" for i in range(2) for j in (1, 2)]
    expected += [f"up_blocks.0.resnets.{i}.conv{j}" for i in range(3) for j in (1, 2)]
    expected += ["up_blocks.0.upsamplers.0.conv"]
    assert sorted(redilated_layers(unet)) == sorted(expected)
    unpatch(unet)
    assert redilated_layers(unet) == []


@pytest.mark.parametrize(
    "kind, spec, count",
    [("sdxl", SDXL_4096, 4 + 4 + 7 + 7 + 6), ("sd15", SD15_1024, 4 + 4 + 7),
     ("sd15", SD15_2048, 5 + 5 + 5 + 4 + 4 + 7 + 7 + 7 + 6)],
)
def test_scalecrafter_plans_resolve(kind, spec, count):
    unet = make_unet(kind)
    with patched(unet, spec):
        assert len(redilated_layers(unet)) == count


def test_unknown_name_lists_the_blocks_and_changes_nothing():
    unet = make_unet("sdxl")
    before = snapshot(unet)
    with pytest.raises(ValueError) as error:
        # SD 1.5's name; SDXL has three levels (the official ScaleCrafter code ignored it silently).
        patch(unet, ReDilation({"mid_block": 2, "down_blocks.3": 2}))
    message = str(error.value)
    assert "'down_blocks.3'" in message
    for block in BLOCK_CONVS["sdxl"]:
        assert block in message
    assert not is_patched(unet)
    assert_restored(unet, before)


@pytest.mark.parametrize(
    "layers, dispersed, match",
    [
        ({"up_blocks.0.resnets.0.conv_shortcut": 2}, None, "odd square kernel"),
        ({"down_blocks.1.attentions.0": 2}, None, "holds no 3x3 convolution"),
        ({"mid_block.resnets.0.conv9": 2}, None, "does not exist"),
        ({"": 2}, None, "does not exist"),
        ({"mid_block": 2, "mid_block.resnets.0.conv1": 3}, None, "selected by both"),
        ({"mid_block": 2}, {"up_blocks.0": 2}, "no re-dilation factor"),
        ({"mid_block": 3}, {"mid_block": 4}, "must be >= 1"),
        ({"mid_block": 2}, {"down_blocks.9": 2}, "does not exist"),
    ],
)
def test_bad_names_raise_value_error(layers, dispersed, match):
    unet = make_unet("sd15")
    with pytest.raises(ValueError, match=match):
        patch(unet, ReDilation(layers, dispersed=dispersed))
    assert not is_patched(unet)
    assert redilated_layers(unet) == []


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"layers": {"mid_block": 0.5}}, ValueError),
        ({"layers": {"mid_block": float("nan")}}, ValueError),
        ({"layers": {"mid_block": True}}, TypeError),
        ({"layers": {"mid_block": "2"}}, TypeError),
        ({"layers": {}}, ValueError),
        ({"layers": ["mid_block"]}, TypeError),
        ({"layers": {3: 2}}, TypeError),
        ({"layers": {"mid_block": 2}, "until_step": -1}, ValueError),
        ({"layers": {"mid_block": 2}, "until_step": 2.0}, TypeError),
        ({"layers": {"mid_block": 2}, "progressive": True}, ValueError),
        ({"layers": {"mid_block": 2}, "progressive": True, "until_step": 0}, ValueError),
        ({"layers": {"mid_block": 2}, "dispersed": {"mid_block": 1}}, ValueError),
        ({"layers": {"mid_block": 2}, "dispersed": {"mid_block": 2.0}}, TypeError),
        ({"layers": {"mid_block": 2}, "dispersed": {"mid_block": True}}, TypeError),
        ({"layers": {"mid_block": 2}, "progressive": 1, "until_step": 3}, TypeError),
        ({"layers": {"mid_block": 2}, "dispersion_eta": "0.1"}, TypeError),
        ({"layers": {"mid_block": 2}, "dispersion_eta": -1.0}, ValueError),
    ],
)
def test_spec_validation(kwargs, error):
    with pytest.raises(error):
        ReDilation(**kwargs)


def test_spec_is_frozen():
    layers = {"mid_block": 2}
    spec = ReDilation(layers)
    layers["mid_block"] = 3  # the spec keeps its own copy
    assert spec.layers["mid_block"] == 2
    with pytest.raises(TypeError):
        spec.layers["mid_block"] = 4
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.until_step = 3


# --------------------------------------------------------------------------------------------------
# Restoring, double patching, the context manager
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, spec", [("sd15", SD15_2048), ("sdxl", SDXL_2048)])
def test_unpatch_restores_exactly(kind, spec):
    unet = make_unet(kind)
    inputs = unet_inputs(unet)
    # A forward someone installed on an instance before patching is restored too.
    conv = conv_of(unet, "mid_block.resnets.0.conv1")
    conv.forward = conv.forward
    before = snapshot(unet)
    reference = run(unet, inputs)
    assert patch(unet, spec) is unet
    assert is_patched(unet)
    dilated = run(unet, inputs)
    assert not torch.allclose(dilated, reference, atol=1e-3)
    assert unpatch(unet) is unet
    assert not is_patched(unet)
    assert_restored(unet, before)
    assert torch.equal(run(unet, inputs), reference)


def test_state_dict_of_a_patched_unet_is_unchanged():
    unet = make_unet("sd15")
    before = snapshot(unet)
    with patched(unet, SD15_2048):
        state = unet.state_dict()
        assert state.keys() == before["state"].keys()
        assert all(torch.equal(state[key], value) for key, value in before["state"].items())
        assert {name: type(m) for name, m in unet.named_modules()} == before["classes"]


def test_same_type_twice_in_one_configuration_raises():
    unet = make_unet("sdxl")
    patch(unet, ReDilation({"mid_block": 2}))
    with pytest.raises(ValueError, match="has a ReDilation in configuration 'default' already.*"
                                         r"unpatch\(unet, ReDilation, variant='default'\)"):
        patch(unet, ReDilation({"up_blocks.0": 2}))
    assert redilated_layers(unet) == [f"mid_block.resnets.{i}.conv{j}" for i in range(2)
                                      for j in (1, 2)]
    unpatch(unet)
    with pytest.raises(ValueError, match="two ReDilation specs for configuration 'default'"):
        patch(unet, [ReDilation({"mid_block": 2}), ReDilation({"up_blocks.0": 3}, until_step=5)])
    assert not is_patched(unet) and redilated_layers(unet) == []


def test_unpatch_and_set_step_of_an_unpatched_unet_raise():
    unet = make_unet("sd15")
    with pytest.raises(ValueError, match="not patched"):
        unpatch(unet)
    with pytest.raises(ValueError, match="not patched"):
        set_step(unet, 0, 999)
    with pytest.raises(TypeError):
        patch(unet, {"mid_block": 2})  # a mapping is not a spec
    with pytest.raises(ValueError):
        patch(unet, [])
    with pytest.raises(TypeError, match="variant must be a str"):
        patch(unet, SD15_1024, variant=1)
    assert not is_patched(unet)


def test_patched_restores_on_exception():
    unet = make_unet("sd15")
    inputs = unet_inputs(unet)
    before = snapshot(unet)
    reference = run(unet, inputs)
    with pytest.raises(RuntimeError, match="inside"):
        with patched(unet, SD15_1024) as patched_unet:
            assert patched_unet is unet and is_patched(unet)
            assert not torch.equal(run(unet, inputs), reference)
            raise RuntimeError("inside")
    assert not is_patched(unet)
    assert_restored(unet, before)
    assert torch.equal(run(unet, inputs), reference)


def test_unpatch_refuses_to_drop_a_forward_installed_later():
    unet = make_unet("sd15")
    patch(unet, ReDilation({"mid_block.resnets.0.conv1": 2}))
    conv = conv_of(unet, "mid_block.resnets.0.conv1")
    redilated = conv.forward
    conv.forward = lambda x: redilated(x)  # e.g. a hook framework wrapping forwards
    with pytest.raises(RuntimeError, match="cannot restore mid_block.resnets.0.conv1"):
        unpatch(unet)
    assert is_patched(unet)
    conv.forward = redilated
    unpatch(unet)
    assert "forward" not in vars(conv)


def test_deepcopy_of_a_patched_unet_is_patched_on_its_own():
    unet = make_unet("sd15")
    name = "mid_block.resnets.0.conv1"
    x = random_input(conv_of(unet, name))
    original = conv_of(unet, name)(x)
    patch(unet, SD15_1024)
    twin = copy.deepcopy(unet)
    assert is_patched(twin)
    set_step(twin, 30)  # past until_step in the copy only
    assert torch.equal(conv_of(twin, name)(x), original)
    assert not torch.allclose(conv_of(unet, name)(x), original, atol=1e-3)
    unpatch(twin)
    assert is_patched(unet) and redilated_layers(twin) == []
    unpatch(unet)


def test_compiled_wrapper_patches_the_module_it_wraps():
    unet = make_unet("sd15")
    compiled = torch.compile(unet, backend="eager")
    assert patch(compiled, SD15_1024) is compiled
    assert is_patched(unet) and is_patched(compiled)
    set_step(compiled, 3)
    assert patch_state(unet).step_index == 3
    unpatch(compiled)
    assert not is_patched(unet)


# --------------------------------------------------------------------------------------------------
# What a patched convolution computes, step by step
# --------------------------------------------------------------------------------------------------


def test_redilation_factor_schedule():
    # METHODS.md: d_i = max(ceil(d * (tau - i) / tau), 2) for i < tau.
    assert [redilation_factor(4, i, 35, True) for i in (0, 8, 9, 17, 18, 26, 34, 35, 50)] == [
        4.0, 4.0, 3.0, 3.0, 2.0, 2.0, 2.0, None, None]
    assert [redilation_factor(2.5, i, 4, True) for i in range(5)] == [3.0, 2.0, 2.0, 2.0, None]
    # Exact on the decimal value: 2.2 * 10 / 11 is 2, not 2.0000000000000004.
    assert redilation_factor(2.2, 1, 11, True) == 2.0
    assert [redilation_factor(1.5, i, 2, False) for i in range(3)] == [1.5, 1.5, None]
    assert redilation_factor(3, 10**6, None, False) == 3.0


@pytest.mark.parametrize(
    "name, factor",
    [
        ("mid_block.resnets.0.conv1", 2),
        ("up_blocks.1.resnets.2.conv2", 3),
        ("down_blocks.0.downsamplers.0.conv", 2),  # stride 2
        ("up_blocks.0.resnets.1.conv1", 2.5),  # fractional: the stretch
        ("down_blocks.1.downsamplers.0.conv", 1.5),
    ],
)
def test_patched_conv_runs_the_dilated_op(name, factor):
    unet = make_unet("sd15")
    conv = conv_of(unet, name)
    x = random_input(conv)
    original = conv(x)
    stride = conv.stride[0]
    with patched(unet, ReDilation({name: factor}, until_step=2)):
        expected = ops.dilated_conv2d(x, conv.weight, conv.bias, dilation=factor, stride=stride)
        assert torch.equal(conv(x), expected)
        if float(factor).is_integer():
            direct = F.conv2d(x, conv.weight, conv.bias, stride, padding=factor, dilation=factor)
            assert_close(conv(x), direct)
        assert conv(x).shape == original.shape
        set_step(unet, 1, 0)
        assert torch.equal(conv(x), expected)
        set_step(unet, 2, 0)
        assert torch.equal(conv(x), original)
        set_step(unet, 0, 0)
        assert torch.equal(conv(x), expected)


def test_progressive_schedule_per_step():
    unet = make_unet("sd15")
    name = "down_blocks.3.resnets.0.conv1"
    conv = conv_of(unet, name)
    x = random_input(conv, 12, 12)
    original = conv(x)
    spec = ReDilation({name: 4}, until_step=5, progressive=True)
    # ceil(4 * (5 - i) / 5) for i = 0..4: 4, 4, 3, 2, 1 -> at least 2; off from step 5.
    expected_factors = [4, 4, 3, 2, 2, None, None]
    with patched(unet, spec):
        for step, factor in enumerate(expected_factors):
            set_step(unet, step, torch.tensor(999 - 100 * step))
            if factor is None:
                assert torch.equal(conv(x), original)
            else:
                direct = F.conv2d(x, conv.weight, conv.bias, padding=factor, dilation=factor)
                assert_close(conv(x), direct)


def test_step_zero_before_any_set_step_and_timestep_never_read():
    unet = make_unet("sd15")
    name = "mid_block.resnets.1.conv2"
    conv = conv_of(unet, name)
    x = random_input(conv)
    with patched(unet, ReDilation({name: 3}, until_step=1)):
        assert patch_state(unet).step_index == 0
        assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=3, dilation=3))
        # A meta tensor cannot be read on the host: set_step must only store it.
        timestep = torch.empty((), device="meta")
        set_step(unet, 1, timestep)
        assert patch_state(unet).timestep is timestep
        assert torch.equal(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1))
        for bad, error in [(-1, ValueError), (True, TypeError), (1.0, TypeError),
                           (torch.tensor(1), TypeError)]:
            with pytest.raises(error):
                set_step(unet, bad)


def test_factor_one_and_outside_until_step_are_bitwise_unpatched():
    unet = make_unet("sdxl")
    inputs = unet_inputs(unet)
    reference = run(unet, inputs)
    with patched(unet, ReDilation({block: 1 for block in BLOCK_CONVS["sdxl"]})):
        assert torch.equal(run(unet, inputs), reference)
    with patched(unet, SDXL_2048):
        assert not torch.allclose(run(unet, inputs), reference, atol=1e-3)
        set_step(unet, 29, 10)
        assert not torch.allclose(run(unet, inputs), reference, atol=1e-3)
        set_step(unet, 30, 5)
        assert torch.equal(run(unet, inputs), reference)
    assert torch.equal(run(unet, inputs), reference)


def test_dispersed_convolution():
    unet = make_unet("sd15")
    name = "mid_block.resnets.0.conv2"
    conv = conv_of(unet, name)
    x = random_input(conv, 12, 10)
    original = conv(x)
    spec = ReDilation({"mid_block": 4}, until_step=3, progressive=True, dispersed={name: 2},
                      dispersion_eta=0.1)
    with patched(unet, spec):
        kernel = ops.disperse_kernel(conv.weight, 2, 0.1)
        assert kernel.shape == (conv.out_channels, conv.in_channels, 5, 5)
        # Step 0: factor 4 -> the 5x5 kernel at dilation 2.
        assert_close(conv(x), F.conv2d(x, kernel, conv.bias, padding=4, dilation=2))
        # Step 2: factor max(ceil(4 / 3), 2) = 2 -> dilation 1.
        set_step(unet, 2)
        assert_close(conv(x), F.conv2d(x, kernel, conv.bias, padding=2))
        # The other layers of the block are re-dilated, not dispersed.
        other = conv_of(unet, "mid_block.resnets.0.conv1")
        y = random_input(other)
        assert_close(other(y), F.conv2d(y, other.weight, other.bias, padding=2, dilation=2))
        # The kernel is dispersed from the live weight: a change of the weight is honoured.
        with torch.no_grad():
            conv.weight.mul_(-0.5)
        kernel = ops.disperse_kernel(conv.weight, 2, 0.1)
        assert_close(conv(x), F.conv2d(x, kernel, conv.bias, padding=2))
        set_step(unet, 3)
        with torch.no_grad():
            conv.weight.div_(-0.5)
        assert torch.equal(conv(x), original)


def test_fractional_dispersed_factor():
    unet = make_unet("sd15")
    name = "up_blocks.0.resnets.0.conv1"
    conv = conv_of(unet, name)
    x = random_input(conv, 8, 8)
    with patched(unet, ReDilation({name: 3}, dispersed={name: 2})):
        kernel = ops.disperse_kernel(conv.weight, 2, 0.05)
        expected = ops.dilated_conv2d(x, kernel, conv.bias, dilation=1.5)
        assert torch.equal(conv(x), expected)


# --------------------------------------------------------------------------------------------------
# LoRA (peft)
# --------------------------------------------------------------------------------------------------


def lora_config(**kwargs):
    peft = pytest.importorskip("peft")
    kwargs = {"r": 2, "lora_alpha": 4, "target_modules": ["conv1", "conv2"],
              "init_lora_weights": False, **kwargs}
    return peft.LoraConfig(**kwargs)


def merged_kernel(layer: nn.Module) -> torch.Tensor:
    """The base kernel plus the default adapter's update ``scaling * lora_B . lora_A``."""
    lora_a = layer.lora_A["default"].weight
    lora_b = layer.lora_B["default"].weight[:, :, 0, 0]
    update = torch.einsum("or,rikl->oikl", lora_b, lora_a)
    return layer.base_layer.weight + layer.scaling["default"] * update


def test_lora_adapter_keeps_working_and_is_dilated():
    unet = make_unet("sd15")
    unet.add_adapter(lora_config())
    inputs = unet_inputs(unet)
    name = "mid_block.resnets.0.conv1"
    layer = unet.get_submodule(name)
    assert hasattr(layer, "base_layer")  # peft wrapped it
    x = random_input(layer.base_layer)
    before_layer = layer(x)
    before = snapshot(unet)
    reference = run(unet, inputs)
    with patched(unet, ReDilation({"mid_block": 2})):
        assert sorted(redilated_layers(unet)) == sorted(
            [f"mid_block.resnets.{i}.conv{j}.{part}" for i in range(2) for j in (1, 2)
             for part in ("base_layer", "lora_A.default")]
        )
        bias = layer.base_layer.bias
        # The adapter's update of the kernel is re-dilated with it (as if merged).
        dilated_merged = F.conv2d(x, merged_kernel(layer), bias, padding=2, dilation=2)
        assert_close(layer(x), dilated_merged)
        base_only = F.conv2d(x, layer.base_layer.weight, bias, padding=2, dilation=2)
        assert not torch.allclose(layer(x), base_only, atol=1e-3)
        # ... so merging the adapter into the weight gives the same result.
        weight = layer.base_layer.weight.detach().clone()
        layer.merge()
        assert_close(layer(x), dilated_merged, scale=10)
        layer.unmerge()
        with torch.no_grad():
            layer.base_layer.weight.copy_(weight)  # unmerge rounds: put the weight back exactly
        # The adapter still changes the UNet's output.
        with_adapter = run(unet, inputs)
        unet.disable_adapters()
        without_adapter = run(unet, inputs)
        unet.enable_adapters()
        assert not torch.allclose(with_adapter, without_adapter, atol=1e-3)
        assert not torch.allclose(with_adapter, reference, atol=1e-3)
    assert_restored(unet, before)
    assert torch.equal(layer(x), before_layer)
    assert torch.equal(run(unet, inputs), reference)


def test_lora_adapter_added_while_patched():
    unet = make_unet("sd15")
    name = "up_blocks.1.resnets.0.conv2"
    patch(unet, ReDilation({name: 3}))
    unet.add_adapter(lora_config())
    layer = unet.get_submodule(name)
    x = random_input(layer.base_layer)
    set_step(unet, 0)  # the sampler's next set_step finds the new adapter
    expected = F.conv2d(x, merged_kernel(layer), layer.base_layer.bias, padding=3, dilation=3)
    assert_close(layer(x), expected)
    unpatch(unet)
    assert redilated_layers(unet) == []
    undilated = F.conv2d(x, merged_kernel(layer), layer.base_layer.bias, padding=1)
    assert_close(layer(x), undilated)


def test_dora_is_refused():
    unet = make_unet("sd15")
    unet.add_adapter(lora_config(use_dora=True, target_modules=["conv1"]))
    with pytest.raises(ValueError, match="DoRA"):
        patch(unet, ReDilation({"mid_block": 2}))
    assert not is_patched(unet) and redilated_layers(unet) == []


# --------------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------------


def compile_steps(spec: ReDilation, steps: list[int]) -> int:
    """Run a compiled (fullgraph) patched small UNet over ``steps``, checking each output against
    the eager patched UNet; return the number of frames dynamo compiled."""
    torch._dynamo.reset()
    unet = small_unet()
    inputs = unet_inputs(unet, size=8)
    counter = CompileCounter()
    patch(unet, spec)
    compiled = torch.compile(unet, backend=counter, fullgraph=True)
    try:
        for step in steps:
            set_step(compiled, step, torch.tensor(999 - 100 * step))
            assert_close(run(compiled, inputs), run(unet, inputs))
        return counter.frame_count
    finally:
        unpatch(unet)
        torch._dynamo.reset()


def test_compile_recompiles_once_per_configuration():
    spec = ReDilation(
        {"down_blocks.1": 3, "mid_block": 2, "up_blocks.0.resnets.0.conv1": 1.5},
        until_step=4,
        progressive=True,
    )
    # Factors per step (progressive, tau 4): down_blocks.1: 3, 3, 2, 2; mid_block: 2, 2, 2, 2;
    # up_blocks.0...conv1: 2, 2, 2, 2; then off. Three configurations: steps {0, 1}, {2, 3}, {4+};
    # a second sampling run reuses the three graphs.
    assert compile_steps(spec, [*range(6), *range(6)]) == 3


def test_compile_dispersed_without_graph_break():
    """Dispersion under fullgraph compile: needs ``hrkernels.ops.disperse_kernel`` to be
    traceable (a registered ``hrkernels::`` op, or free of the least-squares solve it runs on a
    cache miss)."""
    spec = ReDilation({"mid_block": 2}, until_step=1, dispersed={"mid_block.resnets.0.conv1": 2})
    assert compile_steps(spec, [0, 1, 0]) == 2


@pytest.mark.gpu
def test_patched_unet_on_cuda_fp16():
    """The patched tiny SDXL UNet on CUDA in fp16: the Triton path of the fractional
    ``dilated_conv2d`` inside a real UNet, against the PyTorch reference in fp32 and fp16."""

    def cuda_inputs(unet, dtype):
        inputs = unet_inputs(unet)
        inputs["added_cond_kwargs"] = {key: value.to("cuda", dtype)
                                       for key, value in inputs["added_cond_kwargs"].items()}
        for key in ("sample", "encoder_hidden_states"):
            inputs[key] = inputs[key].to("cuda", dtype)
        inputs["timestep"] = inputs["timestep"].to("cuda")
        return inputs

    spec = ReDilation({"mid_block": 2.5, "up_blocks.0": 2, "up_blocks.1": 1.5}, until_step=1)
    results = {}
    for dtype in (torch.float16, torch.float32):
        unet = tiny_pipeline("sdxl", dtype=dtype, device="cuda").unet.eval()
        inputs = cuda_inputs(unet, dtype)
        reference = run(unet, inputs)
        with patched(unet, ReDilation({block: 1 for block in BLOCK_CONVS["sdxl"]})):
            assert torch.equal(run(unet, inputs), reference)
        with patched(unet, spec):
            results[dtype, "auto"] = run(unet, inputs)
            with ops.use_backend("torch"):
                results[dtype, "torch"] = run(unet, inputs)
            set_step(unet, 1)
            assert torch.equal(run(unet, inputs), reference)
    assert torch.isfinite(results[torch.float16, "auto"]).all()
    assert_close_to_fp32(results[torch.float16, "auto"], results[torch.float32, "torch"],
                         results[torch.float16, "torch"])


# --------------------------------------------------------------------------------------------------
# The open registry of spec types
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ScaleOutput:
    """A toy spec type: multiply ``conv_out``'s output by ``factor`` (``fail`` makes it fail)."""

    factor: float
    fail: bool = False


class _ScaleOutputInstalled:
    def __init__(self, conv: nn.Conv2d, factor: float) -> None:
        self.conv, self.factor, self.active = conv, factor, False
        original = conv.forward
        conv.forward = lambda x: original(x) * factor if self.active else original(x)
        self.steps: list[int] = []

    def set_step(self, step_index, timestep):
        self.steps.append(step_index)

    def set_active(self, active):
        self.active = active

    def remove(self):
        del self.conv.forward


class _ScaleOutputPlan:
    def __init__(self, spec: ScaleOutput, unet: nn.Module) -> None:
        self.spec, self.unet = spec, unet
        self.targets = frozenset({"conv_out"})

    def install(self, variant):
        if self.spec.fail:
            raise RuntimeError("install failed")
        return _ScaleOutputInstalled(self.unet.conv_out, self.spec.factor)


@pytest.fixture
def scale_output_type(monkeypatch):
    monkeypatch.setattr(patch_registry, "_SPEC_TYPES", dict(patch_registry._SPEC_TYPES))
    register_spec_type(ScaleOutput, _ScaleOutputPlan)
    register_spec_type(ScaleOutput, _ScaleOutputPlan)  # the same function again: a no-op
    yield ScaleOutput


def test_registry_is_open(scale_output_type):
    with pytest.raises(ValueError, match="registered already"):
        register_spec_type(ScaleOutput, lambda spec, unet: None)
    with pytest.raises(ValueError, match="registered already"):
        register_spec_type(ScaleOutput, _ScaleOutputPlan, shares_modules=True)
    with pytest.raises(TypeError):
        register_spec_type(ScaleOutput(2.0), _ScaleOutputPlan)
    with pytest.raises(TypeError, match="shares_modules must be True or False"):
        register_spec_type(ScaleOutput, _ScaleOutputPlan, shares_modules=1)
    unet = make_unet("sd15")
    inputs = unet_inputs(unet)
    reference = run(unet, inputs)
    before = snapshot(unet)
    with patched(unet, [ScaleOutput(2.0), ReDilation({"mid_block": 2}, until_step=1)]):
        installed = patch_state(unet).entries[0].installed
        set_step(unet, 1)
        assert installed.steps == [0, 1]
        assert torch.equal(run(unet, inputs), reference * 2.0)
    assert_restored(unet, before)
    assert torch.equal(run(unet, inputs), reference)


def test_two_spec_types_changing_one_module_raise(scale_output_type):
    @dataclasses.dataclass(frozen=True)
    class Scale2:  # another type that changes conv_out
        factor: float

    register_spec_type(Scale2, lambda spec, unet: _ScaleOutputPlan(spec, unet))
    unet = make_unet("sd15")
    with pytest.raises(ValueError, match=r"ReDilation \(configuration 'x'\) and ScaleOutput "
                                         r"\(configuration 'x'\) both change 'conv_out'"):
        patch(unet, [ReDilation({"conv_out": 2}), ScaleOutput(2.0)], variant="x")
    assert not is_patched(unet)
    patch(unet, ScaleOutput(2.0))
    for variant in ("default", "base"):  # in any configuration
        expected = (r"ScaleOutput \(configuration 'default'\) and Scale2 "
                    rf"\(configuration '{variant}'\) both change 'conv_out'")
        with pytest.raises(ValueError, match=expected):
            patch(unet, Scale2(3.0), variant=variant)
    # One type that does not share modules, in two configurations.
    with pytest.raises(ValueError, match="cannot share a module across configurations"):
        patch(unet, ScaleOutput(3.0), variant="base")
    assert patch_state(unet).variants == ("default",)
    unpatch(unet)
    assert redilated_layers(unet) == [] and "forward" not in vars(unet.conv_out)


def test_patch_is_atomic(scale_output_type):
    unet = make_unet("sd15")
    before = snapshot(unet)
    with pytest.raises(RuntimeError, match="install failed"):
        patch(unet, [ReDilation({"mid_block": 2}), ScaleOutput(2.0, fail=True)])
    assert not is_patched(unet)
    assert_restored(unet, before)


# --------------------------------------------------------------------------------------------------
# The end-to-end benchmark function (CPU smoke run on a tiny UNet; GPU numbers come from bench/)
# --------------------------------------------------------------------------------------------------


def test_patched_unet_overhead_smoke():
    from hrkernels.bench.unet import patched_unet_overhead

    result = patched_unet_overhead(
        "cpu", torch.float32, unet=make_unet("sdxl"), latent_size=16, warmup_ms=0, rep_ms=0
    )
    assert result["unpatched_ms"] > 0 and result["patched_ms"] > 0
    assert math.isclose(result["ratio"], result["patched_ms"] / result["unpatched_ms"])
    assert result["max_abs_difference"] > 0
    assert result["redilated_layers"] == 11
    assert not is_patched(make_unet("sdxl"))


"""ScaleFusion: FreeScale's Scale Fusion self-attention, against references written here."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from diffusers.models.attention_processor import Attention

import hrkernels
from hrkernels import ops
from hrkernels.nn.attention import (
    GridCell,
    ScaleFusionAttention,
    ScaleFusionSettings,
    WindowTable,
    layer_windows,
)
from hrkernels.testing import tiny_pipeline

DIM, HEADS = 16, 2


def make_attention(seed=0):
    torch.manual_seed(seed)
    attn = Attention(query_dim=DIM, heads=HEADS, dim_head=DIM // HEADS, out_bias=True)
    for parameter in attn.parameters():
        torch.nn.init.normal_(parameter, std=0.3)
    return attn


def install(attn, grid, base, settings, starts=None):
    """The processor on ``attn`` for a ``grid`` of tokens; ``starts``: the windows' starts."""
    cell = GridCell(grid)
    table = WindowTable()
    windows = layer_windows(grid, base, settings)
    if starts is None:
        starts = ops.window_grid(grid[0], grid[1], windows.window, windows.stride)
    table.prepared = {grid: {0: starts}}
    table.select(0)
    processor = ScaleFusionAttention(attn.processor, cell, base, settings, table, "test")
    processor.active = True
    attn.set_processor(processor)
    return windows, starts


def plain(attn, tokens):
    """Self-attention over ``[B, N, D]`` tokens, written out (softmax of q k^T / sqrt(d))."""
    batch, count, _ = tokens.shape
    head = DIM // HEADS

    def split(x):
        return x.view(batch, count, HEADS, head).transpose(1, 2)

    q, k, v = split(attn.to_q(tokens)), split(attn.to_k(tokens)), split(attn.to_v(tokens))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head), dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(batch, count, DIM)
    return attn.to_out[0](out)


def local_reference(attn, x, grid, starts, window):
    """Every window (zero tokens outside the grid) attended alone, its output put back, overlaps
    averaged over the windows that cover a position."""
    batch = x.shape[0]
    feature = x.view(batch, *grid, DIM)
    total = torch.zeros(batch, *grid, DIM)
    count = torch.zeros(1, *grid, 1)
    for top, left in starts.tolist():
        view = torch.zeros(batch, *window, DIM)
        for i in range(window[0]):
            for j in range(window[1]):
                y, x_ = top + i, left + j
                if 0 <= y < grid[0] and 0 <= x_ < grid[1]:
                    view[:, i, j] = feature[:, y, x_]
        out = plain(attn, view.view(batch, -1, DIM)).view(batch, *window, DIM)
        for i in range(window[0]):
            for j in range(window[1]):
                y, x_ = top + i, left + j
                if 0 <= y < grid[0] and 0 <= x_ < grid[1]:
                    total[:, y, x_] += out[:, i, j]
                    count[:, y, x_] += 1
    return total / count


def as_map(tokens, grid):
    return tokens.view(tokens.shape[0], *grid, -1).permute(0, 3, 1, 2)


@pytest.mark.parametrize("grid, jitter", [((11, 9), 0), ((11, 9), 2), ((11, 7), 1)])
def test_local_windows_equal_a_loop_over_windows(grid, jitter):
    # The layer's grid is about its base (8): scale 1, blur kernel 1, so the output is the local
    # branch alone; grids that do not divide, jitter on and off.
    attn = make_attention()
    settings = ScaleFusionSettings(jitter=jitter)
    windows = layer_windows(grid, 8, settings)
    assert windows.kernel_size == 1
    starts = ops.window_grid(*grid, windows.window, windows.stride, jitter,
                             generator=torch.Generator().manual_seed(3))
    install(attn, grid, 8, settings, starts)
    x = torch.randn(2, grid[0] * grid[1], DIM, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = attn(x)
        expected = local_reference(attn, x, grid, starts, windows.window).reshape(2, -1, DIM)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("feature_blur", [False, True])
def test_fusion_is_global_plus_blurred_local_minus_global(feature_blur):
    # A 16x16 grid over a base of 8: scale 2, kernel 3; jittered windows.
    grid, sigma = (16, 16), 0.9
    attn = make_attention(1)
    settings = ScaleFusionSettings(sigma=sigma, feature_blur=feature_blur, jitter=1)
    windows = layer_windows(grid, 8, settings)
    assert windows.scale == (2, 2) and windows.kernel_size == 3
    starts = ops.window_grid(*grid, windows.window, windows.stride, 1,
                             generator=torch.Generator().manual_seed(4))
    install(attn, grid, 8, settings, starts)
    x = torch.randn(1, 256, DIM, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = attn(x)
        global_ = as_map(plain(attn, x), grid)
        local = local_reference(attn, x, grid, starts, windows.window).permute(0, 3, 1, 2)
    difference = local - global_
    if feature_blur:
        blurred = ops.frequency_fusion(torch.zeros_like(global_), difference, sigma, 3, True)
    else:
        blurred = ops.gaussian_blur2d(difference, sigma, kernel_size=3)
    expected = (global_ + blurred).permute(0, 2, 3, 1).reshape(1, -1, DIM)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_fast_mode_attends_within_each_dilated_sub_grid():
    # One window covering the grid makes the local branch plain attention, so the output is
    # fast_global + G(plain - fast_global); fast_global written as a loop over sub-grids.
    grid, sigma = (16, 12), 1.0
    attn = make_attention(2)
    settings = ScaleFusionSettings(window=grid, sigma=sigma, fast_mode=True)
    windows = layer_windows(grid, 8, settings)
    assert windows.scale == (2, 2)
    install(attn, grid, 8, settings)
    x = torch.randn(1, grid[0] * grid[1], DIM, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = attn(x)
        feature = x.view(1, *grid, DIM)
        fast = torch.zeros(1, *grid, DIM)
        for i in range(2):
            for j in range(2):
                sub = feature[:, i::2, j::2]
                fast[:, i::2, j::2] = plain(attn, sub.reshape(1, -1, DIM)).view(sub.shape)
        fast = fast.permute(0, 3, 1, 2)
        whole = as_map(plain(attn, x), grid)
        expected = fast + ops.gaussian_blur2d(whole - fast, sigma, kernel_size=3)
    torch.testing.assert_close(out, expected.permute(0, 2, 3, 1).reshape(1, -1, DIM), atol=1e-5,
                               rtol=1e-5)


def unet_inputs(unet, size=(32, 24)):
    generator = torch.Generator().manual_seed(0)
    config = unet.config
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    return dict(
        sample=torch.randn(1, 4, *size, generator=generator), timestep=500,
        encoder_hidden_states=torch.randn(1, 5, config.cross_attention_dim, generator=generator),
        added_cond_kwargs={"text_embeds": torch.randn(1, pooled, generator=generator),
                           "time_ids": torch.tensor([[256.0, 192.0, 0, 0, 256.0, 192.0]])})


def test_on_the_unet_equal_at_the_base_size_different_above_and_unpatched_bitwise():
    unet = copy.deepcopy(tiny_pipeline("sdxl").unet)
    base_inputs = unet_inputs(unet, (16, 16))
    large = unet_inputs(unet)
    with torch.no_grad():
        reference_base, reference = unet(**base_inputs).sample, unet(**large).sample
        with hrkernels.patched(unet, hrkernels.ScaleFusion()):
            # At the base size one window covers each grid and the blur is the identity.
            assert torch.equal(unet(**base_inputs).sample, reference_base)
            fused = unet(**large).sample
        assert not torch.allclose(fused, reference, atol=1e-4)
        assert torch.equal(unet(**large).sample, reference)


def test_only_the_self_attention_of_the_named_blocks_changes():
    unet = copy.deepcopy(tiny_pipeline("sdxl").unet)
    processors = {name: type(p).__name__ for name, p in unet.attn_processors.items()}
    with hrkernels.patched(unet, hrkernels.ScaleFusion(layers=("mid_block",))):
        changed = {name for name, p in unet.attn_processors.items()
                   if type(p).__name__ != processors[name]}
        assert changed and all(n.startswith("mid_block.") and ".attn1." in n for n in changed)
    assert {name: type(p).__name__ for name, p in unet.attn_processors.items()} == processors


def test_lora_on_to_q_keeps_working():
    from peft import LoraConfig

    unet = copy.deepcopy(tiny_pipeline("sdxl").unet)
    inputs = unet_inputs(unet)
    spec = hrkernels.ScaleFusion()
    with torch.no_grad(), hrkernels.patched(unet, spec):
        without = unet(**inputs).sample
    unet.add_adapter(LoraConfig(r=2, target_modules=["to_q"], init_lora_weights=False))
    with torch.no_grad():
        plain_lora = unet(**inputs).sample
        with hrkernels.patched(unet, spec):
            with_lora = unet(**inputs).sample
        assert torch.equal(unet(**inputs).sample, plain_lora)
    assert not torch.allclose(with_lora, without, atol=1e-5)


def test_compiles_once_per_configuration_whatever_the_windows():
    # Jittered window starts change every step (tensors): one graph; switching the processor off
    # (its configuration inactive) is a second one.
    import torch._dynamo
    from torch._dynamo.utils import counters

    attn = make_attention(3)
    grid = (12, 12)
    install(attn, grid, 8, ScaleFusionSettings(jitter=1))
    processor = attn.processor
    generator = torch.Generator().manual_seed(6)
    steps = {step: ops.window_grid(12, 12, 8, 4, 1, generator=generator) for step in range(4)}
    processor.table.prepared = {grid: steps}
    x = torch.randn(1, 144, DIM)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(attn, backend="eager", fullgraph=True, dynamic=False)
    try:
        with torch.no_grad():
            for step in range(4):
                processor.table.select(step)
                torch.testing.assert_close(compiled(x), attn(x))
            processor.active = False
            compiled(x)
        assert counters["stats"]["unique_graphs"] == 2
        assert not counters["graph_break"]
    finally:
        torch._dynamo.reset()


def test_prepare_windows_draws_from_the_generator_per_step_and_grid():
    unet = copy.deepcopy(tiny_pipeline("sdxl").unet)
    hrkernels.patch(unet, hrkernels.ScaleFusion(), variant="fs")
    try:
        hrkernels.patching.prepare_windows(unet, (32, 24), range(2, 5),
                                           torch.Generator().manual_seed(0), torch.device("cpu"))
        state = hrkernels.patching.patch_state(unet)
        table = next(e.installed for e in state.entries if e.variant == "fs").table
        assert set(table.prepared) == {(16, 12), (8, 6)}  # the two attention levels of SDXL
        assert all(set(steps) == {2, 3, 4} for steps in table.prepared.values())
        hrkernels.set_step(unet, 3)
        assert table.current[(16, 12)] is table.prepared[(16, 12)][3]
        with pytest.raises(ValueError, match="no ScaleFusion"):
            hrkernels.patching.prepare_windows(unet, (32, 24), range(2), torch.Generator(),
                                               torch.device("cpu"), variant="default")
    finally:
        hrkernels.unpatch(unet)


def test_bad_input():
    with pytest.raises(TypeError, match="window"):
        hrkernels.ScaleFusion(window="big")
    with pytest.raises(ValueError, match="sigma"):
        hrkernels.ScaleFusion(sigma=0)
    with pytest.raises(TypeError, match="fast_mode"):
        hrkernels.ScaleFusion(fast_mode="yes")
    with pytest.raises(ValueError, match="jitter"):
        hrkernels.ScaleFusion(jitter=-1)
    unet = tiny_pipeline("sdxl").unet
    with pytest.raises(ValueError, match="down_blocks.0.*holds no transformer.*down_blocks.1"):
        hrkernels.patch(unet, hrkernels.ScaleFusion(layers=("down_blocks.0",)))
    with pytest.raises(ValueError, match="does not exist"):
        hrkernels.patch(unet, hrkernels.ScaleFusion(layers=("down_blocks.7",)))
    assert not hrkernels.is_patched(unet)
    with pytest.raises(ValueError, match="no transformer blocks"):
        hrkernels.patch(torch.nn.Sequential(torch.nn.Linear(2, 2)), hrkernels.ScaleFusion())


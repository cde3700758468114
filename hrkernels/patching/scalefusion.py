"""The ``ScaleFusion`` spec: FreeScale's Scale Fusion in the self-attention (``attn1``) of every
transformer block of a UNet (docs/METHODS.md, "FreeScale").

:func:`hrkernels.patch` installs :class:`hrkernels.nn.attention.ScaleFusionAttention` as the
``attn1`` processor of each selected transformer's blocks (cross-attention, feed-forward, norms and
every weight untouched) and wraps each selected transformer's ``forward`` so that its processors
know the token grid of the call. :func:`hrkernels.unpatch` puts the processors and forwards back.

Window starts are drawn per step and per token grid (``window // 8`` jitter). A sampler draws them
ahead for a whole stage with :func:`prepare_windows` (from its generator, on the device, before the
step loop); without that, they are drawn on first use from a generator seeded with the spec's
``seed`` (eager only: under ``torch.compile`` prepare them).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hrkernels import ops
from hrkernels._validate import check_bool, check_int, check_real
from hrkernels.nn.attention import (
    GridCell,
    LayerWindows,
    ScaleFusionAttention,
    ScaleFusionSettings,
    WindowTable,
    layer_windows,
)
from hrkernels.patching.names import block_names, get_module
from hrkernels.patching.registry import patch_state, register_spec_type

__all__ = ["ScaleFusion", "prepare_windows"]


def _pair(value: Any, name: str) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = (value, value)
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise TypeError(f"{name} must be None, an int or an (h, w) pair of ints; got {value!r}")
    return (check_int(value[0], f"{name}[0]", minimum=1), check_int(value[1], f"{name}[1]",
                                                                     minimum=1))


@dataclass(frozen=True)
class ScaleFusion:
    """FreeScale's Scale Fusion in the self-attention of a UNet's transformer blocks.

    Attributes:
        window: the local windows' size in tokens of each layer, an int or ``(h, w)``; None
            (default): the layer's base token grid (``ceil(sample_size / 2^level)``: the grid the
            model was trained at), clamped to the layer's grid.
        stride: window stride in tokens; None: half the window.
        jitter: the windows' random shift in tokens (``[-j, j]`` per step, border windows
            outward only); None: ``window // 8``.
        sigma: the fusion's Gaussian standard deviation (kernel ``2 max(s_h, s_w) - 1``, ``s`` the
            layer's grid over its base grid, rounded).
        fast_mode: the global branch attends within each dilated ``s_h x s_w`` sub-grid instead of
            over all tokens.
        feature_blur: the fusion's blur also runs along the feature axis (a 3-D Gaussian, as the
            authors' current code; the paper blurs over (h, w) only).
        window_chunk: local windows per SDPA call (None: all windows of the layer in one call);
            the result is the same, the peak memory of the local branch smaller (the memory
            planner sets it for FreeScale when the budget says so).
        layers: block names whose transformers get Scale Fusion (``"down_blocks.1"``,
            ``"mid_block"``, or a transformer's own name); None: every transformer of the UNet.
        seed: seeds the window jitter drawn on first use when no sampler prepared it.

    Raises (when created): TypeError / ValueError for a value of the wrong type or range; names
    are checked by :func:`hrkernels.patch`.

    Example::

        >>> spec = ScaleFusion()               # every transformer, windows of the base grid
        >>> spec = ScaleFusion(fast_mode=True, sigma=1.0, layers=("mid_block", "up_blocks.0"))
    """

    window: int | tuple[int, int] | None = None
    stride: int | tuple[int, int] | None = None
    jitter: int | None = None
    sigma: float = 1.0
    fast_mode: bool = False
    feature_blur: bool = False
    layers: tuple[str, ...] | None = None
    seed: int = 0
    window_chunk: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "window", _pair(self.window, "window"))
        object.__setattr__(self, "stride", _pair(self.stride, "stride"))
        if self.jitter is not None:
            check_int(self.jitter, "jitter", minimum=0)
        check_real(self.sigma, "sigma", greater_than=0)
        check_bool(self.fast_mode, "fast_mode")
        check_bool(self.feature_blur, "feature_blur")
        check_int(self.seed, "seed", minimum=0)
        if self.window_chunk is not None:
            check_int(self.window_chunk, "window_chunk (None or windows per SDPA call)",
                      minimum=1)
        if self.layers is not None:
            layers = (self.layers,) if isinstance(self.layers, str) else tuple(self.layers)
            if not layers or not all(isinstance(name, str) for name in layers):
                raise TypeError(f"layers must be None or block names; got {self.layers!r}")
            object.__setattr__(self, "layers", layers)

    @property
    def settings(self) -> ScaleFusionSettings:
        return ScaleFusionSettings(self.window, self.stride, self.jitter, float(self.sigma),
                                   self.fast_mode, self.feature_blur, self.window_chunk)


def _is_transformer(module: nn.Module) -> bool:
    """A diffusers ``Transformer2DModel`` (duck-typed: transformer blocks with ``attn1``)."""
    blocks = getattr(module, "transformer_blocks", None)
    return isinstance(blocks, nn.ModuleList) and all(hasattr(b, "attn1") for b in blocks)


def _level(model: nn.Module, name: str) -> int:
    """The resolution level of a transformer (0: the latent's own, 1: half, ...)."""
    parts = name.split(".")
    levels = len(getattr(model, "down_blocks", [])) or 1
    if parts[0] == "down_blocks":
        return int(parts[1])
    if parts[0] == "up_blocks":
        return levels - 1 - int(parts[1])
    return levels - 1  # mid_block


class _GridRecorder:
    """A transformer's forward: records the grid of its input ``[B, C, h, w]``, then runs the
    forward it replaced."""

    def __init__(self, transformer: nn.Module, cell: GridCell) -> None:
        self.transformer = transformer
        self.cell = cell
        self.had_instance_forward = "forward" in transformer.__dict__
        self.previous = transformer.__dict__.get("forward")
        self.forward = transformer.forward

    def __call__(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        self.cell.size = (int(hidden_states.shape[-2]), int(hidden_states.shape[-1]))
        return self.forward(hidden_states, *args, **kwargs)

    def restore(self) -> None:
        if self.transformer.__dict__.get("forward") is not self:
            raise RuntimeError("cannot restore a transformer's forward: it was replaced after "
                               "patching")
        if self.had_instance_forward:
            self.transformer.forward = self.previous
        else:
            del self.transformer.forward


@dataclass
class _Target:
    name: str
    transformer: nn.Module
    base: int


class _InstalledScaleFusion:
    def __init__(self, spec: ScaleFusion, targets: list[_Target], table: WindowTable) -> None:
        self.spec = spec
        self.table = table
        self.targets = targets
        self.processors: list[tuple[Any, ScaleFusionAttention]] = []
        self.recorders: list[_GridRecorder] = []
        try:
            for target in targets:
                cell = GridCell()
                recorder = _GridRecorder(target.transformer, cell)
                target.transformer.forward = recorder
                self.recorders.append(recorder)
                for index, block in enumerate(target.transformer.transformer_blocks):
                    attn = block.attn1
                    processor = ScaleFusionAttention(
                        attn.processor, cell, target.base, spec.settings, table,
                        f"{target.name}.transformer_blocks.{index}.attn1")
                    attn.set_processor(processor)
                    self.processors.append((attn, processor))
        except BaseException:
            self.remove()
            raise

    def set_step(self, step_index: int, timestep: Any) -> None:
        self.table.select(step_index)

    def set_active(self, active: bool) -> None:
        for _, processor in self.processors:
            processor.active = active

    def remove(self) -> None:
        for attn, processor in self.processors:
            if attn.processor is not processor:
                raise RuntimeError(f"cannot restore {processor.name}: its processor was "
                                   "replaced after patching")
        for attn, processor in reversed(self.processors):
            attn.set_processor(processor.original)
        self.processors.clear()
        for recorder in reversed(self.recorders):
            recorder.restore()
        self.recorders.clear()


class _ScaleFusionPlan:
    def __init__(self, spec: ScaleFusion, targets: list[_Target]) -> None:
        self.spec = spec
        self.targets_list = targets
        self.targets = frozenset(f"{t.name}.transformer_blocks.{i}.attn1" for t in targets
                                 for i in range(len(t.transformer.transformer_blocks)))

    def install(self, variant: str) -> _InstalledScaleFusion:
        generator = torch.Generator().manual_seed(self.spec.seed)

        def draw(windows: LayerWindows, device: torch.device) -> torch.Tensor:
            return ops.window_grid(windows.grid[0], windows.grid[1], windows.window,
                                   windows.stride, windows.jitter, generator=generator,
                                   device=device)

        return _InstalledScaleFusion(self.spec, self.targets_list, WindowTable(draw=draw))


def _resolve(spec: ScaleFusion, model: nn.Module) -> _ScaleFusionPlan:
    transformers = {name: module for name, module in model.named_modules()
                    if _is_transformer(module)}
    if not transformers:
        raise ValueError(f"this {type(model).__name__} has no transformer blocks with "
                         "self-attention (attn1) for ScaleFusion")
    if spec.layers is None:
        selected = list(transformers)
    else:
        selected = []
        for name in spec.layers:
            get_module(model, name, "ScaleFusion layer")
            inside = [t for t in transformers if t == name or t.startswith(f"{name}.")]
            if not inside:
                holding = [b for b in block_names(model)
                           if any(t.startswith(f"{b}.") for t in transformers)]
                raise ValueError(f"ScaleFusion: {name!r} holds no transformer block; the blocks "
                                 f"with transformers are {', '.join(holding)}")
            selected.extend(t for t in inside if t not in selected)
    sample_size = model.config.sample_size
    sample_size = sample_size if isinstance(sample_size, int) else max(sample_size)
    targets = [_Target(name, transformers[name],
                       math.ceil(sample_size / 2 ** _level(model, name))) for name in selected]
    return _ScaleFusionPlan(spec, targets)


register_spec_type(ScaleFusion, _resolve)


def _installed(unet: nn.Module, variant: str | None) -> list[_InstalledScaleFusion]:
    state = patch_state(unet)
    found = [] if state is None else [
        entry.installed for entry in state.entries
        if isinstance(entry.installed, _InstalledScaleFusion)
        and (variant is None or entry.variant == variant)]
    if not found:
        raise ValueError("prepare_windows: this UNet has no ScaleFusion patched"
                         + ("" if variant is None else f" in configuration {variant!r}"))
    return found


def prepare_windows(unet: nn.Module, latent_size: tuple[int, int], steps: Sequence[int],
                    generator: torch.Generator, device: torch.device,
                    variant: str | None = None) -> None:
    """Draw the window starts of every step and token grid ahead, from ``generator``.

    For each installed ScaleFusion (of configuration ``variant``, or all), each of its layers'
    token grids at a latent of ``latent_size`` (``ceil(size / 2^level)``) and each step index of
    ``steps`` (in order), one :func:`hrkernels.ops.window_grid` draw, stored on ``device``; then
    :func:`hrkernels.set_step` selects a step's starts without host work.

    Args:
        unet: the patched UNet.
        latent_size: ``(h, w)`` of the latents the UNet will see.
        steps: the step indices that will be run.
        generator: the one source of the jitter.
        device: where the starts go.
        variant: the configuration whose ScaleFusion to prepare (None: every one).
    """
    for installed in _installed(getattr(unet, "_orig_mod", unet), variant):
        grids: dict[tuple[int, int], LayerWindows] = {}
        model = getattr(unet, "_orig_mod", unet)
        for target in installed.targets:
            level = _level(model, target.name)
            grid = (-(-latent_size[0] // 2**level), -(-latent_size[1] // 2**level))
            grids.setdefault(grid, layer_windows(grid, target.base, installed.spec.settings))
        table = installed.table
        table.prepared = {grid: {} for grid in grids}
        for step in steps:
            for grid, windows in grids.items():
                table.prepared[grid][step] = ops.window_grid(
                    grid[0], grid[1], windows.window, windows.stride, windows.jitter,
                    generator=generator, device=device)
        table.select(table.step)

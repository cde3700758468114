"""FreeScale's Scale Fusion self-attention (docs/METHODS.md, "FreeScale"), as a diffusers attention
processor installed by :class:`hrkernels.ScaleFusion`.

For a transformer's self-attention over a token grid ``[B, h, w, D]``:

* **global**: ordinary self-attention over all ``h w`` tokens; with ``fast_mode`` over each of the
  ``s_h x s_w`` dilated sub-grids (:func:`hrkernels.ops.gather_dilated`, one batched SDPA,
  :func:`hrkernels.ops.scatter_dilated`; the grid padded with zero tokens to multiples of ``s``);
* **local**: the grid cut into windows (base token grid of the layer, stride half a window, jitter;
  zero tokens outside the grid, as keys and values too) with :func:`hrkernels.ops.gather_windows`
  (channels-last: the token tensor is read in place), ONE batched SDPA over all windows (or, with
  ``window_chunk``, one per chunk of windows into a preallocated result: the same values, less
  memory), and the windows put back with :func:`hrkernels.ops.scatter_windows_mean` (overlaps
  averaged);
* **fusion**: ``out = global + G(local - global)`` (:func:`hrkernels.ops.frequency_fusion`, kernel
  ``2 max(s_h, s_w) - 1``, ``sigma``; ``feature_blur`` also blurs along the features).

``q``, ``k``, ``v`` are projected once over the full grid (the block's own ``to_q/to_k/to_v``, so
LoRA on them works) and windows are cut from them; ``to_out`` runs on both branches' full maps
before the fusion (the fused features are the projected ones, as the authors fuse). The
attention itself is ``torch.nn.functional.scaled_dot_product_attention``: no ``N x N`` matrix is
ever built here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from hrkernels import ops

__all__ = ["GridCell", "LayerWindows", "ScaleFusionAttention", "ScaleFusionSettings",
           "layer_windows"]


@dataclass(frozen=True)
class ScaleFusionSettings:
    """The knobs of Scale Fusion (see :class:`hrkernels.ScaleFusion`); window/stride/jitter in
    tokens of each layer, None to derive them per layer."""

    window: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None
    jitter: int | None = None
    sigma: float = 1.0
    fast_mode: bool = False
    feature_blur: bool = False
    window_chunk: int | None = None


@dataclass(frozen=True)
class LayerWindows:
    """The local windows of one token grid.

    Attributes:
        grid: ``(h, w)`` tokens of the layer now.
        window: ``(wh, ww)``: the layer's base token grid (clamped to the grid), or the spec's.
        stride: ``(sh, sw)``; ``jitter``: the window starts' jitter (``window // 8``).
        scale: ``(s_h, s_w)``: the grid over the base grid, rounded (>= 1): the blur kernel
            ``2 max(s) - 1`` and the dilation of ``fast_mode``.
    """

    grid: tuple[int, int]
    window: tuple[int, int]
    stride: tuple[int, int]
    jitter: int
    scale: tuple[int, int]

    @property
    def kernel_size(self) -> int:
        return 2 * max(self.scale) - 1


def layer_windows(grid: tuple[int, int], base: int, settings: ScaleFusionSettings) -> LayerWindows:
    """The windows of a ``grid`` of tokens whose base (trained) token grid is ``base x base``."""
    window = settings.window or (min(base, grid[0]), min(base, grid[1]))
    window = (min(window[0], grid[0]), min(window[1], grid[1]))
    stride = settings.stride or (max(1, window[0] // 2), max(1, window[1] // 2))
    jitter = settings.jitter if settings.jitter is not None else min(window) // 8
    scale = (max(1, math.floor(grid[0] / base + 0.5)), max(1, math.floor(grid[1] / base + 0.5)))
    return LayerWindows(tuple(grid), window, stride, jitter, scale)


@dataclass
class GridCell:
    """The token grid ``(h, w)`` a transformer's blocks attend over in the current call, written
    by the transformer's forward wrapper before its blocks run (a plain Python attribute: under
    ``torch.compile`` it is a traced constant of the graph of that input shape)."""

    size: tuple[int, int] | None = None


@dataclass
class WindowTable:
    """Window starts per ``(grid, step index)``, shared by the processors of one installed spec.

    ``prepared``: ``{grid: {step: [N, 2] int64 device tensor}}`` (drawn ahead by the sampler);
    ``current``: the starts of the current step per grid (what the processors read; set by
    ``set_step``); ``draw``: draws starts for a grid not prepared (eager use only).
    """

    prepared: dict[tuple[int, int], dict[int, torch.Tensor]] = field(default_factory=dict)
    current: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    step: int = 0
    draw: Callable[[LayerWindows, torch.device], torch.Tensor] | None = None

    def select(self, step: int) -> None:
        self.step = step
        self.current = {grid: steps[step] for grid, steps in self.prepared.items()
                        if step in steps}

    def starts(self, windows: LayerWindows, device: torch.device) -> torch.Tensor:
        current = self.current.get(windows.grid)
        if current is not None:
            return current
        if torch.compiler.is_compiling() or self.draw is None:
            raise RuntimeError(
                f"ScaleFusion: no window starts were prepared for a {windows.grid[0]}x"
                f"{windows.grid[1]} token grid at step {self.step}; under torch.compile call "
                "hrkernels.patching.scalefusion.prepare_windows before sampling")
        starts = self.draw(windows, device)
        self.prepared.setdefault(windows.grid, {})[self.step] = starts
        self.current[windows.grid] = starts
        return starts


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, N, heads * d]`` -> ``[B, heads, N, d]``."""
    batch, tokens, inner = x.shape
    return x.view(batch, tokens, heads, inner // heads).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """``[B, heads, N, d]`` -> ``[B, N, heads * d]``."""
    batch, heads, tokens, dim = x.shape
    return x.transpose(1, 2).reshape(batch, tokens, heads * dim)


def _as_map(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``[B, h w, D]`` tokens as a channels-last ``[B, D, h, w]`` view (no copy)."""
    batch, _, dim = tokens.shape
    return tokens.view(batch, grid[0], grid[1], dim).permute(0, 3, 1, 2)


def _as_tokens(feature_map: torch.Tensor) -> torch.Tensor:
    """``[B, D, h, w]`` -> ``[B, h w, D]`` (a view when the map is channels-last)."""
    batch, dim = feature_map.shape[:2]
    return feature_map.permute(0, 2, 3, 1).reshape(batch, -1, dim)


def _attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               heads: int) -> torch.Tensor:
    """SDPA over ``[B, N, D]`` tokens with ``heads`` heads -> ``[B, N, D]``."""
    out = F.scaled_dot_product_attention(_heads(query, heads), _heads(key, heads),
                                         _heads(value, heads))
    return _merge(out)


def _windows(x: torch.Tensor, grid: tuple[int, int], starts: torch.Tensor,
             window: tuple[int, int]) -> torch.Tensor:
    """The windows of ``[B, h w, D]`` tokens as ``[n B, wh ww, D]`` tokens (zeros outside)."""
    views = ops.gather_windows(_as_map(x, grid), starts, window, torch.channels_last)
    return _as_tokens(views)


def _local_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     grid: tuple[int, int], starts: torch.Tensor, window: tuple[int, int],
                     heads: int, chunk: int | None) -> torch.Tensor:
    """Attention within every window of ``[B, h w, D]`` tokens -> ``[n B, wh ww, D]`` (window-major,
    as :func:`hrkernels.ops.gather_windows`): one SDPA call over all ``n`` windows, or one per
    ``chunk`` windows written into the preallocated result (the same values: every window is
    attended on its own; the peak holds the result and one chunk's q, k, v instead of all)."""
    count = starts.shape[0]
    if chunk is None or chunk >= count:
        return _attention(_windows(query, grid, starts, window),
                          _windows(key, grid, starts, window),
                          _windows(value, grid, starts, window), heads)
    batch, _, dim = query.shape
    out = query.new_empty(count * batch, window[0] * window[1], dim)
    for first in range(0, count, chunk):
        part = starts[first:first + chunk]
        rows = slice(first * batch, (first + part.shape[0]) * batch)
        out[rows] = _attention(_windows(query, grid, part, window),
                               _windows(key, grid, part, window),
                               _windows(value, grid, part, window), heads)
    return out


def _dilated(x: torch.Tensor, grid: tuple[int, int], scale: tuple[int, int]) -> torch.Tensor:
    """The ``s_h s_w`` dilated sub-grids of ``[B, h w, D]`` tokens (the grid padded with zero
    tokens to multiples of ``scale``) as ``[s_h s_w B, h' w', D]``."""
    feature_map = _as_map(x, grid)
    pad_h, pad_w = -grid[0] % scale[0], -grid[1] % scale[1]
    if pad_h or pad_w:
        feature_map = F.pad(feature_map, (0, pad_w, 0, pad_h))
    return _as_tokens(ops.gather_dilated(feature_map, scale))


class ScaleFusionAttention:
    """A diffusers attention processor: Scale Fusion when active, the processor it replaced
    otherwise (and for any call that is not self-attention).

    Args:
        original: the processor the layer had (restored by :meth:`uninstall`).
        cell: the :class:`GridCell` of the layer's transformer.
        base: the layer's base token grid side (``ceil(sample_size / 2^level)``).
        settings: :class:`ScaleFusionSettings`.
        table: the :class:`WindowTable` of the installed spec.
        name: the layer's name (for messages).

    Input/output as every processor: ``hidden_states`` ``[B, N, D]`` -> ``[B, N, D_out]``.
    """

    def __init__(self, original: Any, cell: GridCell, base: int, settings: ScaleFusionSettings,
                 table: WindowTable, name: str) -> None:
        self.original = original
        self.cell = cell
        self.base = base
        self.settings = settings
        self.table = table
        self.name = name
        self.active = False

    def __call__(self, attn: Any, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
        if (not self.active or encoder_hidden_states is not None or attention_mask is not None
                or hidden_states.ndim != 3 or attn.spatial_norm is not None
                or attn.group_norm is not None):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask,
                                 temb, *args, **kwargs)
        grid = self.cell.size
        if grid is None or grid[0] * grid[1] != hidden_states.shape[1]:
            raise RuntimeError(f"ScaleFusion ({self.name}): the token grid of this call is not "
                               "known (its transformer's forward was not seen)")
        windows = layer_windows(grid, self.base, self.settings)
        residual = hidden_states
        heads = attn.heads
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), \
            attn.to_v(hidden_states)
        if attn.norm_q is not None or attn.norm_k is not None:
            raise NotImplementedError(f"ScaleFusion ({self.name}): q/k norms are not supported")
        # Global: all tokens, or (fast_mode) each dilated sub-grid.
        if self.settings.fast_mode and max(windows.scale) > 1:
            scale = windows.scale
            sub = _attention(_dilated(query, grid, scale), _dilated(key, grid, scale),
                             _dilated(value, grid, scale), heads)
            sub_grid = (-(-grid[0] // scale[0]), -(-grid[1] // scale[1]))
            full = ops.scatter_dilated(_as_map(sub, sub_grid).contiguous(
                memory_format=torch.channels_last), scale)
            global_map = full[:, :, :grid[0], :grid[1]]
        else:
            global_map = _as_map(_attention(query, key, value, heads), grid)
        # Local: every window of every image in one SDPA call (or in chunks of windows when a
        # memory budget says so), overlaps averaged.
        starts = self.table.starts(windows, hidden_states.device)
        local = _local_attention(query, key, value, grid, starts, windows.window, heads,
                                 self.settings.window_chunk)
        local_map = ops.scatter_windows_mean(
            _as_map(local, windows.window).contiguous(memory_format=torch.channels_last),
            starts, grid)
        # The output projection on both branches, then the fusion of the projected features (as
        # the authors fuse; with feature_blur=False projecting after the fusion is the same).
        global_out = _as_map(attn.to_out[1](attn.to_out[0](_as_tokens(global_map))), grid)
        local_out = _as_map(attn.to_out[1](attn.to_out[0](_as_tokens(local_map))), grid)
        fused = ops.frequency_fusion(global_out, local_out, self.settings.sigma,
                                     windows.kernel_size, self.settings.feature_blur)
        hidden_states = _as_tokens(fused)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

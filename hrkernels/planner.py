"""The memory planner: the peak device memory of every phase of a sampler call, estimated before any
model work from the UNet/VAE configs and dtypes, and the choices that make the call fit a budget.

:func:`plan` returns a :class:`MemoryPlan`; every sampler calls it first
(:meth:`hrkernels.samplers.base.Sampler.sample`) and raises :class:`MemoryPlanError` before any
work when no choice fits.

Phases (each estimate is the device memory alive at the phase's peak, weights included):

* ``weights``: the pipeline's parameters and buffers on the device.
* ``stage s UNet``: weights, the stage's state (fp32 latents, the step's views and predictions)
  and one UNet call of ``k`` views (``k x`` guidance rows) at the view shape
  (:func:`unet_call_bytes`: a walk over the UNet's blocks from its config, counting the skip
  tensors held for the up path and the working set of each block).
* ``stage s attention``: the largest self-attention layer's working set with a fused SDPA
  backend (flash / memory-efficient: no ``N x N`` matrix); the math backend's ``N x N`` scores
  are reported beside it. FreeScale's stages count Scale Fusion's local windows, chunked over
  windows when the budget says so (:attr:`MemoryPlan.window_chunk`).
* ``VAE decode`` / ``VAE encode``: the tile plan of :mod:`hrkernels.vae` for the budget that is
  left, plus the latents, the image and the weights held then.

Choices: ``view_batch_size`` (the most views per UNet call; ``"auto"`` resolves to the largest that
fits), FreeScale's window chunk, the VAE tile plans. See :data:`UNET_WORKSPACE` for the one
calibrated constant.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from hrkernels._validate import check_int

__all__ = [
    "AUTO_MEMORY_RESERVE",
    "MemoryPlan",
    "MemoryPlanError",
    "Phase",
    "UNET_WORKSPACE",
    "UNetMemory",
    "VAE_WORKSPACE",
    "plan",
    "unet_call_bytes",
]

# Measured constant: the UNet call's peak over the live-tensor walk of :func:`unet_call_bytes`.
# The walk counts the tensors PyTorch's eager forward of diffusers' blocks keeps alive: it equals
# the live tensors of the full SDXL and SD 1.5 UNets in fp16 on the meta device (fused SDPA; within
# 0.1% at 64^2-256^2 latents, 2-16 rows) and of the tiny pipelines' UNets on the CPU (1.0-1.6%),
# tests/test_planner.py. What it does not see (cuDNN/cuBLAS workspaces, SDPA's statistics, the
# allocator's rounding) is a share of the activations: 1.0 on the CPU; on CUDA 1.0 until
# ``hrkernels.bench.plan`` measures it (bench/NOTES.md, "Memory planner").
UNET_WORKSPACE = {"cpu": 1.0, "cuda": 1.0}
# Measured constant: the live tensors of a tiled VAE call over its tile plan's ``peak_bytes``
# (which :mod:`hrkernels.vae` keeps an upper bound: the budget must hold). On the CPU 0.855-0.86
# (the tiny SDXL VAE, decode and encode at 256^2-768^2, tests/test_planner.py); on CUDA measured by
# ``hrkernels.bench.plan``. The VAE phases report the expected peak with it; the tile plan itself
# still fits its budget by the bound.
VAE_WORKSPACE = {"cpu": 0.86, "cuda": 1.0}
# Memory a CUDA budget leaves free when ``max_memory`` is None (bytes): fragmentation, library
# workspaces, the CUDA context's own allocations outside PyTorch's allocator.
AUTO_MEMORY_RESERVE = 2 * 2**30
# Latent-sized float32 tensors a stage holds at its peak besides the views (z, its clean start and
# noise, the skip-residual sample, the scaled input, the predictions, the step's result).
STATE_LATENTS = 8
# ``view_batch_size="auto"`` on a device with no budget (CPU without ``max_memory``).
DEFAULT_CPU_VIEW_BATCH = 8
# Text tokens per row (CLIP's 77), for the cross-attention keys and values.
TEXT_TOKENS = 77


class MemoryPlanError(MemoryError, ValueError):
    """No choice of the planner fits the memory budget. Raised before any model work; the message
    names the phase that does not fit, its estimate, the budget and what would make it fit.
    ``plan`` holds the :class:`MemoryPlan` as far as it was made (the failing phase last)."""

    def __init__(self, message: str, plan: MemoryPlan | None = None) -> None:
        super().__init__(message)
        self.plan = plan


@dataclass(frozen=True)
class Phase:
    """One phase of a call: its name, estimated peak device memory in bytes (weights included) and
    what it holds (one line)."""

    name: str
    bytes: int
    detail: str = ""


@dataclass
class MemoryPlan:
    """The memory plan of one sampler call (see the module docstring).

    Attributes:
        sampler: the sampler's name; ``height``, ``width``, ``batch``: the call.
        device: where the call runs.
        budget: bytes the call may use on the device (weights included), or None for no limit.
        phases: every phase in call order.
        view_batch_size: views per UNet call the engine may use (the resolved ``"auto"``, or the
            caller's number).
        view_batches: per stage, ``{view shape: views per call}`` as the engine will run them.
        window_chunk: FreeScale's local windows per SDPA call (None: all windows in one call).
        vae: the VAE tile plans by phase name (:class:`hrkernels.vae.TilePlan`).
        vae_max_memory: the budget handed to :func:`hrkernels.vae.decode` / ``encode`` (None:
            theirs).
        notes: remarks (the math SDPA backend's needs, the calibration used).
    """

    sampler: str
    height: int
    width: int
    batch: int
    device: torch.device
    budget: int | None
    phases: list[Phase] = field(default_factory=list)
    view_batch_size: int = DEFAULT_CPU_VIEW_BATCH
    view_batches: list[dict[tuple[int, int], int]] = field(default_factory=list)
    window_chunk: int | None = None
    vae: dict[str, Any] = field(default_factory=dict)
    vae_max_memory: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> int:
        """The largest phase estimate (bytes)."""
        return max((phase.bytes for phase in self.phases), default=0)

    @property
    def peak_phase(self) -> Phase:
        return max(self.phases, key=lambda phase: phase.bytes)

    @property
    def fits(self) -> bool:
        return self.budget is None or self.peak <= self.budget

    def __str__(self) -> str:
        """A table of the phases, the choices and the notes (the CLI's ``--plan``)."""
        budget = "none (max_memory=None)" if self.budget is None else gib(self.budget)
        lines = [f"{self.sampler} memory plan: {self.width}x{self.height} (W x H), batch "
                 f"{self.batch}, {self.device}, budget {budget}"]
        width = max(len(phase.name) for phase in self.phases) if self.phases else 5
        lines.append(f"  {'phase':<{width}}  {'estimate':>11}  holds")
        for phase in self.phases:
            lines.append(f"  {phase.name:<{width}}  {gib(phase.bytes):>11}  {phase.detail}")
        lines.append(f"  peak: {gib(self.peak)} ({self.peak_phase.name})" if self.phases
                     else "  peak: 0")
        chunk = "all windows in one call" if self.window_chunk is None else \
            f"{self.window_chunk} windows per call"
        lines.append(f"  choices: view_batch_size={self.view_batch_size}"
                     + (f", window chunk: {chunk}" if self.has_windows else ""))
        for name, tile_plan in self.vae.items():
            lines.append(f"  {name}: {tile_plan.describe()}")
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)

    @property
    def has_windows(self) -> bool:
        return any("window" in phase.detail for phase in self.phases)


def gib(size: float) -> str:
    """Bytes as ``"1.23 GiB"`` (``"12.3 MiB"`` under 1 GiB)."""
    if abs(size) < 2**30:
        return f"{size / 2**20:.1f} MiB"
    return f"{size / 2**30:.2f} GiB"


# --------------------------------------------------------------------------------------------------
# The UNet call
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UNetMemory:
    """Peak bytes of one UNet call (see :func:`unet_call_bytes`).

    Attributes:
        peak: the call's peak (activations, inputs and outputs; not the weights).
        attention: the peak at the largest self-attention layer (fused SDPA).
        attention_tokens, attention_channels, attention_heads: that layer's size.
        math_scores: bytes of the ``N x N`` scores (and their softmax) the math SDPA backend
            would add at that layer.
    """

    peak: int
    attention: int
    attention_tokens: int
    attention_channels: int
    attention_heads: int
    math_scores: int


def _per_block(value: Any, blocks: int) -> list[int]:
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)] * blocks


def _heads(config: Any, blocks: int) -> list[int]:
    """Attention heads per down block (diffusers' legacy ``attention_head_dim`` is the head count
    of SD/SDXL UNets when ``num_attention_heads`` is not set)."""
    heads = config.get("num_attention_heads") or config.get("attention_head_dim") or 8
    return _per_block(heads, blocks)


WindowModel = Any  # callable(level, grid, channels) -> extra elements per row (None: plain)


def unet_call_bytes(config: Any, rows: int, height: int, width: int, element: int,
                    window_elements: WindowModel = None) -> UNetMemory:
    """The peak device memory of one eager UNet call on ``[rows, C, height, width]`` latents.

    A closed-form walk over ``UNet2DConditionModel``'s blocks (from its config) in call order,
    counting per row the tensors diffusers' forward keeps alive (all in the UNet's dtype,
    ``element`` bytes):

    * the skip tensors of the down path (held until their up block ends);
    * ResNet blocks: input, GroupNorm and SiLU outputs, both convolutions, the time-embedding sum,
      the shortcut, the residual sum and its scaled copy;
    * transformers: per token ``19 C`` at the feed-forward (input, hidden, norm, the GEGLU
      projection ``8 C``, its gate ``4 C`` and product ``4 C``), ``8 C`` at the self-attention
      (input, hidden, norm, q, k, v, output and its merged copy; fused SDPA, no scores), the
      depth of a transformer changing nothing (its blocks run one after the other);
      ``window_elements(level, grid, C)`` adds Scale Fusion's local windows;
    * up blocks' concatenations, the x2 upsampling and its convolution, the output head.

    Args:
        config: the UNet's config (``unet.config``).
        rows, height, width: the call's batch rows and latent size.
        element: bytes per element of the UNet's dtype.
        window_elements: Scale Fusion's extra elements per row at a self-attention (None: none).

    Returns:
        :class:`UNetMemory` (bytes; not scaled by :data:`UNET_WORKSPACE`).
    """
    channels = [int(c) for c in config.block_out_channels]
    levels = len(channels)
    down_types = list(config.down_block_types)
    up_types = list(config.up_block_types)
    layers = _per_block(config.layers_per_block, levels)
    heads = _heads(config, levels)
    grids = [(-(-height // 2**level), -(-width // 2**level)) for level in range(levels)]
    pixels = [h * w for h, w in grids]
    text = TEXT_TOKENS
    skips: list[int] = []
    peak = 0
    attention = (0, 0, 0, 0, 0)  # (peak, tokens, channels, heads, level)

    def at(extra: int) -> int:
        nonlocal peak
        live = sum(skips) + extra
        peak = max(peak, live)
        return live

    def resnet(c_in: int, c_out: int, p: int) -> int:
        """Working set of a ResNet block beyond its input."""
        out = (4 if c_in != c_out else 3) * c_out
        return max(2 * c_in, c_in + c_out, out) * p

    def transformer(c: int, level: int, held: int) -> None:
        nonlocal attention
        p = pixels[level]
        windows = window_elements(level, grids[level], c) if window_elements else 0
        self_attention = at(held + 7 * c * p + windows + 2 * text * c)
        at(held + 20 * c * p)
        if p > attention[1] or (p == attention[1] and self_attention > attention[0]):
            attention = (self_attention, p, c, heads[min(level, len(heads) - 1)], level)

    io = 2 * int(config.in_channels) * pixels[0]  # the sample and the prediction
    skips.append(io // 2)  # the input sample, held by the caller
    at(channels[0] * pixels[0])
    skips.append(channels[0] * pixels[0])
    current = channels[0]
    for level, kind in enumerate(down_types):
        c, p = channels[level], pixels[level]
        for _ in range(layers[level]):
            at(resnet(current, c, p))
            if "CrossAttn" in kind:
                transformer(c, level, c * p)
            skips.append(c * p)
            current = c
        if level < levels - 1:
            at(c * pixels[level + 1])
            skips.append(c * pixels[level + 1])
    last = levels - 1
    c, p = channels[last], pixels[last]
    at(resnet(c, c, p))
    if "CrossAttn" in str(config.get("mid_block_type", "UNetMidBlock2DCrossAttn")):
        transformer(c, last, c * p)
    at(c * p + resnet(c, c, p))
    hidden = c * p
    for index, kind in enumerate(up_types):
        level = levels - 1 - index
        c, p = channels[level], pixels[level]
        count = layers[level] + 1
        # The block's input stays alive for the whole block (the caller's variable).
        skips.append(hidden)
        skip_channels = [channels[level]] * count
        # The skips' channels: this level's outputs, and the first one of the level below (the
        # level's input: conv_in's or the downsampler's).
        skip_channels[0] = channels[max(level - 1, 0)]
        for j in range(count):
            c_skip = skip_channels[count - 1 - j]
            c_in = hidden // p + c_skip
            at((hidden if j else 0) + c_in * p)  # the block's input is held already
            at(c_in * p + resnet(c_in, c, p))
            hidden = c * p
            if "CrossAttn" in kind:
                transformer(c, level, hidden)
        if level > 0:
            upsampled = c * pixels[level - 1]
            at(hidden + 2 * upsampled)
            hidden = upsampled
        del skips[-count - 1:]
    at(3 * channels[0] * pixels[0] + io // 2)
    tokens, heads_count = attention[1], attention[3]
    return UNetMemory(
        peak=rows * peak * element,
        attention=rows * attention[0] * element,
        attention_tokens=tokens,
        attention_channels=attention[2],
        attention_heads=heads_count,
        math_scores=2 * rows * heads_count * tokens * tokens * element,
    )


# SD3's text tokens: CLIP's 77 and T5's max_sequence_length (256, the pipeline's default).
SD3_TEXT_TOKENS = 77 + 256
# Live elements per inner channel D of an SD3 transformer call, per row, measured on the CPU with
# the tiny SD3 transformer (1-2 rows, 64-2304 image tokens N, 77-600 text tokens T): the peak is
# the larger of two points of a joint block, 13 N + 3 T + 7 (the image branch's feed-forward: its
# input, norm, attention output, the 4 D hidden and its activation) and 5.5 N + 11.75 T + 55 (the
# text branch's), within 1.2% of every measurement. At SD3's sizes (N >= 4096, T = 333) the first
# holds.
SD3_PEAKS = ((13.0, 3.0, 7.0), (5.5, 11.75, 55.0))


def transformer_call_bytes(config: Any, rows: int, height: int, width: int, element: int,
                           text_tokens: int = SD3_TEXT_TOKENS) -> UNetMemory:
    """The peak device memory of one eager SD3 (MMDiT) transformer call on
    ``[rows, C, height, width]`` latents: ``N = (height / p) (width / p)`` image tokens and
    ``text_tokens`` text tokens of ``D = heads x head_dim`` channels: the larger of the two peaks
    of :data:`SD3_PEAKS` per row, plus the input sample; the joint attention over ``N + T`` tokens
    through fused SDPA (no scores).

    Returns:
        :class:`UNetMemory` (bytes; not scaled by :data:`UNET_WORKSPACE`).
    """
    patch = int(config.patch_size)
    heads = int(config.num_attention_heads)
    inner = heads * int(config.attention_head_dim)
    image = -(-height // patch) * -(-width // patch)
    tokens = image + text_tokens
    per_row = int(max(a * image + b * text_tokens + c for a, b, c in SD3_PEAKS) * inner)
    sample = int(config.in_channels) * height * width
    return UNetMemory(
        peak=rows * (per_row + sample) * element,
        attention=rows * 6 * tokens * inner * element,  # input, norm, q, k, v, output
        attention_tokens=tokens,
        attention_channels=inner,
        attention_heads=heads,
        math_scores=2 * rows * heads * tokens * tokens * element,
    )


def model_call_bytes(config: Any, rows: int, height: int, width: int, element: int,
                     window_elements: WindowModel = None) -> UNetMemory:
    """:func:`unet_call_bytes` for a UNet, :func:`transformer_call_bytes` for an SD3 transformer
    (its config has no ``block_out_channels``)."""
    if "block_out_channels" in config:
        return unet_call_bytes(config, rows, height, width, element, window_elements)
    if window_elements is not None:
        raise ValueError("Scale Fusion windows apply to UNets only")
    return transformer_call_bytes(config, rows, height, width, element)


# --------------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------------


def _module_bytes(module: Any) -> tuple[int, torch.device | None]:
    """Bytes of a module's parameters and buffers, and the device of its first parameter."""
    if not isinstance(module, torch.nn.Module):
        return 0, None
    tensors = list(module.parameters()) + list(module.buffers())
    if not tensors:
        return 0, None
    return sum(t.numel() * t.element_size() for t in tensors), tensors[0].device


def _same_device(a: torch.device | None, b: torch.device) -> bool:
    if a is None or a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    current = torch.cuda.current_device() if torch.cuda.is_available() else 0
    return (a.index if a.index is not None else current) == (
        b.index if b.index is not None else current)


@dataclass(frozen=True)
class _Weights:
    resident: int  # on the device now
    unet: int  # the UNet's, when not resident (model CPU offload loads it for its phases)
    vae: int
    detail: str


def _weights(pipe: Any, device: torch.device) -> _Weights:
    components = getattr(pipe, "components", None) or {"unet": pipe.unet, "vae": pipe.vae}
    resident, named, missing = 0, [], {}
    for name, module in components.items():
        size, where = _module_bytes(module)
        if not size:
            continue
        if _same_device(where, device):
            resident += size
            named.append(f"{name} {gib(size)}")
        else:
            missing[name] = size
    return _Weights(resident, missing.get("unet", 0), missing.get("vae", 0),
                    ", ".join(named) or "none on the device")


def default_budget(device: torch.device, resident: int) -> int | None:
    """The budget of a call with ``max_memory=None``: on CUDA what this process can reach (the
    driver's free memory, what PyTorch's allocator holds unused, and the pipeline's weights
    already there) less :data:`AUTO_MEMORY_RESERVE`; elsewhere None (no limit)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return max(0, free + cached + resident - AUTO_MEMORY_RESERVE)


def host_memory() -> int | None:
    """The host's physical memory in bytes (None where it cannot be read)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _workspace(device: torch.device, table: dict[str, float] = UNET_WORKSPACE) -> float:
    return table.get(device.type, table["cuda"])


@dataclass
class _StageModel:
    """What the planner needs of one stage: its sizes, views per image per step, views per
    UNet call (chosen) and Scale Fusion's settings (None: plain attention)."""

    stage: int
    size: tuple[int, int]  # pixels
    latent: tuple[int, int]
    views: dict[tuple[int, int], int]  # per image per step
    batches: dict[tuple[int, int], int] = field(default_factory=dict)  # views per call
    windows: Any = None  # ScaleFusionSettings or None


def _window_model(settings: Any, base: int, chunk: int | None):
    """Scale Fusion's extra elements per row at a self-attention of a ``grid`` of tokens: the
    global branch's map and the local windows' q, k, v, attention output and its merged copy
    (all windows, or the preallocated output and one chunk)."""
    from hrkernels.nn.attention import layer_windows
    from hrkernels.ops import window_count

    def elements(level: int, grid: tuple[int, int], channels: int) -> int:
        windows = layer_windows(grid, -(-base // 2**level), settings)
        count = window_count(grid[0], grid[1], windows.window, windows.stride)
        per_window = windows.window[0] * windows.window[1] * channels
        local = 5 * count * per_window if chunk is None or chunk >= count else \
            count * per_window + 5 * chunk * per_window
        return grid[0] * grid[1] * channels + local

    return elements


def _window_counts(settings: Any, base: int, latent: tuple[int, int], levels: int) -> int:
    """The most local windows of any level of a latent."""
    from hrkernels.nn.attention import layer_windows
    from hrkernels.ops import window_count

    most = 1
    for level in range(levels):
        grid = (-(-latent[0] // 2**level), -(-latent[1] // 2**level))
        windows = layer_windows(grid, -(-base // 2**level), settings)
        most = max(most, window_count(grid[0], grid[1], windows.window, windows.stride))
    return most


class _Planner:
    """One :func:`plan` call (see there)."""

    def __init__(self, sampler: Any, height: int, width: int, batch: int,
                 max_memory: int | None, num_inference_steps: int, rows_per_view: int,
                 options: dict[str, Any]) -> None:
        adapter = sampler.adapter
        self.sampler, self.adapter = sampler, adapter
        self.device = adapter.device
        self.config = adapter.model.config
        self.element = torch.empty((), dtype=adapter.dtype).element_size()
        self.batch, self.rows_per_view = batch, rows_per_view
        self.options = options
        self.decode_final, self.decode_stages = True, False
        self.weights = _weights(adapter.pipe, self.device)
        self.given_budget = max_memory is not None
        self.budget = max_memory if max_memory is not None else default_budget(
            self.device, self.weights.resident)
        # Without a budget (a CPU), no phase may need more than the host has: it could not run.
        self.limit = self.budget if self.budget is not None else host_memory()
        self.views = sampler.count_views(height, width, num_inference_steps)
        f = adapter.vae_scale_factor
        self.stages = [
            _StageModel(index + 1, size, (size[0] // f, size[1] // f), views,
                        windows=sampler.window_settings(index + 1))
            for index, (size, views) in enumerate(zip(self.views.sizes, self.views.views,
                                                      strict=True))]
        self.plan = MemoryPlan(sampler.name, height, width, batch, self.device, self.budget)
        self.workspace = _workspace(self.device)

    # -- the UNet stages --------------------------------------------------------------------------

    def stage_bytes(self, stage: _StageModel, chunk: int | None) -> tuple[int, UNetMemory, str]:
        """Peak of a stage with its batches: weights, state, the largest UNet call."""
        channels = self.adapter.latent_channels
        h, w = stage.latent
        state = STATE_LATENTS * self.batch * channels * h * w * 4
        per_view_state = 8 + self.element * (1 + self.rows_per_view)  # fp32 views + predictions
        call: UNetMemory | None = None
        shape_used = None
        for shape, count in stage.views.items():
            state += count * self.batch * channels * shape[0] * shape[1] * per_view_state
            rows = stage.batches[shape] * self.rows_per_view
            windows = None if stage.windows is None else _window_model(
                stage.windows, self.adapter.base_latent_size, chunk)
            memory = model_call_bytes(self.config, rows, shape[0], shape[1], self.element,
                                     windows)
            if call is None or memory.peak > call.peak:
                call, shape_used = memory, shape
        assert call is not None and shape_used is not None
        weights = self.weights.resident + self.weights.unet
        total = weights + state + int(self.workspace * call.peak)
        k = stage.batches[shape_used]
        detail = (f"weights, fp32 latents and views {gib(state)}, UNet call of {k} view(s) x "
                  f"{self.rows_per_view} row(s) at {shape_used[1]}x{shape_used[0]} latents "
                  f"{gib(self.workspace * call.peak)}")
        return total, call, detail

    def choose_batches(self) -> None:
        """Views per call of every stage and shape, as the engine will choose them."""
        from hrkernels.samplers.engine import choose_view_batch

        requested = self.sampler.view_batch_size
        if requested != "auto":
            limit = int(requested)
        elif self.budget is None:
            limit = DEFAULT_CPU_VIEW_BATCH
        else:
            limit = self.largest_fitting_limit()
        self.plan.view_batch_size = limit
        for stages, counts in self.sampler.view_batch_groups(
                [stage.latent for stage in self.stages], self.batch):
            for shape, numbers in counts.items():
                k = choose_view_batch(numbers, limit)
                for number in stages:
                    self.stages[number - 1].batches[shape] = k
        self.plan.view_batches = [dict(stage.batches) for stage in self.stages]

    def largest_fitting_limit(self) -> int:
        """The largest view batch whose every stage fits the budget (at least 1): each stage's
        peak is affine in the views per call, so the limit is closed-form per stage and shape."""
        assert self.budget is not None
        fits, most = None, 1
        for stage in self.stages:
            most = max(most, max(stage.views.values()) * self.batch)
            chunk = None if stage.windows is None else 1
            stage.batches = dict.fromkeys(stage.views, 1)
            one, _, _ = self.stage_bytes(stage, chunk)
            stage.batches = dict.fromkeys(stage.views, 2)
            two, _, _ = self.stage_bytes(stage, chunk)
            stage_fits = 1 + max(0, (self.budget - one) // max(two - one, 1))
            fits = stage_fits if fits is None else min(fits, stage_fits)
        return max(1, min(int(fits or 1), most))

    def choose_chunk(self) -> None:
        """FreeScale's window chunk: None when every stage fits with all windows in one call,
        else the largest power-of-two fraction of the most windows that fits."""
        staged = [stage for stage in self.stages if stage.windows is not None]
        if not staged or self.budget is None:
            return
        if all(self.stage_bytes(stage, None)[0] <= self.budget for stage in staged):
            return
        levels = len(self.config.block_out_channels)
        most = max(_window_counts(stage.windows, self.adapter.base_latent_size, stage.latent,
                                  levels) for stage in staged)
        chunk = most
        while chunk > 1 and any(self.stage_bytes(stage, chunk)[0] > self.budget
                                for stage in staged):
            chunk = max(1, chunk // 2)
        self.plan.window_chunk = chunk

    # -- the VAE ----------------------------------------------------------------------------------

    def vae_phases(self) -> list[tuple[str, int, Phase]]:
        """``(kind, stage, phase)`` of every VAE call, in call order (none for a pixel-space
        model: it has no VAE)."""
        from hrkernels import vae as vae_io

        if self.adapter.pixel_space:
            return []
        vae = self.adapter.pipe.vae
        channels = self.adapter.latent_channels
        vae_element = torch.empty((), dtype=vae_io._compute_dtype(vae)).element_size()
        weights = self.weights.resident + self.weights.vae
        prepared = []
        calls = list(self.sampler.vae_calls(len(self.stages), self.options))
        final = ("decode", len(self.stages))
        if not self.decode_final and final in calls:
            calls.remove(final)
        if self.decode_stages:  # the previews of the stages before the last, after the stages
            calls += [("preview", number) for number in range(1, len(self.stages))]
        for kind, number in calls:
            stage = self.stages[number - 1]
            image = self.batch * 3 * stage.size[0] * stage.size[1]
            # Every stage's result so far is kept (SamplerOutput.stages).
            held = sum(self.batch * channels * s.latent[0] * s.latent[1] * 4
                       for s in self.stages[:number])
            if kind in ("decode", "preview"):
                shape = (self.batch, channels, *stage.latent)
                held += image * vae_element + image * 4  # the output and its fp32 copy
            else:
                shape = (self.batch, 3, *stage.size)
                held += 2 * image * 4  # the resized image (and the one it came from)
            name = f"VAE {kind} (stage {number})"
            if kind == "decode" and number == len(self.stages):
                name = "VAE decode"
            elif kind == "preview":
                name = f"VAE decode (preview, stage {number})"
            prepared.append((kind, number, name, shape, held))
        vae_budget = None
        if not prepared:
            return []
        if self.budget is not None:
            vae_budget = min(self.budget - weights - held for *_, held in prepared)
            if not self.given_budget:
                # What the VAE would take by default (it leaves a share of the free memory to
                # cuDNN's workspaces), less what the call holds then.
                vae_budget = min(vae_budget, vae_io.default_budget(self.device) - max(
                    held for *_, held in prepared))
            if vae_budget <= 0:
                _, _, name, _, held = max(prepared, key=lambda p: p[-1])
                raise self.error(Phase(name, weights + held, "weights, latents and images held"),
                                 "a smaller size, or model CPU offload "
                                 "(pipe.enable_model_cpu_offload())")
        self.plan.vae_max_memory = vae_budget
        phases = []
        for kind, number, name, shape, held in prepared:
            planner = vae_io.plan_encode if kind == "encode" else vae_io.plan_decode
            try:
                tile_plan = planner(vae, shape, max_memory=vae_budget)
            except vae_io.TilePlanError as error:
                found = re.search(r"at least (\d+) bytes", str(error))
                least = int(found.group(1)) if found else 0
                budget = vae_budget or vae_io.default_budget(self.device)
                raise self.error(
                    Phase(name, weights + held + least, f"the tiled VAE needs at least "
                          f"{gib(least)}, its floor (the whole-latent attention)"),
                    "a smaller size or more memory",
                    budget=None if vae_budget else f"{gib(budget)} (the VAE's default: half the "
                    "host's memory)") from None
            self.plan.vae[name] = tile_plan
            expected = int(_workspace(self.device, VAE_WORKSPACE) * tile_plan.peak_bytes)
            phases.append((kind, number, Phase(
                name, weights + held + expected,
                f"weights, latents and image {gib(held)}, tiled VAE {gib(expected)} "
                f"({len(tile_plan.segments)} segments, bound {gib(tile_plan.peak_bytes)})")))
        return phases

    # -- assembly ---------------------------------------------------------------------------------

    def error(self, phase: Phase, remedy: str, budget: str | None = None) -> MemoryPlanError:
        self.plan.phases.append(phase)
        if budget is None and self.budget is None:
            budget = f"{gib(self.limit or 0)} (max_memory=None: no budget, but the host's memory)"
        elif budget is None:
            budget = gib(self.budget)
        return MemoryPlanError(
            f"{self.sampler.name}: {self.plan.width}x{self.plan.height} (W x H), batch "
            f"{self.batch}: phase '{phase.name}' needs an estimated {gib(phase.bytes)} "
            f"({phase.detail}) but the budget is {budget} (weights on the device: "
            f"{gib(self.weights.resident)}). To fit: {remedy}.", self.plan)

    def unet_remedy(self, stage: _StageModel, total: int) -> str:
        k = max(stage.batches.values())
        parts = []
        if k > 1:
            parts.append("a smaller view_batch_size (this plan runs "
                         f"{k} views per call)")
        others = self.weights.resident - _module_bytes(self.adapter.model)[0]
        if others >= 2**20:
            parts.append(f"model CPU offload (pipe.enable_model_cpu_offload(): "
                         f"{gib(others)} of other weights leave the device)")
        if self.limit is not None and total > 0:
            scale = math.sqrt(max(self.limit - self.weights.resident, 1) / total)
            side = 64 * max(1, int(max(self.plan.height, self.plan.width) * scale) // 64)
            parts.append(f"a smaller size (about {side} pixels on the long side)")
        return ", or ".join(parts) or "more memory"

    def run(self) -> MemoryPlan:
        plan = self.plan
        plan.phases.append(Phase("weights", self.weights.resident, self.weights.detail))
        if self.limit is not None and self.weights.resident > self.limit:
            raise self.error(plan.phases.pop(), "model CPU offload "
                             "(pipe.enable_model_cpu_offload()) or a smaller dtype")
        self.choose_batches()
        self.choose_chunk()
        stages: list[Phase] = []
        largest: tuple[int, _StageModel, UNetMemory] | None = None
        for stage in self.stages:
            total, call, detail = self.stage_bytes(stage, plan.window_chunk)
            phase = Phase(f"stage {stage.stage} UNet ({stage.size[1]}x{stage.size[0]})", total,
                          detail)
            if self.limit is not None and total > self.limit:
                activations = total - self.weights.resident - self.weights.unet
                raise self.error(phase, self.unet_remedy(stage, activations))
            stages.append(phase)
            if largest is None or call.attention_tokens >= largest[2].attention_tokens:
                largest = (total - int(self.workspace * call.peak), stage, call)
        vae = self.vae_phases()
        # In call order: a stage's VAE calls before it (FreeScale's relay: decode the previous
        # stage, encode this one), the final decode last.
        for stage, phase in zip(self.stages, stages, strict=True):
            plan.phases.extend(p for kind, number, p in vae if p.name != "VAE decode" and (
                number == stage.stage - 1 if kind == "decode" else
                kind == "encode" and number == stage.stage))
            plan.phases.append(phase)
        if largest is not None and largest[2].attention_tokens:
            base, stage, call = largest
            windows = "" if stage.windows is None else (
                ", Scale Fusion windows " + ("all in one call" if plan.window_chunk is None
                                             else f"in chunks of {plan.window_chunk}"))
            plan.phases.append(Phase(
                f"attention (largest layer, stage {stage.stage})",
                base + int(self.workspace * call.attention),
                f"{call.attention_tokens} tokens x {call.attention_channels} channels, "
                f"{call.attention_heads} heads, fused SDPA{windows}"))
            plan.notes.append(
                f"the math SDPA backend would add {gib(self.workspace * call.math_scores)} of "
                f"N x N scores at that layer (flash / memory-efficient SDPA add none)")
        plan.phases.extend(p for kind, _, p in vae if p.name == "VAE decode" or kind == "preview")
        if self.limit is not None:
            over = [phase for phase in plan.phases if phase.bytes > self.limit]
            if over:
                raise self.error(plan.phases.pop(plan.phases.index(over[0])),
                                 "a smaller size or more memory")
        plan.notes.append(f"calibration ({self.device.type}): UNet x{self.workspace:g}, VAE "
                          f"x{_workspace(self.device, VAE_WORKSPACE):g} (hrkernels.planner."
                          "UNET_WORKSPACE, VAE_WORKSPACE)")
        return plan


def plan(sampler: Any, height: int, width: int, batch_size: int = 1,
         max_memory: int | None = None, *, num_inference_steps: int = 50,
         guidance_scale: float | None = None, output_type: str = "pil",
         decode_stages: bool = False, options: dict[str, Any] | None = None) -> MemoryPlan:
    """The memory plan of ``sampler`` called at ``height x width`` for ``batch_size`` images,
    made before any model work (closed form: milliseconds, whatever the size).

    Args:
        sampler: a :class:`hrkernels.samplers.base.Sampler`.
        height, width: the target in pixels (checked as the sampler checks them).
        batch_size: images per call (prompts x ``num_images_per_prompt``).
        max_memory: bytes the call may use on the sampler's device, weights included; None: on
            CUDA what is free (:func:`default_budget`), elsewhere no budget (the choices are the
            defaults: 8 views per call, the VAE's own budget), but a phase that needs more than
            the host's physical memory still fails (it could not run).
        num_inference_steps: the call's steps (the view counts of some methods depend on them).
        guidance_scale: the call's (None: the method's default); ``<= 1`` halves the UNet rows.
        output_type, decode_stages: the call's: ``"latent"`` plans no final decode,
            ``decode_stages`` a decode per stage.
        options: the method's call options (FreeScale's ``image``).

    Returns:
        :class:`MemoryPlan`: phases, budget and choices (``view_batch_size``, window chunk, VAE
        tile plans).

    Raises:
        TypeError / ValueError: a bad size, batch or budget (naming the argument).
        MemoryPlanError: no choice fits ``max_memory`` (names the phase, its estimate, the
            budget and what would make it fit).

    Example::

        >>> from hrkernels.samplers import DemoFusion
        >>> from hrkernels.testing import tiny_pipeline
        >>> memory = plan(DemoFusion(tiny_pipeline("sdxl")), height=256, width=256)
        >>> memory.phases[0].name, memory.view_batch_size
        ('weights', 8)
    """
    from hrkernels.samplers.engine import _rows_per_view, guidance_for

    if not all(hasattr(sampler, name) for name in ("adapter", "count_views", "view_batch_size")):
        raise TypeError(f"sampler must be a hrkernels sampler; got {type(sampler).__name__}")
    batch = check_int(batch_size, "batch_size", minimum=1)
    if max_memory is not None:
        max_memory = check_int(max_memory, "max_memory (bytes)", minimum=1)
    steps = check_int(num_inference_steps, "num_inference_steps", minimum=1)
    scale = sampler.default_guidance_scale if guidance_scale is None else guidance_scale
    rows = _rows_per_view(guidance_for(scale))
    planner = _Planner(sampler, height, width, batch, max_memory, steps, rows,
                       dict(options or {}))
    planner.decode_final = output_type != "latent" or decode_stages
    planner.decode_stages = bool(decode_stages)
    return planner.run()


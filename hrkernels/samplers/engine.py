"""The denoiser engine: view batches of a fixed shape, one choke point for every model call,
pluggable guidance and an injectable executor.

Layout conventions: latents are ``[B, C, h, w]`` float32 on the device (the samplers keep their
state in fp32; only the model inputs are cast to the model's dtype); "views" are
``[N*B, C, vh, vw]`` window-major as :func:`hrkernels.ops.gather_windows` and
:func:`hrkernels.ops.gather_dilated` return them, so view row ``r`` belongs to image ``r % B``.

* :class:`Guidance` says which model passes one batch of views needs and how their predictions
  combine: :class:`CFG` (``u + w (c - u)``, both branches in one call of ``2k`` rows),
  :class:`NoGuidance` (the cond branch alone, ``k`` rows) and :class:`NoiseDampedCFG`
  (ScaleCrafter: ``u_base + w (c - u)``, the main configuration on both branches and the "base"
  configuration of the patched model on the uncond branch alone).
* :class:`Engine` cuts every step's view sets into calls of ``k`` views per input shape (padding
  the last), builds each call's rows (views repeated per branch, text rows of the images the views
  belong to, the family's micro-conditioning) and hands the calls to the **executor**, which runs
  each through :meth:`Engine.evaluate` (the one place a model is called) and gives the predictions
  back in order. :class:`LocalExecutor` runs them one after the other in this process; a
  multi-GPU executor may run a share of them on each rank and gather.
* Everything per step stays on the device: the timestep is a device tensor and the text rows of
  every call layout are built before the step loop (:meth:`Engine.prepare`), so a step copies
  nothing from the host; the input rows (views, padding, CFG duplicates, micro-conditioning) are
  assembled on the device per step, all calls of a step before the executor runs them.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from hrkernels import patching
from hrkernels._validate import check_int, check_real
from hrkernels.samplers.inputs import ControlInputs
from hrkernels.samplers.pipelines import Conditioning, ModelCall, PipelineAdapter

__all__ = [
    "CFG",
    "Engine",
    "Executor",
    "Guidance",
    "LocalExecutor",
    "NoGuidance",
    "NoiseDampedCFG",
    "Pass",
    "ViewSet",
    "check_view_batch_size",
    "choose_view_batch",
    "guidance_for",
    "uses_uncond",
]

# ``view_batch_size="auto"`` on a device whose free memory cannot be queried (CPU, MPS): views per
# model call.
DEFAULT_CPU_VIEW_BATCH = 8
# Bytes of UNet activations per batch row, per latent pixel and per channel of the UNet's first
# level, at the UNet's element size. Measured: 16.0 for the SDXL UNet in fp16 with PyTorch's SDPA on
# an H100 (160 MiB per row of 128x128, batches of 2 to 52 rows); 20 leaves a margin.
# ``view_batch_size="auto"`` divides the free memory by it.
ACTIVATION_BYTES_FACTOR = 20
# Memory ``"auto"`` leaves free (bytes): the allocator's fragmentation, cuBLAS/cuDNN workspaces.
AUTO_MEMORY_RESERVE = 2 * 2**30


# --------------------------------------------------------------------------------------------------
# Guidance
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pass:
    """One model call per batch of views: the guidance branches it evaluates, stacked in this
    order (``("uncond", "cond")``: rows ``[uncond x k, cond x k]``), and the patched model's
    configuration it runs (None: the active one)."""

    branches: tuple[str, ...]
    variant: str | None = None


class Guidance(Protocol):
    """How the model passes of one batch of ``k`` views combine into one noise prediction."""

    passes: tuple[Pass, ...]

    def combine(self, index: int, prediction: torch.Tensor, out: torch.Tensor) -> None:
        """Fold pass ``index``'s prediction (``[len(branches) * k, C, h, w]``, model dtype) into
        ``out`` (``[k, C, h, w]`` float32). Called for the passes in order."""


class NoGuidance:
    """No classifier-free guidance (``guidance_scale <= 1``): the cond branch alone."""

    passes = (Pass(("cond",)),)

    def combine(self, index: int, prediction: torch.Tensor, out: torch.Tensor) -> None:
        out.copy_(prediction)


class CFG:
    """Classifier-free guidance ``eps = u + w (c - u)``, both branches in one call."""

    passes = (Pass(("uncond", "cond")),)

    def __init__(self, scale: float) -> None:
        self.scale = check_real(scale, "guidance_scale")

    def combine(self, index: int, prediction: torch.Tensor, out: torch.Tensor) -> None:
        uncond, cond = prediction.float().chunk(2)
        torch.add(uncond, cond - uncond, alpha=self.scale, out=out)


class NoiseDampedCFG:
    """ScaleCrafter's noise-damped guidance ``eps = u_base + w (c - u)`` (METHODS.md).

    ``c``, ``u``: the model as patched (its active configuration), both branches in one call;
    ``u_base``: the patched model's ``base_variant`` configuration on the uncond branch alone
    (``k`` rows, never the wasted cond half).
    """

    def __init__(self, scale: float, base_variant: str = "base") -> None:
        self.scale = check_real(scale, "guidance_scale")
        self.passes = (Pass(("uncond", "cond")), Pass(("uncond",), base_variant))

    def combine(self, index: int, prediction: torch.Tensor, out: torch.Tensor) -> None:
        if index == 0:
            uncond, cond = prediction.float().chunk(2)
            torch.sub(cond, uncond, out=out).mul_(self.scale)
        else:
            out.add_(prediction.float())


def guidance_for(guidance_scale: float) -> CFG | NoGuidance:
    """:class:`CFG` for ``guidance_scale > 1``, else :class:`NoGuidance` (as diffusers)."""
    scale = check_real(guidance_scale, "guidance_scale")
    return CFG(scale) if scale > 1 else NoGuidance()


def uses_uncond(guidance: Guidance) -> bool:
    """Whether any pass of ``guidance`` evaluates the uncond branch (the prompts must then be
    encoded with their negative)."""
    return any("uncond" in step_pass.branches for step_pass in guidance.passes)


def _branches(guidance: Guidance) -> set[tuple[str, ...]]:
    return {step_pass.branches for step_pass in guidance.passes}


def _rows_per_view(guidance: Guidance) -> int:
    """Model rows per view of the largest call (the memory of ``view_batch_size="auto"``)."""
    return max(len(step_pass.branches) for step_pass in guidance.passes)


# --------------------------------------------------------------------------------------------------
# View batching
# --------------------------------------------------------------------------------------------------


def check_view_batch_size(value: int | str) -> int | str:
    """``"auto"`` or an int >= 1."""
    if value == "auto":
        return value
    if isinstance(value, str):
        raise ValueError(f'view_batch_size must be "auto" or an int >= 1; got {value!r}')
    return check_int(value, 'view_batch_size (or "auto")', minimum=1)


def choose_view_batch(counts: Sequence[int], limit: int, concurrency: float = 1.0) -> int:
    """One batch size (views per model call) for every view group of one input shape.

    ``counts`` are the views of that shape in each step of each stage that uses it (e.g. 13, 34,
    65 for the 128x128 views of a 4096^2 SDXL run). Every group runs as ``ceil(n / k)`` calls of
    exactly ``k`` views (the last padded), so a run compiles/captures one graph per shape.
    ``k <= limit`` minimises the padded work plus one view's worth of cost per call, over the
    rounds of ``concurrency`` calls that run at once (ranks of a parallel executor; 1 in one
    process): ``sum(ceil(ceil(n / k) / concurrency) * (k + 1))``; ties go to the larger ``k``.

    Example::

        >>> choose_view_batch([13, 34, 65], 16)
        13
        >>> choose_view_batch([13, 34, 65], 16, concurrency=4)
        9
    """
    limit = max(1, min(limit, max(counts)))
    best, best_cost = 1, math.inf
    for k in range(1, limit + 1):
        cost = sum(math.ceil(-(-n // k) / concurrency) * (k + 1) for n in counts)
        if cost <= best_cost:
            best, best_cost = k, cost
    return best


def auto_view_batch_limit(adapter: PipelineAdapter, shape: tuple[int, int],
                          rows_per_view: int) -> int:
    """The most views per model call that fit the free memory of the adapter's device
    (``view_batch_size="auto"``).

    On CUDA: (free memory + memory cached by PyTorch's allocator but unused - a 2 GiB reserve)
    divided by an estimate of the activation bytes of one view (``rows_per_view`` model rows of
    ``shape``, :data:`ACTIVATION_BYTES_FACTOR` x latent pixels x first-level channels x element
    size). Elsewhere :data:`DEFAULT_CPU_VIEW_BATCH`.
    """
    device = adapter.device
    if device.type != "cuda":
        return DEFAULT_CPU_VIEW_BATCH
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    budget = free + cached - AUTO_MEMORY_RESERVE
    element = torch.finfo(adapter.dtype).bits // 8
    per_view = (rows_per_view * ACTIVATION_BYTES_FACTOR * shape[0] * shape[1]
                * adapter.model_channels * element)
    return max(1, int(budget // per_view))


@dataclass
class ViewSet:
    """Model inputs of one kind for one step.

    ``views``: ``[N*B, C, vh, vw]`` (already scaled by ``scheduler.scale_model_input``), any float
    dtype; ``crops``: ``[N*B, 2]`` int64 (top, left) in pixels of each view in the image (SDXL's
    ``crops_coords_top_left``), None for (0, 0); ``control``: with a ControlNet, per ControlNet the
    control image of each view, ``[N*B, 3, vh f, vw f]`` (from
    :class:`hrkernels.samplers.inputs.ControlInputs`: ``full``, ``windows``, ``dilated``).
    """

    views: torch.Tensor
    crops: torch.Tensor | None = None
    control: tuple[torch.Tensor, ...] | None = None


# --------------------------------------------------------------------------------------------------
# Executors
# --------------------------------------------------------------------------------------------------


Consume = Callable[[int, torch.Tensor], None]


class Executor(Protocol):
    """Runs a step's model calls: ``evaluate(call)`` on each, ``consume(index, prediction)`` for
    each, exactly once and in index order (the prediction may be a buffer the next call reuses,
    e.g. under CUDA graphs, so it is consumed before the next ``evaluate``)."""

    def run(self, evaluate: Callable[[ModelCall], torch.Tensor], calls: Sequence[ModelCall],
            consume: Consume) -> None: ...


class LocalExecutor:
    """Every call in this process, one after the other."""

    def run(self, evaluate: Callable[[ModelCall], torch.Tensor], calls: Sequence[ModelCall],
            consume: Consume) -> None:
        for index, call in enumerate(calls):
            consume(index, evaluate(call))


# --------------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------------


class Engine:
    """Evaluates the guided model on lists of views in batches of a fixed shape.

    Views with the same spatial size are concatenated (local windows and dilated views of a
    square multiple of the base size share one shape), padded with zero rows to a multiple of the
    batch size ``k`` chosen for that shape (:meth:`plan`), and run ``k`` views per call in each of
    the guidance's passes. Every model call of a run goes through :meth:`evaluate`, which counts it
    (``calls``: ``{(rows, h, w): count}``).

    With a ControlNet (``controls``), every view set carries its views' control images, which
    go into the calls beside the views (padded, repeated per branch) with the ControlNet scales
    of the current step (:meth:`set_step`; a step where every scale is 0 runs no ControlNet).

    Args:
        adapter: the pipeline's adapter.
        cond: the encoded prompts (and IP-Adapter embeddings).
        executor: runs the calls (default :class:`LocalExecutor`).
        controls: the call's ControlNet conditioning, or None.
    """

    def __init__(self, adapter: PipelineAdapter, cond: Conditioning,
                 executor: Executor | None = None,
                 controls: ControlInputs | None = None) -> None:
        self.adapter = adapter
        self.cond = cond
        self.executor = executor or LocalExecutor()
        self.controls = controls
        self.control_scales: tuple[float, ...] = ()
        self.set_step(0)
        self.dtype = adapter.dtype
        self.device = adapter.device
        self.calls: Counter[tuple[int, int, int]] = Counter()
        # What view_batch_size="auto" resolves to (the memory planner's choice, set by the
        # sampler before the stages run); None: estimated from the free memory here.
        self.auto_view_batch: int | None = None
        # (first image, k, branches) -> the text rows of a call; built by prepare().
        self._text: dict[tuple[int, int, tuple[str, ...]], dict[str, torch.Tensor]] = {}

    # -- planning ---------------------------------------------------------------------------------

    def plan(self, shape_counts: dict[tuple[int, int], list[int]], view_batch_size: int | str,
             guidance: Guidance) -> dict[tuple[int, int], int]:
        """Views per call for every input shape (see :func:`choose_view_batch`), and the rows of
        every call built ahead (:meth:`prepare`). ``"auto"`` is :attr:`auto_view_batch` when the
        sampler set it (the memory planner's choice).

        ``shape_counts``: ``{view shape: [views per step, one entry per stage]}``. With
        ``view_batch_size="auto"``, an executor with a ``concurrency`` (calls it runs at once)
        balances the batches over it; an int gives the batches of one process (a parallel run
        then makes exactly the one-process model calls).
        """
        sizes = {}
        for shape, counts in shape_counts.items():
            concurrency = 1.0
            if view_batch_size == "auto":
                limit = (self.auto_view_batch if self.auto_view_batch is not None else
                         auto_view_batch_limit(self.adapter, shape, _rows_per_view(guidance)))
                concurrency = getattr(self.executor, "concurrency", 1.0)
            else:
                limit = int(view_batch_size)
            sizes[shape] = choose_view_batch(counts, limit, concurrency)
        self.prepare(sizes, guidance)
        return sizes

    def prepare(self, batch_sizes: dict[tuple[int, int], int], guidance: Guidance) -> None:
        """Build the text rows of every call layout the batch sizes can produce, before the step
        loop (index tensors are copied to the device here, not inside it)."""
        batch = self.cond.batch
        for k in set(batch_sizes.values()):
            for first in {(call * k) % batch for call in range(batch)}:
                for branches in _branches(guidance):
                    key = (first, k, branches)
                    if key not in self._text:
                        images = torch.tensor([(first + q) % batch for q in range(k)],
                                              device=self.device)
                        self._text[key] = self._text_rows(images, branches)

    def _text_rows(self, images: torch.Tensor,
                   branches: tuple[str, ...]) -> dict[str, torch.Tensor]:
        rows: dict[str, list[torch.Tensor]] = {}
        for branch in branches:
            for name, value in self.cond.branch(branch).items():
                rows.setdefault(name, []).append(value.index_select(0, images))
        return {name: parts[0] if len(parts) == 1 else torch.cat(parts)
                for name, parts in rows.items()}

    def set_step(self, index: int) -> None:
        """The global step index the next calls belong to (the stage loop sets it): picks the
        ControlNet scales of that step (``control_guidance_start/end``)."""
        if self.controls is not None:
            scales = self.controls.step_scales(index)
            self.control_scales = scales if any(scales) else ()

    # -- the choke point --------------------------------------------------------------------------

    def evaluate(self, call: ModelCall) -> torch.Tensor:
        """Run the model on one call (in the call's configuration of the patched model) and count
        it. Every model evaluation of a sampler passes through here."""
        self.calls[call.shape] += 1
        if call.variant is None:
            return self.adapter.denoise(call)
        with patching.variant(self.adapter.model, call.variant):
            return self.adapter.denoise(call)

    # -- one step ---------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(self, timestep: torch.Tensor, view_sets: Sequence[ViewSet],
                 batch_sizes: dict[tuple[int, int], int],
                 guidance: Guidance) -> list[torch.Tensor]:
        """Guided noise predictions (float32, same shapes as the views) for every view set.

        ``timestep``: 0-d device tensor; ``batch_sizes``: views per call for each view shape
        (from :meth:`plan`).
        """
        results: list[torch.Tensor | None] = [None] * len(view_sets)
        groups: dict[tuple[int, int], list[int]] = {}
        for index, view_set in enumerate(view_sets):
            groups.setdefault(tuple(view_set.views.shape[2:]), []).append(index)
        for shape, members in groups.items():
            predictions = self._run_group(timestep, shape, [view_sets[i] for i in members],
                                          batch_sizes[shape], guidance)
            offset = 0
            for i in members:
                rows = view_sets[i].views.shape[0]
                results[i] = predictions[offset:offset + rows]
                offset += rows
        return results  # type: ignore[return-value]

    def _run_group(self, timestep: torch.Tensor, shape: tuple[int, int],
                   view_sets: Sequence[ViewSet], k: int, guidance: Guidance) -> torch.Tensor:
        channels = view_sets[0].views.shape[1]
        rows = sum(view_set.views.shape[0] for view_set in view_sets)
        count = -(-rows // k)
        padding = count * k - rows
        parts = [view_set.views.to(self.dtype) for view_set in view_sets]
        if padding:
            parts.append(torch.zeros(padding, channels, *shape, dtype=self.dtype,
                                     device=self.device))
        inputs = torch.cat(parts) if len(parts) > 1 else parts[0]
        micro = self._micro(view_sets, padding)
        control = self._control(view_sets, padding)
        passes = guidance.passes
        missing = [p.branches for p in passes if (0, k, p.branches) not in self._text]
        if missing:
            raise RuntimeError(f"Engine: the rows of branches {missing} for batches of {k} views "
                               "were not built; plan() or prepare() with this guidance first")
        calls = []
        for chunk in range(count):
            window = slice(chunk * k, (chunk + 1) * k)
            first = (chunk * k) % self.cond.batch
            for step_pass in passes:
                repeat = len(step_pass.branches)
                sample = inputs[window]
                calls.append(ModelCall(
                    sample=torch.cat([sample] * repeat) if repeat > 1 else sample,
                    timestep=timestep,
                    text=self._text[(first, k, step_pass.branches)],
                    micro={name: torch.cat([value[window]] * repeat) if repeat > 1
                           else value[window] for name, value in micro.items()},
                    variant=step_pass.variant,
                    branches=step_pass.branches,
                    control=tuple(torch.cat([value[window]] * repeat) if repeat > 1
                                  else value[window] for value in control),
                    control_scales=self.control_scales if control else (),
                ))
        out = torch.empty(count * k, channels, *shape, dtype=torch.float32, device=self.device)

        def consume(index: int, prediction: torch.Tensor) -> None:
            chunk, pass_index = divmod(index, len(passes))
            guidance.combine(pass_index, prediction, out[chunk * k:(chunk + 1) * k])

        self.executor.run(self.evaluate, calls, consume)
        return out[:rows]

    def _control(self, view_sets: Sequence[ViewSet], padding: int) -> tuple[torch.Tensor, ...]:
        """Per ControlNet, the control images of a group's rows (padding rows: zeros); empty
        when no ControlNet runs this step."""
        if not self.control_scales:
            return ()
        if any(view_set.control is None for view_set in view_sets):
            raise RuntimeError("Engine: this call has a ControlNet but a view set came without "
                               "its control images (ViewSet.control; see "
                               "hrkernels.samplers.inputs.ControlInputs)")
        rows = []
        for net, first in enumerate(view_sets[0].control):
            parts = [view_set.control[net] for view_set in view_sets]
            if padding:
                parts.append(first.new_zeros(padding, *first.shape[1:]))
            rows.append(torch.cat(parts) if len(parts) > 1 else parts[0])
        return tuple(rows)

    def _micro(self, view_sets: Sequence[ViewSet], padding: int) -> dict[str, torch.Tensor]:
        """The family's micro-conditioning rows of a group (padding rows: crop (0, 0))."""
        if not self.adapter.uses_crops:
            return {}
        crops = [view_set.crops if view_set.crops is not None else
                 torch.zeros(view_set.views.shape[0], 2, dtype=torch.int64, device=self.device)
                 for view_set in view_sets]
        if padding:
            crops.append(torch.zeros(padding, 2, dtype=torch.int64, device=self.device))
        return self.adapter.micro_conditioning(self.cond, torch.cat(crops))

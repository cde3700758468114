"""The base class of every sampler: the call's arguments, checks, prompt encoding, the engine, the
output. A method subclasses :class:`Sampler` and implements :meth:`Sampler.stage_sizes` and
:meth:`Sampler.generate` (its stages, over :mod:`hrkernels.samplers.stages`).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from hrkernels import planner
from hrkernels._validate import check_bool, check_choice, check_int, check_real
from hrkernels.patching import is_patched, patch_state, set_step
from hrkernels.samplers.engine import (
    Engine,
    Executor,
    check_view_batch_size,
    guidance_for,
    uses_uncond,
)
from hrkernels.samplers.inputs import (
    as_pixels,
    batch_rows,
    check_image_size,
    control_inputs,
    ip_adapter_conditioning,
)
from hrkernels.samplers.outputs import SamplerOutput, StageResult
from hrkernels.samplers.pipelines import OUTPUT_TYPES, adapter_for
from hrkernels.samplers.schedulers import (
    check_step_options,
    requested_scheduler,
    sampling_scheduler_class,
)
from hrkernels.samplers.stages import Run, StepCallback, resolve_generator

__all__ = ["Sampler", "ViewPlan"]

logger = logging.getLogger("hrkernels")


@dataclass(frozen=True)
class ViewPlan:
    """What a call evaluates, counted in closed form before any model work
    (:meth:`Sampler.view_plan`).

    Attributes:
        sizes: each stage's size in pixels, ``(height, width)``.
        steps: the steps each stage runs (of ``num_inference_steps``; a scheduler may add one,
            PNDM).
        views: per stage, ``{latent view shape (h, w): views per image per step}``.
    """

    sizes: list[tuple[int, int]]
    steps: list[int]
    views: list[dict[tuple[int, int], int]]

    @property
    def view_evaluations(self) -> int:
        """Views the model evaluates per image over the whole call (each is one model row per
        guidance branch)."""
        return sum(steps * sum(views.values()) for steps, views in zip(self.steps, self.views,
                                                                        strict=True))


class Sampler:
    """A high-resolution sampler over a diffusers pipeline.

    Class attributes a method sets:
        name: its name in messages and progress bars.
        needs_sample: its steps change the sample between scheduler steps (a skip residual), so
            it needs a scheduler whose ``step`` uses the sample it is given
            (:func:`hrkernels.samplers.schedulers.sampling_scheduler_class`).
        default_scheduler: the scheduler class the method samples with when the user names none
            (None: the pipeline's own).
        families: the pipeline families it supports (None: every registered adapter's).
        default_guidance_scale: ``guidance_scale`` when the call gives None (7.5).

    Attributes a user may change on an instance:
        max_view_evaluations: the most views per image a call may evaluate
            (:meth:`view_plan`; default 10^6, about 11 hours of SDXL on an H100).

    Args:
        pipe: the diffusers pipeline.
        view_batch_size: views per model call, or ``"auto"`` (as many as the free device memory
            allows; 8 on a CPU). One batch size per view shape for the whole run.
        scheduler: a diffusers scheduler class to sample with, built from the pipeline's
            scheduler config, or a scheduler instance, built from its own config; None: the
            method's default.
        executor: runs the model calls (:class:`hrkernels.samplers.engine.LocalExecutor` by
            default; a multi-GPU executor shares them across ranks).
        parallel: share the model calls and the VAE decode across the ranks of
            :func:`hrkernels.distributed.init`'s process group: ``"views"`` (whole view batches
            per rank: bitwise equal to one process with the same ``view_batch_size``; methods
            with views, :attr:`parallel_modes`) or ``"cfg"`` (the guidance branches per rank,
            and the views too with more ranks than branches); None (default): one process. In a
            process without a process group (world size 1) it is the one-process path.
    """

    name: ClassVar[str] = "Sampler"
    needs_sample: ClassVar[bool] = False
    default_scheduler: ClassVar[type | None] = None
    families: ClassVar[tuple[str, ...] | None] = ("sd", "sdxl")
    default_guidance_scale: float = 7.5
    # The parallel= modes the method supports ("views" needs several views per step).
    parallel_modes: ClassVar[tuple[str, ...]] = ("cfg",)
    # At about 0.04 s per SDXL view on an H100 (DemoFusion at 4096^2: 5,650 views in 224 s), 10^6
    # views are 11 hours per image: a size that needs more is refused before any work (16384^2 with
    # SDXL, 16 stages, 50 steps: 3.5e5 views; 100000^2: 7.9e7).
    max_view_evaluations: int = 10**6
    # Aspect ratios beyond this warn (SD 1.5/SDXL are trained up to about 4:1; a progressive
    # method's first stage then has a short side of under a quarter of the base size).
    max_aspect_ratio: ClassVar[float] = 4.0

    def __init__(self, pipe: Any, *, view_batch_size: int | str = "auto", scheduler: Any = None,
                 executor: Executor | None = None, parallel: str | None = None) -> None:
        self.adapter = adapter_for(pipe, self.name, self.families)
        self.pipe = pipe
        self.view_batch_size = check_view_batch_size(view_batch_size)
        self.scheduler, self._scheduler_template = requested_scheduler(scheduler, self.name)
        if executor is not None and not callable(getattr(executor, "run", None)):
            raise TypeError(f"executor must have a run(evaluate, calls, consume) method; got "
                            f"{executor!r}")
        if parallel is not None:
            check_choice(parallel, f"parallel ({self.name})", self.parallel_modes)
            if executor is not None:
                raise ValueError("pass either executor or parallel, not both")
            from hrkernels.distributed import executor_for

            executor = executor_for(parallel, self.adapter.device)
            if executor is not None:
                self.adapter.communicator = executor.comm
        self.parallel = parallel
        self.executor = executor
        self._warned: set[str] = set()

    # -- what a method implements -----------------------------------------------------------------

    def stage_sizes(self, height: int, width: int) -> list[tuple[int, int]]:
        """The size in pixels of every stage for a ``height x width`` target (checks the size)."""
        raise NotImplementedError

    def stage_steps(self, num_inference_steps: int, stages: int) -> list[int]:
        """The steps each of ``stages`` stages runs (default: all ``num_inference_steps``)."""
        return [num_inference_steps] * stages

    def stage_views(self, latent_sizes: list[tuple[int, int]]) -> list[dict[tuple[int, int], int]]:
        """Per stage, ``{latent view shape: views per image per step}``, counted in closed form
        (default: the whole latent once; methods that cut views override it)."""
        return [{size: 1} for size in latent_sizes]

    def view_batch_groups(self, latent_sizes: list[tuple[int, int]],
                          batch: int) -> list[tuple[tuple[int, ...], dict[tuple[int, int],
                                                                          list[int]]]]:
        """The engine's view-batch choices of a call, for the memory planner: per
        :meth:`~hrkernels.samplers.engine.Engine.plan` call of :meth:`generate`, the stages
        (1-based) it serves and its ``{view shape: [view rows per step, ...]}``. Default: one per
        stage, from :meth:`stage_views`."""
        return [((number,), {shape: [views * batch] for shape, views in per_shape.items()})
                for number, per_shape in enumerate(self.stage_views(latent_sizes), start=1)]

    def vae_calls(self, stages: int, options: Mapping[str, Any]) -> list[tuple[str, int]]:
        """The VAE calls of a call of ``stages`` stages, in order, for the memory planner:
        ``("decode" | "encode", stage)`` (default: ``image=``'s encode at stage 1's size, then the
        final decode). ``options``: the method's call options and ``image``."""
        return ([("encode", 1)] if options.get("image") is not None else []) + \
            [("decode", stages)]

    def default_steps(self) -> int:
        """The step count of a call that names none (``sample``'s default: 50)."""
        return 50

    def window_settings(self, stage: int) -> Any:
        """The :class:`~hrkernels.nn.attention.ScaleFusionSettings` the UNet's self-attention runs
        with in ``stage`` (1-based), or None for plain attention (the memory planner's)."""
        return None

    def count_views(self, height: int, width: int, num_inference_steps: int = 50) -> ViewPlan:
        """The stages, steps and views of a call at this size, counted in closed form (checks
        the size; no warning, no limit: :meth:`view_plan` adds them)."""
        sizes = self.stage_sizes(height, width)
        num_inference_steps = check_int(num_inference_steps, "num_inference_steps", minimum=1)
        f = self.adapter.vae_scale_factor
        return ViewPlan(sizes, self.stage_steps(num_inference_steps, len(sizes)),
                        self.stage_views([(h // f, w // f) for h, w in sizes]))

    def view_plan(self, height: int, width: int, num_inference_steps: int = 50) -> ViewPlan:
        """The stages, steps and views a call at this size evaluates, counted before any work.

        Warns (``UserWarning``) when the aspect ratio is beyond :attr:`max_aspect_ratio`, with the
        stage count.

        Raises:
            TypeError / ValueError: a bad size or step count (as :meth:`sample`); a size whose
                plan evaluates more than :attr:`max_view_evaluations` views per image (the message
                gives the plan's numbers).
        """
        plan = self.count_views(height, width, num_inference_steps)
        sizes = plan.sizes
        label = f"{width}x{height} (W x H)"
        ratio = max(height, width) / min(height, width)
        if ratio > self.max_aspect_ratio:
            # The first call comes from sample(), under torch.no_grad's wrapper: the user's line.
            warnings.warn(f"{self.name}: {label} has an aspect ratio of {ratio:.3g}:1, beyond the "
                          f"about {self.max_aspect_ratio:g}:1 the models are trained at; the call "
                          f"runs {len(sizes)} stage(s), the first at {sizes[0][1]}x{sizes[0][0]}",
                          UserWarning, stacklevel=5)
        if plan.view_evaluations > self.max_view_evaluations:
            raise ValueError(
                f"{self.name}: {label} plans {len(sizes)} stage(s) and {plan.view_evaluations:,} "
                f"view evaluations per image (num_inference_steps={num_inference_steps}; the last "
                f"stage evaluates {sum(plan.views[-1].values()):,} views per step), more than the "
                f"sampler's max_view_evaluations = {self.max_view_evaluations:,} (10^6 SDXL views "
                "take about 11 hours on an H100): choose a smaller size or fewer steps, or raise "
                "max_view_evaluations")
        return plan

    def check_call(self, sizes: list[tuple[int, int]], num_inference_steps: int,
                   step_options: dict[str, Any], **method_options: Any) -> None:
        """Method-specific checks of a call, before any model work (default: none)."""

    def check_image(self, image: Any, fidelity: Any, height: int, width: int,
                    batch: int) -> torch.Tensor | None:
        """``image`` as ``[n, 3, H, W]`` float32 in [0, 1] (CPU or its own device; alpha over
        white), None without; ``fidelity`` in [0, 1], given only with ``image``.

        Raises:
            TypeError / ValueError: a bad image (type, channels, aspect ratio, count), a
                fidelity out of range or without an image.
        """
        if fidelity is not None:
            check_real(fidelity, "fidelity", minimum=0, maximum=1)
            if image is None:
                raise ValueError(f"{self.name}: fidelity applies to image=; pass an image (or no "
                                 "fidelity)")
        if image is None:
            return None
        pixels = as_pixels(image, "image", background=1.0)
        check_image_size(pixels, "image", height, width)
        batch_rows(pixels, batch, "image")
        return pixels

    def generate(self, run: Run, sizes: list[tuple[int, int]]) -> list[StageResult]:
        """Run the stages; one :class:`StageResult` per stage (latents float32). Method call
        options (:meth:`sample`'s ``method_options``) are in ``run.options``."""
        raise NotImplementedError

    # -- schedulers -------------------------------------------------------------------------------

    @property
    def scheduler_template(self) -> Any:
        """The scheduler whose config every scheduler of a run is built from: the ``scheduler``
        instance given to the constructor, else the pipeline's."""
        return self._scheduler_template or self.pipe.scheduler

    def scheduler_class(self) -> type:
        """The scheduler class this sampler steps with (see :class:`Sampler`); when the
        pipeline's own scheduler cannot serve the method, DDIM from its config, with a warning
        (once per sampler)."""
        cls, reason = sampling_scheduler_class(self.scheduler_template, self.scheduler,
                                               needs_sample=self.needs_sample, sampler=self.name,
                                               default=self.default_scheduler)
        if reason is not None and reason not in self._warned:
            self._warned.add(reason)
            # The first call comes from sample(), under torch.no_grad's wrapper: the user's line.
            warnings.warn(reason, UserWarning, stacklevel=5)
        return cls

    # -- the call ---------------------------------------------------------------------------------

    def __call__(self, prompt: str | list[str] | None = None, **kwargs: Any) -> SamplerOutput:
        """Generate images: :meth:`sample` (a method with call options of its own overrides this
        and passes them to :meth:`sample` as ``method_options``)."""
        return self.sample(prompt, **kwargs)

    @torch.no_grad()
    def sample(
        self,
        prompt: str | list[str] | None = None,
        *,
        height: int,
        width: int,
        prompt_2: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        num_images_per_prompt: int = 1,
        num_inference_steps: int = 50,
        guidance_scale: float | None = None,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        decode_stages: bool = False,
        callback_on_step_end: StepCallback | None = None,
        step_options: Mapping[str, Any] | None = None,
        eta: float | None = None,
        progress: bool = True,
        image: Any = None,
        fidelity: float | None = None,
        control_image: Any = None,
        controlnet_conditioning_scale: float | list[float] | None = None,
        control_guidance_start: float | list[float] | None = None,
        control_guidance_end: float | list[float] | None = None,
        ip_adapter_image: Any = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        max_memory: int | None = None,
        method_options: Mapping[str, Any] | None = None,
    ) -> SamplerOutput:
        """Generate images of ``height x width`` pixels.

        Args:
            prompt, prompt_2, negative_prompt, negative_prompt_2, prompt_embeds,
            negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds,
            num_images_per_prompt: as the pipeline's own ``__call__`` (``*_2`` and pooled ones
                for SDXL only); pass ``prompt`` or ``prompt_embeds``.
            height, width: target size in pixels: multiples of the VAE factor (8), the long side at
                least the model's base size (1024 for SDXL, 512 for SD 1.5); any aspect ratio.
            num_inference_steps: steps of the timestep sequence (per stage for progressive
                methods; default 50).
            guidance_scale: classifier-free guidance ``w`` (None: the method's default, 7.5
                unless it says otherwise; ``<= 1`` disables CFG and runs the cond branch alone).
            generator: the one source of randomness (see the method's docstring for the order of
                draws); None: a generator seeded from torch's global RNG.
            output_type: ``"pil"`` | ``"pt"`` | ``"np"`` | ``"latent"``.
            decode_stages: also decode every stage's result into ``stages[i].images``.
            callback_on_step_end: ``f(stage, step, timestep, latents)`` after every step (stage
                1-based, step 0-based within the stage); may return new latents.
            step_options: options passed to every ``scheduler.step`` (e.g. ``{"eta": 0.5}`` for
                DDIM, ``{"s_churn": 1.0}`` for Euler); stochastic steps draw their noise from
                ``generator``, once for the full latent.
            eta: DDIM's eta, a shorthand for ``step_options={"eta": eta}`` (the scheduler's step
                must take it).
            progress: show a tqdm bar per stage.
            image: an existing image to start from (a PIL image, a float tensor ``[n, C, H, W]``
                / ``[C, H, W]`` or array ``[n, H, W, C]`` / ``[H, W, C]`` in [0, 1], C = 3, 1 or
                4: an alpha channel is composited over white), of the target's aspect ratio;
                ``n`` 1 or the batch. What it replaces is the method's (its docstring):
                progressive methods take it as their first stage's result.
            fidelity: how much of ``image`` the result keeps, in [0, 1] (needs ``image``); the
                knob it maps to is the method's (its docstring); None: the method's default.
            control_image, controlnet_conditioning_scale, control_guidance_start,
            control_guidance_end: with a ``StableDiffusionControlNetPipeline`` /
                ``StableDiffusionXLControlNetPipeline``, as its own ``__call__`` takes them (one
                image, or a list with one per ControlNet of a ``MultiControlNetModel``; the
                image's aspect ratio the target's; alpha composited over black). The control
                image is resized to every stage; each view gets its crop (local windows) or
                sub-sampled image (dilated views) (:class:`hrkernels.samplers.inputs.
                ControlInputs`); the ControlNet runs once per UNet call on the same rows.
            ip_adapter_image, ip_adapter_image_embeds: with an IP-Adapter loaded
                (``pipe.load_ip_adapter``), as the pipeline's own ``__call__`` takes them; the
                embeddings reach every UNet call, one row per view row.
            max_memory: bytes of device memory the call may use, weights included (None: on
                CUDA what is free; elsewhere no budget, but no phase beyond the host's memory).
                The memory plan (:func:`hrkernels.plan`, in ``SamplerOutput.memory``) is made
                first and picks ``view_batch_size="auto"``, the VAE tile plans and FreeScale's
                window chunks to fit it.
            method_options: the call options of the method (its ``__call__`` documents them),
                given to :meth:`check_call` and :meth:`generate` as ``run.options``.

        A UNet patched before the call is left as it was: its patches, its active configuration
        and its step (the loop moves it with :func:`hrkernels.set_step`), also when the call
        raises.

        Returns:
            :class:`~hrkernels.samplers.SamplerOutput`.

        Raises:
            TypeError / ValueError: bad sizes, steps, prompts, options or output type (the message
                names the argument); a size beyond :attr:`max_view_evaluations`
                (:meth:`view_plan`).
            MemoryPlanError: no choice fits ``max_memory`` (before any model work; the message
                names the phase, its estimate, the budget and what would make it fit).
            NonFiniteLatentsError: NaN/inf appeared in the latents (names stage and step).
        """
        num_inference_steps = check_int(num_inference_steps, "num_inference_steps", minimum=1)
        sizes = self.count_views(height, width, num_inference_steps).sizes
        guidance = guidance_for(self.default_guidance_scale if guidance_scale is None
                                else guidance_scale)
        check_choice(output_type, "output_type", OUTPUT_TYPES)
        check_bool(decode_stages, "decode_stages")
        check_bool(progress, "progress")
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise TypeError("callback_on_step_end must be None or callable; got "
                            f"{callback_on_step_end!r}")
        if eta is not None:
            if step_options is not None and "eta" in step_options:
                raise ValueError("pass eta either as eta= or in step_options, not both")
            step_options = {**(step_options or {}), "eta": check_real(eta, "eta", minimum=0)}
        options = check_step_options(self.scheduler_class(), step_options, self.name)
        method = dict(method_options or {})
        self.check_call(sizes, num_inference_steps, options, **method)
        progress = progress and getattr(self.executor, "is_main", True)  # rank 0's bars only
        # The memory plan first (closed form): a call that cannot fit fails here, before the
        # view-count limit and any model work.
        memory = planner.plan(
            self, height, width, _call_batch(prompt, prompt_embeds, num_images_per_prompt),
            max_memory, num_inference_steps=num_inference_steps,
            guidance_scale=self.default_guidance_scale if guidance_scale is None
            else guidance_scale, output_type=output_type, decode_stages=decode_stages,
            options={**method, "image": image})
        logger.info("%s", memory)
        self.view_plan(height, width, num_inference_steps)
        adapter = self.adapter
        batch = _call_batch(prompt, prompt_embeds, check_int(
            num_images_per_prompt, "num_images_per_prompt", minimum=1))
        pixels = self.check_image(image, fidelity, height, width, batch)
        controls = control_inputs(adapter, control_image, controlnet_conditioning_scale,
                                  control_guidance_start, control_guidance_end, height=height,
                                  width=width, batch=batch,
                                  num_inference_steps=num_inference_steps)
        generator = resolve_generator(generator, adapter.device)
        cond = adapter.encode_prompts(
            guided=uses_uncond(guidance), size=(height, width),
            num_images_per_prompt=num_images_per_prompt, prompt=prompt, prompt_2=prompt_2,
            negative_prompt=negative_prompt, negative_prompt_2=negative_prompt_2,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
        )
        cond = ip_adapter_conditioning(adapter, cond, ip_adapter_image, ip_adapter_image_embeds,
                                       num_images_per_prompt)
        engine = Engine(adapter, cond, self.executor, controls=controls)
        run = Run(sampler=self.name, adapter=adapter, engine=engine,
                  guidance=guidance, generator=generator, num_inference_steps=num_inference_steps,
                  step_options=options, callback=callback_on_step_end, progress=progress,
                  num_stages=len(sizes), options=method, image=pixels,
                  fidelity=None if image is None else fidelity, memory=memory)
        run.engine.auto_view_batch = memory.view_batch_size
        with self._in_step() as exchanges:
            with _step_kept(adapter.model):
                stages = self.generate(run, sizes)
            if decode_stages:
                for result in stages:
                    result.images = adapter.to_images(result.latents, output_type,
                                                      run.vae_max_memory)
                images = stages[-1].images
            else:
                images = adapter.to_images(stages[-1].latents, output_type, run.vae_max_memory)
        return SamplerOutput(images=images, stages=stages, latents=stages[-1].latents,
                             unet_calls=dict(run.engine.calls), plan=list(run.plan),
                             communication=None if exchanges is None else exchanges.summary(),
                             memory=memory)

    def _in_step(self) -> contextlib.AbstractContextManager[Any]:
        """The ranks of a parallel executor in step for the stages and the decoding (its
        ``session``: an error on one rank stops the others, naming it; yields the call's exchange
        statistics), else nothing (yields None)."""
        session = getattr(self.executor, "session", None)
        return contextlib.nullcontext() if session is None else session(self.name)


def _call_batch(prompt: Any, prompt_embeds: Any, num_images_per_prompt: Any) -> int:
    """Images per call, for the memory plan (before the prompt arguments are checked: a bad one
    counts as 1 and is reported by the checks that follow)."""
    if isinstance(prompt, list) and prompt:
        prompts = len(prompt)
    elif isinstance(prompt_embeds, torch.Tensor) and prompt_embeds.dim() == 3:
        prompts = prompt_embeds.shape[0]
    else:
        prompts = 1
    per_prompt = num_images_per_prompt if isinstance(num_images_per_prompt, int) and \
        num_images_per_prompt >= 1 else 1
    return prompts * per_prompt


@contextlib.contextmanager
def _step_kept(model: torch.nn.Module) -> Iterator[None]:
    """The step a patched model was at, restored after the block (the stage loop moves it)."""
    state = patch_state(model)
    saved = None if state is None else (state.step_index, state.timestep)
    try:
        yield
    finally:
        if saved is not None and is_patched(model):
            set_step(model, *saved)

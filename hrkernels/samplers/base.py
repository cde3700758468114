"""The base class of every sampler: the call's arguments, checks, prompt encoding, the engine, the
output. A method subclasses :class:`Sampler` and implements :meth:`Sampler.stage_sizes` and
:meth:`Sampler.generate` (its stages, over :mod:`hrkernels.samplers.stages`).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from hrkernels._validate import check_bool, check_choice, check_int, check_real
from hrkernels.samplers.engine import (
    Engine,
    Executor,
    check_view_batch_size,
    guidance_for,
    uses_uncond,
)
from hrkernels.samplers.outputs import SamplerOutput, StageResult
from hrkernels.samplers.pipelines import OUTPUT_TYPES, adapter_for
from hrkernels.samplers.schedulers import check_step_options, sampling_scheduler_class
from hrkernels.samplers.stages import Run, StepCallback, resolve_generator

__all__ = ["Sampler"]


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

    Args:
        pipe: the diffusers pipeline.
        view_batch_size: views per model call, or ``"auto"`` (as many as the free device memory
            allows; 8 on a CPU). One batch size per view shape for the whole run.
        scheduler: a diffusers scheduler class (or instance, whose class is taken) to sample
            with, built from the pipeline's scheduler config; None: the method's default.
        executor: runs the model calls (:class:`hrkernels.samplers.engine.LocalExecutor` by
            default; a multi-GPU executor shares them across ranks).
    """

    name: ClassVar[str] = "Sampler"
    needs_sample: ClassVar[bool] = False
    default_scheduler: ClassVar[type | None] = None
    families: ClassVar[tuple[str, ...] | None] = ("sd", "sdxl")

    def __init__(self, pipe: Any, *, view_batch_size: int | str = "auto", scheduler: Any = None,
                 executor: Executor | None = None) -> None:
        self.adapter = adapter_for(pipe, self.name, self.families)
        self.pipe = pipe
        self.view_batch_size = check_view_batch_size(view_batch_size)
        if scheduler is not None and not (isinstance(scheduler, type)
                                          or hasattr(scheduler, "config")):
            raise TypeError(f"scheduler must be None, a diffusers scheduler class or a "
                            f"scheduler; got {scheduler!r}")
        self.scheduler = scheduler
        if executor is not None and not callable(getattr(executor, "run", None)):
            raise TypeError(f"executor must have a run(evaluate, calls, consume) method; got "
                            f"{executor!r}")
        self.executor = executor
        self._warned: set[str] = set()

    # -- what a method implements -----------------------------------------------------------------

    def stage_sizes(self, height: int, width: int) -> list[tuple[int, int]]:
        """The size in pixels of every stage for a ``height x width`` target (checks the size)."""
        raise NotImplementedError

    def check_call(self, sizes: list[tuple[int, int]], num_inference_steps: int,
                   step_options: dict[str, Any]) -> None:
        """Method-specific checks of a call, before any model work (default: none)."""

    def generate(self, run: Run, sizes: list[tuple[int, int]]) -> list[StageResult]:
        """Run the stages; one :class:`StageResult` per stage (latents float32)."""
        raise NotImplementedError

    # -- the call ---------------------------------------------------------------------------------

    def scheduler_class(self) -> type:
        """The scheduler class this sampler steps with (see :class:`Sampler`); when the
        pipeline's own scheduler cannot serve the method, DDIM from its config, with a warning
        (once per sampler)."""
        cls, reason = sampling_scheduler_class(self.pipe.scheduler, self.scheduler,
                                               needs_sample=self.needs_sample, sampler=self.name,
                                               default=self.default_scheduler)
        if reason is not None and reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(reason, UserWarning, stacklevel=3)
        return cls

    @torch.no_grad()
    def __call__(
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
        guidance_scale: float = 7.5,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        decode_stages: bool = False,
        callback_on_step_end: StepCallback | None = None,
        step_options: Mapping[str, Any] | None = None,
        progress: bool = True,
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
            guidance_scale: classifier-free guidance ``w`` (default 7.5; ``<= 1`` disables CFG
                and runs the cond branch alone).
            generator: the one source of randomness (see the method's docstring for the order of
                draws); None: a generator seeded from torch's global RNG.
            output_type: ``"pil"`` | ``"pt"`` | ``"np"`` | ``"latent"``.
            decode_stages: also decode every stage's result into ``stages[i].images``.
            callback_on_step_end: ``f(stage, step, timestep, latents)`` after every step (stage
                1-based, step 0-based within the stage); may return new latents.
            step_options: options passed to every ``scheduler.step`` (e.g. ``{"eta": 0.5}`` for
                DDIM, ``{"s_churn": 1.0}`` for Euler); stochastic steps draw their noise from
                ``generator``, once for the full latent.
            progress: show a tqdm bar per stage.

        Returns:
            :class:`~hrkernels.samplers.SamplerOutput`.

        Raises:
            TypeError / ValueError: bad sizes, steps, prompts, options or output type (the message
                names the argument).
            NonFiniteLatentsError: NaN/inf appeared in the latents (names stage and step).
        """
        sizes = self.stage_sizes(height, width)
        num_inference_steps = check_int(num_inference_steps, "num_inference_steps", minimum=1)
        guidance = guidance_for(check_real(guidance_scale, "guidance_scale"))
        check_choice(output_type, "output_type", OUTPUT_TYPES)
        check_bool(decode_stages, "decode_stages")
        check_bool(progress, "progress")
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise TypeError("callback_on_step_end must be None or callable; got "
                            f"{callback_on_step_end!r}")
        options = check_step_options(self.scheduler_class(), step_options, self.name)
        self.check_call(sizes, num_inference_steps, options)
        adapter = self.adapter
        generator = resolve_generator(generator, adapter.device)
        cond = adapter.encode_prompts(
            guided=uses_uncond(guidance), size=(height, width),
            num_images_per_prompt=num_images_per_prompt, prompt=prompt, prompt_2=prompt_2,
            negative_prompt=negative_prompt, negative_prompt_2=negative_prompt_2,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
        )
        run = Run(sampler=self.name, adapter=adapter, engine=Engine(adapter, cond, self.executor),
                  guidance=guidance, generator=generator, num_inference_steps=num_inference_steps,
                  step_options=options, callback=callback_on_step_end, progress=progress,
                  num_stages=len(sizes))
        stages = self.generate(run, sizes)
        if decode_stages:
            for result in stages:
                result.images = adapter.to_images(result.latents, output_type)
            images = stages[-1].images
        else:
            images = adapter.to_images(stages[-1].latents, output_type)
        return SamplerOutput(images=images, stages=stages, latents=stages[-1].latents,
                             unet_calls=dict(run.engine.calls))

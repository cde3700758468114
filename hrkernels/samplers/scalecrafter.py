"""ScaleCrafter (docs/METHODS.md, "ScaleCrafter"): direct inference at the target size with a
re-dilated (optionally dispersed, progressive) UNet and noise-damped classifier-free guidance.

One stage at the target size. The sampler patches the pipeline's UNet with the plan
(:func:`hrkernels.presets.scalecrafter` for ``plan="auto"``) in two named configurations of its
own: ``"scalecrafter"`` (the plan's ``specs``, active during the call) and
``"scalecrafter-base"`` (the plan's ``base``, the noise-damped guidance's base model). Per step
``i``:

* ``i < noise_damped_until``: ``eps = eps_base_u + w (eps~_c - eps~_u)``: the main configuration
  on both guidance branches in one UNet call (``2B`` rows), the base configuration on the uncond
  branch alone (``B`` rows; the authors' code wastes a cond half here);
* afterwards ordinary CFG on the main configuration, whose re-dilation switches off at
  ``until_step`` (``hrkernels.set_step`` every step).

The UNet is left exactly as it was found (unpatched, or with the user's own patches and active
configuration), also when the call raises. Specs the user patched into the UNet's active
configuration do not run during the call (the sampler's configuration is active); FreeU
(``pipe.enable_freeu``) does, as it lives in the UNet's blocks.

With ``image`` (image-to-image at the target size): the image is resized to the target and encoded,
noised to the start step ``K = N - int(N (1 - fidelity))`` (diffusers' img2img with ``strength = 1 -
fidelity``, at least one step run) and sampled from there; ``fidelity`` defaults to
:data:`DEFAULT_FIDELITY` (0.2, diffusers' img2img default strength 0.8).

Randomness: the initial noise (with ``image``: the VAE's posterior sample, then the noise it is
noised with), then whatever a stochastic step (DDIM ``eta > 0``) draws, from the one ``generator``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from diffusers import DDIMScheduler

from hrkernels import patching
from hrkernels._validate import check_bool
from hrkernels.patching import ReDilation
from hrkernels.presets import ScaleCrafterPlan, model_family
from hrkernels.presets import scalecrafter as scalecrafter_plan
from hrkernels.samplers.base import Sampler
from hrkernels.samplers.engine import CFG, Executor, Guidance, NoiseDampedCFG
from hrkernels.samplers.outputs import StageResult
from hrkernels.samplers.stages import (
    Run,
    StageSchedule,
    StepState,
    denoising_step,
    fidelity_start,
    image_latent,
    initial_latents,
    randn,
    run_stage,
    stage_schedule,
)
from hrkernels.schedules import stage_count

__all__ = ["ScaleCrafter"]

# fidelity with image= when the call gives none: 1 - diffusers' img2img default strength (0.8).
DEFAULT_FIDELITY = 0.2
MAIN_VARIANT = "scalecrafter"
BASE_VARIANT = "scalecrafter-base"


class ScaleCrafter(Sampler):
    """ScaleCrafter over a diffusers ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline``.

    Args:
        pipe: the pipeline (SD 1.x/2.x or SDXL; the preset is chosen from the UNet's config).
        plan: ``"auto"`` (default): :func:`hrkernels.presets.scalecrafter` at the call's size and
            step count; or a :class:`~hrkernels.presets.ScaleCrafterPlan`; or a
            :class:`~hrkernels.ReDilation` (no noise-damped guidance). A plan of the user's is
            used as given (its steps are not rescaled).
        noise_damped: run the plan's noise-damped guidance (default True; False: ordinary CFG on
            the re-dilated UNet at every step).
        scheduler: a scheduler class to sample with instead of DDIM (built from the pipeline's
            scheduler config; any diffusers scheduler: one ``scheduler.step`` per step).
        view_batch_size, executor: as :class:`~hrkernels.samplers.DemoFusion` (the model sees
            one view per image here).
        parallel: ``"cfg"``: the guidance branches (and the noise-damped base pass) on different
            ranks of :func:`hrkernels.distributed.init` (:class:`~hrkernels.samplers.Sampler`).

    The call takes :meth:`Sampler.__call__`'s arguments; ``guidance_scale`` defaults to the
    model's (7.5 for SD 1.x/2.x, 5.0 for SDXL) and ``eta`` is DDIM's (default 0; the authors'
    SDXL script samples with ``eta=1.0``). ``image``: image-to-image at the target size (module
    docstring); ``fidelity`` picks the start step (1 - diffusers' ``strength``; default 0.2).
    With a ControlNet pipeline the ControlNet sees the whole control image at the target size, in
    both passes of the noise-damped guidance (one ControlNet call per UNet call).

    Raises:
        TypeError: ``pipe`` is not a supported pipeline, or ``plan`` of the wrong type.

    Example::

        >>> out = ScaleCrafter(pipe)(prompt="a castle", height=2048, width=2048,
        ...                          generator=torch.Generator("cuda").manual_seed(0))
    """

    name = "ScaleCrafter"
    default_scheduler = DDIMScheduler

    def __init__(self, pipe: Any, *, plan: Any = "auto", noise_damped: bool = True,
                 scheduler: Any = None, view_batch_size: int | str = "auto",
                 executor: Executor | None = None, parallel: str | None = None) -> None:
        super().__init__(pipe, view_batch_size=view_batch_size, scheduler=scheduler,
                         executor=executor, parallel=parallel)
        if not (plan == "auto" if isinstance(plan, str) else
                isinstance(plan, (ScaleCrafterPlan, ReDilation))):
            raise TypeError('plan must be "auto", a hrkernels.presets.ScaleCrafterPlan or a '
                            f"hrkernels.ReDilation; got {plan!r}")
        self.plan = ScaleCrafterPlan(plan) if isinstance(plan, ReDilation) else plan
        self.noise_damped = check_bool(noise_damped, "noise_damped")
        self.default_guidance_scale = 5.0 if model_family(pipe.unet) == "sdxl" else 7.5

    def stage_sizes(self, height: int, width: int) -> list[tuple[int, int]]:
        """One stage at the target size (checked as every sampler's)."""
        stage_count(height, width, self.adapter.base_size, self.adapter.vae_scale_factor)
        return [(height, width)]

    def plan_for(self, height: int, width: int, num_inference_steps: int) -> ScaleCrafterPlan:
        """The plan a call at this size and step count runs."""
        if self.plan == "auto":
            return scalecrafter_plan(self.pipe, height, width, num_inference_steps)
        return self.plan

    def start_index(self, num_inference_steps: int, fidelity: float | None) -> int:
        """The step image-to-image starts at: ``N - int(N (1 - fidelity))`` (diffusers' img2img
        with ``strength = 1 - fidelity``), at most ``N - 1``."""
        fidelity = DEFAULT_FIDELITY if fidelity is None else fidelity
        return fidelity_start(num_inference_steps, fidelity, num_inference_steps - 1)

    def image_start(self, run: Run, size: tuple[int, int]) -> tuple[torch.Tensor, StageSchedule]:
        """The caller's image at the target ``size`` (pixels), encoded and noised to the start
        step, and the schedule from there."""
        start = self.start_index(run.num_inference_steps, run.fidelity)
        schedule = stage_schedule(self.scheduler_template, run.num_inference_steps, run.device,
                                  scheduler_class=self.scheduler_class(), start=start,
                                  noised=True)
        z0 = image_latent(run, size)
        noise = randn(z0.shape, run.generator, run.device)
        return z0 * schedule.noise_scale[0] + noise * schedule.noise_sigma[0], schedule

    def generate(self, run: Run, sizes: list[tuple[int, int]]) -> list[StageResult]:
        height, width = sizes[0]
        f = self.adapter.vae_scale_factor
        size = (height // f, width // f)
        plan = self.plan_for(height, width, run.num_inference_steps)
        damped_until = plan.noise_damped_until if self.noise_damped and plan.base else 0
        cfg = run.guidance
        damped = NoiseDampedCFG(cfg.scale, BASE_VARIANT) if isinstance(cfg, CFG) else None
        planning = damped if damped is not None and damped_until > 0 else cfg
        batch_sizes = run.engine.plan({size: [run.batch]}, self.view_batch_size, planning)
        steps = run.num_inference_steps
        if run.image is None:
            schedule = stage_schedule(self.scheduler_template, steps, run.device,
                                      scheduler_class=self.scheduler_class())
            z = initial_latents(run, size, schedule.scheduler)
        else:
            z, schedule = self.image_start(run, sizes[0])

        def guidance(state: StepState) -> Guidance:
            return damped if damped is not None and state.index < damped_until else cfg

        step = denoising_step(run, schedule, batch_sizes, guidance)
        with _patched(self.adapter.model, plan, with_base=damped_until > 0 and damped is not None):
            z = run_stage(run, 1, size, schedule, z, step)
        return [StageResult(1, height, width, z)]


@contextlib.contextmanager
def _patched(unet: torch.nn.Module, plan: ScaleCrafterPlan, with_base: bool) -> Iterator[None]:
    """The plan patched into the sampler's own configurations (main active) for the block; the
    UNet's patches and active configuration as they were afterwards, also on an exception."""
    installed: list[str] = []
    previous = None
    try:
        patching.patch(unet, plan.specs, variant=MAIN_VARIANT)
        installed.append(MAIN_VARIANT)
        if with_base:
            patching.patch(unet, plan.base, variant=BASE_VARIANT)
            installed.append(BASE_VARIANT)
        previous = patching.set_variant(unet, MAIN_VARIANT)
        yield
    finally:
        if previous is not None:
            patching.set_variant(unet, previous)
        for name in reversed(installed):
            patching.unpatch(unet, ReDilation, variant=name)

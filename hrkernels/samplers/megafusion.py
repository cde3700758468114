"""MegaFusion (docs/METHODS.md, "MegaFusion"): truncate-and-relay across resolutions over one shared
timestep sequence; MegaFusion++ (``mega_plus=True``) adds a dilated mid block and noise
re-scheduling.

Stages ``k = 1..S`` at increasing sizes take consecutive runs of one timestep sequence of
``num_inference_steps``: stage ``k`` runs step indices ``[s_k, s_k + T_k)``. Each step is plain
guided sampling on the whole sample (one model call per step). At the last step of every stage but
the last, the stage hands on its clean estimate ``x0_hat`` computed from the sample **before** the
update (the scheduler's ``pred_original_sample`` of that step; flow matching: ``x_t - sigma_t v``);
the authors compute it from the updated sample, a defect not reproduced. The relay
(:func:`~hrkernels.samplers.stages.relay`): latent models decode ``x0_hat`` (tiled VAE), resize it
bicubically on the device, clamp to [-1, 1] and encode it (posterior sampled from the generator);
pixel-space models (DeepFloyd IF) resize ``x0_hat`` itself (also clamped). The result is noised to
the next stage's first timestep: ``add_noise`` coefficients looked up by step index, or the flow
scheduler's ``scale_noise`` (SD3).

MegaFusion++ (UNet models): stages >= 2 run

* the mid block's 3x3 convolutions at dilation 2 (:func:`hrkernels.presets.megafusion`, in a
  configuration of the sampler's own, removed after the stage). Stages >= 2 only, as the paper's
  appendix C.1 says; the authors' code dilates every stage (a deviation from their code);
* a scheduler whose table is re-scheduled with ``gamma = (stage_long_side / b)^2``
  (:func:`hrkernels.schedules.rescheduled_betas`; none where ``gamma <= 1``), the model still
  receiving the integer timesteps; the relay noise is added with that table at the stage's own
  first timestep (the authors' code adds it four steps later).

Randomness, all from the one ``generator``, in this order: (IF stage II) the noise of the upscaled
low-resolution image at every stage's size, first to last; stage 1's initial noise; then per stage
``k >= 2``: the relay's posterior sample (latent models), the relay noise ``[B, C, h, w]``;
stochastic steps (DDIM ``eta > 0``) draw inside their steps.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import torch
from diffusers import DDIMScheduler

from hrkernels._validate import check_bool, check_int, describe
from hrkernels.presets import megafusion as megafusion_dilation
from hrkernels.samplers.base import Sampler
from hrkernels.samplers.engine import Executor, ViewSet
from hrkernels.samplers.inputs import as_pixels
from hrkernels.samplers.outputs import StageResult
from hrkernels.samplers.schedulers import fresh_scheduler, noising_coefficients, step_kwargs
from hrkernels.samplers.stages import (
    Run,
    StageSchedule,
    StepFunction,
    StepState,
    fidelity_start,
    image_latent,
    initial_latents,
    randn,
    relay,
    relay_vae_calls,
    run_stage,
    stage_patches,
    stage_schedule,
)
from hrkernels.schedules import rescheduled_betas, stage_count

__all__ = ["DEFAULT_STAGES", "MegaFusion"]

VARIANT = "megafusion"
logger = logging.getLogger("hrkernels")

# docs/METHODS.md, MegaFusion, "Stages": per family, each stage's long side in units of the base
# size b for a target of 2b (the middle of three sits halfway between b and the target at any
# target) and its steps of the family's default step count (the sum).
DEFAULT_STAGES: dict[str, tuple[tuple[float, ...], tuple[int, ...]]] = {
    "sd": ((1.0, 1.5, 2.0), (40, 5, 5)),
    "sdxl": ((1.0, 2.0), (40, 10)),
    "if": ((1.0, 2.0), (80, 20)),
    "if-sr": ((1.0, 2.0), (40, 10)),
    "sd3": ((1.0, 2.0), (20, 8)),
}
# Guidance scales: METHODS.md's 7.0 (SDXL) / 7.5 (SD 1.5); IF and SD3 as their pipelines'.
DEFAULT_GUIDANCE = {"sd": 7.5, "sdxl": 7.0, "if": 7.0, "if-sr": 4.0, "sd3": 7.0}
# Stage sizes are multiples of this many pixels (and of the model's own multiple).
STAGE_MULTIPLE = 8


def split_steps(weights: Sequence[int], total: int) -> list[int]:
    """``total`` steps split in proportion to ``weights``: every stage but the first gets its share
    rounded half up (at least 1), the first the remainder.

    Raises:
        ValueError: the first stage would get fewer than 1 step.

    Example::

        >>> split_steps((40, 5, 5), 50), split_steps((40, 5, 5), 30), split_steps((40, 10), 2)
        ([40, 5, 5], [24, 3, 3], [1, 1])
    """
    whole = sum(weights)
    later = [max(1, math.floor(Fraction(weight * total, whole) + Fraction(1, 2)))
             for weight in weights[1:]]
    first = total - sum(later)
    if first < 1:
        raise ValueError(f"num_inference_steps={total} is too few for {len(weights)} stages "
                         f"(the default split {tuple(weights)} gives the later stages {later}); "
                         f"use at least {len(weights)} steps")
    return [first, *later]


def _check_stages(stages: Any) -> tuple[tuple[int, int], ...] | None:
    """``stages``: None, or a non-empty sequence of ``(long side in pixels, steps)`` with sizes
    multiples of 8, strictly ascending, and steps >= 1."""
    if stages is None:
        return None
    if isinstance(stages, (str, bytes)) or not isinstance(stages, Sequence) or not stages:
        raise TypeError("stages must be None or a non-empty list of (long side in pixels, steps) "
                        f"pairs, e.g. [(1024, 40), (2048, 10)]; got {describe(stages)}")
    checked = []
    for index, pair in enumerate(stages):
        if not isinstance(pair, Sequence) or isinstance(pair, (str, bytes)) or len(pair) != 2:
            raise TypeError(f"stages[{index}] must be a (long side in pixels, steps) pair; got "
                            f"{describe(pair)}")
        size = check_int(pair[0], f"stages[{index}] size", minimum=STAGE_MULTIPLE)
        steps = check_int(pair[1], f"stages[{index}] steps", minimum=1)
        if size % STAGE_MULTIPLE:
            raise ValueError(f"stages[{index}] size must be a multiple of {STAGE_MULTIPLE}; got "
                             f"{size}")
        if checked and size <= checked[-1][0]:
            raise ValueError(f"stages must be in strictly ascending size; stages[{index}] = "
                             f"{size} follows {checked[-1][0]}")
        checked.append((size, steps))
    return tuple(checked)


def _is_flow(scheduler_class: type) -> bool:
    """A flow-matching scheduler (``scale_noise``, no ``add_noise``: SD3's)."""
    return hasattr(scheduler_class, "scale_noise") and not hasattr(scheduler_class, "add_noise")


_CLEAN_ESTIMATE: dict[tuple[type, str], bool] = {}


def _has_clean_estimate(scheduler_class: type, config: Any) -> bool:
    """Whether ``scheduler_class.step`` returns a ``pred_original_sample`` (probed on the CPU
    with a 2-step schedule, once per class and config)."""
    key = (scheduler_class, repr(sorted((name, repr(value)) for name, value in config.items())))
    if key not in _CLEAN_ESTIMATE:
        _CLEAN_ESTIMATE[key] = _probe_clean_estimate(scheduler_class, config)
    return _CLEAN_ESTIMATE[key]


def _probe_clean_estimate(scheduler_class: type, config: Any) -> bool:
    scheduler = fresh_scheduler(type("Template", (), {"config": config})(), 2,
                                scheduler_class=scheduler_class)
    sample = torch.zeros(1, 4, 2, 2)
    output = scheduler.step(sample, scheduler.timesteps[0], sample,
                            **step_kwargs(scheduler, torch.Generator().manual_seed(0)))
    return getattr(output, "pred_original_sample", None) is not None


class MegaFusion(Sampler):
    """MegaFusion over SD 1.x/2.x, SDXL, DeepFloyd IF stage I and II, and SD3 pipelines.

    Args:
        pipe: a ``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``, ``IFPipeline``,
            ``IFSuperResolutionPipeline`` or ``StableDiffusion3Pipeline``.
        stages: None (the family's default: :data:`DEFAULT_STAGES`), or ``[(long side in pixels,
            steps), ...]``: sizes multiples of 8, strictly ascending, the last one the target's
            long side; steps >= 1 summing to ``num_inference_steps``. Every stage keeps the
            target's aspect ratio (short sides rounded half up to a multiple of 8, or of 16 for
            SD3's patches).
        mega_plus: MegaFusion++: the mid block dilated and the noise re-scheduled in the stages
            above the base size (UNet models only).
        scheduler: the scheduler class (or instance) to sample with; default DDIM (eta 0) built
            from the pipeline's config; SD3 keeps its flow-matching scheduler. Its ``step`` must
            return ``pred_original_sample`` (DDIM, DDPM, Euler, LMS, ...).
        view_batch_size, executor: as :class:`~hrkernels.samplers.DemoFusion` (the model sees one
            view per image).
        parallel: ``"cfg"``: the guidance branches on different ranks of
            :func:`hrkernels.distributed.init` (:class:`~hrkernels.samplers.Sampler`).

    Default stages for a target of long side ``T`` (``b`` the base size): the first stage at
    ``b``, the last at ``T``; SD 1.x/2.x adds one halfway (512, 768, 1024 with 40, 5, 5 of 50
    steps); SDXL 1024, 2048 with 40 + 10; IF stage I 64, 128 with 80 + 20 of 100; IF stage II
    256, 512 with 40 + 10 of 50; SD3 1024, 2048 with 20 + 8 of 28. A step count other than the
    default splits in proportion (:func:`split_steps`: rounded half up, at least 1 per stage, the
    first stage takes the remainder); a target at the base size runs one stage. Guidance scale
    defaults: 7.5 (SD), 7.0 (SDXL, IF stage I, SD3), 4.0 (IF stage II).

    The call takes :meth:`Sampler.sample`'s arguments, with ``num_inference_steps`` defaulting to
    the stages' sum (or the family's default), and for IF stage II ``image`` (required: the
    low-resolution image, a PIL image, ``[B, 3, h, w]`` tensor or ``[h, w, 3]`` array in [0, 1],
    e.g. an IF stage I result) and ``noise_level`` (default 250, as the pipeline). On the latent
    models (and IF stage I) ``image`` is the shared input image (:meth:`Sampler.sample`): resized
    to the first stage's size and encoded, it replaces stage 1's result (no stage-1 sampling) and
    is relayed to stage 2 as usual; ``fidelity`` picks the step stage 2 starts at: None its own
    first step, else ``N - int(N (1 - fidelity))`` (diffusers' img2img with ``strength = 1 -
    fidelity``), at most stage 2's last step. ControlNet and IP-Adapter conditioning reach every
    stage (one whole-latent view per image). Stage results
    (``out.stages[k].latents``) are the clean estimates handed on (the last stage's final sample).
    A pixel-space model's output has no latents: ``output_type="latent"`` is refused.

    Raises:
        TypeError: an unsupported pipeline or a bad argument type; SD3 with a scheduler that is not
            flow matching.
        ValueError: bad ``stages``; ``mega_plus`` on SD3 (no mid block, no ``alphas_cumprod``).

    Example::

        >>> out = MegaFusion(pipe, stages=[(1024, 40), (1536, 5), (2048, 5)], mega_plus=True)(
        ...     prompt="a castle", height=2048, width=2048,
        ...     generator=torch.Generator("cuda").manual_seed(0))
        >>> [(s.height, s.width) for s in out.stages]
        [(1024, 1024), (1536, 1536), (2048, 2048)]
    """

    name = "MegaFusion"
    default_scheduler = DDIMScheduler
    families = None

    def __init__(self, pipe: Any, stages: Any = None, mega_plus: bool = False, *,
                 scheduler: Any = None, view_batch_size: int | str = "auto",
                 executor: Executor | None = None, parallel: str | None = None) -> None:
        super().__init__(pipe, view_batch_size=view_batch_size, scheduler=scheduler,
                         executor=executor, parallel=parallel)
        self.stages = _check_stages(stages)
        self.mega_plus = check_bool(mega_plus, "mega_plus")
        family = self.adapter.family
        if self.mega_plus and family == "sd3":
            raise ValueError("MegaFusion: mega_plus applies to UNet models with an alphas_cumprod "
                             "noise table (SD, SDXL, DeepFloyd IF); SD3's transformer has no mid "
                             "block and its flow-matching scheduler no alphas_cumprod")
        self.dilation = megafusion_dilation(pipe) if self.mega_plus else None
        self.default_guidance_scale = DEFAULT_GUIDANCE.get(family, 7.5)
        config = self.scheduler_template.config
        if _is_flow(type(self.scheduler_template)) and config.get("use_dynamic_shifting", False):
            raise ValueError("MegaFusion: a flow-matching scheduler with use_dynamic_shifting "
                             "(resolution-dependent shift) is not supported; use one with a fixed "
                             "shift (SD3's)")

    # -- stages -----------------------------------------------------------------------------------

    @property
    def multiple(self) -> int:
        """Pixels every stage side is a multiple of."""
        return math.lcm(STAGE_MULTIPLE, self.adapter.size_multiple)

    def default_steps(self) -> int:
        """The family's default step count (the sum of its default split), or the sum of
        ``stages``."""
        if self.stages is not None:
            return sum(steps for _, steps in self.stages)
        return sum(DEFAULT_STAGES[self.adapter.family][1])

    def _long_sides(self, long_side: int) -> list[int]:
        """Each stage's long side for a target of ``long_side`` pixels."""
        if self.stages is not None:
            sides = [size for size, _ in self.stages]
            odd = [side for side in sides if side % self.multiple]
            if odd:
                raise ValueError(f"MegaFusion: stage sizes {odd} must be multiples of "
                                 f"{self.multiple} for {type(self.pipe).__name__}")
            if sides[-1] != long_side:
                raise ValueError(f"MegaFusion: the last of stages {sides} must be the target's "
                                 f"long side {long_side} (max(height, width))")
            return sides
        base, multiple = self.adapter.base_size, self.multiple
        ratios = DEFAULT_STAGES[self.adapter.family][0]
        sides = [base]
        for ratio in ratios[1:-1]:  # SD's middle stage: halfway, as 768 between 512 and 1024
            exact = Fraction(base) + (long_side - base) * Fraction(ratio - 1) / Fraction(
                ratios[-1] - 1)
            sides.append(multiple * math.floor(exact / multiple + Fraction(1, 2)))
        sides.append(long_side)
        return sorted(set(side for side in sides if base <= side <= long_side))

    def stage_sizes(self, height: int, width: int) -> list[tuple[int, int]]:
        """Every stage's ``(height, width)`` for the target (the last one exactly)."""
        stage_count(height, width, self.adapter.base_size, self.multiple)
        long_side = max(height, width)
        multiple = self.multiple

        def rounded(value: int, side: int) -> int:
            exact = Fraction(value * side, long_side * multiple)
            return max(multiple, multiple * math.floor(exact + Fraction(1, 2)))

        sizes = [(rounded(height, side), rounded(width, side))
                 for side in self._long_sides(long_side)[:-1]]
        return [*sizes, (height, width)]

    def stage_steps(self, num_inference_steps: int, stages: int) -> list[int]:
        """The steps each stage takes of the shared sequence (see the class docstring)."""
        if self.stages is not None:
            steps = [count for _, count in self.stages]
            if sum(steps) != num_inference_steps:
                raise ValueError(f"MegaFusion: the stages' steps {steps} sum to {sum(steps)}, not "
                                 f"num_inference_steps={num_inference_steps}")
            return steps
        weights = DEFAULT_STAGES[self.adapter.family][1]
        if stages == 1:
            return [num_inference_steps]
        if stages < len(weights):  # SD's middle stage dropped (a target just above b)
            weights = (weights[0], sum(weights[1:]))
        return split_steps(weights, num_inference_steps)

    # -- schedulers -------------------------------------------------------------------------------

    def scheduler_class(self) -> type:
        """DDIM (or the class asked for); a flow-matching pipeline (SD3) keeps its own class."""
        template = type(self.scheduler_template)
        if not _is_flow(template):
            return super().scheduler_class()
        cls = self.scheduler or template
        if not _is_flow(cls):
            raise TypeError(f"MegaFusion: {type(self.pipe).__name__} samples with flow matching; "
                            f"scheduler {cls.__name__} is not a flow-matching scheduler")
        return cls

    def gamma(self, height: int, width: int) -> float:
        """MegaFusion++'s ``gamma = (long side / b)^2`` of a stage (1 at or below the base)."""
        return max(1.0, (max(height, width) / self.adapter.base_size) ** 2)

    def schedule_for(self, run: Run, start: int, end: int, gamma: float) -> StageSchedule:
        """The stage's schedule over steps ``start .. end - 1`` (re-scheduled when
        ``gamma > 1``)."""
        return stage_schedule(self.scheduler_template, run.num_inference_steps, run.device,
                              scheduler_class=self.scheduler_class(), start=start, end=end,
                              **self._table(gamma))

    def _table(self, gamma: float) -> dict[str, Any]:
        """Scheduler overrides for a stage: the re-scheduled ``trained_betas`` when
        ``mega_plus`` and ``gamma > 1``, else none."""
        if not self.mega_plus or gamma == 1.0:
            return {}
        template = fresh_scheduler(self.scheduler_template, 1,
                                   scheduler_class=self.scheduler_class())
        return {"trained_betas": rescheduled_betas(template.alphas_cumprod, gamma).tolist()}

    # -- the call ---------------------------------------------------------------------------------

    def __call__(self, prompt: str | list[str] | None = None, *,
                 num_inference_steps: int | None = None, image: Any = None,
                 noise_level: int = 250, output_type: str = "pil", **kwargs: Any):
        """:meth:`Sampler.sample`, plus ``image`` and ``noise_level`` (IF stage II; see the class
        docstring); ``num_inference_steps`` None: :meth:`default_steps`."""
        if output_type == "latent" and self.adapter.pixel_space:
            raise ValueError(f"MegaFusion: output_type='latent' does not apply to the pixel-space "
                             f"{type(self.pipe).__name__} (its samples are the images); use "
                             "'pil', 'np' or 'pt'")
        if num_inference_steps is None:
            num_inference_steps = self.default_steps()
        if self.adapter.family != "if-sr":  # the shared image= (it replaces stage 1's result)
            return self.sample(prompt, num_inference_steps=num_inference_steps,
                               output_type=output_type, image=image, **kwargs)
        return self.sample(prompt, num_inference_steps=num_inference_steps,
                           output_type=output_type,
                           method_options={"image": image, "noise_level": noise_level}, **kwargs)

    def check_call(self, sizes: list[tuple[int, int]], num_inference_steps: int,
                   step_options: dict[str, Any], image: Any = None,
                   noise_level: int = 250) -> None:
        cls = self.scheduler_class()
        config = self.scheduler_template.config
        if not _is_flow(cls) and not _has_clean_estimate(cls, config):
            raise TypeError(f"MegaFusion: {cls.__name__}.step returns no pred_original_sample, "
                            "the clean estimate a stage hands on; use DDIM (the default), DDPM, "
                            "Euler or LMS")
        if self.adapter.family == "if-sr":
            if image is None:
                raise ValueError("MegaFusion: IFSuperResolutionPipeline needs image= (the "
                                 "low-resolution image it upscales, e.g. an IF stage I result)")
            as_pixels(image, "image", background=1.0)
            total = int(self.pipe.image_noising_scheduler.config.num_train_timesteps)
            check_int(noise_level, "noise_level", minimum=0, maximum=total - 1)

    def generate(self, run: Run, sizes: list[tuple[int, int]]) -> list[StageResult]:
        f = self.adapter.vae_scale_factor
        steps = self.stage_steps(run.num_inference_steps, len(sizes))
        starts = [sum(steps[:k]) for k in range(len(steps))]
        if run.image is not None:
            if len(sizes) < 2:
                raise ValueError("MegaFusion: image= needs at least 2 stages (it replaces the "
                                 "first stage's result); the target is the base size")
            end = starts[1] + steps[1]  # stage 2 keeps its end, starts where fidelity says
            starts[1] = self.image_start(run, starts[1], end)
            steps[:2] = [0, end - starts[1]]
        latents = [(h // f, w // f) for h, w in sizes]
        if self.adapter.family == "if-sr":  # the upscaled image rows must exist before plan()
            self._condition_on_image(run, latents)
        batch_sizes = run.engine.plan({size: [run.batch] for size in latents},
                                      self.view_batch_size, run.guidance)
        gammas = [self.gamma(h, w) if self.mega_plus and k > 0 else 1.0
                  for k, (h, w) in enumerate(sizes)]
        self._state_plan(run, sizes, steps, starts, gammas)
        results: list[StageResult] = []
        z: torch.Tensor | None = None
        if run.image is not None:  # the caller's image is stage 1's result
            z = image_latent(run, sizes[0])
            results.append(StageResult(1, sizes[0][0], sizes[0][1], z))
        for k, (size, latent) in enumerate(zip(sizes, latents, strict=True)):
            number, last = k + 1, k == len(sizes) - 1
            if k == 0 and run.image is not None:
                continue
            schedule = self.schedule_for(run, starts[k], starts[k] + steps[k], gammas[k])
            if z is None and _is_flow(type(schedule.scheduler)):  # pure noise is x_1 of the flow
                z = randn((run.batch, self.adapter.latent_channels, *latent), run.generator,
                          run.device)
            elif z is None:
                z = initial_latents(run, latent, schedule.scheduler)
            else:
                z = self._noised(run, schedule, relay(run, z, size), gammas[k])
            specs = [self.dilation] if self.dilation is not None and k > 0 else []
            patches = (stage_patches(self.adapter.model, specs, VARIANT) if specs
                       else contextlib.nullcontext())
            with patches:
                z = run_stage(run, number, latent, schedule, z,
                              self._step(run, schedule, batch_sizes, truncate=not last))
            results.append(StageResult(number, size[0], size[1], z))
        return results

    def vae_calls(self, stages: int, options: Any) -> list[tuple[str, int]]:
        """For the memory planner: ``image=``'s encode, the relay of every stage ``s >= 2``
        (decode ``s - 1``, encode ``s``), the final decode; none on a pixel-space model."""
        if self.adapter.pixel_space:
            return []
        return relay_vae_calls(stages, options.get("image") is not None)

    # -- pieces of a call -------------------------------------------------------------------------

    @staticmethod
    def image_start(run: Run, start: int, end: int) -> int:
        """With ``image=``: the step stage 2 starts at (its relayed input noised there).
        ``fidelity`` None: ``start`` (the stage's own); else ``N - int(N (1 - fidelity))``
        (diffusers' img2img with ``strength = 1 - fidelity``), at most ``end - 1``."""
        if run.fidelity is None:
            return start
        return fidelity_start(run.num_inference_steps, run.fidelity, end - 1)

    def _condition_on_image(self, run: Run, latents: list[tuple[int, int]]) -> None:
        """IF stage II: the low-resolution image, upscaled and noised at every stage's size."""
        image = as_pixels(run.options["image"], "image", background=1.0)
        image = (image * 2 - 1).to(run.device, torch.float32)
        if image.shape[0] not in (1, run.batch):
            raise ValueError(f"image holds {image.shape[0]} images; pass 1 or {run.batch} (the "
                             "prompts times num_images_per_prompt)")
        image = image.expand(run.batch, -1, -1, -1)
        noises = [randn((run.batch, 3, *size), run.generator, run.device) for size in latents]
        self.adapter.add_image_condition(run.engine.cond, image, latents, noises,
                                         run.options["noise_level"])

    def _state_plan(self, run: Run, sizes: list[tuple[int, int]], steps: list[int],
                    starts: list[int], gammas: list[float]) -> None:
        rows = run.batch * max(len(p.branches) for p in run.guidance.passes)
        relay_kind = "resize" if self.adapter.pixel_space else "decode, resize, encode"
        for k, ((h, w), count) in enumerate(zip(sizes, steps, strict=True)):
            if count == 0:  # image=: the input image is the stage's result
                run.plan.append(f"stage {k + 1} ({w}x{h}): the input image, encoded")
                continue
            line = (f"stage {k + 1} ({w}x{h}): steps {starts[k]} to {starts[k] + count - 1} of "
                    f"{run.num_inference_steps}, one model call of {rows} rows per step")
            if k > 0:
                line += f", relay ({relay_kind})"
            if self.dilation is not None and k > 0:
                line += ", mid block dilated 2"
            if gammas[k] != 1.0:
                line += f", noise re-scheduled with gamma {gammas[k]:.4g}"
            run.plan.append(line)
        logger.info("%s plan: %s", self.name, "; ".join(run.plan))

    def _noised(self, run: Run, schedule: StageSchedule, z0: torch.Tensor,
                gamma: float) -> torch.Tensor:
        """The relayed clean ``z0`` noised to the stage's first timestep (its own table)."""
        noise = randn(z0.shape, run.generator, run.device)
        scheduler = schedule.scheduler
        if _is_flow(type(scheduler)):
            return scheduler.scale_noise(z0, schedule.timesteps[0].reshape(1), noise)
        (scale,), (sigma,) = noising_coefficients(
            self.scheduler_template, run.num_inference_steps, [schedule.indices[0]],
            scheduler_class=type(scheduler), **self._table(gamma))
        return z0 * scale + noise * sigma

    def _step(self, run: Run, schedule: StageSchedule, batch_sizes: dict[tuple[int, int], int],
              truncate: bool) -> StepFunction:
        """One guided model call and the scheduler's step; with ``truncate``, the stage's last
        step returns the clean estimate from the sample before the update."""
        scheduler = schedule.scheduler
        kwargs = step_kwargs(scheduler, run.generator, run.step_options)
        flow = _is_flow(type(scheduler))
        sigmas = [float(scheduler.sigmas[i]) for i in schedule.indices] if flow else []

        def step(state: StepState, z: torch.Tensor) -> torch.Tensor:
            zin = z if flow else scheduler.scale_model_input(z, state.timestep)
            view = ViewSet(zin, control=run.control_views(tuple(z.shape[2:])))
            (prediction,) = run.engine(state.model_timestep, [view], batch_sizes, run.guidance)
            if truncate and state.last:
                if flow:  # x0 = x_t - sigma_t v
                    return z - sigmas[state.step] * prediction
                return scheduler.step(prediction, state.timestep, z, return_dict=True,
                                      **kwargs).pred_original_sample
            return scheduler.step(prediction, state.timestep, z, return_dict=False, **kwargs)[0]

        return step

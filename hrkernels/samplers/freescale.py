"""FreeScale (docs/METHODS.md, "FreeScale"): self-cascade upscaling in RGB, restrained dilation and
Scale Fusion in every transformer's self-attention.

Stages (:func:`hrkernels.presets.freescale`): the base size, doubling, then the target. Stage 1 is
plain sampling (or the caller's ``image``, encoded). Each later stage:

1. relay: decode the previous stage's latent, bicubic-resize the image to the stage's size on the
   device, clamp to [-1, 1], encode (posterior sample from the generator): ``z0``;
2. restart: the stage runs the steps from ``K`` on, ``K`` the first step whose timestep is
   ``<= restart_timestep`` (default 700: index 15 of 50 with SDXL's spacing);
3. each step: skip residual ``zh = c z'_t + (1 - c) z_t``, ``c = c(t)^alpha``
   (:class:`~hrkernels.samplers.stages.SkipResidual`; ``alpha`` a number or a 2-D map resized to
   the latent), then one guided UNet call on the full latent and ``scheduler.step(eps, t, zh)``;
   the UNet runs the stage's specs (:class:`hrkernels.ScaleFusion` in every transformer, the
   restrained :class:`hrkernels.ReDilation` while ``i < 35`` of 50) in a configuration of the
   sampler's own (``"freescale"``), switched on for the stage and removed after it.

The UNet is left as it was found (patches, active configuration, step), also when the call raises.

Randomness, all from the one ``generator``, in this order: stage 1's initial noise (or, with
``image``, its posterior sample); then per stage ``s >= 2``: the posterior sample of the relay, the
stage's noise ``[B, C, h, w]``, then the Scale Fusion window jitter of every step and token grid
(:func:`hrkernels.patching.prepare_windows`, before the stage's loop); stochastic schedulers draw
inside their steps.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
import torch.nn.functional as F

from hrkernels import patching
from hrkernels._validate import check_int, check_real
from hrkernels.patching import ScaleFusion
from hrkernels.presets import FreeScalePlan, FreeScaleStage
from hrkernels.presets import freescale as freescale_plan
from hrkernels.samplers.base import Sampler
from hrkernels.samplers.engine import Executor
from hrkernels.samplers.outputs import StageResult
from hrkernels.samplers.stages import (
    Run,
    SkipResidual,
    denoising_step,
    fidelity_exponent,
    image_latent,
    initial_latents,
    randn,
    relay,
    relay_vae_calls,
    run_stage,
    stage_patches,
    stage_schedule,
)

__all__ = ["FreeScale"]

VARIANT = "freescale"
logger = logging.getLogger("hrkernels")


def _check_alpha(alpha: Any) -> float | torch.Tensor:
    if isinstance(alpha, torch.Tensor):
        if alpha.dim() != 2 or alpha.numel() == 0 or not alpha.is_floating_point():
            raise ValueError("alpha as a map must be a non-empty 2-D float tensor [h, w]; got "
                             f"shape {tuple(alpha.shape)}, {alpha.dtype}")
        return alpha
    return check_real(alpha, "alpha (a number or a 2-D map)", minimum=0)


class FreeScale(Sampler):
    """FreeScale over a diffusers ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline``.

    Args:
        pipe: the pipeline (SD 1.x/2.x or SDXL; the restrained dilation's layers follow the UNet's
            family).
        fast_mode: Scale Fusion's global branch attends within each dilated sub-grid.
        alpha: the skip residual's exponent of ``c(t)`` (default 2, the paper's): a number, or a
            2-D float tensor ``[h, w]`` of any size (bilinear-resized to each stage's latent) for
            region-wise detail control (larger alpha: less of the previous stage kept, more new
            detail).
        restart_timestep: stages >= 2 start at the first step whose timestep is ``<=`` it
            (default 700); in ``[1, num_train_timesteps]``.
        sigma, feature_blur: Scale Fusion's (:class:`hrkernels.ScaleFusion`).
        scheduler, view_batch_size, executor: as :class:`~hrkernels.samplers.DemoFusion` (the
            scheduler must keep its input sample: the skip residual).
        parallel: ``"cfg"``: the guidance branches on different ranks of
            :func:`hrkernels.distributed.init` (:class:`~hrkernels.samplers.Sampler`).

    The call takes :meth:`Sampler.sample`'s arguments. ``image``: an existing image that replaces
    the first stage's (the 1x) result, resized to its size and encoded; ``fidelity`` sets the skip
    residual's exponent to ``2 (1 - fidelity) alpha`` (0.5: ``alpha``; 1: 0, the relayed input
    noised at every step; None: ``alpha``). With a ControlNet pipeline the ControlNet sees the
    whole control image at each stage's size.

    Example::

        >>> out = FreeScale(pipe)(prompt="a castle", height=4096, width=4096,
        ...                       generator=torch.Generator("cuda").manual_seed(0))
        >>> [(s.height, s.width) for s in out.stages]
        [(1024, 1024), (2048, 2048), (4096, 4096)]
    """

    name = "FreeScale"
    needs_sample = True

    def __init__(self, pipe: Any, *, fast_mode: bool = False, alpha: Any = 2.0,
                 restart_timestep: int = 700, sigma: float = 1.0, feature_blur: bool = False,
                 scheduler: Any = None, view_batch_size: int | str = "auto",
                 executor: Executor | None = None, parallel: str | None = None) -> None:
        super().__init__(pipe, view_batch_size=view_batch_size, scheduler=scheduler,
                         executor=executor, parallel=parallel)
        self.alpha = _check_alpha(alpha)
        total = int(self.scheduler_template.config.num_train_timesteps)
        self.restart_timestep = check_int(restart_timestep, "restart_timestep", minimum=1,
                                          maximum=total)
        self.fusion = ScaleFusion(sigma=sigma, fast_mode=fast_mode, feature_blur=feature_blur)

    def plan(self, height: int, width: int, num_inference_steps: int) -> FreeScalePlan:
        """The cascade a call at this size and step count runs."""
        return freescale_plan(self.pipe, height, width, num_inference_steps, self.fusion)

    def stage_sizes(self, height: int, width: int) -> list[tuple[int, int]]:
        return [(stage.height, stage.width) for stage in self.plan(height, width, 1).stages]

    def vae_calls(self, stages: int, options: Any) -> list[tuple[str, int]]:
        """``image=``'s encode, the relay of every stage ``s >= 2`` (decode ``s - 1``, encode
        ``s``), the final decode."""
        return relay_vae_calls(stages, options.get("image") is not None)

    def window_settings(self, stage: int) -> Any:
        """Scale Fusion's settings in stages >= 2."""
        return None if stage == 1 else self.fusion.settings

    def restart_index(self, timesteps: torch.Tensor) -> int:
        """``K``: the first step index whose timestep is ``<= restart_timestep`` (the last step
        if none is)."""
        for index, timestep in enumerate(timesteps.tolist()):
            if timestep <= self.restart_timestep:
                return index
        return len(timesteps) - 1

    def generate(self, run: Run, sizes: list[tuple[int, int]]) -> list[StageResult]:
        height, width = sizes[-1]
        chunk = None if run.memory is None else run.memory.window_chunk
        plan = freescale_plan(self.pipe, height, width, run.num_inference_steps,
                              dataclasses.replace(self.fusion, window_chunk=chunk))
        f = self.adapter.vae_scale_factor
        cls = self.scheduler_class()
        first = plan.stages[0]
        latent = (first.height // f, first.width // f)
        schedule = stage_schedule(self.scheduler_template, run.num_inference_steps, run.device,
                                  scheduler_class=cls)
        restart = self.restart_index(schedule.scheduler.timesteps)
        rows = run.batch * max(len(p.branches) for p in run.guidance.passes)
        run.plan.extend(
            f"stage {k} ({s.width}x{s.height}): steps {0 if k == 1 else restart} to "
            f"{run.num_inference_steps - 1}, one UNet call of {rows} rows per step"
            + ("" if k == 1 else f", Scale Fusion, dilation {s.scale} until step "
               f"{plan.dilated_until}") for k, s in enumerate(plan.stages, start=1))
        if run.image is not None:
            run.plan[-len(plan.stages)] = (f"stage 1 ({first.width}x{first.height}): the input "
                                           "image, encoded (no sampling)")
        logger.info("%s plan: %s", self.name, "; ".join(run.plan))
        batch_sizes = run.engine.plan({latent: [run.batch]}, self.view_batch_size, run.guidance)
        if run.image is None:
            z = run_stage(run, 1, latent, schedule, initial_latents(run, latent,
                                                                    schedule.scheduler),
                          denoising_step(run, schedule, batch_sizes))
        else:
            z = image_latent(run, (first.height, first.width))
        stages = [StageResult(1, first.height, first.width, z)]
        for number, stage in enumerate(plan.stages[1:], start=2):
            z = self.upscale_stage(run, number, stage, z, restart)
            stages.append(StageResult(number, stage.height, stage.width, z))
        return stages

    def relay(self, run: Run, z: torch.Tensor, stage: FreeScaleStage) -> torch.Tensor:
        """The previous stage's latent in RGB, resized to ``stage``'s size, encoded: ``z0``
        (:func:`~hrkernels.samplers.stages.relay`)."""
        return relay(run, z, (stage.height, stage.width))

    def upscale_stage(self, run: Run, number: int, stage: FreeScaleStage, z: torch.Tensor,
                      restart: int) -> torch.Tensor:
        f = self.adapter.vae_scale_factor
        latent = (stage.height // f, stage.width // f)
        z0 = self.relay(run, z, stage)
        schedule = stage_schedule(self.scheduler_template, run.num_inference_steps, run.device,
                                  scheduler_class=self.scheduler_class(), start=restart,
                                  noised=True)
        alpha = fidelity_exponent(self.alpha, run.fidelity)
        if isinstance(alpha, torch.Tensor):
            alpha = F.interpolate(alpha[None, None].to(run.device, torch.float32), size=latent,
                                  mode="bilinear", align_corners=False)
        skip = SkipResidual(z0, randn(z0.shape, run.generator, run.device), alpha)
        batch_sizes = run.engine.plan({latent: [run.batch]}, self.view_batch_size, run.guidance)
        model = self.adapter.model
        with stage_patches(model, stage.specs, VARIANT):
            patching.prepare_windows(model, latent, schedule.indices, run.generator, run.device,
                                     variant=VARIANT)
            return run_stage(run, number, latent, schedule, None,
                             denoising_step(run, schedule, batch_sizes), skip=skip)



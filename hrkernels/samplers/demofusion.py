"""DemoFusion (docs/METHODS.md, "DemoFusion"): progressive upscaling, skip
residual and dilated sampling over MultiDiffusion, on any SD 1.5/2.x or SDXL pipeline.

Per step of a stage ``s >= 2`` (latent ``z``, its clean upsampled start ``z0`` and one noise draw):

1. ``z'_t = add_noise(z0, noise, t)`` (formed on the fly), ``zh = c1 z'_t + (1 - c1) z``
   (:class:`~hrkernels.samplers.stages.SkipResidual`);
2. ``zin = scheduler.scale_model_input(zh, t)`` on the full latent;
3. local windows of ``zin`` (base latent size, stride, jitter) -> model -> overlap mean:
   ``eps_local``;
4. ``zin`` blurred (kernel ``2s - 1``, std ``sigma * c3``), renormalised to ``zin``'s mean/std,
   padded to multiples of ``s``, cut into ``s x s`` dilated views -> model -> put back:
   ``eps_global`` (scaling commutes with the blur and the renormalisation, so cutting the global
   views from ``zin`` instead of ``zh`` is the same);
5. ``eps = c2 eps_global + (1 - c2) eps_local`` and **one** ``scheduler.step(eps, t, zh)`` on the
   full latent (:meth:`DemoFusion.combine_step`; equal to the official per-view stepping for
   schedulers linear in ``(sample, eps)``, and correct for multistep ones).

All local and global views of a step (both CFG halves) go through the model together in batches of
a fixed shape per stage (:class:`hrkernels.samplers.engine.Engine`).

Schedulers: the skip residual reaches the trajectory only through a scheduler whose ``step`` uses
the sample it is given. With the pipeline's own scheduler when it does not (PNDM, SD 1.5's default;
UniPC; DPM-Solver singlestep; Heun), DemoFusion samples with DDIM built from the same config and
warns once; a scheduler passed explicitly (``scheduler=``) that does not is an error
(:func:`hrkernels.samplers.schedulers.keeps_sample`).

Randomness, all from the one ``generator`` in this order: stage 1's initial noise (with ``image``:
the VAE's posterior sample of it); then per stage
``s >= 2``: the stage's noise ``[B, C, h, w]``, then the window jitter of every step of the stage
(one :func:`hrkernels.ops.window_grid` draw per step, drawn before the stage's loop); stochastic
schedulers (e.g. Euler with ``s_churn > 0``, DDIM with ``eta > 0``) draw their own noise from the
same generator inside each ``scheduler.step`` call.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from hrkernels import ops
from hrkernels._validate import check_int, check_real, check_reals
from hrkernels.samplers.base import Sampler
from hrkernels.samplers.engine import Executor, ViewSet
from hrkernels.samplers.outputs import StageResult
from hrkernels.samplers.schedulers import step_kwargs
from hrkernels.samplers.stages import (
    Run,
    SkipResidual,
    StageSchedule,
    StepState,
    denoising_step,
    fidelity_exponent,
    global_stats,
    image_latent,
    initial_latents,
    randn,
    run_stage,
    stage_schedule,
)
from hrkernels.schedules import stage_sizes

__all__ = ["DemoFusion"]


class DemoFusion(Sampler):
    """DemoFusion over a diffusers ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline``.

    Args:
        pipe: the pipeline; its text encoders, scheduler (DDIM, Euler, DPM-Solver++ multistep,
            ...; see the module docstring), UNet and VAE are used as they are.
        stride: MultiDiffusion window stride in latent pixels; None = half the window (the window
            is the base latent size: 128 for SDXL, 64 for SD 1.5), 64 for SDXL (the paper's
            default). ``1 <= stride <=`` window.
        cosine_scales: ``(a1, a2, a3)``, the exponents of ``c(t)`` for the skip residual, the
            local/global fusion and the blur (default ``(3, 1, 1)``).
        sigma: standard deviation of the global views' Gaussian blur at the first step (decays
            with ``c3 = 0.99 c(t)^a3 + 0.01``), default 0.8.
        view_batch_size: views per UNet call (each view is two UNet rows with guidance), or
            ``"auto"``: as many as the free device memory allows (8 on a CPU). One batch size is
            chosen per view shape for the whole run, the last call of a step padded, so a compiled
            UNet sees one shape for stage 1 and one for the views of all later stages.
        scheduler: a scheduler class to sample with instead of the pipeline's (built from its
            config); it must keep its input sample (module docstring).
        executor: runs the UNet calls (default: one process).
        parallel: ``"views"`` or ``"cfg"``: share the UNet calls across the ranks of
            :func:`hrkernels.distributed.init` (:class:`~hrkernels.samplers.Sampler`).

    The call takes :meth:`Sampler.sample`'s arguments. ``image``: resized to the first stage's
    size and encoded, it replaces the first stage's result (the later stages run as usual, from
    its upsampled latent, and match its statistics); ``fidelity`` sets the skip residual's
    exponent ``a1`` to ``2 (1 - fidelity) cosine_scales[0]`` (0.5: the configured ``a1``, 3; 1:
    ``a1 = 0``, the noised input at every step; None: the configured ``a1``). With a ControlNet
    pipeline, a local window's ControlNet sees the window's crop of the control image (at the
    stage's size, times ``f``), a dilated view its sub-sampled image
    (:meth:`~hrkernels.samplers.inputs.ControlInputs.dilated`).

    Raises:
        TypeError: ``pipe`` is not a supported pipeline, or an argument of the wrong type.
        ValueError: a hyperparameter out of range.

    Example::

        >>> pipe = StableDiffusionXLPipeline.from_pretrained(
        ...     "stabilityai/stable-diffusion-xl-base-1.0", torch_dtype=torch.float16).to("cuda")
        >>> out = DemoFusion(pipe)(prompt="a castle", height=2048, width=2048,
        ...                        generator=torch.Generator("cuda").manual_seed(0))
        >>> out.images[0].size, [(s.height, s.width) for s in out.stages]
        ((2048, 2048), [(1024, 1024), (2048, 2048)])
    """

    name = "DemoFusion"
    needs_sample = True
    parallel_modes = ("views", "cfg")

    def __init__(
        self,
        pipe: Any,
        *,
        stride: int | None = None,
        cosine_scales: Sequence[float] = (3, 1, 1),
        sigma: float = 0.8,
        view_batch_size: int | str = "auto",
        scheduler: Any = None,
        executor: Executor | None = None,
        parallel: str | None = None,
    ) -> None:
        super().__init__(pipe, view_batch_size=view_batch_size, scheduler=scheduler,
                         executor=executor, parallel=parallel)
        self.window = self.adapter.base_latent_size
        if stride is None:
            stride = max(1, self.window // 2)
        self.stride = check_int(stride, f"stride (latent pixels, at most the window "
                                        f"{self.window})", minimum=1, maximum=self.window)
        self.jitter = max(0, (self.window - self.stride) // 4)
        self.cosine_scales = check_reals(cosine_scales, "cosine_scales", 3, minimum=0)
        self.sigma = check_real(sigma, "sigma", greater_than=0)

    # ----------------------------------------------------------------------------------------------
    # Hooks (APT overrides them)
    # ----------------------------------------------------------------------------------------------

    def stage_sizes(self, height: int, width: int) -> list[tuple[int, int]]:
        """:func:`hrkernels.schedules.stage_sizes` for this pipeline's base size."""
        return stage_sizes(height, width, self.adapter.base_size, self.adapter.vae_scale_factor)

    def start_index(self, stage: int, num_inference_steps: int) -> int:
        """Index into the timestep list where a stage's loop starts (0: all steps)."""
        return 0

    def stage_steps(self, num_inference_steps: int, stages: int) -> list[int]:
        """The steps of each stage: from :meth:`start_index` on."""
        return [num_inference_steps - self.start_index(stage, num_inference_steps)
                for stage in range(1, stages + 1)]

    def prepare_stage_latent(self, z0: torch.Tensor, stage: int,
                             reference: torch.Tensor) -> torch.Tensor:
        """The clean start of stage ``stage`` from the previous stage's upsampled result ``z0``
        (``reference``: the stage-1 latent). DemoFusion: ``z0`` itself."""
        return z0

    def schedule_for(self, stage: int, sizes: list[tuple[int, int]], num_inference_steps: int,
                     device: torch.device) -> StageSchedule:
        """The schedule of stage ``stage`` (of ``sizes``): a fresh scheduler of
        :meth:`scheduler_class`, the steps from :meth:`start_index` on, and for stages >= 2 the
        noising coefficients of the skip residual."""
        start = self.start_index(stage, num_inference_steps)
        return stage_schedule(self.scheduler_template, num_inference_steps, device,
                              scheduler_class=self.scheduler_class(), start=start,
                              noised=stage > 1)

    def combine_step(self, schedule: StageSchedule, step: int, eps_global: torch.Tensor,
                     eps_local: torch.Tensor, c2: float, zh: torch.Tensor,
                     kwargs: dict[str, Any]) -> torch.Tensor:
        """``scheduler.step(c2 eps_global + (1 - c2) eps_local, t, zh)``: one step on the full
        latent."""
        eps = eps_global.mul(c2).add_(eps_local, alpha=1.0 - c2)
        return schedule.scheduler.step(eps, schedule.timesteps[step], zh, return_dict=False,
                                       **kwargs)[0]

    # ----------------------------------------------------------------------------------------------
    # The stages
    # ----------------------------------------------------------------------------------------------

    def generate(self, run: Run, sizes: list[tuple[int, int]]) -> list[StageResult]:
        f = self.adapter.vae_scale_factor
        latent_sizes = [(h // f, w // f) for h, w in sizes]
        # Stage 1 and the later stages get their own batch shapes (stage 1 has B views only).
        base_batch = run.engine.plan({latent_sizes[0]: [run.batch]}, self.view_batch_size,
                                     run.guidance)
        view_batch = run.engine.plan(self.view_counts(latent_sizes, run.batch),
                                     self.view_batch_size, run.guidance)
        z0 = self.base_stage(run, sizes, latent_sizes[0], base_batch)
        reference = global_stats(z0)
        stages = [StageResult(1, *sizes[0], z0)]
        for stage in range(2, len(sizes) + 1):
            upsampled = F.interpolate(z0, size=latent_sizes[stage - 1], mode="bicubic",
                                      align_corners=False)
            start = self.prepare_stage_latent(upsampled, stage, stages[0].latents)
            z0 = self.upscale_stage(run, sizes, stage, start, view_batch)
            z0 = ops.match_stats(z0, reference[0], reference[1])
            stages.append(StageResult(stage, *sizes[stage - 1], z0))
        return stages

    def local_window(self, size: tuple[int, int]) -> tuple[int, int]:
        """The local window on a latent of ``size``: the base latent size, clamped per axis."""
        return min(self.window, size[0]), min(self.window, size[1])

    def stage_views(self, latent_sizes: list[tuple[int, int]]) -> list[dict[tuple[int, int], int]]:
        """Stage 1: the whole latent; stage ``s >= 2``: the local windows
        (:func:`hrkernels.ops.window_count`) and the ``s x s`` dilated views."""
        views = [{latent_sizes[0]: 1}]
        for dilation, size in enumerate(latent_sizes[1:], start=2):
            window = self.local_window(size)
            per_shape = {window: ops.window_count(size[0], size[1], window, self.stride)}
            dilated = (-(-size[0] // dilation), -(-size[1] // dilation))
            per_shape[dilated] = per_shape.get(dilated, 0) + dilation * dilation
            views.append(per_shape)
        return views

    def view_counts(self, latent_sizes: list[tuple[int, int]],
                    batch: int) -> dict[tuple[int, int], list[int]]:
        """``{view shape: [view rows per step, one entry per (stage, shape)]}`` for stages >= 2
        (:meth:`stage_views` times the batch)."""
        counts: dict[tuple[int, int], list[int]] = {}
        for per_shape in self.stage_views(latent_sizes)[1:]:
            for shape, views in per_shape.items():
                counts.setdefault(shape, []).append(views * batch)
        return counts

    def view_batch_groups(self, latent_sizes: list[tuple[int, int]],
                          batch: int) -> list[tuple[tuple[int, ...], dict[tuple[int, int],
                                                                          list[int]]]]:
        """Stage 1's batch shape, and one for the views of all later stages (:meth:`generate`)."""
        later = tuple(range(2, len(latent_sizes) + 1))
        return [((1,), {latent_sizes[0]: [batch]}),
                (later, self.view_counts(latent_sizes, batch))]

    def base_stage(self, run: Run, sizes: list[tuple[int, int]], size: tuple[int, int],
                   batch_sizes: dict[tuple[int, int], int]) -> torch.Tensor:
        """Stage 1: ordinary sampling at the base size, or the caller's ``image`` encoded at
        that size."""
        if run.image is not None:
            return image_latent(run, sizes[0])
        schedule = self.schedule_for(1, sizes, run.num_inference_steps, run.device)
        z = initial_latents(run, size, schedule.scheduler)
        return run_stage(run, 1, size, schedule, z, denoising_step(run, schedule, batch_sizes))

    def upscale_stage(self, run: Run, sizes: list[tuple[int, int]], stage: int,
                      z0: torch.Tensor, batch_sizes: dict[tuple[int, int], int]) -> torch.Tensor:
        """One stage ``s >= 2`` from its clean start ``z0``; returns the stage's clean latent."""
        size = tuple(z0.shape[2:])
        window = self.local_window(size)
        schedule = self.schedule_for(stage, sizes, run.num_inference_steps, run.device)
        main = schedule.scheduler
        kwargs = step_kwargs(main, run.generator, run.step_options)
        skip = SkipResidual(z0, randn(z0.shape, run.generator, run.device),
                            fidelity_exponent(self.cosine_scales[0], run.fidelity))
        # Jitter of every step, drawn before the loop (window_grid builds its grid on the host).
        starts = [ops.window_grid(size[0], size[1], window, self.stride, self.jitter,
                                  generator=run.generator, device=run.device)
                  for _ in range(len(schedule) if self.jitter else 1)]
        crops = [s.clamp(min=0).mul(self.adapter.vae_scale_factor)[:, None]
                 .expand(-1, run.batch, 2).reshape(-1, 2) for s in starts]
        controls = run.controls
        # The dilated views' control images do not change within the stage: cut once.
        dilated_control = None if controls is None else controls.dilated(size, stage)
        _, a2, a3 = self.cosine_scales
        dilation = stage
        kernel = 2 * dilation - 1
        pad_h, pad_w = -size[0] % dilation, -size[1] % dilation

        def step(state: StepState, zh: torch.Tensor) -> torch.Tensor:
            c = schedule.c[state.step]
            c2, c3 = c**a2, 0.99 * c**a3 + 0.01
            zin = main.scale_model_input(zh, state.timestep)
            jitter = state.step if self.jitter else 0
            local = ops.gather_windows(zin, starts[jitter], window)
            mean, std = global_stats(zin)
            blurred = ops.gaussian_blur2d(zin, self.sigma * c3, kernel_size=kernel)
            blurred = ops.match_stats(blurred, mean, std)
            if pad_h or pad_w:
                blurred = F.pad(blurred, (0, pad_w, 0, pad_h))
            dilated = ops.gather_dilated(blurred, dilation)
            local_control = (None if controls is None else
                             controls.windows(size, starts[jitter], window))
            eps_local, eps_global = run.engine(
                state.model_timestep, [ViewSet(local, crops[jitter], local_control),
                                       ViewSet(dilated, control=dilated_control)],
                batch_sizes, run.guidance)
            eps_local = ops.scatter_windows_mean(eps_local, starts[jitter], size)
            eps_global = ops.scatter_dilated(eps_global, dilation)
            if pad_h or pad_w:
                eps_global = eps_global[:, :, : size[0], : size[1]]
            return self.combine_step(schedule, state.step, eps_global, eps_local, c2, zh, kwargs)

        return run_stage(run, stage, size, schedule, None, step, skip=skip)

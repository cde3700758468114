"""DemoFusion (METHODS.md, "DemoFusion"; papers/demofusion.md): progressive upscaling, skip
residual and dilated sampling over MultiDiffusion, on any SD 1.5/2.x or SDXL pipeline and any of its
diffusers schedulers.

Per step of a stage ``s >= 2`` (latent ``z``, its clean upsampled start ``z0`` and one noise draw):

1. ``z'_t = add_noise(z0, noise, t)`` (formed on the fly), ``zh = c1 z'_t + (1 - c1) z``;
2. ``zin = scheduler.scale_model_input(zh, t)`` on the full latent;
3. local windows of ``zin`` (base latent size, stride, jitter) -> UNet -> overlap mean:
   ``eps_local``;
4. ``zin`` blurred (kernel ``2s - 1``, std ``sigma * c3``), renormalised to ``zin``'s mean/std,
   padded to multiples of ``s``, cut into ``s x s`` dilated views -> UNet -> put back:
   ``eps_global`` (scaling commutes with the blur and the renormalisation, so cutting the global
   views from ``zin`` instead of ``zh`` is the same);
5. ``eps = c2 eps_global + (1 - c2) eps_local`` and **one** ``scheduler.step(eps, t, zh)`` on the
   full latent (equal to the official per-view stepping for schedulers linear in
   ``(sample, eps)``, and correct for multistep ones).

All local and global views of a step (both CFG halves) go through the UNet together in batches of
a fixed shape per stage (:class:`hrkernels.samplers._core.UNetEngine`).

Multistep schedulers (DPM-Solver++, UniPC) keep their own history across the steps of a stage, as
in plain sampling. UniPC's corrector rebuilds each step's sample from the previous step's input, so
with UniPC the skip residual of a step reaches the trajectory through the next step's corrector.

Randomness, all from the one ``generator`` in this order: stage 1's initial noise; then per stage
``s >= 2``: the stage's noise ``[B, C, h, w]``, then the window jitter of every step of the stage
(one :func:`hrkernels.ops.window_grid` draw per step, drawn before the stage's loop); stochastic
schedulers (e.g. Euler with ``s_churn > 0``, DDIM with ``eta > 0``, SDE-DPM) draw their own noise
from the same generator inside each ``scheduler.step`` call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from hrkernels import ops
from hrkernels.samplers import _core
from hrkernels.samplers._core import (
    FiniteWatch,
    SamplerOutput,
    StageResult,
    StepCallback,
    UNetEngine,
    ViewSet,
)
from hrkernels.schedules import cosine_decay, stage_sizes


@dataclass
class StageSchedule:
    """Everything the step loop of one stage reads, precomputed on the host and the device.

    ``schedulers``: the stage's fresh scheduler(s) (``"main"``; APT adds ``"local"``);
    ``timesteps``: the scheduler's own timestep values (CPU 0-d tensors, for ``scheduler.step``);
    ``device_timesteps``: the same on the device (for the UNet); ``noise_scale``/``noise_sigma``:
    ``add_noise`` coefficients per step; ``c``: ``c(t)`` per step.
    """

    schedulers: dict[str, Any]
    timesteps: list[torch.Tensor]
    device_timesteps: torch.Tensor
    noise_scale: list[float]
    noise_sigma: list[float]
    c: list[float]

    @property
    def values(self) -> list[float | int]:
        return [t.item() for t in self.timesteps]


@dataclass
class _Run:
    """Per-call state shared by the stages."""

    cond: _core.Conditioning
    engine: UNetEngine
    base_batch: dict[tuple[int, int], int]
    view_batch: dict[tuple[int, int], int]
    generator: torch.Generator
    device: torch.device
    num_inference_steps: int
    callback: StepCallback | None
    progress: bool
    sizes: list[tuple[int, int]]

    @property
    def num_stages(self) -> int:
        return len(self.sizes)


class DemoFusion:
    """DemoFusion over a diffusers ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline``.

    Args:
        pipe: the pipeline; its text encoders, scheduler (any diffusers scheduler: DDIM, Euler,
            DPM-Solver++ multistep, UniPC, ...), UNet and VAE are used as they are.
        stride: MultiDiffusion window stride in latent pixels; None = half the window (the base
            latent size): 64 for SDXL (the paper's default), 32 for SD 1.5. ``1 <= stride <=``
            window.
        cosine_scales: ``(a1, a2, a3)``, the exponents of ``c(t)`` for the skip residual, the
            local/global fusion and the blur (default ``(3, 1, 1)``).
        sigma: standard deviation of the global views' Gaussian blur at the first step (decays
            with ``c3 = 0.99 c(t)^a3 + 0.01``), default 0.8.
        view_batch_size: views per UNet call (each view is two UNet rows with guidance), or
            ``"auto"``: as many as the free device memory allows (8 on a CPU). One batch size is
            chosen per view shape for the whole run, the last call of a step padded, so a compiled
            UNet sees one shape for stage 1 and one for the views of all later stages.

    Raises:
        TypeError: ``pipe`` is not a supported pipeline.
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

    def __init__(
        self,
        pipe: Any,
        *,
        stride: int | None = None,
        cosine_scales: Sequence[float] = (3, 1, 1),
        sigma: float = 0.8,
        view_batch_size: int | str = "auto",
    ) -> None:
        _core.check_pipeline(pipe, self.name)
        self.pipe = pipe
        self.window = _core.base_latent_size(pipe)
        if stride is None:
            stride = max(1, self.window // 2)
        if (isinstance(stride, bool) or not isinstance(stride, int)
                or not 1 <= stride <= self.window):
            raise ValueError(f"stride must be an int in [1, {self.window}] (the window, i.e. the "
                             f"base latent size, in latent pixels); got {stride!r}")
        self.stride = stride
        self.jitter = max(0, (self.window - stride) // 4)
        scales = tuple(cosine_scales)
        if len(scales) != 3 or not all(isinstance(a, (int, float)) and a >= 0 for a in scales):
            raise ValueError(f"cosine_scales must be three numbers >= 0; got {cosine_scales!r}")
        self.cosine_scales = tuple(float(a) for a in scales)
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma > 0:
            raise ValueError(f"sigma must be a number > 0; got {sigma!r}")
        self.sigma = float(sigma)
        self.view_batch_size = _core.check_view_batch_size(view_batch_size)
        self.scale_factor = _core.vae_scale_factor(pipe)

    # ----------------------------------------------------------------------------------------------
    # Hooks that APT overrides
    # ----------------------------------------------------------------------------------------------

    def _scheduler_class(self) -> type | None:
        """The scheduler class to sample with (None: the pipeline's own)."""
        return None

    def _start_index(self, stage: int, num_inference_steps: int) -> int:
        """Index into the timestep list where a stage's loop starts (0: all steps)."""
        return 0

    def _prepare_stage_latent(self, z0: torch.Tensor, stage: int, reference: Any) -> torch.Tensor:
        """The clean start of stage ``stage`` from the previous stage's upsampled result
        (``reference``: the stage-1 latent)."""
        return z0

    def _stage_schedule(self, stage: int, run: _Run) -> StageSchedule:
        template = self.pipe.scheduler
        cls = self._scheduler_class()
        steps = run.num_inference_steps
        start = self._start_index(stage, steps)
        main = _core.fresh_scheduler(template, steps, begin_index=start, scheduler_class=cls)
        return self._schedule_from(stage, run, {"main": main}, main, start, {})

    def _schedule_from(self, stage: int, run: _Run, schedulers: dict[str, Any], main: Any,
                       start: int, noise_overrides: dict[str, Any]) -> StageSchedule:
        timesteps = main.timesteps[start:]
        scale, sigma = _core.noising_coefficients(
            self.pipe.scheduler, run.num_inference_steps, timesteps,
            scheduler_class=self._scheduler_class() or type(main), **noise_overrides)
        total = main.config.num_train_timesteps
        return StageSchedule(
            schedulers=schedulers,
            timesteps=list(timesteps),
            device_timesteps=timesteps.to(run.device, torch.float32),
            noise_scale=scale,
            noise_sigma=sigma,
            c=[cosine_decay(float(t), total, 1.0) for t in timesteps],
        )

    def _fused_step(self, schedule: StageSchedule, step: int, eps_global: torch.Tensor,
                    eps_local: torch.Tensor, c2: float, zh: torch.Tensor,
                    kwargs: dict[str, Any]) -> torch.Tensor:
        """``scheduler.step(c2 eps_global + (1 - c2) eps_local, t, zh)``: one step on the full
        latent."""
        eps = eps_global.mul(c2).add_(eps_local, alpha=1.0 - c2)
        main = schedule.schedulers["main"]
        return main.step(eps, schedule.timesteps[step], zh, return_dict=False, **kwargs)[0]

    # ----------------------------------------------------------------------------------------------
    # The call
    # ----------------------------------------------------------------------------------------------

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
            num_inference_steps: steps per stage (default 50).
            guidance_scale: classifier-free guidance ``w`` (default 7.5; ``<= 1`` disables CFG).
            generator: the one source of randomness (see the module docstring for the order of
                draws); None: a generator seeded from torch's global RNG.
            output_type: ``"pil"`` | ``"pt"`` | ``"np"`` | ``"latent"``.
            decode_stages: also decode every stage's result into ``stages[i].images``.
            callback_on_step_end: ``f(stage, step, timestep, latents)`` after every step (stage
                1-based, step 0-based within the stage); may return new latents.
            progress: show a tqdm bar per stage.

        Returns:
            :class:`~hrkernels.samplers.SamplerOutput`.

        Raises:
            ValueError: bad sizes, steps, prompts or output type.
            NonFiniteLatentsError: NaN/inf appeared in the latents (names stage and step).
        """
        pipe = self.pipe
        f = self.scale_factor
        sizes = stage_sizes(height, width, self.window * f, f)
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) \
                or num_inference_steps < 1:
            raise ValueError("num_inference_steps must be an int >= 1; got "
                             f"{num_inference_steps!r}")
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)):
            raise ValueError(f"guidance_scale must be a number; got {guidance_scale!r}")
        _core.check_output_type(output_type)
        self._check_call(len(sizes), num_inference_steps)
        device = pipe._execution_device
        generator = _core.resolve_generator(generator, device)
        guided = guidance_scale > 1
        cond = _core.encode_prompts(
            pipe, sampler=self.name, device=device, guided=guided,
            size=(height, width) if _core.is_sdxl(pipe) else None,
            prompt=prompt, prompt_2=prompt_2, negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            num_images_per_prompt=num_images_per_prompt,
        )
        latent_sizes = [(h // f, w // f) for h, w in sizes]
        # Stage 1 and the later stages get their own batch shapes (stage 1 has B views only).
        plan = [{latent_sizes[0]: [cond.batch]}, self._shape_counts(latent_sizes, cond.batch)]
        batch_sizes = [_core.plan_view_batches(counts, self.view_batch_size, pipe.unet, guided,
                                               device) for counts in plan]
        run = _Run(cond=cond, engine=UNetEngine(pipe, cond, guidance_scale),
                   base_batch=batch_sizes[0], view_batch=batch_sizes[1],
                   generator=generator, device=device, num_inference_steps=num_inference_steps,
                   callback=callback_on_step_end, progress=progress, sizes=sizes)

        z0 = self._base_stage(run, latent_sizes[0])
        reference = _core.global_stats(z0)
        stages = [StageResult(1, *sizes[0], z0)]
        for stage in range(2, len(sizes) + 1):
            upsampled = F.interpolate(z0, size=latent_sizes[stage - 1], mode="bicubic",
                                      align_corners=False)
            start = self._prepare_stage_latent(upsampled, stage, stages[0].latents)
            z0 = self._upscale_stage(run, stage, start)
            z0 = ops.match_stats(z0, reference[0], reference[1])
            stages.append(StageResult(stage, *sizes[stage - 1], z0))

        if decode_stages:
            for result in stages:
                result.images = _core.decode(pipe, result.latents, output_type)
            images = stages[-1].images
        else:
            images = _core.decode(pipe, z0, output_type)
        return SamplerOutput(images=images, stages=stages, latents=z0,
                             unet_calls=dict(run.engine.calls))

    def _check_call(self, num_stages: int, num_inference_steps: int) -> None:
        """Method-specific checks of a call (APT: per-stage etas)."""

    # ----------------------------------------------------------------------------------------------
    # Stages
    # ----------------------------------------------------------------------------------------------

    def _window(self, size: tuple[int, int]) -> tuple[int, int]:
        """The local window on a latent of ``size``: the base latent size, clamped per axis."""
        return min(self.window, size[0]), min(self.window, size[1])

    def _shape_counts(self, latent_sizes: list[tuple[int, int]],
                      batch: int) -> dict[tuple[int, int], list[int]]:
        """``{view shape: [view rows per step, one entry per (stage, shape)]}`` for stages >= 2."""
        counts: dict[tuple[int, int], list[int]] = {}
        for stage, size in enumerate(latent_sizes[1:], start=2):
            window = self._window(size)
            local = ops.window_grid(size[0], size[1], window, self.stride).shape[0] * batch
            dilated = (-(-size[0] // stage), -(-size[1] // stage))
            per_shape = {window: local}
            per_shape[dilated] = per_shape.get(dilated, 0) + stage * stage * batch
            for shape, rows in per_shape.items():
                counts.setdefault(shape, []).append(rows)
        return counts

    def _base_stage(self, run: _Run, size: tuple[int, int]) -> torch.Tensor:
        """Stage 1: ordinary sampling at about the base size."""
        schedule = self._stage_schedule(1, run)
        scheduler = schedule.schedulers["main"]
        kwargs = _core.step_kwargs(scheduler, run.generator)
        channels = self.pipe.unet.config.in_channels
        noise = _core.randn((run.cond.batch, channels, *size), run.generator, run.device)
        z = noise * float(scheduler.init_noise_sigma)
        values = schedule.values
        watch = FiniteWatch(self.name, 1, values, run.device)
        bar = _core.progress_bar(len(values), self._bar_label(1, run, size), run.progress)
        for step, timestep in enumerate(schedule.timesteps):
            zin = scheduler.scale_model_input(z, timestep)
            (eps,) = run.engine(schedule.device_timesteps[step], [ViewSet(zin)], run.base_batch)
            z = scheduler.step(eps, timestep, z, return_dict=False, **kwargs)[0]
            watch.record(step, z)
            z = _core.run_callback(run.callback, 1, step, values[step], z)
            bar.update()
        bar.close()
        watch.check()
        return z

    def _bar_label(self, stage: int, run: _Run, size: tuple[int, int]) -> str:
        f = self.scale_factor
        return f"{self.name} stage {stage}/{run.num_stages} ({size[0] * f}x{size[1] * f})"

    def _upscale_stage(self, run: _Run, stage: int, z0: torch.Tensor) -> torch.Tensor:
        """One stage ``s >= 2`` from its clean start ``z0``; returns the stage's clean latent."""
        size = tuple(z0.shape[2:])
        window = self._window(size)
        schedule = self._stage_schedule(stage, run)
        main = schedule.schedulers["main"]
        kwargs = _core.step_kwargs(main, run.generator)
        noise = _core.randn(z0.shape, run.generator, run.device)
        steps = len(schedule.timesteps)
        # Jitter of every step, drawn before the loop (window_grid builds its grid on the host).
        starts = [ops.window_grid(size[0], size[1], window, self.stride, self.jitter,
                                  generator=run.generator, device=run.device)
                  for _ in range(steps if self.jitter else 1)]
        batch = run.cond.batch
        crops = [s.clamp(min=0).mul(self.scale_factor)[:, None].expand(-1, batch, 2).reshape(-1, 2)
                 for s in starts]
        a1, a2, a3 = self.cosine_scales
        kernel = 2 * stage - 1
        pad_h, pad_w = -size[0] % stage, -size[1] % stage
        values = schedule.values
        watch = FiniteWatch(self.name, stage, values, run.device)
        bar = _core.progress_bar(steps, self._bar_label(stage, run, size), run.progress)
        z = None
        for step in range(steps):
            c = schedule.c[step]
            c1, c2, c3 = c**a1, c**a2, 0.99 * c**a3 + 0.01
            noised = z0 * schedule.noise_scale[step] + noise * schedule.noise_sigma[step]
            zh = noised if z is None else noised.mul_(c1).add_(z, alpha=1.0 - c1)
            zin = main.scale_model_input(zh, schedule.timesteps[step])
            step_starts = starts[step if self.jitter else 0]
            local = ops.gather_windows(zin, step_starts, window)
            mean, std = _core.global_stats(zin)
            blurred = ops.gaussian_blur2d(zin, self.sigma * c3, kernel_size=kernel)
            blurred = ops.match_stats(blurred, mean, std)
            if pad_h or pad_w:
                blurred = F.pad(blurred, (0, pad_w, 0, pad_h))
            dilated = ops.gather_dilated(blurred, stage)
            eps_local, eps_global = run.engine(
                schedule.device_timesteps[step],
                [ViewSet(local, crops[step if self.jitter else 0]), ViewSet(dilated)],
                run.view_batch)
            eps_local = ops.scatter_windows_mean(eps_local, step_starts, size)
            eps_global = ops.scatter_dilated(eps_global, stage)
            if pad_h or pad_w:
                eps_global = eps_global[:, :, : size[0], : size[1]]
            z = self._fused_step(schedule, step, eps_global, eps_local, c2, zh, kwargs)
            watch.record(step, z)
            z = _core.run_callback(run.callback, stage, step, values[step], z)
            bar.update()
        bar.close()
        watch.check()
        return z

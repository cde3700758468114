"""APT, Adaptive Path Tracing, applied to DemoFusion (METHODS.md, "APT"; papers/apt.md,
Algorithm 1).

What changes from :class:`~hrkernels.samplers.DemoFusion`:

* **Sampler**: DDIM with eta = 0 (the paper's), built from the pipeline's scheduler config, for
  every stage.
* **Statistical matching**: after the bicubic upsampling to stage ``s``, each of the ``s_h x s_w``
  dilated sub-lattices of the latent (the stage's latent size over the base latent size, rounded
  half up) is renormalised to the mean/std of the stage-1 latent
  (:func:`hrkernels.ops.match_stats`; per channel with ``per_channel=True``).
* **Scale-aware scheduling**: stage ``s`` has a second DDIM scheduler whose betas are
  :func:`hrkernels.schedules.scale_aware_betas` at ``eta_s``. The local (MultiDiffusion) path steps
  with it, the dilated (global) path with the original one, both from the same ``zh``:
  ``z_{t-1} = c2 step_orig(eps_global, t, zh) + (1 - c2) step_eta(eps_local, t, zh)``; the stage's
  forward noising ``z'_t`` uses the ``eta_s`` schedule.
* **Shortcut**: stages ``>= 2`` run only the last ``shortcut_steps`` timesteps of the schedule,
  starting from ``z'_t`` at the first of them.

Randomness: as DemoFusion (DDIM with eta = 0 draws nothing in its steps).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler

from hrkernels import ops
from hrkernels.samplers import _core
from hrkernels.samplers.demofusion import DemoFusion, StageSchedule, _Run
from hrkernels.schedules import apt_default_eta, scale_aware_betas, sublattice_factor


class APT(DemoFusion):
    """APT over DemoFusion, for ``StableDiffusionPipeline`` and ``StableDiffusionXLPipeline``.

    Args:
        pipe: the pipeline (its scheduler's config supplies ``beta_start``, ``beta_end``,
            timestep spacing; the sampling itself is DDIM, eta = 0).
        eta: the scale-aware exponent of each stage ``s >= 2``: None (default) picks it from the
            stage's upscale factor (:func:`hrkernels.schedules.apt_default_eta`: x2 -> 2,
            x1.5 -> 3, x4/3 -> 3.5); a number uses it for every stage; a sequence gives one per
            stage ``2..S`` (its length must be ``S - 1``).
        shortcut_steps: ``T0``: stages ``>= 2`` run the last ``T0`` of the ``num_inference_steps``
            timesteps (default 30 of 50); None runs them all.
        per_channel: statistical matching per latent channel instead of over all channels.
        stride, cosine_scales, sigma, view_batch_size: as :class:`DemoFusion`.

    Example::

        >>> out = APT(pipe)(prompt="a castle", height=2048, width=2048,
        ...                 generator=torch.Generator("cuda").manual_seed(0))
    """

    name = "APT"

    def __init__(
        self,
        pipe: Any,
        *,
        eta: float | Sequence[float] | None = None,
        shortcut_steps: int | None = 30,
        per_channel: bool = False,
        stride: int | None = None,
        cosine_scales: Sequence[float] = (3, 1, 1),
        sigma: float = 0.8,
        view_batch_size: int | str = "auto",
    ) -> None:
        super().__init__(pipe, stride=stride, cosine_scales=cosine_scales, sigma=sigma,
                         view_batch_size=view_batch_size)
        if eta is not None:
            values = list(eta) if isinstance(eta, Sequence) else [eta]
            if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                     and v > 0 for v in values):
                raise ValueError(f"eta must be None, a number > 0 or a sequence of numbers > 0; "
                                 f"got {eta!r}")
        self.eta = eta
        if shortcut_steps is not None and (isinstance(shortcut_steps, bool)
                                           or not isinstance(shortcut_steps, int)
                                           or shortcut_steps < 1):
            raise ValueError(f"shortcut_steps must be None or an int >= 1; got {shortcut_steps!r}")
        self.shortcut_steps = shortcut_steps
        if not isinstance(per_channel, bool):
            raise ValueError(f"per_channel must be a bool; got {per_channel!r}")
        self.per_channel = per_channel
        config = pipe.scheduler.config
        for key in ("beta_start", "beta_end", "num_train_timesteps"):
            if key not in config:
                raise TypeError(f"APT needs a scheduler config with {key} (scale-aware betas); "
                                f"{type(pipe.scheduler).__name__} has none")

    def _check_call(self, num_stages: int, num_inference_steps: int) -> None:
        if isinstance(self.eta, Sequence) and len(self.eta) != num_stages - 1:
            raise ValueError(f"eta has {len(self.eta)} values but this size has {num_stages} "
                             f"stages, so {num_stages - 1} upscaling stages (one eta each)")

    def stage_eta(self, stage: int, sizes: Sequence[tuple[int, int]]) -> float:
        """``eta_s`` of stage ``stage >= 2`` for the stage sizes ``sizes`` (pixels)."""
        if self.eta is None:
            return apt_default_eta(max(sizes[stage - 1]) / max(sizes[stage - 2]))
        if isinstance(self.eta, Sequence):
            return float(self.eta[stage - 2])
        return float(self.eta)

    def _scheduler_class(self) -> type:
        return DDIMScheduler

    def _start_index(self, stage: int, num_inference_steps: int) -> int:
        if stage == 1 or self.shortcut_steps is None:
            return 0
        return max(0, num_inference_steps - self.shortcut_steps)

    def _prepare_stage_latent(self, z0: torch.Tensor, stage: int, reference: Any) -> torch.Tensor:
        """Statistical matching of the upsampled latent ``z0`` to the stage-1 latent ``reference``.

        When a side of ``z0`` does not divide by its lattice factor (sizes that are not multiples of
        the base size), ``z0`` is padded by replicating its last rows/columns, matched and cropped:
        the sub-lattices holding the copies then match the reference up to those few duplicates.
        """
        mean, std = _core.global_stats(reference, per_channel=self.per_channel)
        height, width = z0.shape[2:]
        factor = sublattice_factor((height, width), self.window)
        pad_h, pad_w = -height % factor[0], -width % factor[1]
        padded = F.pad(z0, (0, pad_w, 0, pad_h), mode="replicate") if pad_h or pad_w else z0
        matched = ops.match_stats(padded, mean, std, factor=factor, per_channel=self.per_channel)
        return matched[:, :, :height, :width]

    def _stage_schedule(self, stage: int, run: _Run) -> StageSchedule:
        template, steps = self.pipe.scheduler, run.num_inference_steps
        main = _core.fresh_scheduler(template, steps, begin_index=None,
                                     scheduler_class=DDIMScheduler)
        if stage == 1:
            return self._schedule_from(stage, run, {"main": main}, main, 0, {})
        config = template.config
        eta = self.stage_eta(stage, run.sizes)
        betas = scale_aware_betas(config.beta_start, config.beta_end, eta,
                                  config.num_train_timesteps).tolist()
        local = _core.fresh_scheduler(template, steps, begin_index=None,
                                      scheduler_class=DDIMScheduler, trained_betas=betas)
        start = self._start_index(stage, steps)
        return self._schedule_from(stage, run, {"main": main, "local": local}, main, start,
                                   {"trained_betas": betas})

    def _fused_step(self, schedule: StageSchedule, step: int, eps_global: torch.Tensor,
                    eps_local: torch.Tensor, c2: float, zh: torch.Tensor,
                    kwargs: dict[str, Any]) -> torch.Tensor:
        """``c2 step_orig(eps_global, t, zh) + (1 - c2) step_eta(eps_local, t, zh)``."""
        timestep = schedule.timesteps[step]
        main, local = schedule.schedulers["main"], schedule.schedulers["local"]
        stepped_global = main.step(eps_global, timestep, zh, return_dict=False, **kwargs)[0]
        stepped_local = local.step(eps_local, timestep, zh, return_dict=False, **kwargs)[0]
        return stepped_global.mul_(c2).add_(stepped_local, alpha=1.0 - c2)

"""APT, Adaptive Path Tracing, applied to DemoFusion (docs/METHODS.md, "APT"; the paper's
Algorithm 1).

What changes from :class:`~hrkernels.samplers.DemoFusion`:

* **Sampler**: DDIM with eta = 0 (the paper's), built from the pipeline's scheduler config (with
  ``clip_sample=False``, whatever that config says), for every stage; ``scheduler=`` picks another
  class (one that keeps its input sample and takes ``trained_betas``), used for both paths.
* **Statistical matching**: after the bicubic upsampling to stage ``s``, each of the ``s_h x s_w``
  dilated sub-lattices of the latent (the stage's latent size over the base latent size, rounded
  half up: :func:`hrkernels.schedules.sublattice_factor`) is renormalised to the mean/std of the
  stage-1 latent (:func:`hrkernels.ops.match_stats`; per channel with ``per_channel=True``).
* **Scale-aware scheduling**: stage ``s`` has a second DDIM scheduler whose betas are
  :func:`hrkernels.schedules.scale_aware_betas` at the scale-aware exponent ``eta_s``. The local
  (MultiDiffusion) path steps with it, the dilated (global) path with the original one, both from
  the same ``zh``: ``z_{t-1} = c2 step_orig(eps_global, t, zh) + (1 - c2) step_eta(eps_local, t,
  zh)``; the stage's forward noising ``z'_t`` uses the ``eta_s`` schedule.
* **Shortcut**: stages ``>= 2`` run only the last ``shortcut_steps`` timesteps of the schedule,
  starting from ``z'_t`` at the first of them.

Randomness: as DemoFusion (DDIM with eta = 0 draws nothing in its steps).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler

from hrkernels import ops
from hrkernels._validate import check_bool, check_int, check_real, check_reals
from hrkernels.samplers.demofusion import DemoFusion
from hrkernels.samplers.engine import Executor
from hrkernels.samplers.schedulers import fresh_scheduler
from hrkernels.samplers.stages import StageSchedule, global_stats, stage_schedule
from hrkernels.schedules import apt_default_eta, scale_aware_betas, sublattice_factor

__all__ = ["APT"]

_UNSET = object()

# Step options that make a scheduler's step draw noise (DDIM's eta, Euler's s_churn).
_STOCHASTIC_OPTIONS = ("eta", "s_churn")


class APT(DemoFusion):
    """APT over DemoFusion, for ``StableDiffusionPipeline`` and ``StableDiffusionXLPipeline``.

    Args:
        pipe: the pipeline (its scheduler's config supplies ``beta_start``, ``beta_end``,
            timestep spacing; the sampling itself is DDIM, eta = 0, unless ``scheduler`` says
            otherwise).
        scale_aware_eta: the scale-aware exponent ``eta_s`` of each stage ``s >= 2`` (the
            paper's eta; not DDIM's): None (default) picks it from the stage's upscale factor
            (:func:`hrkernels.schedules.apt_default_eta`: x2 -> 2, x1.5 -> 3, x4/3 -> 3.5); a
            number uses it for every stage; a sequence gives one per stage ``2..S`` (its length
            must be ``S - 1``).
        shortcut_steps: ``T0``: stages ``>= 2`` run the last ``T0`` of the ``num_inference_steps``
            timesteps (default 30 of 50); None runs them all.
        per_channel: statistical matching per latent channel instead of over all channels.
        scheduler: a scheduler class to sample with instead of DDIM (the paper's), or an instance
            (built from its own config); both paths' schedulers are built from it, the
            scale-aware one with ``trained_betas``, so the class must take ``trained_betas`` and
            keep its input sample (DDIM, Euler, DPM-Solver++ multistep, ...). Its steps must be
            deterministic (no DDIM ``eta`` > 0 or Euler ``s_churn`` > 0): the two paths step
            from one sample.
        stride, cosine_scales, sigma, view_batch_size, executor, parallel: as
            :class:`DemoFusion`.
        eta: the former name of ``scale_aware_eta`` (deprecated: it is easily confused with
            DDIM's eta).

    ``image``, ``fidelity`` and the ControlNet views: as :class:`DemoFusion` (``image`` replaces
    the first stage's result; ``fidelity`` sets the skip residual's exponent ``a1``).

    Example::

        >>> out = APT(pipe)(prompt="a castle", height=2048, width=2048,
        ...                 generator=torch.Generator("cuda").manual_seed(0))
    """

    name = "APT"
    default_scheduler = DDIMScheduler

    def __init__(
        self,
        pipe: Any,
        *,
        scale_aware_eta: float | Sequence[float] | None = None,
        shortcut_steps: int | None = 30,
        per_channel: bool = False,
        stride: int | None = None,
        cosine_scales: Sequence[float] = (3, 1, 1),
        sigma: float = 0.8,
        view_batch_size: int | str = "auto",
        scheduler: Any = None,
        executor: Executor | None = None,
        parallel: str | None = None,
        eta: Any = _UNSET,
    ) -> None:
        super().__init__(pipe, stride=stride, cosine_scales=cosine_scales, sigma=sigma,
                         view_batch_size=view_batch_size, scheduler=scheduler, executor=executor,
                         parallel=parallel)
        if eta is not _UNSET:
            warnings.warn("APT(eta=...) is renamed APT(scale_aware_eta=...) (it is the paper's "
                          "scale-aware exponent, not DDIM's eta)", FutureWarning, stacklevel=2)
            if scale_aware_eta is not None:
                raise ValueError("pass scale_aware_eta only (eta is its deprecated name)")
            scale_aware_eta = eta
        if isinstance(scale_aware_eta, Sequence) and not isinstance(scale_aware_eta, str):
            if not scale_aware_eta:
                raise ValueError("scale_aware_eta must not be an empty sequence")
            scale_aware_eta = check_reals(scale_aware_eta, "scale_aware_eta", greater_than=0)
        elif scale_aware_eta is not None:
            scale_aware_eta = check_real(scale_aware_eta, "scale_aware_eta", greater_than=0)
        self.scale_aware_eta = scale_aware_eta
        self.shortcut_steps = (None if shortcut_steps is None
                               else check_int(shortcut_steps, "shortcut_steps", minimum=1))
        self.per_channel = check_bool(per_channel, "per_channel")
        config = self.scheduler_template.config
        for key in ("beta_start", "beta_end", "num_train_timesteps"):
            if key not in config:
                raise TypeError(f"APT needs a scheduler config with {key} (scale-aware betas); "
                                f"{type(self.scheduler_template).__name__} has none")
        if self.scheduler is not None and "trained_betas" not in inspect.signature(
                self.scheduler.__init__).parameters:
            raise TypeError(f"APT: scheduler {self.scheduler.__name__} cannot take trained_betas "
                            "(the scale-aware schedule); use DDIMScheduler (the paper's), "
                            "EulerDiscreteScheduler or DPMSolverMultistepScheduler")
        etas = scale_aware_eta if isinstance(scale_aware_eta, tuple) else (scale_aware_eta,)
        for eta_s in etas:
            if eta_s is not None:
                self.scale_aware_betas(eta_s, "scale_aware_eta")

    def scale_aware_betas(self, eta_s: float, name: str = "eta_s") -> list[float]:
        """The scale-aware beta table at ``eta_s`` for the scheduler config (``name``: the
        argument messages name).

        Raises:
            ValueError: ``eta_s`` out of what float32 can hold
                (:func:`hrkernels.schedules.scale_aware_betas`).
        """
        config = self.scheduler_template.config
        try:
            betas = scale_aware_betas(config.beta_start, config.beta_end, eta_s,
                                      config.num_train_timesteps)
        except ValueError as error:
            raise ValueError(f"{name}: {error}") from None
        return betas.tolist()

    def check_call(self, sizes: list[tuple[int, int]], num_inference_steps: int,
                   step_options: dict[str, Any], **method_options: Any) -> None:
        for option in _STOCHASTIC_OPTIONS:
            if step_options.get(option, 0) != 0:
                raise ValueError(f"APT's steps must be deterministic (the paper's DDIM eta = 0): "
                                 f"step_options {option}={step_options[option]!r} is not "
                                 "supported (the two paths' stochastic steps would draw "
                                 "independent noise)")
        eta = self.scale_aware_eta
        if isinstance(eta, Sequence) and len(eta) != len(sizes) - 1:
            raise ValueError(f"scale_aware_eta has {len(eta)} values but this size has "
                             f"{len(sizes)} stages, so {len(sizes) - 1} upscaling stages (one "
                             "eta each)")

    def stage_eta(self, stage: int, sizes: Sequence[tuple[int, int]]) -> float:
        """``eta_s`` (the scale-aware exponent) of stage ``stage >= 2`` for the stage sizes
        ``sizes`` (pixels)."""
        eta = self.scale_aware_eta
        if eta is None:
            return apt_default_eta(max(sizes[stage - 1]) / max(sizes[stage - 2]))
        if isinstance(eta, Sequence):
            return float(eta[stage - 2])
        return float(eta)

    def start_index(self, stage: int, num_inference_steps: int) -> int:
        if stage == 1 or self.shortcut_steps is None:
            return 0
        return max(0, num_inference_steps - self.shortcut_steps)

    def prepare_stage_latent(self, z0: torch.Tensor, stage: int,
                             reference: torch.Tensor) -> torch.Tensor:
        """Statistical matching of the upsampled latent ``z0`` to the stage-1 latent ``reference``.

        When a side of ``z0`` does not divide by its lattice factor (sizes that are not multiples of
        the base size), ``z0`` is padded by replicating its last rows/columns, matched and cropped:
        the sub-lattices holding the copies then match the reference up to those few duplicates.
        """
        mean, std = global_stats(reference, per_channel=self.per_channel)
        height, width = z0.shape[2:]
        factor = sublattice_factor((height, width), self.adapter.base_latent_size)
        pad_h, pad_w = -height % factor[0], -width % factor[1]
        padded = F.pad(z0, (0, pad_w, 0, pad_h), mode="replicate") if pad_h or pad_w else z0
        matched = ops.match_stats(padded, mean, std, factor=factor, per_channel=self.per_channel)
        return matched[:, :, :height, :width]

    def schedule_for(self, stage: int, sizes: list[tuple[int, int]], num_inference_steps: int,
                     device: torch.device) -> StageSchedule:
        """The sampling scheduler (DDIM by default); stages >= 2 add the local path's scale-aware
        one (``"local"``), start at the shortcut and noise with the scale-aware table."""
        template, steps, cls = self.scheduler_template, num_inference_steps, self.scheduler_class()
        if stage == 1:
            return stage_schedule(template, steps, device, scheduler_class=cls,
                                  set_begin_index=False)
        betas = self.scale_aware_betas(self.stage_eta(stage, sizes))
        local = fresh_scheduler(template, steps, begin_index=None, scheduler_class=cls,
                                trained_betas=betas)
        return stage_schedule(template, steps, device, scheduler_class=cls,
                              start=self.start_index(stage, steps), noised=True,
                              noise_overrides={"trained_betas": betas}, extra={"local": local},
                              set_begin_index=False)

    def combine_step(self, schedule: StageSchedule, step: int, eps_global: torch.Tensor,
                     eps_local: torch.Tensor, c2: float, zh: torch.Tensor,
                     kwargs: dict[str, Any]) -> torch.Tensor:
        """``c2 step_orig(eps_global, t, zh) + (1 - c2) step_eta(eps_local, t, zh)``."""
        timestep = schedule.timesteps[step]
        main, local = schedule.scheduler, schedule.schedulers["local"]
        stepped_global = main.step(eps_global, timestep, zh, return_dict=False, **kwargs)[0]
        stepped_local = local.step(eps_local, timestep, zh, return_dict=False, **kwargs)[0]
        return stepped_global.mul_(c2).add_(stepped_local, alpha=1.0 - c2)

"""The stage loop every sampler runs, and what it reads.

* :class:`StageSchedule` -- a stage's fresh scheduler(s), the step indices it runs (a stage may
  start late, APT's shortcut, and stop early, MegaFusion's truncation), their timesteps on the host
  and the device, ``c(t)`` and the ``add_noise`` coefficients, all precomputed;
  :func:`stage_schedule` builds one.
* :class:`SkipResidual` -- ``zh = c^alpha z'_t + (1 - c^alpha) z_t`` with ``z'_t`` the stage's clean
  start noised to step ``t`` (DemoFusion, APT, FreeScale).
* :func:`run_stage` -- the loop: per step, ``set_step`` on a patched model, the skip residual, the
  method's step function, the non-finite watch, the callback and the progress bar.
* :class:`Run` -- what one sampler call shares across its stages (adapter, engine, generator,
  guidance, step options, callback, progress, the input image and ControlNet conditioning).
* :func:`image_latent` -- the caller's ``image=`` encoded at a stage's size;
  :func:`fidelity_exponent` -- ``fidelity`` as a skip-residual exponent.
* Between stages: :func:`relay` (a latent through pixels to another size: FreeScale, MegaFusion)
  and :func:`stage_patches` (a stage's specs active in a configuration of the sampler's own).

Randomness comes only from the call's generator (:func:`randn`, :func:`resolve_generator`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from hrkernels import patching
from hrkernels._validate import check_int
from hrkernels.patching import is_patched, set_step
from hrkernels.samplers.engine import Engine, Guidance, ViewSet
from hrkernels.samplers.inputs import ControlInputs, batch_rows, resize_pixels
from hrkernels.samplers.outputs import NonFiniteLatentsError
from hrkernels.samplers.pipelines import PipelineAdapter
from hrkernels.samplers.schedulers import fresh_scheduler, noising_coefficients, step_kwargs
from hrkernels.schedules import cosine_decay

__all__ = [
    "FiniteWatch",
    "Run",
    "SkipResidual",
    "denoising_step",
    "fidelity_exponent",
    "fidelity_start",
    "image_latent",
    "initial_latents",
    "StageSchedule",
    "StepCallback",
    "StepState",
    "global_stats",
    "randn",
    "relay",
    "relay_resize",
    "relay_vae_calls",
    "resolve_generator",
    "run_stage",
    "stage_patches",
    "stage_schedule",
]

StepCallback = Callable[[int, int, Any, torch.Tensor], Any]


# --------------------------------------------------------------------------------------------------
# Randomness and statistics
# --------------------------------------------------------------------------------------------------


def resolve_generator(generator: torch.Generator | None, device: torch.device) -> torch.Generator:
    """The caller's generator, or a new one on ``device`` seeded from torch's global CPU RNG (so
    ``torch.manual_seed`` before the call makes a run reproducible)."""
    if generator is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
        return torch.Generator(device=device).manual_seed(seed)
    if not isinstance(generator, torch.Generator):
        raise TypeError("generator must be one torch.Generator (lists of generators are not "
                        f"supported); got {type(generator).__name__}")
    return generator


def randn(shape: Sequence[int], generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Standard normal float32 noise drawn on the generator's device, then moved to ``device``."""
    noise = torch.randn(tuple(shape), generator=generator, device=generator.device,
                        dtype=torch.float32)
    return noise.to(device)


def global_stats(x: torch.Tensor, per_channel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std (``torch.std``'s default correction) of each image ``[B]`` (or of each image's
    channels ``[B, C]``), in float32."""
    x = x.float()
    flat = x.flatten(2) if per_channel else x.flatten(1)
    return flat.mean(dim=-1), flat.std(dim=-1)


# --------------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------------


@dataclass
class StageSchedule:
    """Everything the step loop of one stage reads, precomputed on the host and the device.

    Attributes:
        schedulers: the stage's fresh scheduler(s) by role: ``"main"`` (the one whose
            ``scale_model_input`` and ``step`` the loop uses; APT adds ``"local"``).
        indices: the step indices the stage runs, into the scheduler's timestep list (global: 0 is
            the noisiest step of ``num_inference_steps``).
        timesteps: the scheduler's timestep of each of those steps (CPU 0-d tensors, for
            ``scheduler.step``); ``device_timesteps``: the same on the device (for the model).
        c: ``c(t)`` (cosine decay, alpha 1) of each step.
        noise_scale, noise_sigma: ``add_noise(z0, noise, t_i) = scale_i z0 + sigma_i noise`` of
            each step (empty when the stage noises nothing).
    """

    schedulers: dict[str, Any]
    indices: range
    timesteps: list[torch.Tensor]
    device_timesteps: torch.Tensor
    c: list[float]
    noise_scale: list[float] = field(default_factory=list)
    noise_sigma: list[float] = field(default_factory=list)

    @property
    def scheduler(self) -> Any:
        return self.schedulers["main"]

    @property
    def values(self) -> list[float | int]:
        """The timesteps as Python numbers (callbacks, messages)."""
        return [t.item() for t in self.timesteps]

    def __len__(self) -> int:
        return len(self.indices)


def stage_schedule(template: Any, num_inference_steps: int, device: torch.device, *,
                   scheduler_class: type | None = None, start: int = 0, end: int | None = None,
                   noised: bool = False, noise_overrides: dict[str, Any] | None = None,
                   extra: dict[str, Any] | None = None, set_begin_index: bool = True,
                   **overrides: Any) -> StageSchedule:
    """A :class:`StageSchedule` for steps ``start .. end - 1`` of ``num_inference_steps``.

    Args:
        template: the pipeline's scheduler (its config).
        num_inference_steps: the length of the timestep sequence the stage takes part of.
        device: where the model's timesteps go.
        scheduler_class: the class to build (None: ``template``'s).
        start, end: the step indices (end None: to the last step).
        noised: compute the ``add_noise`` coefficients of each step (with ``noise_overrides``
            applied to the scheduler config, e.g. APT's scale-aware ``trained_betas``).
        extra: more schedulers by role (already built).
        set_begin_index: tell the main scheduler where the stage starts (schedulers that
            support ``set_begin_index``).
        overrides: config overrides of the main scheduler.

    Raises:
        ValueError: ``start``/``end`` do not select at least one step.
    """
    main = fresh_scheduler(template, num_inference_steps,
                           begin_index=start if set_begin_index else None,
                           scheduler_class=scheduler_class, **overrides)
    total_steps = len(main.timesteps)
    start = check_int(start, "start", minimum=0, maximum=total_steps - 1)
    end = total_steps if end is None else check_int(end, "end", minimum=start + 1,
                                                     maximum=total_steps)
    indices = range(start, end)
    timesteps = main.timesteps[start:end]
    total = main.config.num_train_timesteps
    scale: list[float] = []
    sigma: list[float] = []
    if noised:
        scale, sigma = noising_coefficients(template, num_inference_steps, indices,
                                            scheduler_class=scheduler_class or type(main),
                                            **(noise_overrides or {}))
    return StageSchedule(
        schedulers={"main": main, **(extra or {})},
        indices=indices,
        timesteps=list(timesteps),
        device_timesteps=timesteps.to(device, torch.float32),
        c=[cosine_decay(float(t), total, 1.0) for t in timesteps],
        noise_scale=scale,
        noise_sigma=sigma,
    )


@dataclass
class SkipResidual:
    """The skip residual of a stage that starts from a clean latent ``z0``.

    ``zh = c1 z'_t + (1 - c1) z_t`` with ``z'_t = add_noise(z0, noise, t) = scale_i z0 + sigma_i
    noise`` formed on the fly and ``c1 = c(t)^exponent``; at the stage's first step (no ``z_t``
    yet) ``zh = z'_t``.

    Attributes:
        z0: ``[B, C, h, w]`` float32, the stage's clean start.
        noise: ``[B, C, h, w]`` float32, the stage's one noise draw.
        exponent: the exponent of ``c(t)`` (DemoFusion's ``a1``, FreeScale's ``alpha``): a number,
            or a float32 tensor that broadcasts against ``z0`` (e.g. ``[1, 1, h, w]``: a map of
            region-wise exponents, on ``z0``'s device).
    """

    z0: torch.Tensor
    noise: torch.Tensor
    exponent: float | torch.Tensor

    def __call__(self, schedule: StageSchedule, step: int, z: torch.Tensor | None) -> torch.Tensor:
        noised = self.z0 * schedule.noise_scale[step] + self.noise * schedule.noise_sigma[step]
        if z is None:
            return noised
        if isinstance(self.exponent, torch.Tensor):
            c1 = torch.pow(schedule.c[step], self.exponent)
            return noised.mul_(c1).add_(z * (1.0 - c1))
        c1 = schedule.c[step] ** self.exponent
        return noised.mul_(c1).add_(z, alpha=1.0 - c1)


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """Per-call state shared by the stages of one sampler call (``options``: the method's call
    options; ``plan``: what the method states it will do, one line per stage, before any model
    work; ``image``: the caller's ``image=`` as ``[n, 3, H, W]`` float32 in [0, 1] (n 1 or the
    batch; :func:`image_latent` encodes it), or None; ``fidelity``: the caller's ``fidelity`` in
    [0, 1], or None for the method's own behaviour; ``controls``: the ControlNet conditioning, or
    None; ``memory``: the call's :class:`hrkernels.MemoryPlan`)."""

    sampler: str
    adapter: PipelineAdapter
    engine: Engine
    guidance: Guidance
    generator: torch.Generator
    num_inference_steps: int
    step_options: dict[str, Any]
    callback: StepCallback | None
    progress: bool
    num_stages: int
    options: dict[str, Any] = field(default_factory=dict)
    plan: list[str] = field(default_factory=list)
    image: torch.Tensor | None = None
    fidelity: float | None = None
    memory: Any = None

    @property
    def controls(self) -> ControlInputs | None:
        return self.engine.controls

    def control_views(self, size: tuple[int, int]) -> tuple[torch.Tensor, ...] | None:
        """The control images of one whole-latent view per image at latent ``size`` (None
        without a ControlNet): what a :class:`ViewSet` of the full latent carries."""
        return None if self.controls is None else self.controls.full(size)

    @property
    def vae_max_memory(self) -> int | None:
        """The budget of the call's VAE decodes and encodes (the memory plan's; None: the
        VAE's default)."""
        return None if self.memory is None else self.memory.vae_max_memory

    @property
    def device(self) -> torch.device:
        return self.adapter.device

    @property
    def batch(self) -> int:
        return self.engine.cond.batch


@dataclass
class StepState:
    """One step of a stage, as the method's step function sees it.

    ``step``: 0-based within the stage; ``index``: the global step index; ``timestep``: the
    scheduler's (CPU 0-d); ``model_timestep``: the same on the device (0-d float32); ``last``:
    the stage's last step (where a method that hands a clean estimate on computes it from the
    sample before the update).
    """

    stage: int
    step: int
    index: int
    timestep: torch.Tensor
    model_timestep: torch.Tensor
    last: bool

    @property
    def first(self) -> bool:
        return self.step == 0


StepFunction = Callable[[StepState, torch.Tensor], torch.Tensor]


class FiniteWatch:
    """Per-step NaN/inf flags kept on the device; checked once per stage (one host sync)."""

    def __init__(self, sampler: str, stage: int, timesteps: Sequence[Any], device: torch.device,
                 dtype: torch.dtype | None = None):
        self.sampler, self.stage, self.timesteps = sampler, stage, list(timesteps)
        self.dtype = dtype  # the model's (for the error's hint)
        self.flags = torch.zeros(len(self.timesteps), dtype=torch.bool, device=device)

    def record(self, step: int, latents: torch.Tensor) -> None:
        self.flags[step] = ~torch.isfinite(latents).all()

    def check(self) -> None:
        if bool(self.flags.any()):
            step = int(self.flags.nonzero()[0, 0])
            raise NonFiniteLatentsError(self.sampler, self.stage, step, self.timesteps[step],
                                        self.dtype)


def run_callback(callback: StepCallback | None, stage: int, step: int, timestep: Any,
                 latents: torch.Tensor) -> torch.Tensor:
    """Call ``callback(stage, step, timestep, latents)``; a returned tensor replaces the latents."""
    if callback is None:
        return latents
    result = callback(stage, step, timestep, latents)
    if result is None:
        return latents
    if not isinstance(result, torch.Tensor) or result.shape != latents.shape:
        raise TypeError("callback_on_step_end must return None or a tensor shaped like the latents "
                        f"{tuple(latents.shape)}; got {type(result).__name__}")
    return result.to(latents.dtype)


def progress_bar(total: int, description: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, disable=not enabled)


def initial_latents(run: Run, size: tuple[int, int], scheduler: Any) -> torch.Tensor:
    """Pure noise ``[B, C, h, w]`` (float32, from the call's generator) scaled by the scheduler's
    ``init_noise_sigma``: the start of a stage that samples from scratch."""
    noise = randn((run.batch, run.adapter.latent_channels, *size), run.generator, run.device)
    return noise * float(scheduler.init_noise_sigma)


def image_latent(run: Run, size: tuple[int, int]) -> torch.Tensor:
    """The caller's ``image=`` as a clean latent of pixel ``size`` ``(H, W)``: resized on the
    device (bicubic, antialiased when shrinking), one row per image of the batch, encoded by the
    adapter (the VAE's posterior sample, from the call's generator): ``[B, C, H / f, W / f]``
    float32. What the image replaces: a progressive method's first-stage result (DemoFusion, APT,
    FreeScale), or the start of an image-to-image stage (ScaleCrafter)."""
    if run.image is None:
        raise RuntimeError(f"{run.sampler}: image_latent without an image= in the call")
    pixels = resize_pixels(run.image.to(run.device), size)
    pixels = batch_rows(pixels, run.batch, "image")
    return run.adapter.encode(pixels * 2 - 1, run.generator, run.vae_max_memory).float()


def fidelity_start(num_inference_steps: int, fidelity: float, latest: int) -> int:
    """The step an image-to-image run starts at for a ``fidelity`` in [0, 1]: ``N - int(N (1 -
    fidelity))`` (diffusers' img2img with ``strength = 1 - fidelity``), at most ``latest`` (so at
    least one step runs). ScaleCrafter's start, MegaFusion's stage 2 after an input image."""
    steps = num_inference_steps
    return min(steps - int(steps * (1.0 - fidelity)), latest)


def fidelity_exponent(exponent: float | torch.Tensor,
                      fidelity: float | None) -> float | torch.Tensor:
    """A skip-residual exponent of ``c(t)`` (DemoFusion's ``a1``, FreeScale's ``alpha``) for a
    ``fidelity`` in [0, 1]: ``2 (1 - fidelity) exponent``, so 0.5 keeps the method's exponent, 1
    gives 0 (``c^0 = 1``: every step starts from the noised input, the most of it kept) and 0
    twice the exponent (less of it kept); None: ``exponent`` unchanged."""
    if fidelity is None:
        return exponent
    return exponent * (2.0 * (1.0 - fidelity))


def denoising_step(run: Run, schedule: StageSchedule, batch_sizes: dict[tuple[int, int], int],
                   guidance: Callable[[StepState], Guidance] | None = None) -> StepFunction:
    """The step of plain sampling on the full latent: ``zin = scale_model_input(z, t)``, the
    guided prediction of ``zin`` as one view per image, ``scheduler.step(eps, t, z)`` with the
    run's step options. ``guidance(state)`` picks the step's guidance (default: the run's)."""
    scheduler = schedule.scheduler
    kwargs = step_kwargs(scheduler, run.generator, run.step_options)

    def step(state: StepState, z: torch.Tensor) -> torch.Tensor:
        zin = scheduler.scale_model_input(z, state.timestep)
        strategy = run.guidance if guidance is None else guidance(state)
        view = ViewSet(zin, control=run.control_views(tuple(z.shape[2:])))
        (eps,) = run.engine(state.model_timestep, [view], batch_sizes, strategy)
        return scheduler.step(eps, state.timestep, z, return_dict=False, **kwargs)[0]

    return step


def run_stage(run: Run, stage: int, size: tuple[int, int], schedule: StageSchedule,
              z: torch.Tensor | None, step_function: StepFunction,
              skip: SkipResidual | None = None) -> torch.Tensor:
    """Run one stage's steps and return its last latent.

    Per step ``i`` of ``schedule``: :func:`hrkernels.set_step` on the model when it is patched
    (with the global step index and the device timestep), the engine's step (its ControlNet
    scales), ``sample = skip(z)`` with a skip residual (else ``z``), ``z = step_function(state,
    sample)``, ``callback_on_step_end`` (may replace ``z``), the NaN/inf flag of ``z`` (checked
    once, after the stage) and the progress bar.

    Args:
        run: the call's shared state.
        stage: 1-based stage number; ``size``: its latent size (for the progress label).
        schedule: the stage's schedule.
        z: the latent at the stage's first step; None when ``skip`` forms it from its clean start.
        step_function: the method's step: ``(state, sample) -> next latent``.
        skip: the stage's skip residual, or None.

    Raises:
        NonFiniteLatentsError: a step produced NaN or inf (names the stage and step).
    """
    model = run.adapter.model
    patched = is_patched(model)
    values = schedule.values
    watch = FiniteWatch(run.sampler, stage, values, run.device, run.adapter.dtype)
    f = run.adapter.vae_scale_factor
    # Sizes are W x H everywhere a user reads them (as image tools write them); the bar counts the
    # scheduler steps the stage runs (PNDM runs one more than num_inference_steps; a stage that
    # starts late, APT's shortcut, fewer).
    label = f"{run.sampler} stage {stage}/{run.num_stages} ({size[1] * f}x{size[0] * f})"
    bar = progress_bar(len(schedule), label, run.progress)
    try:
        for step, index in enumerate(schedule.indices):
            state = StepState(stage, step, index, schedule.timesteps[step],
                              schedule.device_timesteps[step], last=step == len(schedule) - 1)
            if patched:
                set_step(model, index, state.model_timestep)
            run.engine.set_step(index)
            sample = skip(schedule, step, z) if skip is not None else z
            z = step_function(state, sample)
            z = run_callback(run.callback, stage, step, values[step], z)
            watch.record(step, z)  # after the callback: latents it returns are watched too
            bar.update()
    finally:
        bar.close()
    watch.check()
    return z


# --------------------------------------------------------------------------------------------------
# Between stages
# --------------------------------------------------------------------------------------------------


def relay_resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Decoded images ``[B, 3, H, W]`` bicubic-resized to ``size`` (pixels, ``(height, width)``)
    on their device, in float32, clamped to [-1, 1] (the relay upsamples: no antialiasing)."""
    resized = F.interpolate(images.float(), size=size, mode="bicubic", align_corners=False)
    return resized.clamp_(-1, 1)


def relay_vae_calls(stages: int, image: bool) -> list[tuple[str, int]]:
    """The VAE calls of a method that relays through pixels between its stages, in call order, for
    the memory planner (:meth:`Sampler.vae_calls`): ``image=``'s encode at stage 1's size when
    ``image``, then per stage ``s >= 2`` the relay (decode at ``s - 1``, encode at ``s``), then the
    final decode."""
    calls = [("encode", 1)] if image else []
    for stage in range(2, stages + 1):
        calls += [("decode", stage - 1), ("encode", stage)]
    return calls + [("decode", stages)]


def relay(run: Run, latents: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A stage's (clean) latent handed to a stage of another size through pixels: decode
    (:meth:`PipelineAdapter.decode`: the tiled VAE; a pixel-space model's latents are its pixels),
    :func:`relay_resize` to ``size`` (pixels), encode (the VAE posterior sampled from the run's
    generator; a pixel-space model takes the pixels as they are). No host round trip.

    ``latents``: ``[B, C, h, w]``; returns float32 ``[B, C, H / f, W / f]`` for ``size = (H, W)``.
    """
    images = relay_resize(run.adapter.decode(latents, run.vae_max_memory), size)
    return run.adapter.encode(images, run.generator, run.vae_max_memory)


@contextlib.contextmanager
def stage_patches(model: torch.nn.Module, specs: Sequence[Any], variant: str) -> Iterator[None]:
    """``specs`` patched into ``model``'s configuration ``variant`` and active for the block; the
    model's patches and active configuration as they were afterwards, also on an exception."""
    installed = False
    previous = None
    try:
        patching.patch(model, list(specs), variant=variant)
        installed = True
        previous = patching.set_variant(model, variant)
        yield
    finally:
        if previous is not None:
            patching.set_variant(model, previous)
        if installed:
            patching.unpatch(model, variant=variant)

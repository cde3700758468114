"""Diffusers schedulers as the samplers use them: fresh copies per stage, noising coefficients per
step, step options, and which schedulers keep a skip residual.

* :data:`SCHEDULERS` -- the scheduler classes by the short names the CLI and the tests use.
* :func:`fresh_scheduler` -- a new scheduler of a class and config with its timesteps set on the
  CPU (``clip_sample=False``: a sampler never clips its x0 predictions).
* :func:`noising_coefficients` -- ``add_noise`` as two numbers per step, looked up by step index.
* :func:`check_step_options` -- the options a call passes to every ``scheduler.step`` (DDIM's
  ``eta``, Euler's ``s_churn``, ...).
* :func:`keeps_sample` / :func:`sampling_scheduler_class` -- whether a scheduler's ``step`` uses the
  sample it is given (needed by every method with a skip residual; docs/METHODS.md, "Schedulers and
  the skip residual"), and the class a sampler then samples with.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.utils import logging as diffusers_logging

__all__ = [
    "SCHEDULERS",
    "check_scheduler_kind",
    "check_step_options",
    "fresh_scheduler",
    "keeps_sample",
    "noising_coefficients",
    "requested_scheduler",
    "sampling_scheduler_class",
    "step_kwargs",
]

# Short names of the scheduler classes (``hrkernels generate --scheduler``, the tiny pipelines).
SCHEDULERS: dict[str, type] = {
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "dpm": DPMSolverMultistepScheduler,
    "unipc": UniPCMultistepScheduler,
    "pndm": PNDMScheduler,
}

# What the samplers call on a scheduler (the noise-prediction schedulers of the UNet pipelines have
# them all; flow-matching ones, e.g. FlowMatchEulerDiscreteScheduler, have no add_noise).
_SCHEDULER_METHODS = ("set_timesteps", "scale_model_input", "step", "add_noise")

# ``scheduler.step`` arguments that are not options: the sampler passes them itself.
_STEP_ARGUMENTS = frozenset({"self", "model_output", "timestep", "sample", "return_dict",
                             "generator"})

# A step that uses the sample it is given moves its output by at least as much as the sample moves
# (x_next = a x + b eps with a = alpha_next / alpha >= 1 for DDIM, DPM-Solver++; a = 1 for Euler);
# a step that partly rebuilds it from history moves less (see keeps_sample for the measurements).
_MIN_SAMPLE_SENSITIVITY = 0.9


def _config_overrides(scheduler_class: type, config: Mapping[str, Any]) -> dict[str, Any]:
    """What every scheduler a sampler builds sets regardless of the template's config.

    ``clip_sample=False``: DDIM's default clips every x0 prediction to [-1, 1], which is wrong for
    latents; a config written for another class (Euler's has no ``clip_sample``) would get that
    default. ``set_alpha_to_one``: the template's value, else False (the value the SD 1.5/2.x and
    SDXL checkpoints ship).
    """
    parameters = inspect.signature(scheduler_class.__init__).parameters
    overrides: dict[str, Any] = {}
    if "clip_sample" in parameters:
        overrides["clip_sample"] = False
    if "set_alpha_to_one" in parameters:
        overrides["set_alpha_to_one"] = bool(config.get("set_alpha_to_one", False))
    return overrides


def fresh_scheduler(template: Any, num_inference_steps: int, begin_index: int | None = 0,
                    scheduler_class: type | None = None, **overrides: Any) -> Any:
    """A new scheduler of ``template``'s class (or ``scheduler_class``) and config, with its
    timesteps set on the CPU.

    Schedulers keep internal step counters and multistep history, so every stage gets its own.
    Timesteps and tables stay on the CPU: ``step`` then reads them on the host, never the device.
    ``begin_index`` (when the scheduler supports ``set_begin_index``) is where the stage starts in
    the timestep list, so ``step`` never searches the timestep list. ``clip_sample`` is always
    False (see :func:`_config_overrides`); ``overrides`` (e.g. ``trained_betas``) win over the
    template's config.
    """
    cls = scheduler_class or type(template)
    settings = {**_config_overrides(cls, template.config), **overrides}
    scheduler = cls.from_config(template.config, **settings)
    scheduler.set_timesteps(num_inference_steps, device="cpu")
    if begin_index is not None and hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(begin_index)
    return scheduler


def noising_coefficients(template: Any, num_inference_steps: int, indices: Sequence[int],
                         scheduler_class: type | None = None,
                         **overrides: Any) -> tuple[list[float], list[float]]:
    """``(a_i, b_i)`` for each step index ``i`` of ``indices``, with
    ``add_noise(z0, noise, t_i) == a_i * z0 + b_i * noise`` at that step.

    ``add_noise`` is linear in ``(z0, noise)``; it is evaluated once per stage on a fresh CPU copy
    of the scheduler, so that noised copies can be formed in the step loop without host
    synchronisation. Coefficients are looked up **by step index**, not by timestep value: a
    schedule may repeat a timestep with two different noise levels (DPM-Solver++/UniPC with Karras
    sigmas repeat ``t = 1``), which a lookup by value confuses. Schedulers without
    ``set_begin_index`` (DDIM, DDPM, PNDM) index their tables by the timestep itself, which is
    exact.
    """
    scheduler = fresh_scheduler(template, num_inference_steps, begin_index=None,
                                scheduler_class=scheduler_class, **overrides)
    one, zero = torch.ones(1), torch.zeros(1)
    scale, sigma = [], []
    for index in indices:
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(index)
        timestep = scheduler.timesteps[index:index + 1]
        scale.append(float(scheduler.add_noise(one, zero, timestep)[0]))
        sigma.append(float(scheduler.add_noise(zero, one, timestep)[0]))
    return scale, sigma


def check_step_options(scheduler_class: type, options: Mapping[str, Any] | None,
                       sampler: str) -> dict[str, Any]:
    """The options a call passes to every ``scheduler.step`` (e.g. ``{"eta": 0.5}`` for DDIM,
    ``{"s_churn": 1.0}`` for Euler), checked against the step's signature.

    Raises:
        TypeError: ``options`` is not a mapping with string keys.
        ValueError: an option the scheduler's ``step`` does not take (the message lists those it
            takes).
    """
    if options is None:
        return {}
    if not isinstance(options, Mapping) or not all(isinstance(key, str) for key in options):
        raise TypeError(f"{sampler}: step_options must be a mapping of option names to values; "
                        f"got {options!r}")
    accepted = sorted(set(inspect.signature(scheduler_class.step).parameters) - _STEP_ARGUMENTS)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"{sampler}: step_options {unknown} are not options of "
                         f"{scheduler_class.__name__}.step; it takes {accepted or 'none'}")
    return dict(options)


def step_kwargs(scheduler: Any, generator: torch.Generator | None,
                options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Keyword arguments for ``scheduler.step``: the step options, and the generator where the
    scheduler takes one."""
    kwargs = dict(options or {})
    if "generator" in inspect.signature(scheduler.step).parameters:
        kwargs["generator"] = generator
    return kwargs


def _config_key(config: Mapping[str, Any]) -> str:
    return repr(sorted((key, repr(value)) for key, value in config.items()))


_SENSITIVITY: dict[tuple[type, str], float] = {}


def _sample_sensitivity(scheduler_class: type, config: Mapping[str, Any]) -> float:
    """How much ``step``'s output moves per unit change of its input sample (cached)."""
    key = (scheduler_class, _config_key(config))
    if key not in _SENSITIVITY:
        _SENSITIVITY[key] = _measure_sensitivity(scheduler_class, config)
    return _SENSITIVITY[key]


def _measure_sensitivity(scheduler_class: type, config: Mapping[str, Any]) -> float:
    # Calls 2 to 4 of a 10-step schedule are probed (multistep schedulers have history by then;
    # PNDM ignores its input from its second call on): the same trajectory twice, the sample of
    # the probed call moved by a small delta once.
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    outputs = [torch.randn(1, 4, 8, 8, generator=generator) for _ in range(4)]
    delta = 1e-3 * torch.randn(1, 4, 8, 8, generator=generator)
    template = type("Template", (), {"config": config})()
    sensitivity = float("inf")
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # DPM singlestep reports its own config fixes
    try:
        for probe in (1, 2, 3):
            sensitivity = min(sensitivity, _probe(scheduler_class, template, probe, sample,
                                                  outputs, delta))
    finally:
        diffusers_logging.set_verbosity(verbosity)
    return sensitivity


def _probe(scheduler_class: type, template: Any, probe: int, sample: torch.Tensor,
           outputs: list[torch.Tensor], delta: torch.Tensor) -> float:
    """Output change per unit sample change at call ``probe`` (calls before it identical)."""
    results = []
    for moved in (False, True):
        scheduler = fresh_scheduler(template, 10, scheduler_class=scheduler_class)
        kwargs = step_kwargs(scheduler, torch.Generator().manual_seed(1))
        z = sample.clone()
        for call in range(probe + 1):
            if moved and call == probe:
                z = z + delta
            timestep = scheduler.timesteps[call]
            scheduler.scale_model_input(z, timestep)  # the order the schedulers expect
            z = scheduler.step(outputs[call], timestep, z, return_dict=False, **kwargs)[0]
        results.append(z)
    return float((results[1] - results[0]).norm() / delta.norm())


def keeps_sample(scheduler_class: type, config: Mapping[str, Any]) -> bool:
    """Whether ``scheduler_class.step`` (with ``config``) uses the sample it is given.

    Methods that change the sample between steps (DemoFusion's, APT's and FreeScale's skip
    residual) reach the trajectory only through it. Measured on the scheduler itself, once per
    class and config (milliseconds on the CPU): the least, over calls 2 to 4 of a 10-step
    schedule, of how much the step's output moves per unit change of its input sample; it keeps
    the sample when that is >= 0.9. With SDXL's scheduler config (diffusers 0.42): DDIM 1.31,
    DDPM 1.31, Euler 1.00, Euler ancestral 1.00, LMS 1.00, DEIS 1.30, DPM-Solver++ multistep 1.46
    keep it; DPM-Solver singlestep 0.73 and UniPC 0.64 (their higher-order updates rebuild the
    sample from the one stored at an earlier call), PNDM 0 (from its second call on), Heun 0 and
    KDPM2 0 (their second-order calls reuse the stored first-order sample) do not.
    """
    return _sample_sensitivity(scheduler_class, config) >= _MIN_SAMPLE_SENSITIVITY


def requested_scheduler(value: Any, sampler: str) -> tuple[type | None, Any | None]:
    """A sampler's ``scheduler`` option as ``(class, template)``: None -> ``(None, None)``; a
    scheduler class -> ``(class, None)`` (built from the pipeline's config); a scheduler
    instance -> ``(its class, itself)`` (built from its own config).

    Raises:
        TypeError: anything else.
    """
    if value is None:
        return None, None
    if isinstance(value, type):
        if not (hasattr(value, "from_config") and hasattr(value, "step")):
            raise TypeError(f"{sampler}: scheduler must be a diffusers scheduler class or "
                            f"instance; got {value!r}")
        return value, None
    if hasattr(value, "step") and hasattr(value, "config") and hasattr(value, "set_timesteps"):
        return type(value), value
    raise TypeError(f"{sampler}: scheduler must be None, a diffusers scheduler class or a "
                    f"scheduler; got {value!r}")


def check_scheduler_kind(cls: type, config: Mapping[str, Any], *, needs_sample: bool,
                         sampler: str, source: str) -> None:
    """``cls`` has what the samplers call (:data:`_SCHEDULER_METHODS`).

    Raises:
        TypeError: it does not (e.g. a flow-matching scheduler on a UNet pipeline); the message
            names ``source`` (where it came from) and the schedulers of :data:`SCHEDULERS` the
            sampler can use (with ``needs_sample``, those that keep the sample with ``config``).
    """
    missing = [name for name in _SCHEDULER_METHODS if not callable(getattr(cls, name, None))]
    if missing:
        supported = [scheduler.__name__ for scheduler in SCHEDULERS.values()
                     if not needs_sample or keeps_sample(scheduler, config)]
        raise TypeError(f"{sampler}: {source} {cls.__name__} is not a noise-prediction scheduler "
                        f"(it has no {', '.join(missing)}); use one of {', '.join(supported)}")


def sampling_scheduler_class(template: Any, requested: type | None, *, needs_sample: bool,
                             sampler: str, default: type | None = None) -> tuple[type, str | None]:
    """The scheduler class a sampler steps with, and why it is not the one the pipeline has
    (None when it is, or when the user asked for it).

    ``requested`` (the class of the sampler's ``scheduler`` option, see
    :func:`requested_scheduler`) wins; else the method's ``default``; else the class of the
    pipeline's own scheduler (``template``). A method that ``needs_sample`` (a skip residual)
    cannot use a scheduler that drops it (:func:`keeps_sample`): one the user asked for is an
    error; otherwise DDIM with the same config replaces it, and the reason returned is the warning
    to give.

    Raises:
        TypeError: the scheduler is not one the samplers can step (:func:`check_scheduler_kind`).
        ValueError: ``needs_sample`` and the requested scheduler drops the sample.
    """
    cls = requested or default or type(template)
    check_scheduler_kind(cls, template.config, needs_sample=needs_sample, sampler=sampler,
                         source="scheduler" if requested else "the pipeline's scheduler")
    if not needs_sample or keeps_sample(cls, template.config):
        return cls, None
    if requested is not None:
        raise ValueError(
            f"{sampler}: {cls.__name__}.step ignores (or rebuilds) the sample it is given, so the "
            "method's skip residual would never reach the trajectory; use a scheduler that keeps "
            "its sample (DDIM, Euler, DPM-Solver++; docs/METHODS.md, 'Schedulers and the skip "
            "residual')")
    return DDIMScheduler, (
        f"{sampler}: {cls.__name__}.step ignores (or rebuilds) the sample it is given, which "
        f"would drop the method's skip residual; sampling with DDIMScheduler built from the same "
        "config instead. Pass scheduler=DDIMScheduler (or another scheduler that keeps its "
        "sample: Euler, DPM-Solver++ multistep) to silence this warning.")

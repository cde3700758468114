"""``patch`` / ``unpatch`` / ``patched`` / ``set_step`` and the open registry of spec types.

A *spec* is a small dataclass that says how a UNet should behave differently (``ReDilation``:
which convolutions run re-dilated, with which factors, until which step). Each spec type registers
one function with :func:`register_spec_type`::

    resolve(spec, unet) -> Plan

``resolve`` finds and validates the modules the spec touches (raising ``ValueError`` for a name that
does not exist) and changes nothing. The :class:`Plan` it returns names those modules
(``targets``, used to refuse two specs that change the same module) and installs the behaviour
(``install() -> Installed``); the :class:`Installed` object follows the sampler's steps
(``set_step``) and removes the behaviour exactly (``remove``).

:func:`patch` resolves every spec first, then installs them all (or none: a failure part-way removes
what was installed) and keeps a :class:`PatchState` on the UNet, which :func:`set_step` and
:func:`unpatch` use. Weights, buffers, module classes and ``state_dict`` are never changed.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, runtime_checkable

import torch
from torch import nn

__all__ = [
    "Installed",
    "PatchState",
    "Plan",
    "is_patched",
    "patch",
    "patch_state",
    "patched",
    "register_spec_type",
    "set_step",
    "unpatch",
]

# Attribute of the (unwrapped) UNet that holds its PatchState. A plain object, so it is not a
# submodule, parameter or buffer and never appears in state_dict().
STATE_ATTRIBUTE = "_hrkernels_patch_state"

ModuleT = TypeVar("ModuleT", bound=nn.Module)


@runtime_checkable
class Installed(Protocol):
    """What one installed spec keeps: it follows the steps and can be removed."""

    def set_step(self, step_index: int, timestep: Any) -> None:
        """Update the per-step behaviour (called by :func:`set_step`, and with ``(0, None)`` right
        after installing). Must not read tensors on the host."""

    def remove(self) -> None:
        """Restore exactly what was there before the spec was installed."""


@runtime_checkable
class Plan(Protocol):
    """A resolved, validated spec: what it will change (``targets``) and how (``install``)."""

    targets: frozenset[str]

    def install(self) -> Installed:
        """Change the UNet's behaviour; if it raises, it must leave the UNet as it was."""


Resolver = Callable[[Any, nn.Module], Plan]

_RESOLVERS: dict[type, Resolver] = {}


def register_spec_type(spec_type: type, resolve: Resolver) -> None:
    """Register how specs of ``spec_type`` are resolved against a UNet (see the module docstring).

    Registering the same function again is a no-op; a different function for a registered type is
    an error, so two parts of a program cannot silently disagree on what a spec means.

    Args:
        spec_type: the spec class (e.g. ``ReDilation``).
        resolve: ``resolve(spec, unet) -> Plan``; raises ``ValueError`` for names that do not exist.

    Raises:
        TypeError: ``spec_type`` is not a class or ``resolve`` is not callable.
        ValueError: ``spec_type`` is registered already with another function.
    """
    if not isinstance(spec_type, type):
        raise TypeError(f"spec_type must be a class; got {spec_type!r}")
    if not callable(resolve):
        raise TypeError(f"resolve must be callable; got {resolve!r}")
    registered = _RESOLVERS.get(spec_type)
    if registered is not None and registered is not resolve:
        raise ValueError(f"spec type {spec_type.__name__} is registered already ({registered!r})")
    _RESOLVERS[spec_type] = resolve


@dataclass
class PatchState:
    """What :func:`patch` keeps on a UNet.

    Attributes:
        specs: the specs, in the order given.
        installed: their installed behaviours (same order).
        step_index: the step last given to :func:`set_step` (0 before any call).
        timestep: the timestep last given to :func:`set_step` (None before any call); kept as given
            (a tensor stays a tensor: it is never read on the host).
    """

    specs: tuple[Any, ...]
    installed: list[Installed] = field(default_factory=list)
    step_index: int = 0
    timestep: Any = None


def _model(unet: nn.Module) -> nn.Module:
    """The module patches live on: ``unet``, or the module its ``torch.compile`` wrapper holds."""
    if not isinstance(unet, nn.Module):
        raise TypeError(f"unet must be a torch.nn.Module; got {type(unet).__name__}")
    original = getattr(unet, "_orig_mod", None)
    if isinstance(unet, torch._dynamo.eval_frame.OptimizedModule) and isinstance(
        original, nn.Module
    ):
        return original
    return unet


def patch_state(unet: nn.Module) -> PatchState | None:
    """The :class:`PatchState` of a patched UNet, or None when it is not patched."""
    return _model(unet).__dict__.get(STATE_ATTRIBUTE)


def is_patched(unet: nn.Module) -> bool:
    """Whether :func:`patch` has patched ``unet`` (and :func:`unpatch` has not restored it)."""
    return patch_state(unet) is not None


def _spec_list(specs: Any) -> tuple[Any, ...]:
    if isinstance(specs, Sequence) and not isinstance(specs, str):
        specs = tuple(specs)
    else:
        specs = (specs,)
    if not specs:
        raise ValueError("patch needs at least one spec; got an empty list")
    for spec in specs:
        if type(spec) not in _RESOLVERS:
            known = ", ".join(sorted(t.__name__ for t in _RESOLVERS)) or "none"
            raise TypeError(
                f"{type(spec).__name__} is not a registered spec type (registered: {known}); "
                "see hrkernels.patching.register_spec_type"
            )
    return specs


def patch(unet: ModuleT, specs: Any) -> ModuleT:
    """Change how ``unet`` computes, as the spec (or list of specs) says; reversible with
    :func:`unpatch`.

    Every spec is resolved and validated before anything changes. Weights, buffers, module classes
    and ``state_dict`` are never changed: behaviours are installed by swapping instance ``forward``s
    (or processors) and everything needed to restore them is kept. The per-step state starts at
    step 0 (see :func:`set_step`). A ``torch.compile`` wrapper (``OptimizedModule``) may be passed:
    the module it wraps is patched.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (any ``nn.Module`` with the named layers).
        specs: one spec (e.g. ``hrkernels.ReDilation``) or a list of specs of registered types.
            Several specs must be given together, in one call.

    Returns:
        ``unet`` itself (patched in place).

    Raises:
        TypeError: a spec is not of a registered type, or ``unet`` is not a module.
        ValueError: ``unet`` is patched already (unpatch it first, or pass all specs in one call);
            a spec names a block or layer that does not exist (the message lists the blocks); two
            specs change the same module; or a spec's own checks fail.

    Example:
        >>> import hrkernels
        >>> from hrkernels.testing import tiny_pipeline
        >>> unet = tiny_pipeline("sdxl").unet
        >>> spec = hrkernels.ReDilation({"mid_block": 2, "up_blocks.0": 2}, until_step=30)
        >>> _ = hrkernels.patch(unet, spec)
        >>> hrkernels.set_step(unet, 30, 10)  # from until_step on, the original convolutions run
        >>> _ = hrkernels.unpatch(unet)
    """
    model = _model(unet)
    state = patch_state(model)
    if state is not None:
        raise ValueError(
            f"this {type(model).__name__} is patched already (with "
            f"{', '.join(type(spec).__name__ for spec in state.specs)}); call hrkernels.unpatch "
            "first, or give all specs together in one patch call"
        )
    spec_list = _spec_list(specs)
    plans = [_RESOLVERS[type(spec)](spec, model) for spec in spec_list]
    claimed: dict[str, int] = {}
    for index, plan in enumerate(plans):
        for target in sorted(plan.targets):
            if target in claimed:
                raise ValueError(
                    f"specs {claimed[target]} ({type(spec_list[claimed[target]]).__name__}) and "
                    f"{index} ({type(spec_list[index]).__name__}) both change {target!r}"
                )
            claimed[target] = index
    new_state = PatchState(specs=spec_list)
    try:
        for plan in plans:
            installed = plan.install()
            new_state.installed.append(installed)
            installed.set_step(0, None)
    except BaseException:
        for installed in reversed(new_state.installed):
            installed.remove()
        raise
    setattr(model, STATE_ATTRIBUTE, new_state)
    return unet


def unpatch(unet: ModuleT) -> ModuleT:
    """Restore ``unet`` exactly as it was before :func:`patch` (same forwards, so bitwise the same
    outputs; ``state_dict`` was never changed).

    Args:
        unet: a UNet patched by :func:`patch` (or its ``torch.compile`` wrapper).

    Returns:
        ``unet`` itself.

    Raises:
        ValueError: ``unet`` is not patched (unpatching is never a silent no-op).
        RuntimeError: a patched forward was replaced by something else after patching, so it cannot
            be restored; the specs not yet removed stay recorded (fix it and call unpatch again).
    """
    model = _model(unet)
    state = patch_state(model)
    if state is None:
        raise ValueError(f"this {type(model).__name__} is not patched; there is nothing to unpatch")
    while state.installed:
        state.installed[-1].remove()
        state.installed.pop()
    delattr(model, STATE_ATTRIBUTE)
    return unet


@contextlib.contextmanager
def patched(unet: ModuleT, specs: Any) -> Iterator[ModuleT]:
    """``with patched(unet, spec): ...``: :func:`patch` on entry, :func:`unpatch` on exit (also when
    the block raises).

    Example:
        >>> import hrkernels
        >>> from hrkernels.testing import tiny_pipeline
        >>> unet = tiny_pipeline("sd15").unet
        >>> with hrkernels.patched(unet, hrkernels.ReDilation({"down_blocks.3": 2})):
        ...     hrkernels.is_patched(unet)
        True
        >>> hrkernels.is_patched(unet)
        False
    """
    patch(unet, specs)
    try:
        yield unet
    finally:
        unpatch(unet)


def set_step(unet: nn.Module, step_index: int, timestep: Any = None) -> None:
    """Tell a patched UNet which denoising step comes next, before evaluating it for that step.

    Each spec derives its behaviour for the step from it (``ReDilation``: whether the step is before
    ``until_step`` and, when progressive, the step's factors) and stores only the result as plain
    Python attributes, so under ``torch.compile`` a new step recompiles only when the behaviour
    changes. Before the first call, step 0 is assumed. Nothing is read from ``timestep`` on the
    host: it is stored as given (a tensor or a number) for specs that use it on the device.

    Args:
        unet: a patched UNet (or its ``torch.compile`` wrapper).
        step_index: index of the step in the sampler's loop, ``>= 0``.
        timestep: the step's timestep, or None.

    Raises:
        ValueError: ``unet`` is not patched, or ``step_index < 0``.
        TypeError: ``step_index`` is not an integer.
    """
    state = patch_state(unet)
    if state is None:
        raise ValueError(
            f"this {type(_model(unet)).__name__} is not patched; call hrkernels.patch first"
        )
    if isinstance(step_index, bool | torch.Tensor):
        raise TypeError(f"step_index must be a Python int; got {step_index!r}")
    try:
        step_index = operator.index(step_index)
    except TypeError:
        raise TypeError(f"step_index must be an int; got {step_index!r}") from None
    if step_index < 0:
        raise ValueError(f"step_index must be >= 0; got {step_index}")
    for installed in state.installed:
        installed.set_step(step_index, timestep)
    state.step_index = step_index
    state.timestep = timestep

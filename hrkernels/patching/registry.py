"""``patch`` / ``unpatch`` / ``patched`` / ``set_step``, the configuration switch (``variant`` /
``set_variant``) and the open registry of spec types.

A *spec* is a small dataclass that says how a UNet should behave differently (``ReDilation``:
which convolutions run re-dilated, with which factors, until which step). Each spec type registers
one function with :func:`register_spec_type`::

    resolve(spec, unet) -> Plan

``resolve`` finds and validates the modules the spec touches (raising ``ValueError`` for a name that
does not exist) and changes nothing. The :class:`Plan` it returns names those modules
(``targets``, used to refuse two specs that change the same module) and installs the behaviour
into a configuration (``install(variant) -> Installed``); the :class:`Installed` object follows
the sampler's steps (``set_step``), is switched on and off with its configuration (``set_active``)
and removes the behaviour exactly (``remove``).

*Configurations* ("variants"): every spec is installed into a named configuration, ``"default"``
unless ``patch(..., variant=...)`` names another. A UNet holds at most one spec of each type per
configuration and has exactly one active configuration (``"default"`` unless switched with
:func:`variant` / :func:`set_variant`); the specs of the other configurations run the original
behaviour. A spec type that ``shares_modules`` may change the same modules in several
configurations (``ReDilation``: its forward holds one setting per configuration); two different
spec types never change the same module.

:func:`patch` resolves and validates every spec first, then installs them all (or none: a failure
part-way removes what was installed) and keeps a :class:`PatchState` on the UNet, which
:func:`set_step`, :func:`set_variant` and :func:`unpatch` use. Weights, buffers, module classes and
``state_dict`` are never changed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, runtime_checkable

import torch
from torch import nn

from hrkernels._validate import check_bool, check_int, describe

__all__ = [
    "DEFAULT_VARIANT",
    "Installed",
    "PatchEntry",
    "PatchState",
    "Plan",
    "is_patched",
    "patch",
    "patch_state",
    "patched",
    "register_spec_type",
    "set_step",
    "set_variant",
    "unpatch",
    "variant",
]

# Attribute of the (unwrapped) UNet that holds its PatchState. A plain object, so it is not a
# submodule, parameter or buffer and never appears in state_dict().
STATE_ATTRIBUTE = "_hrkernels_patch_state"

# The configuration specs go into unless patch names another, and the one active unless switched.
DEFAULT_VARIANT = "default"

ModuleT = TypeVar("ModuleT", bound=nn.Module)


@runtime_checkable
class Installed(Protocol):
    """What one installed spec keeps: it follows the steps and the active configuration, and can
    be removed.

    Right after ``Plan.install`` the registry calls ``set_active`` and ``set_step`` with the UNet's
    current configuration and step; until then the installed behaviour must be off (the original
    behaviour runs).
    """

    def set_step(self, step_index: int, timestep: Any) -> None:
        """Update the per-step behaviour (called by :func:`set_step` for every installed spec, in
        every configuration). Must not read tensors on the host."""

    def set_active(self, active: bool) -> None:
        """Run the spec's behaviour (``True``: its configuration became the active one) or the
        original behaviour (``False``). On a switch, the specs of the configuration left are told
        first, those of the configuration entered after. Must only set Python attributes."""

    def remove(self) -> None:
        """Restore exactly what was there before the spec was installed."""


@runtime_checkable
class Plan(Protocol):
    """A resolved, validated spec: what it will change (``targets``) and how (``install``)."""

    targets: frozenset[str]

    def install(self, variant: str) -> Installed:
        """Change the UNet's behaviour for configuration ``variant`` (off until ``set_active``);
        if it raises, it must leave the UNet as it was."""


Resolver = Callable[[Any, nn.Module], Plan]


@dataclass(frozen=True)
class _SpecType:
    resolve: Resolver
    shares_modules: bool


_SPEC_TYPES: dict[type, _SpecType] = {}


def register_spec_type(spec_type: type, resolve: Resolver, *, shares_modules: bool = False) -> None:
    """Register how specs of ``spec_type`` are resolved against a UNet (see the module docstring).

    Registering the same function (and flag) again is a no-op; a different one for a registered
    type is an error, so two parts of a program cannot silently disagree on what a spec means.

    Args:
        spec_type: the spec class (e.g. ``ReDilation``).
        resolve: ``resolve(spec, unet) -> Plan``; raises ``ValueError`` for names that do not exist.
        shares_modules: whether specs of this type installed in different configurations may
            change the same modules (their ``Plan.install`` then finds what the other
            configurations installed and adds to it). If False, that is an error at patch time.

    Raises:
        TypeError: ``spec_type`` is not a class, ``resolve`` is not callable or ``shares_modules``
            is not a bool.
        ValueError: ``spec_type`` is registered already with another function or flag.

    Example:
        >>> from dataclasses import dataclass
        >>> @dataclass(frozen=True)
        ... class Nothing:  # a spec type that changes no module
        ...     pass
        >>> class NothingInstalled:
        ...     def set_step(self, step_index, timestep): pass
        ...     def set_active(self, active): pass
        ...     def remove(self): pass
        >>> class NothingPlan:
        ...     targets = frozenset()
        ...     def install(self, variant): return NothingInstalled()
        >>> register_spec_type(Nothing, lambda spec, unet: NothingPlan())
    """
    if not isinstance(spec_type, type):
        raise TypeError(f"spec_type must be a class; got {describe(spec_type)}")
    if not callable(resolve):
        raise TypeError(f"resolve must be callable; got {describe(resolve)}")
    registration = _SpecType(resolve, check_bool(shares_modules, "shares_modules"))
    registered = _SPEC_TYPES.get(spec_type)
    if registered is not None and registered != registration:
        raise ValueError(f"spec type {spec_type.__name__} is registered already ({registered})")
    _SPEC_TYPES[spec_type] = registration


@dataclass(eq=False)
class PatchEntry:
    """One spec installed into one configuration of a UNet.

    Attributes:
        variant: the configuration.
        spec: the spec.
        targets: the names of the modules it changes (its plan's ``targets``).
        installed: its installed behaviour.
    """

    variant: str
    spec: Any
    targets: frozenset[str]
    installed: Installed


@dataclass
class PatchState:
    """What :func:`patch` keeps on a UNet.

    Attributes:
        entries: the installed specs, in the order they were installed.
        active_variant: the configuration that runs (see :func:`set_variant`).
        step_index: the step last given to :func:`set_step` (0 before any call).
        timestep: the timestep last given to :func:`set_step` (None before any call); kept as given
            (a tensor stays a tensor: it is never read on the host).
    """

    entries: list[PatchEntry] = field(default_factory=list)
    active_variant: str = DEFAULT_VARIANT
    step_index: int = 0
    timestep: Any = None

    @property
    def variants(self) -> tuple[str, ...]:
        """The configurations: ``"default"`` (always, even without specs), then the others in the
        order their first spec was installed."""
        return tuple(dict.fromkeys([DEFAULT_VARIANT, *(entry.variant for entry in self.entries)]))

    @property
    def specs(self) -> dict[str, dict[type, Any]]:
        """configuration -> spec type -> spec, for the configurations that hold specs."""
        specs: dict[str, dict[type, Any]] = {}
        for entry in self.entries:
            specs.setdefault(entry.variant, {})[type(entry.spec)] = entry.spec
        return specs

    def find(self, spec_type: type | None = None, variant: str | None = None) -> list[PatchEntry]:
        """The entries of type ``spec_type`` in configuration ``variant`` (None: any), in
        installation order."""
        return [
            entry for entry in self.entries
            if (spec_type is None or type(entry.spec) is spec_type)
            and (variant is None or entry.variant == variant)
        ]


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


def _check_variant(name: Any) -> str:
    if not isinstance(name, str):
        raise TypeError(f"variant must be a str (a configuration's name); got {describe(name)}")
    if not name:
        raise ValueError("variant must be a non-empty str; got ''")
    return name


def _check_spec_type(spec_type: Any) -> type:
    if not isinstance(spec_type, type):
        raise TypeError(
            f"spec_type must be a spec class (e.g. ReDilation); got {describe(spec_type)}"
        )
    return spec_type


def _unknown_variant(model: nn.Module, name: str, state: PatchState | None) -> ValueError:
    known = ", ".join(repr(v) for v in (state.variants if state else (DEFAULT_VARIANT,)))
    return ValueError(
        f"this {type(model).__name__} has no configuration {name!r}; its configurations: {known} "
        "(a configuration exists once hrkernels.patch(unet, spec, variant=name) installed a spec "
        "into it)"
    )


def _describe(entries: Sequence[PatchEntry]) -> str:
    return ", ".join(f"{type(e.spec).__name__} in {e.variant!r}" for e in entries) or "nothing"


def patch_state(unet: nn.Module) -> PatchState | None:
    """The :class:`PatchState` of a patched UNet, or None when it is not patched.

    Example:
        >>> import hrkernels
        >>> from hrkernels.testing import tiny_pipeline
        >>> unet = tiny_pipeline("sd15").unet
        >>> _ = hrkernels.patch(unet, hrkernels.ReDilation({"mid_block": 2}), variant="base")
        >>> state = patch_state(unet)
        >>> state.variants, state.active_variant, state.step_index
        (('default', 'base'), 'default', 0)
        >>> _ = hrkernels.unpatch(unet)
    """
    return _model(unet).__dict__.get(STATE_ATTRIBUTE)


def is_patched(
    unet: nn.Module, spec_type: type | None = None, *, variant: str | None = None
) -> bool:
    """Whether :func:`patch` installed a spec on ``unet`` (of type ``spec_type``, in configuration
    ``variant``; None: any) that :func:`unpatch` has not removed.

    Example:
        >>> import hrkernels
        >>> from hrkernels.testing import tiny_pipeline
        >>> unet = tiny_pipeline("sd15").unet
        >>> _ = hrkernels.patch(unet, hrkernels.ReDilation({"mid_block": 2}))
        >>> is_patched(unet), is_patched(unet, hrkernels.ReDilation, variant="base")
        (True, False)
        >>> _ = hrkernels.unpatch(unet)
    """
    if spec_type is not None:
        _check_spec_type(spec_type)
    if variant is not None:
        _check_variant(variant)
    state = patch_state(unet)
    return state is not None and bool(state.find(spec_type, variant))


def _spec_list(specs: Any) -> tuple[Any, ...]:
    if isinstance(specs, Sequence) and not isinstance(specs, str):
        specs = tuple(specs)
    else:
        specs = (specs,)
    if not specs:
        raise ValueError("patch needs at least one spec; got an empty list")
    for spec in specs:
        if type(spec) not in _SPEC_TYPES:
            known = ", ".join(sorted(t.__name__ for t in _SPEC_TYPES)) or "none"
            raise TypeError(
                f"{type(spec).__name__} is not a registered spec type (registered: {known}); "
                "see hrkernels.patching.register_spec_type"
            )
    return specs


def _check_new_specs(
    model: nn.Module, state: PatchState, specs: tuple[Any, ...], variant: str
) -> None:
    """Refuse a second spec of a type in one configuration (given together or installed)."""
    for index, spec in enumerate(specs):
        name = type(spec).__name__
        if any(type(other) is type(spec) for other in specs[:index]):
            raise ValueError(
                f"two {name} specs for configuration {variant!r}: a configuration holds one spec "
                f"of each type; merge them into one {name}, or install the second into another "
                "configuration (patch(unet, spec, variant=...))"
            )
        if state.find(type(spec), variant):
            raise ValueError(
                f"this {type(model).__name__} has a {name} in configuration {variant!r} already "
                f"(patched: {_describe(state.entries)}); remove it first with "
                f"hrkernels.unpatch(unet, {name}, variant={variant!r}), or install into another "
                "configuration (patch(unet, spec, variant=...))"
            )


def _check_targets(
    state: PatchState, specs: tuple[Any, ...], plans: list[Plan], variant: str
) -> None:
    """Refuse two specs that change the same module, unless they are of one type that shares
    modules across configurations (and in different configurations)."""
    claims = [(entry.variant, type(entry.spec), entry.targets) for entry in state.entries]
    for spec, plan in zip(specs, plans, strict=True):
        spec_type = type(spec)
        for other_variant, other_type, other_targets in claims:
            shared = plan.targets & other_targets
            if not shared or (other_type is spec_type and _SPEC_TYPES[spec_type].shares_modules):
                continue
            target = min(shared)
            if other_type is spec_type:
                raise ValueError(
                    f"{spec_type.__name__} specs in configurations {other_variant!r} and "
                    f"{variant!r} both change {target!r}, and {spec_type.__name__} cannot share a "
                    "module across configurations (it was registered without shares_modules)"
                )
            raise ValueError(
                f"{other_type.__name__} (configuration {other_variant!r}) and {spec_type.__name__} "
                f"(configuration {variant!r}) both change {target!r}; two spec types cannot "
                "change the same module"
            )
        claims.append((variant, spec_type, plan.targets))


def patch(unet: ModuleT, specs: Any, *, variant: str = DEFAULT_VARIANT) -> ModuleT:
    """Change how ``unet`` computes, as the spec (or list of specs) says, in configuration
    ``variant``; reversible with :func:`unpatch`.

    Calls compose: a UNet holds one spec of each type per configuration, and specs installed by
    earlier calls stay. Every spec is resolved and validated before anything changes. Weights,
    buffers, module classes and ``state_dict`` are never changed: behaviours are installed by
    swapping instance ``forward``s (or processors) and everything needed to restore them is kept.
    New specs start at the UNet's current step (0 on the first patch; see :func:`set_step`) and run
    only while their configuration is the active one (see :func:`variant`). A ``torch.compile``
    wrapper (``OptimizedModule``) may be passed: the module it wraps is patched.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (any ``nn.Module`` with the named layers).
        specs: one spec (e.g. ``hrkernels.ReDilation``) or a list of specs of registered types,
            at most one of each type.
        variant: the configuration to install them into (created by its first spec).

    Returns:
        ``unet`` itself (patched in place).

    Raises:
        TypeError: a spec is not of a registered type, ``unet`` is not a module, or ``variant`` is
            not a str.
        ValueError: the configuration has a spec of that type already (unpatch that type first,
            ``unpatch(unet, SpecType, variant=...)``), or two specs of one type are given; a spec
            names a block or layer that does not exist (the message lists the blocks); two spec
            types change the same module (or one type that cannot share modules does so in two
            configurations); or a spec's own checks fail. Nothing is changed then.

    Example:
        >>> import hrkernels
        >>> from hrkernels.testing import tiny_pipeline
        >>> unet = tiny_pipeline("sdxl").unet
        >>> spec = hrkernels.ReDilation({"mid_block": 2, "up_blocks.0": 2}, until_step=30)
        >>> _ = hrkernels.patch(unet, spec)
        >>> # ScaleCrafter's noise-damped guidance also needs a less re-dilated "base" UNet:
        >>> _ = hrkernels.patch(unet, hrkernels.ReDilation({"mid_block": 1.5}), variant="base")
        >>> hrkernels.set_step(unet, 30, 10)  # from until_step on, the original convolutions run
        >>> _ = hrkernels.unpatch(unet)
    """
    model = _model(unet)
    variant = _check_variant(variant)
    spec_list = _spec_list(specs)
    existing = patch_state(model)
    state = PatchState() if existing is None else existing
    _check_new_specs(model, state, spec_list, variant)
    plans = [_SPEC_TYPES[type(spec)].resolve(spec, model) for spec in spec_list]
    _check_targets(state, spec_list, plans, variant)
    added: list[PatchEntry] = []
    try:
        for spec, plan in zip(spec_list, plans, strict=True):
            entry = PatchEntry(variant, spec, frozenset(plan.targets), plan.install(variant))
            added.append(entry)
            entry.installed.set_active(variant == state.active_variant)
            entry.installed.set_step(state.step_index, state.timestep)
    except BaseException:
        for entry in reversed(added):
            entry.installed.remove()
        raise
    state.entries.extend(added)
    if existing is None:
        setattr(model, STATE_ATTRIBUTE, state)
    return unet


def unpatch(
    unet: ModuleT, spec_type: type | None = None, *, variant: str | None = None
) -> ModuleT:
    """Remove the specs of type ``spec_type`` in configuration ``variant`` (None: all types, all
    configurations) and restore what they changed exactly; what stays runs as if it had been
    patched alone. Once nothing is left the UNet is unpatched: the same forwards as before the
    first :func:`patch`, so bitwise the same outputs (``state_dict`` was never changed).

    Args:
        unet: a UNet patched by :func:`patch` (or its ``torch.compile`` wrapper).
        spec_type: the spec class to remove (e.g. ``hrkernels.ReDilation``), or None for all.
        variant: the configuration to remove it from, or None for all.

    Returns:
        ``unet`` itself.

    Raises:
        TypeError: ``spec_type`` is not a class or ``variant`` not a str.
        ValueError: ``unet`` is not patched, ``variant`` names no configuration, or no spec of
            ``spec_type`` is installed there (unpatching is never a silent no-op); or the removal
            would empty the active configuration while other specs stay (switch to another first,
            ``set_variant(unet, "default")``).
        RuntimeError: a patched forward was replaced by something else after patching, so it cannot
            be restored; the specs not yet removed stay recorded (fix it and call unpatch again).

    Example:
        >>> import hrkernels
        >>> from hrkernels.testing import tiny_pipeline
        >>> unet = tiny_pipeline("sd15").unet
        >>> _ = hrkernels.patch(unet, hrkernels.ReDilation({"mid_block": 2}))
        >>> _ = hrkernels.patch(unet, hrkernels.ReDilation({"mid_block": 3}), variant="base")
        >>> _ = hrkernels.unpatch(unet, hrkernels.ReDilation, variant="base")  # "default" stays
        >>> patch_state(unet).variants
        ('default',)
        >>> _ = hrkernels.unpatch(unet)  # everything
        >>> hrkernels.is_patched(unet)
        False
    """
    model = _model(unet)
    if spec_type is not None:
        _check_spec_type(spec_type)
    if variant is not None:
        _check_variant(variant)
    state = patch_state(model)
    if state is None:
        raise ValueError(f"this {type(model).__name__} is not patched; there is nothing to unpatch")
    if variant is not None and variant not in state.variants:
        raise _unknown_variant(model, variant, state)
    selected = state.find(spec_type, variant)
    if not selected:
        what = "spec" if spec_type is None else spec_type.__name__
        where = "" if variant is None else f" in configuration {variant!r}"
        raise ValueError(
            f"no {what} is installed{where} on this {type(model).__name__} "
            f"(patched: {_describe(state.entries)}); there is nothing to unpatch"
        )
    remaining = [entry for entry in state.entries if entry not in selected]
    active = state.active_variant
    if (
        remaining
        and active != DEFAULT_VARIANT
        and not any(entry.variant == active for entry in remaining)
    ):
        raise ValueError(
            f"configuration {active!r} is active and this would remove its last spec; switch to "
            "another first (hrkernels.patching.set_variant(unet, 'default'))"
        )
    for entry in reversed(selected):
        entry.installed.remove()
        state.entries.remove(entry)
    if not state.entries:
        delattr(model, STATE_ATTRIBUTE)
    return unet


@contextlib.contextmanager
def patched(unet: ModuleT, specs: Any, *, variant: str = DEFAULT_VARIANT) -> Iterator[ModuleT]:
    """``with patched(unet, spec): ...``: :func:`patch` on entry; on exit (also when the block
    raises) :func:`unpatch` of exactly the spec types it installed, in that configuration (specs
    patched before the block stay).

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
    spec_list = _spec_list(specs)
    patch(unet, spec_list, variant=variant)
    try:
        yield unet
    finally:
        for spec in reversed(spec_list):
            unpatch(unet, type(spec), variant=variant)


def set_step(unet: nn.Module, step_index: int, timestep: Any = None) -> None:
    """Tell a patched UNet which denoising step comes next, before evaluating it for that step.

    Every installed spec, in every configuration, derives its behaviour for the step from it
    (``ReDilation``: whether the step is before ``until_step`` and, when progressive, the step's
    factors) and stores only the result as plain Python attributes, so under ``torch.compile`` a new
    step recompiles only when the behaviour changes. Before the first call, step 0 is assumed.
    Nothing is read from ``timestep`` on the host: it is stored as given (a tensor or a number) for
    specs that use it on the device.

    Args:
        unet: a patched UNet (or its ``torch.compile`` wrapper).
        step_index: index of the step in the sampler's loop, ``>= 0``.
        timestep: the step's timestep, or None.

    Raises:
        ValueError: ``unet`` is not patched, or ``step_index < 0``.
        TypeError: ``step_index`` is not an integer (bools and tensors are refused).

    Example:
        >>> import hrkernels
        >>> from hrkernels.testing import tiny_pipeline
        >>> unet = tiny_pipeline("sd15").unet
        >>> with hrkernels.patched(unet, hrkernels.ReDilation({"mid_block": 2}, until_step=10)):
        ...     for step_index, timestep in enumerate([999, 899, 799]):
        ...         hrkernels.set_step(unet, step_index, timestep)
        ...         # ... evaluate the UNet for this step
    """
    state = patch_state(unet)
    if state is None:
        raise ValueError(
            f"this {type(_model(unet)).__name__} is not patched; call hrkernels.patch first"
        )
    step_index = check_int(step_index, "step_index", minimum=0)
    for entry in state.entries:
        entry.installed.set_step(step_index, timestep)
    state.step_index = step_index
    state.timestep = timestep


def set_variant(unet: nn.Module, name: str) -> str:
    """Make configuration ``name`` the active one: its specs run, those of the other
    configurations run the original behaviour. Returns the configuration that was active.

    Only Python attributes change (no tensor work), so samplers may switch around every UNet call;
    under ``torch.compile`` each distinct configuration compiles once, then switches reuse the
    graphs. Prefer the context manager :func:`variant`, which switches back. Every UNet has the
    configuration ``"default"`` (an unpatched UNet has only that one).

    Args:
        unet: a UNet (or its ``torch.compile`` wrapper).
        name: a configuration of it (``patch_state(unet).variants``).

    Raises:
        TypeError: ``name`` is not a str.
        ValueError: the UNet has no configuration ``name`` (the message lists those it has).

    Example:
        >>> import hrkernels
        >>> from hrkernels.testing import tiny_pipeline
        >>> unet = tiny_pipeline("sd15").unet
        >>> _ = hrkernels.patch(unet, hrkernels.ReDilation({"mid_block": 2}), variant="base")
        >>> set_variant(unet, "base")
        'default'
        >>> set_variant(unet, "default")
        'base'
        >>> _ = hrkernels.unpatch(unet)
    """
    model = _model(unet)
    name = _check_variant(name)
    state = patch_state(model)
    if state is None or name not in state.variants:
        if state is None and name == DEFAULT_VARIANT:
            return DEFAULT_VARIANT
        raise _unknown_variant(model, name, state)
    previous = state.active_variant
    if name != previous:
        for entry in state.find(variant=previous):
            entry.installed.set_active(False)
        for entry in state.find(variant=name):
            entry.installed.set_active(True)
        state.active_variant = name
    return previous


@contextlib.contextmanager
def variant(unet: ModuleT, name: str) -> Iterator[ModuleT]:
    """``with variant(unet, "base"): ...``: configuration ``name`` is active inside the block
    (see :func:`set_variant`); the one active before is restored on exit, also when the block
    raises.

    Raises:
        TypeError / ValueError: as :func:`set_variant` (unknown name: the message lists the
            configurations the UNet has).

    Example (ScaleCrafter's noise-damped guidance: two configurations in one step):
        >>> import hrkernels
        >>> from hrkernels.testing import tiny_pipeline
        >>> unet = tiny_pipeline("sdxl").unet
        >>> main = hrkernels.ReDilation({"mid_block": 4, "up_blocks.0": 4}, until_step=35)
        >>> base = hrkernels.ReDilation({"mid_block": 2, "up_blocks.0": 2}, until_step=35)
        >>> _ = hrkernels.patch(unet, main)
        >>> _ = hrkernels.patch(unet, base, variant="base")
        >>> with variant(unet, "base"):
        ...     patch_state(unet).active_variant  # eps_base = unet(...) here
        'base'
        >>> patch_state(unet).active_variant  # eps = unet(...) here
        'default'
        >>> _ = hrkernels.unpatch(unet)
    """
    previous = set_variant(unet, name)
    try:
        yield unet
    finally:
        set_variant(unet, previous)

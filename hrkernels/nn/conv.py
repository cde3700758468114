"""The forward a re-dilated ``nn.Conv2d`` runs (ScaleCrafter's re-dilated and dispersed
convolutions), with one setting per named configuration ("variant") of the model.

:class:`ReDilatedConvForward` is a small callable installed as a convolution's instance ``forward``
(``conv.forward = ReDilatedConvForward(conv)``): the module keeps its class, its parameters and its
``state_dict``; removing the instance attribute restores the class's forward exactly.

One forward serves every configuration that re-dilates the layer: it holds a setting per variant
(dispersion, and the dilation of the current step) and runs the active variant's, or the original
forward when no variant, or one without a dilation at this step, is active. Everything it reads
when called is a plain Python attribute set from the host between model evaluations (the name of
the variant that runs, a ``str``; the setting's dilation, a ``str``), so ``torch.compile`` guards on
their values: one graph per distinct configuration, never one per step or per switch.
"""

from __future__ import annotations

import torch
from torch import nn

from hrkernels import ops
from hrkernels._validate import check_bool, check_int, check_real, describe

__all__ = ["ReDilatedConvForward", "check_redilatable"]


def check_redilatable(conv: nn.Module, name: str = "conv") -> None:
    """Raise unless ``conv`` is a convolution that re-dilation can run without changing its
    meaning.

    Re-dilating a kernel with factor ``d`` runs it with dilation ``d`` and padding ``d * (k // 2)``,
    which is the same layer at dilation 1 only if the layer is an ``nn.Conv2d`` with an odd square
    kernel of at least 3x3, ``groups == 1``, dilation 1, zero padding of ``k // 2`` on every side
    and a square stride (the constraints of :func:`hrkernels.ops.dilated_conv2d`).

    Args:
        conv: the module.
        name: its name in the model, for the error message.

    Raises:
        TypeError: ``conv`` is not an ``nn.Conv2d``.
        ValueError: one of the constraints above does not hold (the message says which).
    """
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"{name} must be an nn.Conv2d to be re-dilated; got {type(conv).__name__}")
    kernel_h, kernel_w = conv.kernel_size
    problem = None
    if kernel_h != kernel_w or kernel_h % 2 == 0 or kernel_h < 3:
        problem = f"kernel {kernel_h}x{kernel_w} (re-dilation needs an odd square kernel >= 3x3)"
    elif conv.groups != 1:
        problem = f"groups={conv.groups} (re-dilation needs groups=1)"
    elif tuple(conv.dilation) != (1, 1):
        problem = f"dilation={tuple(conv.dilation)} (re-dilation needs a dilation-1 layer)"
    elif isinstance(conv.padding, str) or tuple(conv.padding) != (kernel_h // 2, kernel_h // 2):
        problem = f"padding={conv.padding!r} (re-dilation needs padding {kernel_h // 2})"
    elif conv.padding_mode != "zeros":
        problem = f"padding_mode={conv.padding_mode!r} (re-dilation needs 'zeros')"
    elif conv.stride[0] != conv.stride[1]:
        problem = f"stride={tuple(conv.stride)} (re-dilation needs a square stride)"
    if problem is not None:
        raise ValueError(f"{name} cannot be re-dilated: {problem}")


class _Setting:
    """What one variant runs on a layer: its dispersion, and its dilation at the current step.

    The forward reads it as ``self._settings[<variant>]``, so under ``torch.compile`` each
    variant's attributes have their own sources and the int/float ones never change value under
    one source (a changing number would be turned symbolic by "automatic dynamic").
    """

    def __init__(self, dispersion_scale: int | None, dispersion_eta: float) -> None:
        self.dispersion_scale = dispersion_scale
        self.dispersion_eta = dispersion_eta
        # None: the original forward runs. Otherwise the dilation of the kernel that runs (the
        # dispersed kernel's when dispersed) as the repr of a float. A str, not a float:
        # torch.compile guards on a str's value, while a float that changes between calls is
        # turned into a symbolic float, which the op's argument checks cannot take (and the
        # dilation decides the kernel anyway).
        self.dilation: str | None = None


class ReDilatedConvForward:
    """A convolution's forward that runs its kernel re-dilated (or dispersed) in the variants
    (named configurations) that ask for it, and the original forward otherwise.

    Installed as ``conv.forward`` (an instance attribute; :meth:`install` / :meth:`remove`); the
    one installed on a layer is :meth:`installed_on`. The convolution is evaluated from its live
    ``weight`` and ``bias`` on every call, so LoRA merges or any other change of the parameters is
    honoured; nothing is ever written to the parameters.

    Each variant added with :meth:`add_variant` has its own dispersion and its own factor
    (:meth:`set_factor`); :meth:`set_active` chooses the variant that runs. With the active
    variant's factor:

    * ``None`` (off), or ``1`` without dispersion, or no active variant: the forward the module had
      before :meth:`install` runs, so the output is bitwise that of the unpatched layer.
    * ``d`` without dispersion: ``hrkernels.ops.dilated_conv2d(x, weight, bias, dilation=d,
      stride)`` (ScaleCrafter's re-dilation; fractional ``d`` is the "stretch").
    * ``d`` with dispersion scale ``s`` (ScaleCrafter's dispersed convolution): the kernel is
      enlarged with ``hrkernels.ops.disperse_kernel(weight, s, eta)`` (``[O, I, 3, 3]`` ->
      ``[O, I, 5, 5]`` for ``s = 2``) and run with dilation ``d / s``, which must be ``>= 1``.

    Args:
        conv: the convolution (see :func:`check_redilatable`).
        name: the layer's name in the model, for error messages.

    Input/output: ``x`` ``[B, C_in, H, W]`` in the layer's dtype; output ``[B, C_out, H', W']``
    with ``H' = (H - 1) // stride + 1``, as the unpatched layer.

    Example:
        >>> conv = torch.nn.Conv2d(4, 8, 3, padding=1)
        >>> forward = ReDilatedConvForward(conv)
        >>> forward.add_variant("default")
        >>> forward.add_variant("base", dispersion_scale=2)
        >>> forward.set_factor("default", 2)  # dilation 2
        >>> forward.set_factor("base", 4)  # the dispersed 5x5 kernel at dilation 4 / 2
        >>> forward.install()
        >>> forward.set_active("default", True)
        >>> tuple(conv(torch.randn(1, 4, 16, 16)).shape)
        (1, 8, 16, 16)
        >>> forward.set_active("base", True)  # "base" runs now
        >>> forward.dilation
        2.0
        >>> forward.remove()
    """

    def __init__(self, conv: nn.Conv2d, name: str = "conv") -> None:
        check_redilatable(conv, name)
        self.conv = conv
        self.name = name
        self.stride = int(conv.stride[0])
        self._settings: dict[str, _Setting] = {}
        # The variant set_active chose (None: none), and the one whose dilation runs now: the
        # active variant if it has a dilation at this step, else None. The forward reads only the
        # latter, so every configuration in which the layer runs its original forward shares one
        # compiled graph.
        self._active: str | None = None
        self._running: str | None = None
        self._installed = False
        self._original_forward = None
        self._had_instance_forward = False
        self._previous_instance_forward = None

    @classmethod
    def installed_on(cls, conv: nn.Module) -> ReDilatedConvForward | None:
        """The :class:`ReDilatedConvForward` that is ``conv``'s ``forward`` now, or None."""
        forward = conv.__dict__.get("forward")
        return forward if isinstance(forward, cls) else None

    # -- variants ---------------------------------------------------------------------------------

    @property
    def variants(self) -> tuple[str, ...]:
        """The variants added (and not removed), in the order they were added."""
        return tuple(self._settings)

    def _setting(self, variant: str) -> _Setting:
        setting = self._settings.get(variant)
        if setting is None:
            known = ", ".join(repr(name) for name in self._settings) or "none"
            raise ValueError(f"{self.name} has no variant {variant!r} (its variants: {known})")
        return setting

    def add_variant(
        self, variant: str, dispersion_scale: int | None = None, dispersion_eta: float = 0.05
    ) -> None:
        """Add a variant that re-dilates this layer, switched off (factor None) and inactive.

        Args:
            variant: its name.
            dispersion_scale: ``None``, or the integer scale ``s >= 2`` of the dispersed kernel.
            dispersion_eta: weight of the pixel-level calibration term of the dispersion
                (``eta``), ``>= 0``.

        Raises:
            TypeError: ``variant`` is not a str, or a dispersion argument has the wrong type.
            ValueError: the variant exists already, or a dispersion argument is out of range.
        """
        if not isinstance(variant, str):
            raise TypeError(f"variant must be a str; got {describe(variant)}")
        if variant in self._settings:
            raise ValueError(f"{self.name} has a variant {variant!r} already")
        if dispersion_scale is not None:
            dispersion_scale = check_int(
                dispersion_scale, f"the dispersion scale of {self.name}", minimum=2
            )
        dispersion_eta = check_real(dispersion_eta, "dispersion_eta", minimum=0)
        self._settings[variant] = _Setting(dispersion_scale, dispersion_eta)

    def remove_variant(self, variant: str) -> None:
        """Forget a variant (if it was active, no variant is active afterwards).

        Raises:
            ValueError: the layer has no such variant.
        """
        self._setting(variant)
        del self._settings[variant]
        if self._active == variant:
            self._active = None
        self._update_running()

    def set_factor(self, variant: str, factor: float | None) -> None:
        """Switch the variant's re-dilation off (``None``) or on with factor ``factor >= 1``.

        With dispersion the dispersed kernel then runs at dilation ``factor / dispersion_scale``.

        Raises:
            TypeError: ``factor`` is not None or a real number.
            ValueError: no such variant, ``factor < 1``, or ``factor / dispersion_scale < 1``
                when dispersed.
        """
        setting = self._setting(variant)
        if factor is None:
            setting.dilation = None
        else:
            factor = check_real(factor, f"the re-dilation factor of {self.name}", minimum=1)
            scale = setting.dispersion_scale
            if scale is None:
                setting.dilation = None if factor == 1.0 else repr(factor)
            elif factor / scale < 1.0:
                raise ValueError(
                    f"{self.name} is dispersed with scale {scale} in variant {variant!r}, so its "
                    f"re-dilation factor must be >= {scale}; got {factor}"
                )
            else:
                setting.dilation = repr(factor / scale)
        self._update_running()

    def set_active(self, variant: str, active: bool) -> None:
        """Make ``variant`` the one that runs (``active=True``), or stop it if it is the one that
        runs (``active=False``; then the original forward runs). Deactivating a variant that is
        not the active one changes nothing, so the order in which the variants of a switch are
        told does not matter.

        Raises:
            ValueError: the layer has no such variant.
        """
        self._setting(variant)
        if check_bool(active, "active"):
            self._active = variant
        elif self._active == variant:
            self._active = None
        self._update_running()

    @property
    def active_variant(self) -> str | None:
        """The variant :meth:`set_active` made active, or None."""
        return self._active

    def _update_running(self) -> None:
        active = self._active
        runs = active is not None and self._settings[active].dilation is not None
        self._running = active if runs else None

    @property
    def dilation(self) -> float | None:
        """The dilation the layer's kernel (the dispersed one, when dispersed) runs with now, or
        None when the original forward runs."""
        if self._running is None:
            return None
        return float(self._settings[self._running].dilation)

    # -- installing -------------------------------------------------------------------------------

    @property
    def installed(self) -> bool:
        """Whether :meth:`install` ran (and :meth:`remove` has not run since)."""
        return self._installed

    def install(self) -> None:
        """Make this object the convolution's ``forward`` (an instance attribute).

        The forward the module had (its class's, or an instance ``forward`` someone installed
        before) is kept: it runs when re-dilation is off and is put back by :meth:`remove`.

        Raises:
            RuntimeError: it is installed already, or the layer already runs another
                :class:`ReDilatedConvForward` (add a variant to that one instead).
        """
        current = self.conv.__dict__.get("forward")
        if self._installed:
            raise RuntimeError(f"the re-dilated forward of {self.name} is installed already")
        if isinstance(current, ReDilatedConvForward):
            raise RuntimeError(f"{self.name} is re-dilated already (by another patch)")
        self._had_instance_forward = "forward" in self.conv.__dict__
        self._previous_instance_forward = current
        self._original_forward = self.conv.forward
        self.conv.forward = self
        self._installed = True

    def check_removable(self) -> None:
        """Raise ``RuntimeError`` if :meth:`remove` cannot restore the layer: this object is no
        longer its ``forward`` (something replaced ``conv.forward`` after :meth:`install`, and
        removing would drop it)."""
        if self._installed and self.conv.__dict__.get("forward") is not self:
            raise RuntimeError(
                f"cannot restore {self.name}: its forward is no longer the re-dilated one "
                f"(conv.forward was replaced after patching, by {self.conv.forward!r})"
            )

    def remove(self) -> None:
        """Put back the forward the module had before :meth:`install` (no-op if not installed).

        Raises:
            RuntimeError: see :meth:`check_removable`.
        """
        if not self._installed:
            return
        self.check_removable()
        if self._had_instance_forward:
            self.conv.forward = self._previous_instance_forward
        else:
            del self.conv.forward
        self._original_forward = None
        self._previous_instance_forward = None
        self._installed = False

    # -- the forward ------------------------------------------------------------------------------

    def __call__(self, input: torch.Tensor) -> torch.Tensor:
        running = self._running
        if running is None:
            return self._original_forward(input)
        hook = getattr(self.conv, "_hf_hook", None)
        if hook is None:
            return self._dilated(input, running)
        # An offload hook (enable_sequential_cpu_offload) owns the weights: run it around the
        # dilated convolution as accelerate runs it around the module's own forward.
        args, _ = hook.pre_forward(self.conv, input)
        return hook.post_forward(self.conv, self._dilated(args[0], running))

    def _dilated(self, input: torch.Tensor, running: str) -> torch.Tensor:
        setting = self._settings[running]
        weight = self.conv.weight
        if setting.dispersion_scale is not None:
            weight = ops.disperse_kernel(weight, setting.dispersion_scale, setting.dispersion_eta)
        return ops.dilated_conv2d(
            input, weight, self.conv.bias, dilation=float(setting.dilation), stride=self.stride
        )

    def __repr__(self) -> str:
        settings = ", ".join(
            f"{variant!r}: dilation {setting.dilation}"
            + ("" if setting.dispersion_scale is None else f", scale {setting.dispersion_scale}")
            for variant, setting in self._settings.items()
        )
        return f"ReDilatedConvForward({self.name}, active={self._active!r}, {{{settings}}})"

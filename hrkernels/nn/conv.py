"""The forward a re-dilated ``nn.Conv2d`` runs (ScaleCrafter's re-dilated and dispersed
convolutions).

:class:`ReDilatedConvForward` is a small callable installed as a convolution's instance ``forward``
(``conv.forward = ReDilatedConvForward(conv)``): the module keeps its class, its parameters and its
``state_dict``; removing the instance attribute restores the class's forward exactly. Which dilation
it runs is one plain Python attribute set from the host between UNet evaluations
(:meth:`ReDilatedConvForward.set_factor`), so ``torch.compile`` guards on it: one graph per distinct
value, never one per step.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from hrkernels import ops

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


class ReDilatedConvForward:
    """A convolution's forward that runs its kernel re-dilated (or dispersed) when switched on.

    Installed as ``conv.forward`` (an instance attribute; :meth:`install` / :meth:`remove`). The
    convolution is evaluated from its live ``weight`` and ``bias`` on every call, so LoRA merges or
    any other change of the parameters is honoured; nothing is ever written to the parameters.

    * ``factor`` ``None`` (off), or ``1`` without dispersion: the forward the module had before
      :meth:`install` runs, so the output is bitwise that of the unpatched layer.
    * ``factor`` ``d`` without dispersion: ``hrkernels.ops.dilated_conv2d(x, weight, bias,
      dilation=d, stride)`` (ScaleCrafter's re-dilation; fractional ``d`` is the "stretch").
    * ``factor`` ``d`` with ``dispersion_scale`` ``s`` (ScaleCrafter's dispersed convolution): the
      kernel is enlarged with ``hrkernels.ops.disperse_kernel(weight, s, eta)`` (``[O, I, 3, 3]`` ->
      ``[O, I, 5, 5]`` for ``s = 2``) and run with dilation ``d / s``, which must be ``>= 1``.

    Args:
        conv: the convolution (see :func:`check_redilatable`).
        dispersion_scale: ``None``, or the integer scale ``s >= 2`` of the dispersed kernel.
        dispersion_eta: weight of the pixel-level calibration term of the dispersion (``eta``).
        name: the layer's name in the model, for error messages.

    Input/output: ``x`` ``[B, C_in, H, W]`` in the layer's dtype; output ``[B, C_out, H', W']``
    with ``H' = (H - 1) // stride + 1``, as the unpatched layer.

    Example:
        >>> conv = torch.nn.Conv2d(4, 8, 3, padding=1)
        >>> forward = ReDilatedConvForward(conv)
        >>> forward.install()
        >>> forward.set_factor(2)
        >>> tuple(conv(torch.randn(1, 4, 16, 16)).shape)
        (1, 8, 16, 16)
        >>> forward.remove()
    """

    def __init__(
        self,
        conv: nn.Conv2d,
        dispersion_scale: int | None = None,
        dispersion_eta: float = 0.05,
        name: str = "conv",
    ) -> None:
        check_redilatable(conv, name)
        if dispersion_scale is not None and (
            isinstance(dispersion_scale, bool)
            or not isinstance(dispersion_scale, int)
            or dispersion_scale < 2
        ):
            raise ValueError(
                f"dispersion scale of {name} must be None or an int >= 2; got {dispersion_scale!r}"
            )
        self.conv = conv
        self.name = name
        self.dispersion_scale = dispersion_scale
        self.dispersion_eta = float(dispersion_eta)
        self.stride = int(conv.stride[0])
        # The only state the forward reads: None runs the original forward, otherwise the dilation
        # of the kernel that runs (the dispersed kernel's when dispersed) as the repr of a float.
        # A str, not a float: torch.compile guards on a str's value, while a float attribute that
        # changes between calls is turned into a symbolic float ("automatic dynamic"), which the
        # op's argument checks cannot take (and the dilation decides the kernel anyway).
        self._dilation: str | None = None
        self._installed = False
        self._original_forward = None
        self._had_instance_forward = False
        self._previous_instance_forward = None

    # -- per-step state ---------------------------------------------------------------------------

    @property
    def dilation(self) -> float | None:
        """The dilation the layer's kernel (the dispersed one, when dispersed) runs with now, or
        None when the original forward runs."""
        return None if self._dilation is None else float(self._dilation)

    def set_factor(self, factor: float | None) -> None:
        """Switch re-dilation off (``None``) or on with re-dilation factor ``factor >= 1``.

        With dispersion the dispersed kernel then runs at dilation ``factor / dispersion_scale``.

        Raises:
            ValueError: ``factor < 1``, or ``factor / dispersion_scale < 1`` when dispersed.
        """
        if factor is None:
            self._dilation = None
            return
        factor = float(factor)
        if not (math.isfinite(factor) and factor >= 1.0):
            raise ValueError(f"re-dilation factor of {self.name} must be >= 1; got {factor}")
        if self.dispersion_scale is None:
            self._dilation = None if factor == 1.0 else repr(factor)
            return
        dilation = factor / self.dispersion_scale
        if dilation < 1.0:
            raise ValueError(
                f"{self.name} is dispersed with scale {self.dispersion_scale}, so its re-dilation "
                f"factor must be >= {self.dispersion_scale}; got {factor}"
            )
        self._dilation = repr(dilation)

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
                :class:`ReDilatedConvForward` (the layer would be re-dilated twice).
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
        dilation = self._dilation
        if dilation is None:
            return self._original_forward(input)
        weight = self.conv.weight
        if self.dispersion_scale is not None:
            weight = ops.disperse_kernel(weight, self.dispersion_scale, self.dispersion_eta)
        return ops.dilated_conv2d(
            input, weight, self.conv.bias, dilation=float(dilation), stride=self.stride
        )

    def __repr__(self) -> str:
        dispersed = (
            "" if self.dispersion_scale is None else f", dispersion_scale={self.dispersion_scale}"
        )
        return f"ReDilatedConvForward({self.name}, dilation={self.dilation}{dispersed})"

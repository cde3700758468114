"""The ``ReDilation`` spec: ScaleCrafter's re-dilated (and dispersed) convolutions.

See METHODS.md (ScaleCrafter). The spec picks convolution layers by block or layer name and gives
each a re-dilation factor; :func:`hrkernels.patch` installs
:class:`hrkernels.nn.ReDilatedConvForward` on each of them, and :func:`hrkernels.set_step`
switches them per step.

ReDilation shares modules across configurations: a layer re-dilated by ReDilations in several
configurations (ScaleCrafter's main and noise-damped "base" UNets) has one forward, which holds a
setting per configuration (``ReDilatedConvForward.add_variant``) and runs the active one's. Each
installed ReDilation adds its configuration to the forwards of its layers (creating and installing
a forward where a layer has none), sets its factors there per step, and on removal takes its
configuration out again (removing a forward once no configuration is left in it).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from hrkernels import ops
from hrkernels._validate import check_bool, check_int, check_real
from hrkernels.nn import ReDilatedConvForward, check_redilatable
from hrkernels.patching.names import ConvSlot, conv_slots, lora_convs, resolve_convs
from hrkernels.patching.registry import register_spec_type
from hrkernels.schedules import redilation_factor

__all__ = ["ReDilation", "redilation_factor"]  # redilation_factor: from hrkernels.schedules


class _FrozenMapping(Mapping):
    """A read-only copy of a mapping (unlike ``MappingProxyType``, it can be pickled and copied)."""

    def __init__(self, items: Mapping[str, Any]) -> None:
        self._items = dict(items)

    def __getitem__(self, key: str) -> Any:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return repr(self._items)


@dataclass(frozen=True)
class ReDilation:
    """Run selected 3x3 convolutions re-dilated (ScaleCrafter), optionally dispersed, until a step.

    Attributes:
        layers: block or layer name -> re-dilation factor ``d >= 1`` (int or float; fractional
            factors use the "stretch" of :func:`hrkernels.ops.dilated_conv2d`). A block name
            (``"mid_block"``, ``"up_blocks.0"``, or a part of one such as
            ``"up_blocks.0.resnets.1"``) stands for every 3x3 convolution inside it: the resnets'
            ``conv1``/``conv2`` and the down/upsamplers' ``conv``, never a 1x1 convolution
            (``conv_shortcut``, ``proj_in``); ``conv_in``/``conv_out`` are in no block. A full
            layer name (``"down_blocks.2.resnets.1.conv1"``) selects that convolution, which must
            have an odd square kernel of at least 3x3 (``"conv_in"`` is accepted this way). A
            convolution may be selected by one name only.
            Factor 1 (without ``progressive`` or dispersion) runs the layer unchanged.
        until_step: re-dilate while the step index (:func:`hrkernels.set_step`) is ``< until_step``;
            from ``until_step`` on, every selected layer runs its original forward (bitwise the
            unpatched output). None: at every step.
        progressive: ScaleCrafter's progressive schedule: at step ``i < until_step`` a layer with
            factor ``d`` runs with ``d_i = max(ceil(d * (until_step - i) / until_step), 2)``
            (computed exactly on the factor's decimal value; note it is never below 2). Needs
            ``until_step``.
        dispersed: None, or block or layer name -> integer scale ``s >= 2``: those layers
            (resolved as in ``layers``; each must also be selected by ``layers``) run ScaleCrafter's
            dispersed convolution: the kernel enlarged by ``hrkernels.ops.disperse_kernel(weight,
            s, dispersion_eta)`` (3x3 -> 5x5 for ``s = 2``), computed from the live weight at every
            call, with dilation ``d_i / s`` where ``d_i`` is the layer's factor at the step (so
            ``d_i / s >= 1`` is required at every step). The dispersion follows ``until_step`` like
            the re-dilation (after it, the original layer runs).
        dispersion_eta: weight of the pixel-level calibration in the dispersion's least squares
            (METHODS.md; ``eta`` of ``disperse_kernel``), >= 0.

    LoRA (peft) adapters on a selected layer: the base convolution and every adapter's 3x3
    ``lora_A`` convolution are re-dilated (and dispersed) alike, so an adapter's update of the
    kernel (``lora_B . lora_A``) is re-dilated with the kernel, exactly as if it were merged into
    the weight. Adapters are found when :func:`hrkernels.patch` and :func:`hrkernels.set_step` run;
    DoRA and other LoRA variants (which convolve with the base layer's own padding) are refused.

    Configurations: ReDilations installed into different configurations
    (``hrkernels.patch(unet, spec, variant="base")``) may re-dilate the same layers, each with its
    own factors, dispersion and ``until_step``; the layer runs the active configuration's (see
    :func:`hrkernels.patching.variant`).

    Raises (when created):
        TypeError / ValueError: a factor, scale, ``until_step`` or ``dispersion_eta`` of the wrong
            type or out of range, ``progressive`` without ``until_step``, or an empty ``layers``.
            Names are checked against the UNet by :func:`hrkernels.patch`.

    Example (ScaleCrafter's SDXL 2048^2 plan):
        >>> spec = ReDilation({"mid_block": 2, "up_blocks.0": 2}, until_step=30)
    """

    layers: Mapping[str, float]
    until_step: int | None = None
    progressive: bool = False
    dispersed: Mapping[str, int] | None = None
    dispersion_eta: float = 0.05

    def __post_init__(self) -> None:
        if not isinstance(self.layers, Mapping):
            raise TypeError(f"layers must be a mapping name -> factor; got {self.layers!r}")
        if not self.layers:
            raise ValueError("layers must name at least one block or layer")
        layers = {}
        for name, factor in self.layers.items():
            if not isinstance(name, str):
                raise TypeError(f"layer names must be strings; got {name!r}")
            layers[name] = check_real(factor, f"the factor of {name!r}", minimum=1)
        object.__setattr__(self, "layers", _FrozenMapping(layers))
        if self.until_step is not None:
            check_int(self.until_step, "until_step", minimum=0)
        check_bool(self.progressive, "progressive")
        if self.progressive and not self.until_step:
            raise ValueError(
                "progressive=True needs until_step >= 1 (the schedule's tau); "
                f"got {self.until_step!r}"
            )
        if self.dispersed is not None:
            if not isinstance(self.dispersed, Mapping):
                raise TypeError(f"dispersed must be None or a mapping name -> scale; got "
                                f"{self.dispersed!r}")
            dispersed = {}
            for name, scale in self.dispersed.items():
                if not isinstance(name, str):
                    raise TypeError(f"dispersed layer names must be strings; got {name!r}")
                dispersed[name] = check_int(scale, f"the dispersion scale of {name!r}", minimum=2)
            object.__setattr__(self, "dispersed", _FrozenMapping(dispersed))
        check_real(self.dispersion_eta, "dispersion_eta", minimum=0)

    def factor_at(self, factor: float, step_index: int) -> float | None:
        """The factor a layer with ``factor`` runs with at ``step_index`` (None: off)."""
        return redilation_factor(factor, step_index, self.until_step, self.progressive)


def _check_lora(slot: ConvSlot) -> None:
    """Refuse LoRA variants whose forward does not go through ``lora_A``'s forward."""
    if slot.lora is None:
        return
    variants = getattr(slot.lora, "lora_variant", None) or {}
    use_dora = getattr(slot.lora, "use_dora", None) or {}
    if variants or any(use_dora.values()):
        raise ValueError(
            f"{slot.name} has a LoRA variant adapter (DoRA or another peft variant): it convolves "
            "with the base layer's own padding and dilation and cannot be re-dilated"
        )


@dataclass
class _Layer:
    """One selected convolution layer and the forwards one installed ReDilation set there."""

    slot: ConvSlot
    parent: nn.Module  # the module that holds the layer, as ``parent.<attribute>``
    attribute: str
    factor: float
    dispersion_scale: int | None
    # The forwards that hold this configuration's setting: the base convolution's, then the
    # lora_A convolutions' (shared with the other configurations that re-dilate the layer).
    forwards: list[ReDilatedConvForward] = field(default_factory=list)

    def refresh_lora(self) -> None:
        """Follow peft: find the LoRA layer that wraps the convolution now (adapters may have been
        added or removed since the layer was resolved)."""
        current = self.parent._modules.get(self.attribute)
        if current is self.slot.conv:
            lora = None
        elif current is not None and getattr(current, "base_layer", None) is self.slot.conv:
            lora = current
        else:
            lora = self.slot.lora
        if lora is not self.slot.lora:
            self.slot = ConvSlot(self.slot.name, self.slot.conv, lora)

    def convs(self) -> dict[str, nn.Conv2d]:
        """The convolutions the layer runs, by name: its base convolution and the ``lora_A``
        convolutions of its adapters (re-dilated alike; see :func:`lora_convs`)."""
        self.refresh_lora()
        _check_lora(self.slot)
        convs = {self.slot.name: self.slot.conv}
        for adapter, conv in lora_convs(self.slot).items():
            convs[f"{self.slot.name}.lora_A.{adapter}"] = conv
        return convs


class _ReDilationPlan:
    """A :class:`ReDilation` resolved against a UNet: which layers, which factors."""

    def __init__(self, spec: ReDilation, layers: list[_Layer]) -> None:
        self.spec = spec
        self.layers = layers
        self.targets = frozenset(layer.slot.name for layer in layers)

    def install(self, variant: str) -> _InstalledReDilation:
        installed = _InstalledReDilation(self.spec, variant, self.layers)
        try:
            for layer in self.layers:
                installed.attach(layer)
        except BaseException:
            installed.remove()
            raise
        return installed


class _InstalledReDilation:
    """One :class:`ReDilation` installed into one configuration: its setting in the forwards of
    its layers."""

    def __init__(self, spec: ReDilation, variant: str, layers: list[_Layer]) -> None:
        self.spec = spec
        self.variant = variant
        self.layers = layers
        self.active = False

    def attach(self, layer: _Layer) -> None:
        """Add this configuration to the forwards of the layer's convolutions that lack it (the
        layer's adapters may have changed since the last call), creating and installing a forward
        on a convolution that has none."""
        for name, conv in layer.convs().items():
            if any(forward.conv is conv for forward in layer.forwards):
                continue
            forward = ReDilatedConvForward.installed_on(conv)
            if forward is None:
                forward = ReDilatedConvForward(conv, name)
            forward.add_variant(self.variant, layer.dispersion_scale, self.spec.dispersion_eta)
            layer.forwards.append(forward)
            if not forward.installed:
                forward.install()
            forward.set_active(self.variant, self.active)

    def set_step(self, step_index: int, timestep: Any) -> None:
        for layer in self.layers:
            self.attach(layer)
            factor = self.spec.factor_at(layer.factor, step_index)
            for forward in layer.forwards:
                forward.set_factor(self.variant, factor)

    def set_active(self, active: bool) -> None:
        self.active = active
        for layer in self.layers:
            for forward in layer.forwards:
                forward.set_active(self.variant, active)

    def remove(self) -> None:
        forwards = [forward for layer in self.layers for forward in layer.forwards]
        for forward in forwards:
            if forward.variants == (self.variant,):  # the last configuration: it goes
                forward.check_removable()
        for forward in reversed(forwards):
            forward.remove_variant(self.variant)
            if not forward.variants:
                forward.remove()
        for layer in self.layers:
            layer.forwards.clear()


def _select(
    model: nn.Module, names: Mapping[str, Any], what: str
) -> dict[str, tuple[ConvSlot, Any, str]]:
    """layer name -> (slot, value, the name that selected it); one name per layer."""
    selected: dict[str, tuple[ConvSlot, Any, str]] = {}
    for name, value in names.items():
        for slot in resolve_convs(model, name):
            if slot.name in selected:
                raise ValueError(
                    f"{what}: layer {slot.name!r} is selected by both "
                    f"{selected[slot.name][2]!r} and {name!r}; name each layer once"
                )
            selected[slot.name] = (slot, value, name)
    return selected


def _resolve(spec: ReDilation, model: nn.Module) -> _ReDilationPlan:
    factors = _select(model, spec.layers, "layers")
    scales = _select(model, spec.dispersed or {}, "dispersed")
    for layer_name, (_, _, by) in scales.items():
        if layer_name not in factors:
            raise ValueError(
                f"dispersed: layer {layer_name!r} (from {by!r}) has no re-dilation factor in layers"
            )
    steps = range(spec.until_step) if spec.until_step is not None else range(1)
    position = {name: index for index, name in enumerate(conv_slots(model))}
    layers = []
    for layer_name in sorted(factors, key=position.__getitem__):
        slot, factor, _ = factors[layer_name]
        check_redilatable(slot.conv, layer_name)
        _check_lora(slot)
        scale = scales[layer_name][1] if layer_name in scales else None
        if scale is not None:
            for step in steps:
                step_factor = spec.factor_at(factor, step)
                if step_factor is not None and step_factor < scale:
                    raise ValueError(
                        f"{layer_name} is dispersed with scale {scale}, so it runs with dilation "
                        f"factor / {scale}, which must be >= 1; its factor is {step_factor} at "
                        f"step {step}"
                    )
        parent_name, _, attribute = layer_name.rpartition(".")
        layers.append(
            _Layer(
                slot=slot,
                parent=model.get_submodule(parent_name),
                attribute=attribute,
                factor=factor,
                dispersion_scale=scale,
            )
        )
    for kernel_size, scale in {(layer.slot.conv.kernel_size[0], layer.dispersion_scale)
                               for layer in layers if layer.dispersion_scale is not None}:
        # Let the op refuse a kernel size or scale now, not in the middle of sampling.
        probe = torch.zeros(1, 1, kernel_size, kernel_size)
        ops.disperse_kernel(probe, scale, spec.dispersion_eta)
    return _ReDilationPlan(spec, layers)


register_spec_type(ReDilation, _resolve, shares_modules=True)

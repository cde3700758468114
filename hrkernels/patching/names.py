"""Resolving the block and layer names of a spec to modules of a UNet.

Names are ``named_modules()`` names (``"mid_block"``, ``"up_blocks.0"``,
``"down_blocks.2.resnets.1.conv1"``). A *block* is an item of a top-level ``nn.ModuleList``
(``down_blocks.k``, ``up_blocks.k``) or another top-level child that holds convolutions
(``mid_block``); ``conv_in``/``conv_out`` are layers, not blocks.

PEFT LoRA layers are seen through: where peft wrapped a convolution in a ``lora.Conv2d`` (whose
``base_layer`` is the original ``nn.Conv2d`` and whose ``lora_A``/``lora_B`` hold the adapters), the
layer keeps its original name (``...conv1``, not ``...conv1.base_layer``) and is one
:class:`ConvSlot`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = ["ConvSlot", "block_names", "conv_slots", "get_module", "lora_convs", "resolve_convs"]


@dataclass(frozen=True)
class ConvSlot:
    """One convolution layer of a model, by name.

    Attributes:
        name: the layer's name (``"down_blocks.2.resnets.1.conv1"``).
        conv: the ``nn.Conv2d`` that computes it (peft's ``base_layer`` for a LoRA layer).
        lora: the peft LoRA layer that wraps ``conv``, or None.
    """

    name: str
    conv: nn.Conv2d
    lora: nn.Module | None = None


def _is_lora_conv(module: nn.Module) -> bool:
    """A peft LoRA layer around an ``nn.Conv2d`` (duck-typed, so peft need not be installed)."""
    return isinstance(getattr(module, "base_layer", None), nn.Conv2d) and isinstance(
        getattr(module, "lora_A", None), nn.ModuleDict
    )


def lora_convs(slot: ConvSlot) -> dict[str, nn.Conv2d]:
    """The ``lora_A`` convolutions of a LoRA layer's adapters, by adapter name.

    peft builds ``lora_A`` as a convolution with the base layer's kernel size, stride and padding
    (and ``lora_B`` as a 1x1 convolution), so the adapter's update of the kernel is
    ``lora_B . lora_A``: a re-dilation of the layer re-dilates ``lora_A`` with it.
    """
    if slot.lora is None:
        return {}
    return {
        adapter: conv
        for adapter, conv in slot.lora.lora_A.items()  # type: ignore[union-attr]
        if isinstance(conv, nn.Conv2d)
    }


def conv_slots(model: nn.Module) -> dict[str, ConvSlot]:
    """Every ``nn.Conv2d`` layer of ``model`` (peft LoRA layers seen as their base layer), in
    ``named_modules()`` order."""
    slots: dict[str, ConvSlot] = {}
    inside_lora: str | None = None
    for name, module in model.named_modules():
        if inside_lora is not None and name.startswith(inside_lora):
            continue
        inside_lora = None
        if _is_lora_conv(module):
            slots[name] = ConvSlot(name, module.base_layer, module)
            inside_lora = f"{name}."
        elif isinstance(module, nn.Conv2d):
            slots[name] = ConvSlot(name, module)
    return slots


def block_names(model: nn.Module) -> list[str]:
    """The blocks of ``model`` in registration order (for an SD UNet ``down_blocks.0..3``,
    ``up_blocks.0..3``, ``mid_block``): the items of its top-level ``nn.ModuleList`` children and
    its other top-level children that hold a convolution and are not one themselves."""
    names = []
    for child_name, child in model.named_children():
        if isinstance(child, nn.ModuleList):
            names.extend(f"{child_name}.{index}" for index in range(len(child)))
        elif not isinstance(child, nn.Conv2d) and not _is_lora_conv(child):
            if any(isinstance(module, nn.Conv2d) for module in child.modules()):
                names.append(child_name)
    return names


def get_module(model: nn.Module, name: str, what: str = "layer") -> nn.Module:
    """The submodule of ``model`` called ``name``.

    Raises:
        TypeError: ``name`` is not a string.
        ValueError: no module has that name; the message lists the blocks that exist.
    """
    if not isinstance(name, str):
        raise TypeError(f"{what} names must be strings; got {name!r}")
    modules = dict(model.named_modules())
    if name and name in modules:
        return modules[name]
    raise ValueError(f"{what} {name!r} does not exist in this {type(model).__name__}; "
                     f"{_blocks_text(model)}")


def _blocks_text(model: nn.Module) -> str:
    """What a message lists as the blocks of ``model`` (or says that it has none)."""
    blocks = block_names(model)
    if not blocks:
        return "it has no blocks holding convolutions (is it a UNet? patch pipe.unet)"
    return (f"its blocks are {', '.join(blocks)} (a block stands for its layers; a single layer "
            "is named in full, e.g. 'down_blocks.0.resnets.0.conv1')")


def resolve_convs(model: nn.Module, name: str) -> list[ConvSlot]:
    """The convolution layers a block or layer name stands for.

    * The name of a convolution layer (``"down_blocks.2.resnets.1.conv1"``, or ``"conv_in"``):
      that layer, whatever its kernel (the caller checks that it suits).
    * Any other module name (a block such as ``"mid_block"`` or ``"up_blocks.0"``, or a part of one
      such as ``"up_blocks.0.resnets.1"``): every 3x3 convolution with ``groups == 1`` inside it,
      i.e. for diffusers' UNet blocks the resnets' ``conv1``/``conv2`` and the down/upsamplers'
      ``conv``, never the 1x1 ``conv_shortcut`` or a transformer's 1x1 ``proj_in``/``proj_out``.

    Raises:
        ValueError: the name matches no module (the message lists the blocks), or the module holds
            no 3x3 convolution.
    """
    slots = conv_slots(model)
    if isinstance(name, str) and name in slots:
        return [slots[name]]
    module = get_module(model, name)
    prefix = f"{name}."
    selected = [
        slot
        for slot_name, slot in slots.items()
        if slot_name.startswith(prefix)
        and tuple(slot.conv.kernel_size) == (3, 3)
        and slot.conv.groups == 1
    ]
    if not selected:
        raise ValueError(f"{name!r} ({type(module).__name__}) holds no 3x3 convolution; name "
                         f"a block or a convolution layer: {_blocks_text(model)}")
    return selected

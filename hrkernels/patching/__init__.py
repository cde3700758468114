"""Reversible, composable patching of a diffusers UNet: ``patch``, ``unpatch``, ``patched``,
``set_step``, named configurations switched per call (``variant``, ``set_variant``) and the spec
types (``ReDilation``, ``ScaleFusion``).

The public names are exported from :mod:`hrkernels` (``hrkernels.patch(unet, spec)``); this package
is named ``patching`` so that the function ``hrkernels.patch`` shadows nothing.

* ``patch`` calls compose, keyed by spec type: a UNet holds at most one spec of each type per
  configuration, ``unpatch(unet, SpecType)`` removes one type (the rest runs as if patched alone)
  and ``unpatch(unet)`` everything (bitwise the original UNet).
* Configurations ("variants"): ``patch(unet, spec, variant="base")`` installs into the named
  configuration; one configuration is active at a time (``"default"`` unless switched) and the
  specs of the others run the original behaviour. ``with variant(unet, "base"): ...`` switches for
  one UNet call (ScaleCrafter's noise-damped guidance runs the main and the "base" UNet in one
  step); switching only sets Python attributes and, under ``torch.compile``, compiles once per
  distinct configuration.

Modules:

* :mod:`hrkernels.patching.registry`: ``patch``/``unpatch``/``patched``/``set_step``,
  ``variant``/``set_variant``, :class:`PatchState`, and :func:`register_spec_type`, the open
  registry through which a spec type says how it resolves layers, installs its behaviour into a
  configuration and removes it, and whether it can share modules across configurations.
* :mod:`hrkernels.patching.names`: block and layer names -> modules (shared by the spec types).
* :mod:`hrkernels.patching.scalefusion`: ``ScaleFusion`` (FreeScale's Scale Fusion attention) and
  ``prepare_windows``.
* :mod:`hrkernels.patching.redilation`: ``ReDilation`` (ScaleCrafter's re-dilated and dispersed
  convolutions; one forward per layer holds the factors of every configuration).

Example:
    >>> import hrkernels
    >>> from hrkernels.patching import variant
    >>> from hrkernels.testing import tiny_pipeline
    >>> unet = tiny_pipeline("sdxl").unet
    >>> _ = hrkernels.patch(unet, hrkernels.ReDilation({"mid_block": 4, "up_blocks.0": 4}))
    >>> _ = hrkernels.patch(unet, hrkernels.ReDilation({"mid_block": 2}), variant="base")
    >>> with variant(unet, "base"):
    ...     pass  # the UNet runs mid_block at 2 and up_blocks.0 unchanged here
    >>> _ = hrkernels.unpatch(unet)
"""

from hrkernels.patching.redilation import ReDilation, redilation_factor
from hrkernels.patching.registry import (
    DEFAULT_VARIANT,
    Installed,
    PatchEntry,
    PatchState,
    Plan,
    is_patched,
    patch,
    patch_state,
    patched,
    register_spec_type,
    set_step,
    set_variant,
    unpatch,
    variant,
)
from hrkernels.patching.scalefusion import ScaleFusion, prepare_windows

__all__ = [
    "DEFAULT_VARIANT",
    "Installed",
    "PatchEntry",
    "PatchState",
    "Plan",
    "ReDilation",
    "ScaleFusion",
    "is_patched",
    "patch",
    "patch_state",
    "patched",
    "prepare_windows",
    "redilation_factor",
    "register_spec_type",
    "set_step",
    "set_variant",
    "unpatch",
    "variant",
]

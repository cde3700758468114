"""Reversible patching of a diffusers UNet: ``patch``, ``unpatch``, ``patched``, ``set_step`` and
the spec types (``ReDilation``; later ``ScaleFusion``).

The public names are exported from :mod:`hrkernels` (``hrkernels.patch(unet, spec)``); this package
is named ``patching`` so that the function ``hrkernels.patch`` shadows nothing.

* :mod:`hrkernels.patching.registry`: ``patch``/``unpatch``/``patched``/``set_step`` and
  :func:`register_spec_type`, the open registry through which a spec type says how it resolves
  layers and installs and removes its behaviour.
* :mod:`hrkernels.patching.names`: block and layer names -> modules (shared by the spec types).
* :mod:`hrkernels.patching.redilation`: ``ReDilation`` (ScaleCrafter's re-dilated and dispersed
  convolutions).
"""

from hrkernels.patching.redilation import ReDilation, redilation_factor
from hrkernels.patching.registry import (
    Installed,
    PatchState,
    Plan,
    is_patched,
    patch,
    patch_state,
    patched,
    register_spec_type,
    set_step,
    unpatch,
)

__all__ = [
    "Installed",
    "PatchState",
    "Plan",
    "ReDilation",
    "is_patched",
    "patch",
    "patch_state",
    "patched",
    "redilation_factor",
    "register_spec_type",
    "set_step",
    "unpatch",
]

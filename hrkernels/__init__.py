"""hrkernels: fused Triton kernels for tuning-free high-resolution diffusion.

Layers (each imports only from the ones above it): ``hrkernels.ops`` (torch.library ops over Triton
kernels with PyTorch references), ``hrkernels.schedules`` (per-step math), ``hrkernels.nn``,
``hrkernels.patching`` (reversible UNet patches: ``patch``, ``unpatch``, ``set_step``,
``variant``), ``hrkernels.vae``, ``hrkernels.samplers`` (DemoFusion, APT, ScaleCrafter, FreeScale
and MegaFusion) with their memory planner (``hrkernels.planner``: :func:`plan`,
:class:`MemoryPlan`, :class:`MemoryPlanError`, exported here), ``hrkernels.distributed`` (view-,
CFG- and prompt-parallel sampling over ``torch.distributed``) and the ``hrkernels`` command line
(``hrkernels.cli``). The ops are inference-only (no backward). See docs/DESIGN.md in the
repository for the conventions and docs/METHODS.md for the algorithms.
"""

__version__ = "0.1.0"

from hrkernels import ops  # noqa: E402
from hrkernels.patching import (  # noqa: E402
    ReDilation,
    ScaleFusion,
    is_patched,
    patch,
    patched,
    set_step,
    set_variant,
    unpatch,
    variant,
)

__all__ = ["__version__", "ops"]
__all__ += ["ReDilation", "ScaleFusion", "is_patched", "patch", "patched", "set_step",
            "set_variant", "unpatch", "variant"]

__all__ += ["MemoryPlan", "MemoryPlanError", "plan"]

# Imported on first use (`hrkernels.samplers` and `hrkernels.vae` pull in diffusers).
_LAZY_SUBMODULES = ("distributed", "planner", "presets", "samplers", "schedules", "vae")
# The memory planner's public names (``hrkernels.plan``, ...), from ``hrkernels.planner``.
_PLANNER_NAMES = ("MemoryPlan", "MemoryPlanError", "plan")


def __getattr__(name: str):
    import importlib

    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"hrkernels.{name}")
    if name in _PLANNER_NAMES:
        return getattr(importlib.import_module("hrkernels.planner"), name)
    raise AttributeError(f"module 'hrkernels' has no attribute {name!r}")

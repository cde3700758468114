"""hrkernels: fused Triton kernels for tuning-free high-resolution diffusion.

Layers (each imports only from the ones above it): ``hrkernels.ops`` (torch.library ops over Triton
kernels with PyTorch references), ``hrkernels.nn``, ``hrkernels.patching``, ``hrkernels.schedules``,
``hrkernels.samplers``, ``hrkernels.vae``, and the ``hrkernels`` command line (``hrkernels.cli``).
See DESIGN.md in the repository for the conventions.
"""

__version__ = "0.1.0"

from hrkernels import ops  # noqa: E402
from hrkernels.patching import (  # noqa: E402
    ReDilation,
    is_patched,
    patch,
    patched,
    set_step,
    unpatch,
)

__all__ = ["__version__", "ops"]
__all__ += ["ReDilation", "is_patched", "patch", "patched", "set_step", "unpatch"]

# Imported on first use (`hrkernels.samplers` pulls in diffusers).
_LAZY_SUBMODULES = ("samplers", "schedules")


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f"hrkernels.{name}")
    raise AttributeError(f"module 'hrkernels' has no attribute {name!r}")

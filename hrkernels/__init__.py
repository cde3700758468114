"""hrkernels: fused Triton kernels for tuning-free high-resolution diffusion.

Layers (each imports only from the ones above it): ``hrkernels.ops`` (torch.library ops over Triton
kernels with PyTorch references), ``hrkernels.nn``, ``hrkernels.patch``, ``hrkernels.schedules``,
``hrkernels.samplers``, ``hrkernels.vae``, and the ``hrkernels`` command line (``hrkernels.cli``).
See DESIGN.md in the repository for the conventions.
"""

__version__ = "0.1.0"

from hrkernels import ops  # noqa: E402

__all__ = ["__version__", "ops"]

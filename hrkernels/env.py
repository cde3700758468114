"""What this installation runs on: versions, device and usable backends (``hrkernels info``)."""

from __future__ import annotations

import importlib.metadata
import platform

import torch

from hrkernels import __version__
from hrkernels.ops._backend import backend_report, requested_backend


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def device_name() -> str:
    """The GPU's name, or ``"cpu (<processor>)"`` when there is no CUDA device."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()})"


def environment() -> dict[str, str]:
    """Versions of hrkernels and its stack, the device, and which backends can run here."""
    info = {
        "hrkernels": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "diffusers": _version("diffusers"),
        "transformers": _version("transformers"),
        "cuda": torch.version.cuda or "none (CPU build of torch)",
        "device": device_name(),
        "HRKERNELS_BACKEND": requested_backend(),
    }
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        info["compute capability"] = f"{major}.{minor}"
        free, total = torch.cuda.mem_get_info()
        info["GPU memory"] = f"{total / 2**30:.1f} GiB ({free / 2**30:.1f} GiB free)"
    for backend, status in backend_report().items():
        info[f"backend {backend}"] = status
    return info

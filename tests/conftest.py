"""Test harness: device fixture, the ``gpu`` marker, Triton's interpreter on CPU, NaN-poisoned
kernel outputs and per-dtype tolerances.

On a machine without CUDA, ``TRITON_INTERPRET=1`` is set before triton is imported, so the Triton
kernels run on CPU tensors (slowly: keep interpreter shapes tiny). Tests that need a GPU carry
``@pytest.mark.gpu`` and are skipped here; they run on the lent H100 through ``bench/gpu.sh``.
"""

from __future__ import annotations

import os
import sys

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton was imported before TRITON_INTERPRET=1 could be set")
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

import hrkernels.ops._launch as launch  # noqa: E402
from hrkernels.ops import use_backend  # noqa: E402

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")

# Float dtypes the kernels are tested in: bf16 arithmetic is not supported by the interpreter.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])

# Absolute/relative tolerances per dtype for results that are rounded once from fp32 arithmetic.
TOLERANCES = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.float16: {"atol": 1e-3, "rtol": 1e-3},
    torch.bfloat16: {"atol": 8e-3, "rtol": 8e-3},
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, scale: float = 1.0) -> None:
    """``torch.testing.assert_close`` with the tolerance of ``actual``'s dtype (times ``scale``)."""
    tolerance = TOLERANCES[actual.dtype]
    torch.testing.assert_close(
        actual, expected.to(actual.dtype),
        atol=tolerance["atol"] * scale, rtol=tolerance["rtol"] * scale, equal_nan=False,
    )


def assert_close_to_fp32(actual: torch.Tensor, fp32_result: torch.Tensor,
                         lowp_result: torch.Tensor) -> None:
    """A low-precision result may differ from the fp32 reference by at most ~2x the error of the
    reference computed in the same low precision (plus one ulp-scale slack)."""
    assert not actual.isnan().any(), "NaN in the result (an unwritten, poisoned element?)"
    error = (actual.float() - fp32_result.float()).abs().max().item()
    reference_error = (lowp_result.float() - fp32_result.float()).abs().max().item()
    slack = torch.finfo(actual.dtype).eps * fp32_result.float().abs().max().item()
    assert error <= 2 * reference_error + slack, (error, reference_error)


def pytest_configure(config: pytest.Config) -> None:
    launch.POISON_OUTPUTS = True


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run bench/gpu.sh on the lent H100)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device() -> torch.device:
    """The device the kernels are tested on: CUDA when present, else CPU (Triton interpreter)."""
    return DEVICE


@pytest.fixture
def triton_backend():
    """Force the Triton kernels (through the interpreter on CPU) inside the test."""
    with use_backend("triton"):
        yield


@pytest.fixture
def torch_backend():
    """Force the PyTorch reference inside the test."""
    with use_backend("torch"):
        yield


def make_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """``x`` ([B, C, H, W], contiguous) in another memory layout with the same values.

    ``contiguous``; ``channels_last`` (a [B, H, W, C] tensor seen through ``permute(0, 3, 1, 2)``);
    ``strided`` (every other column of a wider tensor: no unit stride on W).
    """
    if layout == "contiguous":
        return x
    if layout == "channels_last":
        return x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    if layout == "strided":
        wide = torch.zeros(*x.shape[:3], 2 * x.shape[3], dtype=x.dtype, device=x.device)
        wide[..., ::2] = x
        return wide[..., ::2]
    raise ValueError(layout)


LAYOUTS = ["contiguous", "channels_last", "strided"]


# Sampler tests: the tiny pipelines (built once per test module, as some tests change a pipeline's
# scheduler) and the target sizes of each kind (2x, 3x and non-square over the base resolution).


@pytest.fixture(scope="module")
def sdxl():
    from hrkernels.testing import tiny_pipeline

    return tiny_pipeline("sdxl")


@pytest.fixture(scope="module")
def sd15():
    from hrkernels.testing import tiny_pipeline

    return tiny_pipeline("sd15")


@pytest.fixture(scope="session")
def sizes() -> dict[str, dict[str, tuple[int, int]]]:
    """kind -> {name: (height, width)}."""
    return {
        "sdxl": {"2x": (256, 256), "3x": (384, 384), "non-square": (256, 192)},
        "sd15": {"2x": (128, 128), "3x": (192, 192), "non-square": (128, 96)},
    }

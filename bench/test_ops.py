"""pytest-benchmark view of the op benchmarks (the same cases as ``hrkernels bench``).

GPU: ``python -m pytest bench/test_ops.py`` times every GPU case with each provider
(CUDA-synchronised calls). CPU: ``python -m pytest bench/test_ops.py --benchmark-disable`` runs the
small cases once as a smoke test. For the table with GB/s and speedups, use ``hrkernels bench``.
"""

from __future__ import annotations

import pytest
import torch

from hrkernels.bench.registry import all_cases
from hrkernels.env import environment

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
DTYPE = torch.float16 if ON_GPU else torch.float32
CASES = [case for case in all_cases() if case.cpu != ON_GPU]
ENVIRONMENT = environment()


@pytest.fixture(scope="module")
def compiled():
    return {}


@pytest.mark.parametrize("provider", ["torch", "torch.compile", "hrkernels"])
@pytest.mark.parametrize("case", CASES, ids=lambda case: f"{case.op}[{case.label}]")
def test_op(benchmark, case, provider, compiled):
    inputs = case.make(DEVICE, DTYPE)
    if provider == "torch.compile":
        function = compiled.setdefault(
            id(case), torch.compile(case.compiled_reference or case.reference))
    else:
        function = case.run if provider == "hrkernels" else case.reference
    function(inputs)  # warm-up (and compilation)

    def call():
        function(inputs)
        if ON_GPU:
            torch.cuda.synchronize()

    benchmark.extra_info.update(
        device=ENVIRONMENT["device"], torch=ENVIRONMENT["torch"], triton=ENVIRONMENT["triton"],
        cuda=ENVIRONMENT["cuda"], dtype=str(DTYPE), op=case.op, shape=case.label,
    )
    if case.bytes_moved is not None:
        benchmark.extra_info["bytes_moved"] = case.bytes_moved(inputs)
    benchmark(call)

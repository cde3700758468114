"""Benchmark cases: what to run, on which inputs, and how many bytes/FLOPs it must move."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

# The modules (``hrkernels/bench/<family>.py``) that define ``CASES``; one line per op family.
FAMILIES = ("views", "conv", "blur", "stats")

Inputs = dict[str, Any]


@dataclass(frozen=True)
class BenchCase:
    """One op at one shape.

    Attributes:
        op: the public op's name (``"gather_windows"``).
        label: the shape, as a reader of the results table wants it (``"feat 4096^2 cl"``).
        make: builds the inputs on a device in a dtype (a dict of keyword arguments).
        run: the hrkernels call on those inputs.
        reference: the PyTorch reference on the same inputs (also compiled with torch.compile).
        bytes_moved: the fewest bytes the op must move (inputs read once + outputs written once),
            for GB/s; None for compute-bound ops.
        flops: floating-point operations, for TFLOP/s; None for memory-bound ops.
        cpu: whether the case is small enough to run on a CPU (``hrkernels bench`` on a machine
            without a GPU runs only these).
        compiled_reference: what the ``torch.compile`` provider compiles, when not ``reference``
            itself (an equivalent formulation that compiles in reasonable time; say why).
    """

    op: str
    label: str
    make: Callable[[torch.device, torch.dtype], Inputs]
    run: Callable[[Inputs], Any]
    reference: Callable[[Inputs], Any]
    bytes_moved: Callable[[Inputs], int] | None = None
    flops: Callable[[Inputs], int] | None = None
    cpu: bool = False
    compiled_reference: Callable[[Inputs], Any] | None = None


def all_cases(families: tuple[str, ...] = FAMILIES) -> list[BenchCase]:
    """Every registered case of ``families`` (default: all), family by family."""
    unknown = set(families) - set(FAMILIES)
    if unknown:
        raise ValueError(f"unknown benchmark families {sorted(unknown)}; choose from {FAMILIES}")
    cases: list[BenchCase] = []
    for family in families:
        cases.extend(importlib.import_module(f"hrkernels.bench.{family}").CASES)
    return cases


def tensor_bytes(*tensors: torch.Tensor) -> int:
    """Bytes of the given tensors (each counted once)."""
    return sum(t.numel() * t.element_size() for t in tensors)

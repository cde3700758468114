"""DemoFusion and APT reproduce, bitwise, the latents recorded before the sampler framework
refactor (``golden/record.py``: recorded from 299c551 on the tiny pipelines, one CPU thread)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

_RECORD = Path(__file__).resolve().parent / "golden" / "record.py"
_spec = importlib.util.spec_from_file_location("hrkernels_golden_record", _RECORD)
record = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(record)


@pytest.mark.parametrize("name", sorted(record.CASES))
def test_bitwise_equal_to_the_recorded_latents(name):
    golden = torch.load(record.path(name))
    latents = record.run_case(name)
    assert [tuple(z.shape) for z in latents] == [tuple(z.shape) for z in golden]
    for stage, (actual, expected) in enumerate(zip(latents, golden, strict=True), start=1):
        assert torch.equal(actual, expected), (
            f"stage {stage}: max difference {(actual - expected).abs().max().item():.3e}")

"""Bad and edge input to patching and the schedules (issue 20)."""

from __future__ import annotations

import time

import pytest
import torch.nn as nn

import hrkernels
from hrkernels.schedules import MAX_STAGES, stage_count, stage_sizes


@pytest.mark.parametrize("model", [nn.Linear(2, 2), nn.Sequential(nn.Conv2d(2, 2, 3))])
def test_patching_a_module_without_blocks_says_so(model):
    with pytest.raises(ValueError, match="has no blocks holding convolutions .*pipe.unet"):
        hrkernels.patch(model, hrkernels.ReDilation({"mid_block": 2}))


def test_stage_counts_are_closed_form_and_huge_sizes_fail_at_once():
    assert stage_count(100000, 128, 128) == 782 == len(stage_sizes(100000, 128, 128))
    started = time.perf_counter()
    with pytest.raises(ValueError, match=f"976563 stages; at most {MAX_STAGES}"):
        stage_sizes(10**9, 10**9, 1024)
    assert time.perf_counter() - started < 0.1

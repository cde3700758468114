"""Benchmark cases of the ``stats`` family (issue shapes: ``[8, 64, 512, 512]`` for bandwidth, and
DemoFusion/APT latents at 4096^2, ``[1, 4, 512, 512]`` with factor (4, 4), which is launch-bound:
its time is what matters, target < 30 us).

Targets are 0-d tensors on the device, as in DemoFusion (the mean/std of ``zh``) and APT (those of
the stage-1 latent). ``bytes_moved`` is ``2 * |x|`` (read once, write once) although the op reads
``x`` twice (statistics, then the normalised write): 60% of copy bandwidth by this count needs the
two passes to run at 90% of it (the second pass starts with the tiles still in L2).
"""

from __future__ import annotations

import torch

from hrkernels import ops
from hrkernels.bench.registry import BenchCase, Inputs, tensor_bytes
from hrkernels.ops.stats import reference


def _case(label, shape, factor, per_channel=False, channels_last=False, cpu=False) -> BenchCase:
    def make(device: torch.device, dtype: torch.dtype) -> Inputs:
        generator = torch.Generator(device).manual_seed(0)
        x = torch.randn(shape, device=device, dtype=dtype, generator=generator) * 2 + 0.5
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return {"x": x, "mean": torch.tensor(0.1, device=device),
                "std": torch.tensor(1.3, device=device)}

    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    tag = f"{label} f{factor[0]}x{factor[1]}" + (" per-ch" if per_channel else "")
    return BenchCase(
        "match_stats", tag, make,
        run=lambda i: ops.match_stats(i["x"], i["mean"], i["std"], factor, per_channel),
        reference=lambda i: reference.match_stats(i["x"], i["mean"], i["std"], factor, per_channel,
                                                  memory_format),
        bytes_moved=lambda i: 2 * tensor_bytes(i["x"]),
        cpu=cpu,
    )


CASES = [
    # Bandwidth: DemoFusion's global renormalisation (factor 1) and APT-style sub-lattices.
    _case("[8,64,512,512]", (8, 64, 512, 512), (1, 1)),
    _case("[8,64,512,512]", (8, 64, 512, 512), (4, 4)),
    _case("[8,64,512,512]", (8, 64, 512, 512), (1, 1), per_channel=True),
    # Latents at 4096^2 (launch-bound): APT's matching (factor 4) and DemoFusion's renormalisation.
    _case("latent [1,4,512,512]", (1, 4, 512, 512), (4, 4)),
    _case("latent [1,4,512,512]", (1, 4, 512, 512), (4, 4), per_channel=True),
    _case("latent [1,4,512,512]", (1, 4, 512, 512), (1, 1)),
    # Channels-last features, per channel.
    _case("feat [2,128,128,640] cl", (2, 640, 128, 128), (1, 1), per_channel=True,
          channels_last=True),
    # Small case for a CPU run.
    _case("cpu [1,4,64,64]", (1, 4, 64, 64), (2, 2), cpu=True),
]

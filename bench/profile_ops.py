"""Where an op's time goes on a GPU: device time per kernel, host time per call, host hot spots.

    python bench/profile_ops.py [--out DIR] [--cprofile]

For each case it prints
* ``wall``: host wall time per call in a loop of back-to-back calls (synchronised once at the end):
  what a caller pays when the op is launch-bound;
* ``bench``: ``triton.testing.do_bench``'s median (the harness's number: L2 flushed before each
  call, host work hidden behind the flush unless it is longer);
* ``device``: the kernels' own time per call (``torch.profiler``), kernel by kernel;
* with ``--cprofile``: the functions with the most own time over the calls (host overhead).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import triton
import triton.language as tl
import triton.testing

from hrkernels import ops
from hrkernels.bench.harness import copy_bandwidth_gbps, gbps
from hrkernels.env import environment


@triton.jit
def _empty_kernel(x_ptr, n, a, b, c, d, e, f, g, h, i, j, k, l, m, o, p, q, r, s,  # noqa: E741
                  BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offsets = pid * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + offsets, tl.zeros([BLOCK], dtype=tl.float32), mask=offsets < n)


def _cases() -> dict:
    def randn(*shape, channels_last=False):
        if channels_last:
            b, c, h, w = shape
            return torch.randn(b, h, w, c, device="cuda", dtype=torch.float16).permute(0, 3, 1, 2)
        return torch.randn(*shape, device="cuda", dtype=torch.float16)

    latent = randn(1, 4, 512, 512)
    latent2 = randn(1, 4, 512, 512)
    big = randn(8, 64, 512, 512)
    feats = {size: (randn(2, 640, size, size, channels_last=True),
                    randn(2, 640, size, size, channels_last=True)) for size in (128, 256)}
    scratch = torch.empty(1024, device="cuda")
    nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
    cases = {  # name: (call, bytes moved: inputs read once, output written once)
        "triton empty launch (20 args)": (lambda: _empty_kernel[(1,)](
            scratch, 1024, *range(18), BLOCK=1024), 0),
        "torch.empty_like latent": (lambda: torch.empty_like(latent), 0),
        "match_stats latent f4x4": (lambda: ops.match_stats(latent, 0.0, 1.0, (4, 4)),
                                    2 * nbytes(latent)),
        "match_stats latent f1x1": (lambda: ops.match_stats(latent, 0.0, 1.0), 2 * nbytes(latent)),
        "gaussian_blur2d latent k7": (lambda: ops.gaussian_blur2d(latent, 0.8, 7),
                                      2 * nbytes(latent)),
        "frequency_fusion latent k7": (lambda: ops.frequency_fusion(latent, latent2, 0.8, 7),
                                       3 * nbytes(latent)),
        "gather_dilated latent f4": (lambda: ops.gather_dilated(latent, (4, 4)),
                                     2 * nbytes(latent)),
        "match_stats [8,64,512,512] f1x1": (lambda: ops.match_stats(big, 0.0, 1.0),
                                            2 * nbytes(big)),
        "match_stats [8,64,512,512] f4x4": (lambda: ops.match_stats(big, 0.0, 1.0, (4, 4)),
                                            2 * nbytes(big)),
    }
    for size, (a, b) in feats.items():
        for k in (3, 7):
            cases[f"frequency_fusion [2,{size},{size},640] cl k{k}"] = (
                lambda a=a, b=b, k=k: ops.frequency_fusion(a, b, 1.0, k), 3 * nbytes(a))
            cases[f"gaussian_blur2d [2,{size},{size},640] cl k{k}"] = (
                lambda b=b, k=k: ops.gaussian_blur2d(b, 1.0, k), 2 * nbytes(b))
    return cases


def _wall_us(fn, calls: int = 300) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def _device_us(fn, calls: int = 20) -> dict[str, float]:
    """Per-call device time of each kernel ``fn`` launches (CUPTI, through torch.profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    totals: dict[str, float] = defaultdict(float)
    for event in profiler.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name[:60]] += event.device_time_total / calls
    return dict(totals)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--cprofile", action="store_true")
    parser.add_argument("--filter", default="")
    args = parser.parse_args(argv)
    report = {}
    bandwidth = copy_bandwidth_gbps(torch.device("cuda"))
    print(f"copy bandwidth {bandwidth:.0f} GB/s")
    for name, (fn, moved) in _cases().items():
        if args.filter not in name:
            continue
        for _ in range(3):
            fn()  # compile and warm up
        wall = _wall_us(fn)
        bench = triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e3
        device = _device_us(fn)
        total = sum(device.values())
        fraction = gbps(moved, total * 1e-3) / bandwidth if moved and total else None
        report[name] = {"wall_us": wall, "bench_us": bench, "device_us": device,
                        "device_total_us": total, "device_copy_fraction": fraction}
        kernels = ", ".join(f"{k} {v:.1f}" for k, v in device.items())
        share = f" = {fraction:.0%} of copy bandwidth" if fraction else ""
        print(f"{name}: wall {wall:.1f} us/call, bench {bench:.1f} us, device {total:.1f} us"
              f"{share} ({kernels})", flush=True)
        if args.cprofile and "latent" in name:
            profile = cProfile.Profile()
            profile.enable()
            for _ in range(300):
                fn()
            profile.disable()
            torch.cuda.synchronize()
            text = io.StringIO()
            pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(14)
            lines = [line for line in text.getvalue().splitlines() if line.strip()][-16:]
            print("\n".join("    " + line for line in lines), flush=True)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "profile_ops.json").write_text(json.dumps(
            {"environment": {**environment(), "copy_gbps": bandwidth}, "cases": report}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Sweep the launch knobs of the blur kernel on a GPU (bench/NOTES.md records what it found).

    python bench/tune_blur.py [--out DIR] [--quick]

For every issue shape, kernel size and op (blur, fusion) it times the Triton kernel under each plan
(``hrkernels.bench.tuning.blur_plan``'s knobs: elements per thread, rows per iteration, programs
per SM, L2 prefetch, ...) with ``triton.testing.do_bench`` (median, L2 flushed before each run),
checks every plan's output against the default plan's, and prints the default and the best plans
as a fraction of the measured copy bandwidth. Launches go straight to the Triton launcher
(``hrkernels.bench.tuning.run_*``: no backend selection), so the times are device times (the host
work of one launch hides behind do_bench's L2 flush).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import triton.testing

from hrkernels.bench.harness import copy_bandwidth_gbps, gbps
from hrkernels.bench.tuning import (
    blur_plan,
    default_blur_knobs,
    run_frequency_fusion,
    run_gaussian_blur2d,
)

SHAPES = {  # label: (shape [B, C, H, W], channels-last)
    "feat [2,128,128,640] cl": ((2, 640, 128, 128), True),
    "feat [2,256,256,640] cl": ((2, 640, 256, 256), True),
    "latent [1,4,512,512]": ((1, 4, 512, 512), False),
}


def _inputs(shape, channels_last):
    batch, channels, height, width = shape
    if channels_last:
        make = lambda: torch.randn(batch, height, width, channels, device="cuda",  # noqa: E731
                                   dtype=torch.float16).permute(0, 3, 1, 2)
    else:
        make = lambda: torch.randn(shape, device="cuda", dtype=torch.float16)  # noqa: E731
    return make(), make()


def _knobs(kernel_size: int, channels_last: bool, quick: bool) -> list[dict]:
    """The plans to try: ``blur_plan`` knobs."""
    plans = []
    per_thread = (4, 8) if channels_last else (1, 2, 4)
    unroll = (2, 4, 6) if kernel_size <= 3 else (2, 4)
    for pt, u, pps, pf in itertools.product(per_thread, unroll, (6, 16), (False, True)):
        plans.append(dict(per_thread=pt, unroll=u, programs_per_sm=pps, prefetch=pf))
    if channels_last:  # the register-blocked columns kernel
        tiles = (4, 8) if kernel_size <= 3 else (2, 3, 4)
        for pt, tile_w, u, pps in itertools.product((2, 4), tiles, (1, 2),
                                                    (6,) if quick else (6, 12, 24)):
            plans.append(dict(per_thread=pt, tile_w=tile_w, unroll=u, programs_per_sm=pps,
                              prefetch=True))
    return plans


def _parse_plan(text: str) -> dict:
    """``"tile_w=6,block_c=64,per_thread=2"`` -> ``blur_plan`` knobs."""
    knobs = {}
    for item in text.split(","):
        name, value = item.split("=")
        knobs[name.strip()] = value.strip() == "True" if value.strip() in ("True", "False") \
            else int(value)
    return knobs


def _around(bases: list[dict], iterations: list[int], max_registers: list[int]) -> list[dict]:
    """Each base plan with other loop iterations (rows per program) and register caps."""
    return [dict(base, iterations=i, max_registers=m) for base, i, m in
            itertools.product(bases, [None, *iterations], [None, *max_registers])]


def _describe(result: dict) -> str:
    kernel = f"columns tw{result.get('tile_w')}" if result["columns"] else "rows"
    return (f"{kernel} pt{result.get('per_thread')} u{result.get('unroll')} "
            f"pps{result.get('programs_per_sm', 6)} pf{int(bool(result.get('prefetch')))} "
            f"rows{result['rows']} programs{result['programs']} "
            f"maxnreg{result.get('max_registers')} block{result['block']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="fewer programs-per-SM values")
    parser.add_argument("--kernel-sizes", type=int, nargs="+", default=[3, 7])
    parser.add_argument("--filter", default="", help="only cases whose label contains this")
    parser.add_argument("--ops", nargs="+", default=["blur", "fusion"])
    parser.add_argument("--plans", nargs="+", default=[],
                        help='instead of the sweep: these plans ("tile_w=6,block_c=64,...") and '
                             "the default, each with --iterations and --max-registers")
    parser.add_argument("--iterations", type=int, nargs="+", default=[],
                        help="loop iterations (rows per program) to add to --plans")
    parser.add_argument("--max-registers", type=int, nargs="+", default=[],
                        help="register caps to add to --plans")
    args = parser.parse_args(argv)
    bandwidth = copy_bandwidth_gbps(torch.device("cuda"))
    print(f"copy bandwidth {bandwidth:.0f} GB/s", flush=True)
    rows = []
    for (label, (shape, channels_last)), kernel_size, fusion in itertools.product(
            SHAPES.items(), args.kernel_sizes, (False, True)):
        if args.filter not in label or ("fusion" if fusion else "blur") not in args.ops:
            continue
        a, b = _inputs(shape, channels_last)
        moved = a.numel() * a.element_size() * (3 if fusion else 2)

        def run(plan=None, a=a, b=b, kernel_size=kernel_size, fusion=fusion):
            if fusion:
                return run_frequency_fusion(a, b, 1.0, kernel_size, plan=plan)
            return run_gaussian_blur2d(a, 1.0, kernel_size, plan=plan)

        expected = run()
        results = []
        if args.plans or args.iterations or args.max_registers:
            default = default_blur_knobs(a, kernel_size, fusion=fusion)
            plans = _around([default, *map(_parse_plan, args.plans)], args.iterations,
                            args.max_registers)
        else:
            plans = _knobs(kernel_size, channels_last, args.quick)
        for knobs in plans:
            plan = blur_plan(a, kernel_size, fusion=fusion, **knobs)
            try:
                out = run(plan)
            except Exception as error:  # noqa: BLE001 (a plan that does not compile is reported)
                print(f"  {plan}: {type(error).__name__}: {str(error)[:200]}", flush=True)
                continue
            error = (out.float() - expected.float()).abs().max().item()
            ms = triton.testing.do_bench(lambda p=plan, r=run: r(p), warmup=10, rep=40,
                                         return_mode="median")
            results.append({**knobs, "columns": plan.columns, "rows": plan.rows,
                            "tile_w": plan.block_w if plan.columns else None,
                            "programs": plan.programs,
                            "block": [plan.block_w, plan.block_c, plan.num_warps],
                            "us": ms * 1e3, "copy_fraction": gbps(moved, ms) / bandwidth,
                            "max_abs_diff_vs_default": error})
        default_plan = blur_plan(a, kernel_size, fusion=fusion)
        default_ms = triton.testing.do_bench(run, warmup=10, rep=40, return_mode="median")
        results.sort(key=lambda r: r["us"])
        row = {"case": label, "k": kernel_size, "op": "fusion" if fusion else "blur",
               "default": {"plan": str(default_plan), "us": default_ms * 1e3,
                           "copy_fraction": gbps(moved, default_ms) / bandwidth},
               "plans": results}
        rows.append(row)
        best = results[0]
        print(f"{label} k{kernel_size} {row['op']}: default {default_ms * 1e3:.1f} us "
              f"({row['default']['copy_fraction']:.0%}); best {best['us']:.1f} us "
              f"({best['copy_fraction']:.0%}) {_describe(best)}", flush=True)
        for r in results[1:5]:
            print(f"    {r['us']:.1f} us {r['copy_fraction']:.0%} {_describe(r)}", flush=True)
        del a, b, expected
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "tune_blur.json").write_text(json.dumps(
            {"copy_gbps": bandwidth, "device": torch.cuda.get_device_name(), "rows": rows},
            indent=1))
    print("\n| case | k | op | default | best | best plan |\n| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        best = row["plans"][0]
        print(f"| {row['case']} | {row['k']} | {row['op']} | {row['default']['us']:.1f} us "
              f"{row['default']['copy_fraction']:.0%} | {best['us']:.1f} us "
              f"{best['copy_fraction']:.0%} | {_describe(best)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

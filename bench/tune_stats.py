"""Sweep the launch knobs of ``match_stats`` on a GPU (bench/NOTES.md records what it found).

    python bench/tune_stats.py [--out DIR]

For every case it times both passes under each plan (``hrkernels.bench.tuning.match_stats_plan``'s
knobs: programs per SM the chunks aim for, rows per loop iteration of each pass) with
``triton.testing.do_bench`` (median, L2 flushed before each run), checks that every plan gives the
default plan's output (up to the order of the sums: other chunks), and prints each plan as
a fraction of the measured copy bandwidth (``2 |x|`` moved: read once, written once).
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
from hrkernels.bench.tuning import match_stats_plan, run_match_stats

CASES = {  # label: (shape [B, C, H, W], factor, per_channel)
    "[8,64,512,512] f1x1": ((8, 64, 512, 512), (1, 1), False),
    "[8,64,512,512] f4x4": ((8, 64, 512, 512), (4, 4), False),
    "[8,64,512,512] f2x2 per channel": ((8, 64, 512, 512), (2, 2), True),
}
KNOBS = [dict(programs_per_sm=p, unroll_stats=us, unroll_normalize=un)
         for p, us, un in itertools.product((2, 4, 5, 8), (4, 8), (2, 4))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--filter", default="", help="only cases whose label contains this")
    args = parser.parse_args(argv)
    bandwidth = copy_bandwidth_gbps(torch.device("cuda"))
    print(f"copy bandwidth {bandwidth:.0f} GB/s", flush=True)
    rows = []
    for label, (shape, (sh, sw), per_channel) in CASES.items():
        if args.filter not in label:
            continue
        x = torch.randn(shape, device="cuda", dtype=torch.float16)
        default_plan = match_stats_plan(x, (sh, sw), per_channel=per_channel)
        moved = 2 * x.numel() * x.element_size()

        def run(plan, x=x, sh=sh, sw=sw, per_channel=per_channel):
            return run_match_stats(x, 0.0, 1.0, (sh, sw), per_channel, plan=plan)

        expected = run(default_plan)
        results = []
        for knobs in KNOBS:
            plan = match_stats_plan(x, (sh, sw), per_channel=per_channel, **knobs)
            error = (run(plan).float() - expected.float()).abs().max().item()
            ms = triton.testing.do_bench(lambda p=plan, r=run: r(p), warmup=10, rep=40,
                                         return_mode="median")
            results.append({**knobs, "programs": plan.grid[0], "chunks": plan.chunks,
                            "us": ms * 1e3, "copy_fraction": gbps(moved, ms) / bandwidth,
                            "max_abs_diff_vs_default": error})
        results.sort(key=lambda r: r["us"])
        rows.append({"case": label, "default": str(default_plan), "plans": results})
        print(f"{label}: default {default_plan}", flush=True)
        for r in results[:6]:
            print(f"    {r['us']:.1f} us {r['copy_fraction']:.0%} pps{r['programs_per_sm']} "
                  f"u{r['unroll_stats']}/{r['unroll_normalize']} programs {r['programs']} "
                  f"diff {r['max_abs_diff_vs_default']:.2g}", flush=True)
        del x, expected
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "tune_stats.json").write_text(json.dumps(
            {"copy_gbps": bandwidth, "device": torch.cuda.get_device_name(), "rows": rows},
            indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

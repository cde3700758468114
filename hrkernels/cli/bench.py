"""``hrkernels bench``: time the ops against the PyTorch reference (eager and compiled)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hrkernels.cli import DTYPES, default_device, resolve_dtype

NAME = "bench"
HELP = "time the ops against the PyTorch reference (eager and compiled)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from hrkernels.bench.harness import PROVIDERS
    from hrkernels.bench.registry import FAMILIES

    parser.add_argument("--out", default="bench/results",
                        help="directory for the JSON, Markdown and PNG results "
                             "(default: %(default)s)")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES),
                        help="data type (default: fp16 on a GPU, fp32 on a CPU)")
    parser.add_argument("--family", nargs="+", choices=FAMILIES, default=list(FAMILIES),
                        help="op families to run (default: all)")
    parser.add_argument("--name", default="ops",
                        help="stem of the result files, <name>_<device>.json/.md/.png "
                             "(default: %(default)s)")
    parser.add_argument("--filter", nargs="+", help="run only cases whose op or shape contains "
                                                    "one of these strings")
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS),
                        help="which implementations to time (default: all three)")


def run(args: argparse.Namespace) -> int:
    import torch

    from hrkernels.bench.harness import run_cases, write_results
    from hrkernels.bench.registry import all_cases

    device = torch.device(default_device(args.device))
    on_gpu = device.type == "cuda"
    dtype = resolve_dtype(args.dtype, device.type)
    cases = [case for case in all_cases(tuple(args.family)) if case.cpu != on_gpu]
    if args.filter:
        cases = [c for c in cases if any(f in f"{c.op} {c.label}" for f in args.filter)]
    if not cases:
        print("no benchmark case matches", file=sys.stderr)
        return 2
    if not on_gpu:
        print("No CUDA device: running the small CPU cases; the 'hrkernels' provider is the "
              "PyTorch reference here, so these numbers are CPU numbers, not kernel numbers.")
    print(f"{len(cases)} cases on {device}, {str(dtype).removeprefix('torch.')}")

    def save(results, bandwidth):
        return write_results(results, bandwidth, dtype, Path(args.out), args.name)

    results, bandwidth = run_cases(cases, device, dtype, args.providers, on_case=save)
    paths = save(results, bandwidth)
    print("wrote " + ", ".join(str(path) for path in paths))
    return 0

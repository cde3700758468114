"""``hrkernels bench``: time the ops against the PyTorch reference (eager and compiled).

Results go to ``--out-dir`` (created if needed), or to a new temporary folder: never into a
checkout's ``bench/results/`` unless that folder is given (``bench/gpu.sh`` gives its ``$OUT``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from hrkernels.cli import DTYPES, default_device, reports_usage_errors, resolve_dtype

NAME = "bench"
HELP = "time the ops against the PyTorch reference (eager and compiled)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from hrkernels.bench.harness import PROVIDERS
    from hrkernels.bench.registry import FAMILIES

    parser.add_argument("--out-dir", "--out", dest="out_dir", type=Path, default=None,
                        help="folder for the JSON, Markdown and PNG results (created if needed; "
                             "default: a new temporary folder, printed at the end)")
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
                        help="which implementations to time (default: all three; the chart needs "
                             "'torch')")


@reports_usage_errors(NAME)
def run(args: argparse.Namespace) -> int:
    import torch

    from hrkernels.bench.harness import run_cases, write_results
    from hrkernels.bench.registry import all_cases
    from hrkernels.ops._backend import check_backend

    device = torch.device(default_device(args.device))
    check_backend(device)
    on_gpu = device.type == "cuda"
    dtype = resolve_dtype(args.dtype, device.type)
    cases = [case for case in all_cases(tuple(args.family)) if case.cpu != on_gpu]
    if args.filter:
        cases = [c for c in cases if any(f in f"{c.op} {c.label}" for f in args.filter)]
    if not cases:
        raise ValueError("no benchmark case matches --family/--filter")
    if args.out_dir is not None and args.out_dir.exists() and not args.out_dir.is_dir():
        raise ValueError(f"--out-dir {str(args.out_dir)!r} is a file, not a folder")
    out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="hrkernels-bench-"))
    if not on_gpu:
        print("No CUDA device: running the small CPU cases; the 'hrkernels' provider is the "
              "PyTorch reference here, so these numbers are CPU numbers, not kernel numbers.")
    print(f"{len(cases)} cases on {device}, {str(dtype).removeprefix('torch.')}")

    def save(results, bandwidth):
        return write_results(results, bandwidth, dtype, out_dir, args.name)

    results, bandwidth = run_cases(cases, device, dtype, args.providers, on_case=save)
    paths = write_results(results, bandwidth, dtype, out_dir, args.name,
                          log=lambda line: print(line, file=sys.stderr))
    print("wrote " + ", ".join(str(path) for path in paths))
    return 0

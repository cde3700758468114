"""The ``hrkernels`` command: ``info``, ``bench`` and ``generate``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _info(args: argparse.Namespace) -> int:
    from hrkernels.env import environment

    info = environment()
    width = max(map(len, info))
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    import torch

    from hrkernels.bench.harness import run_cases, write_results
    from hrkernels.bench.registry import all_cases

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    dtype = getattr(torch, DTYPES[args.dtype or ("fp16" if on_gpu else "fp32")])
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


def build_parser() -> argparse.ArgumentParser:
    from hrkernels.bench.harness import PROVIDERS
    from hrkernels.bench.registry import FAMILIES
    from hrkernels.samplers.cli import add_generate_arguments, run_generate

    parser = argparse.ArgumentParser(
        prog="hrkernels", description="Fused kernels for tuning-free high-resolution diffusion.")
    commands = parser.add_subparsers(dest="command", required=True)

    info = commands.add_parser("info", help="versions, device and usable backends")
    info.set_defaults(handler=_info)

    bench = commands.add_parser(
        "bench", help="time the ops against the PyTorch reference (eager and compiled)")
    bench.add_argument("--out", default="bench/results",
                       help="directory for the JSON, Markdown and PNG results "
                            "(default: %(default)s)")
    bench.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    bench.add_argument("--dtype", choices=sorted(DTYPES),
                       help="data type (default: fp16 on a GPU, fp32 on a CPU)")
    bench.add_argument("--family", nargs="+", choices=FAMILIES, default=list(FAMILIES),
                       help="op families to run (default: all)")
    bench.add_argument("--name", default="ops",
                       help="stem of the result files, <name>_<device>.json/.md/.png "
                            "(default: %(default)s)")
    bench.add_argument("--filter", nargs="+", help="run only cases whose op or shape contains one "
                                                   "of these strings")
    bench.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS),
                       help="which implementations to time (default: all three)")
    bench.set_defaults(handler=_bench)

    generate = commands.add_parser("generate", help="generate a high-resolution image")
    add_generate_arguments(generate)
    generate.set_defaults(handler=run_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hrkernels`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    raise SystemExit(main())

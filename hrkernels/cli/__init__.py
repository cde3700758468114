"""The ``hrkernels`` command: ``info``, ``bench`` and ``generate`` (one module per command).

* :mod:`hrkernels.cli.info` -- versions, device and usable backends.
* :mod:`hrkernels.cli.bench` -- the op benchmarks (``hrkernels.bench``).
* :mod:`hrkernels.cli.generate` -- a registered sampler on a diffusers pipeline.

:data:`DTYPES` is the one table of ``--dtype`` names; the scheduler names are
:data:`hrkernels.samplers.schedulers.SCHEDULERS`.
"""

from __future__ import annotations

import argparse

__all__ = ["DTYPES", "build_parser", "default_device", "main", "resolve_dtype"]

# ``--dtype`` names -> torch dtype attribute names.
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def default_device(requested: str | None) -> str:
    """``requested``, or ``"cuda"`` when a CUDA device is available, else ``"cpu"``."""
    import torch

    return requested or ("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(requested: str | None, device: str):
    """The torch dtype of ``--dtype`` (default: fp16 on a GPU, fp32 elsewhere)."""
    import torch

    return getattr(torch, DTYPES[requested or ("fp16" if device.startswith("cuda") else "fp32")])


def build_parser() -> argparse.ArgumentParser:
    from hrkernels.cli import bench, generate, info

    parser = argparse.ArgumentParser(
        prog="hrkernels", description="Fused kernels for tuning-free high-resolution diffusion.")
    commands = parser.add_subparsers(dest="command", required=True)
    for module in (info, bench, generate):
        command = commands.add_parser(module.NAME, help=module.HELP)
        module.add_arguments(command)
        command.set_defaults(handler=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hrkernels`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    return args.handler(args)

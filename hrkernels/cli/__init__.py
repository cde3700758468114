"""The ``hrkernels`` command: ``info``, ``bench`` and ``generate`` (one module per command).

* :mod:`hrkernels.cli.info` -- versions, device and usable backends.
* :mod:`hrkernels.cli.bench` -- the op benchmarks (``hrkernels.bench``).
* :mod:`hrkernels.cli.generate` -- a registered sampler on a diffusers pipeline.

:data:`DTYPES` is the one table of ``--dtype`` names; the scheduler names are
:data:`hrkernels.samplers.schedulers.SCHEDULERS`.

The parser is built for the command asked for only, so ``hrkernels --help`` and ``hrkernels info``
never import diffusers or transformers (``generate``'s options list the samplers, which do). A bad
argument, device or backend is one line on stderr naming what was given and what is allowed, and
exit status 2 (:func:`reports_usage_errors`).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import sys
from collections.abc import Callable, Iterable

__all__ = ["COMMANDS", "DTYPES", "build_parser", "default_device", "main", "reports_usage_errors",
           "resolve_dtype"]

# The command modules (``hrkernels.cli.<name>``), in the order ``--help`` lists them.
COMMANDS = ("info", "bench", "generate")

# ``--dtype`` names -> torch dtype attribute names.
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def default_device(requested: str | None) -> str:
    """``--device`` checked: ``requested`` if torch can allocate on it, else ``ValueError``; None:
    ``"cuda"`` when a CUDA device is available, else ``"cpu"``."""
    import torch

    if requested is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.empty(0, device=torch.device(requested))
    except (RuntimeError, AssertionError) as error:  # unknown name; a build or machine without it
        available = [name for name, usable in (("cpu", True), ("cuda", torch.cuda.is_available()),
                                               ("mps", torch.backends.mps.is_available()))
                     if usable]
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"--device {requested!r} cannot be used here ({reason}); this machine "
                         f"has {', '.join(available)}") from None
    return requested


def resolve_dtype(requested: str | None, device: str):
    """The torch dtype of ``--dtype`` (default: fp16 on a GPU, fp32 elsewhere)."""
    import torch

    return getattr(torch, DTYPES[requested or ("fp16" if device.startswith("cuda") else "fp32")])


def reports_usage_errors(name: str) -> Callable[[Callable[[argparse.Namespace], int]],
                                                Callable[[argparse.Namespace], int]]:
    """Decorator of a command's ``run``: a ``TypeError``/``ValueError`` (bad argument) or
    :class:`~hrkernels.ops.BackendUnavailableError` is printed as one line, ``hrkernels <name>:
    <message>``, on stderr, and the command returns 2."""
    def decorate(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        @functools.wraps(run)
        def reported(args: argparse.Namespace) -> int:
            from hrkernels.ops import BackendUnavailableError

            try:
                return run(args)
            except (TypeError, ValueError, BackendUnavailableError) as error:
                print(f"hrkernels {name}: {error}", file=sys.stderr)
                return 2
        return reported
    return decorate


def build_parser(commands: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The ``hrkernels`` parser, with the options of ``commands`` only (None: every command's)."""
    parser = argparse.ArgumentParser(
        prog="hrkernels", description="Fused kernels for tuning-free high-resolution diffusion.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    selected = set(COMMANDS if commands is None else commands)
    for name in COMMANDS:
        module = importlib.import_module(f"hrkernels.cli.{name}")
        command = subparsers.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        if name in selected:
            module.add_arguments(command)
        command.set_defaults(handler=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hrkernels`` command; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    # transformers reports at import that torchvision is missing (its image processors, which
    # hrkernels never uses, fall back to PIL): not the user's concern. TRANSFORMERS_VERBOSITY set
    # by the user wins.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    args = build_parser([command] if command in COMMANDS else []).parse_args(argv)
    return args.handler(args)

"""``hrkernels info``: versions, the device and which backends can run."""

from __future__ import annotations

import argparse

from hrkernels.cli import reports_usage_errors

NAME = "info"
HELP = "versions, device and usable backends"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``info`` takes no options."""


@reports_usage_errors(NAME)
def run(args: argparse.Namespace) -> int:
    from hrkernels.env import environment

    info = environment()
    width = max(map(len, info))
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")
    return 0

"""Several GPUs and several machines over ``torch.distributed`` (NCCL on CUDA, gloo on the CPU),
launched with ``torchrun`` (docs/DESIGN.md, "Distributed").

* :func:`init` joins the process group ``torchrun`` describes in the environment (``RANK``,
  ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); with a world size of 1 it does
  nothing at all (no process group, no collective: the one-process path is unchanged).
* :func:`rank`, :func:`world_size`, :func:`local_rank`, :func:`is_main`: where this process
  stands (from the process group once joined, else from the environment).
* ``Sampler(pipe, parallel="views" | "cfg")`` shares every step's model calls across the ranks
  (:class:`ParallelExecutor`): view-parallel (DemoFusion, APT; bitwise equal to one process) or
  CFG-parallel (every sampler); the exact tiled VAE splits its strips across the ranks
  (:func:`hrkernels.vae.decode` with ``comm=``).
* Prompt-parallel needs no process group: ``hrkernels generate --prompts FILE --out-dir DIR``
  deals the prompt lines out by :func:`rank` (:mod:`hrkernels.distributed.prompts`).

Example (``torchrun --nproc-per-node 2 script.py``)::

    import hrkernels, torch
    hrkernels.distributed.init()
    pipe = ...to(f"cuda:{hrkernels.distributed.local_rank()}")
    out = hrkernels.samplers.DemoFusion(pipe, parallel="views")(
        prompt="a castle", height=4096, width=4096,
        generator=torch.Generator("cuda").manual_seed(0))
    if hrkernels.distributed.is_main():
        out.images[0].save("castle.png")
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from hrkernels._validate import check_int, check_real
from hrkernels.distributed.comm import (
    CommRecord,
    CommStats,
    Communicator,
    RankFailedError,
    RankLostError,
)

if TYPE_CHECKING:
    from hrkernels.distributed.executor import ParallelExecutor

__all__ = [
    "DEFAULT_TIMEOUT",
    "CommRecord",
    "CommStats",
    "Communicator",
    "ParallelExecutor",
    "RankFailedError",
    "RankLostError",
    "communicator",
    "executor_for",
    "init",
    "is_main",
    "local_rank",
    "rank",
    "world_size",
]

# Seconds a collective waits for a stalled rank before every rank fails (HRKERNELS_DIST_TIMEOUT
# overrides it): long enough for the slowest rank's share of one step plus a VAE decode.
DEFAULT_TIMEOUT = 600.0

_COMMUNICATOR: Communicator | None = None


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an int; got {value!r}") from None


def _initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Processes in the job: the process group's size once joined, else ``WORLD_SIZE`` (1)."""
    if _COMMUNICATOR is not None:
        return _COMMUNICATOR.world_size
    return _env_int("WORLD_SIZE", 1)


def rank() -> int:
    """This process's rank: the process group's once joined, else ``RANK`` (0)."""
    if _COMMUNICATOR is not None:
        return _COMMUNICATOR.rank
    return _env_int("RANK", 0)


def local_rank() -> int:
    """This process's rank on its machine (``LOCAL_RANK``, 0): its GPU index."""
    return _env_int("LOCAL_RANK", 0)


def is_main() -> bool:
    """Whether this is rank 0: the process that shows progress bars and writes files."""
    return rank() == 0


def communicator() -> Communicator | None:
    """The communicator :func:`init` made, or None (one process, or not initialised)."""
    return _COMMUNICATOR


def init(backend: str | None = None, *, timeout: float | None = None,
         init_method: str | None = None, rank: int | None = None,
         world_size: int | None = None) -> Communicator | None:
    """Join the process group and return its :class:`Communicator`; None in one process.

    With ``torchrun`` every argument comes from the environment. With a world size of 1 nothing
    happens (no process group, no collective) and None is returned. Calling it again returns the
    same communicator.

    Args:
        backend: ``"nccl"`` or ``"gloo"`` (default: NCCL when CUDA is available, else gloo). With
            NCCL the process uses GPU ``LOCAL_RANK`` (``torch.cuda.set_device``), and a gloo group
            over the same ranks carries the host-side status checks.
        timeout: seconds a collective waits for a stalled rank (default ``HRKERNELS_DIST_TIMEOUT``
            or :data:`DEFAULT_TIMEOUT`); then every waiting rank raises :class:`RankLostError`.
        init_method, rank, world_size: as ``torch.distributed.init_process_group`` (default: the
            environment, ``env://``); for launchers other than ``torchrun`` and for tests.

    Raises:
        ValueError: a bad backend, timeout, rank or world size.
    """
    global _COMMUNICATOR
    if _COMMUNICATOR is not None:
        return _COMMUNICATOR
    size = check_int(_env_int("WORLD_SIZE", 1) if world_size is None else world_size,
                     "world_size (WORLD_SIZE)", minimum=1)
    if size == 1:
        return None
    if rank is not None:
        check_int(rank, "rank", minimum=0, maximum=size - 1)
    import torch
    import torch.distributed as dist

    if _initialized():  # the caller's own process group: its backend
        backend = dist.get_backend()
    elif backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ValueError(f'backend must be "nccl", "gloo" or None; got {backend!r}')
    if timeout is None:
        timeout = os.environ.get("HRKERNELS_DIST_TIMEOUT", DEFAULT_TIMEOUT)
        try:
            timeout = float(timeout)
        except ValueError:
            raise ValueError("HRKERNELS_DIST_TIMEOUT must be a number of seconds; got "
                             f"{timeout!r}") from None
    seconds = check_real(timeout, "timeout (seconds)", greater_than=0)
    limit = timedelta(seconds=seconds)
    options: dict[str, Any] = {"backend": backend, "timeout": limit}
    if init_method is not None:
        options.update(init_method=init_method, rank=rank, world_size=size)
    if not _initialized():
        if backend == "nccl":
            device = torch.device("cuda", local_rank())
            torch.cuda.set_device(device)
            options["device_id"] = device
        dist.init_process_group(**options)
    control = dist.new_group(backend="gloo", timeout=limit) if backend == "nccl" else None
    _COMMUNICATOR = Communicator(None, control, limit)
    return _COMMUNICATOR


def executor_for(parallel: str, device: Any) -> ParallelExecutor | None:
    """The executor of ``Sampler(parallel=...)`` on ``device``: None in one process (the local
    executor does the same work).

    Raises:
        RuntimeError: ``WORLD_SIZE`` > 1 but :func:`init` was not called; a backend that does
            not fit the device (NCCL for CUDA, gloo for the CPU); a model on another GPU than this
            rank's.
    """
    comm = _COMMUNICATOR
    if comm is None:
        if _env_int("WORLD_SIZE", 1) > 1:
            raise RuntimeError(f"parallel={parallel!r}: WORLD_SIZE is "
                               f"{os.environ['WORLD_SIZE']} but this process has not joined the "
                               "process group; call hrkernels.distributed.init() first")
        return None
    import torch

    from hrkernels.distributed.executor import ParallelExecutor

    device = torch.device(device)
    if (comm.backend == "nccl") != (device.type == "cuda"):
        raise RuntimeError(f"parallel={parallel!r}: the pipeline is on {device} but the process "
                           f"group's backend is {comm.backend}; use NCCL with CUDA pipelines and "
                           "gloo with CPU ones (hrkernels.distributed.init(backend=...))")
    if device.type == "cuda" and device.index not in (None, torch.cuda.current_device()):
        raise RuntimeError(f"parallel={parallel!r}: the pipeline is on {device} but rank "
                           f"{comm.rank} uses cuda:{torch.cuda.current_device()} (LOCAL_RANK); "
                           "move the pipeline to it")
    return ParallelExecutor(comm, parallel)


def __getattr__(name: str) -> Any:
    # The executor imports the samplers' engine (a layer above this one): only when asked for.
    if name == "ParallelExecutor":
        from hrkernels.distributed.executor import ParallelExecutor

        return ParallelExecutor
    raise AttributeError(f"module 'hrkernels.distributed' has no attribute {name!r}")


def _reset_for_tests() -> None:
    """Forget the communicator (tests that tear the process group down)."""
    global _COMMUNICATOR
    _COMMUNICATOR = None

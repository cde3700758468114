""":class:`ParallelExecutor`: the engine's model calls of one step shared across ranks
(view-parallel and CFG-parallel), predictions exchanged so that every rank consumes all of them in
the one-process order.

The engine hands an executor a step's calls for one view shape: ``calls[i]`` has ``k`` views times
``len(branches)`` guidance rows (``[uncond x k, cond x k]`` under CFG), all of one shape. The
executor cuts them into **units**, deals the units out in contiguous shares (rank ``r`` takes
units ``r q .. r q + q - 1``, ``q = ceil(units / world)``; the last ranks may get fewer or none and
then evaluate nothing), evaluates its share through the engine's ``evaluate`` (the choke point),
exchanges the predictions (:meth:`Communicator.exchange`) and consumes every call's prediction in
index order on every rank: every rank folds the same predictions in the same order, so every rank
holds the same latent.

* ``"views"``: a unit is a whole call: every UNet call has exactly the rows and shape of the
  one-process run, so the result is **bitwise** equal to it (same generator seed, same
  ``view_batch_size``).
* ``"cfg"``: a unit is one guidance branch of a call (``k`` rows; a single-branch pass, e.g.
  noise-damped CFG's base pass, stays whole): the uncond and cond halves run on different ranks,
  and with more ranks than halves the calls of a step spread over them too (CFG- and
  view-parallel together). Batches of ``k`` rows instead of ``2k`` may round differently inside
  the model, so the result equals the one-process run to the model's floating-point tolerance
  (bitwise where the model's kernels do not depend on the batch size).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

import torch

from hrkernels._validate import check_choice
from hrkernels.distributed.comm import CommStats, Communicator
from hrkernels.samplers.engine import Consume
from hrkernels.samplers.pipelines import ModelCall

__all__ = ["PARALLEL_MODES", "ParallelExecutor"]

PARALLEL_MODES = ("views", "cfg")


class ParallelExecutor:
    """Runs each rank's share of a step's model calls and gathers all predictions on every rank.

    Args:
        comm: the ranks (:func:`hrkernels.distributed.communicator`).
        parallel: ``"views"`` (whole calls per rank, bitwise equal to one process) or ``"cfg"``
            (guidance branches per rank); see the module docstring.
    """

    def __init__(self, comm: Communicator, parallel: str) -> None:
        self.comm = comm
        self.parallel = check_choice(parallel, "parallel", PARALLEL_MODES)

    @property
    def is_main(self) -> bool:
        """Whether this rank shows progress and writes files (rank 0)."""
        return self.comm.is_main

    @property
    def concurrency(self) -> float:
        """Calls of two branches that run at once: the world size for ``"views"``, half of it
        for ``"cfg"`` (the engine's choice of ``view_batch_size`` balances the shares with it)."""
        world = self.comm.world_size
        return float(world) if self.parallel == "views" else max(1.0, world / 2)

    def session(self, what: str) -> AbstractContextManager[CommStats]:
        """:meth:`Communicator.session`: a sampler call every rank makes in step."""
        return self.comm.session(what)

    def parts(self, call: ModelCall) -> int:
        """Units of a call: its guidance branches for ``"cfg"``, else 1 (the whole call)."""
        return max(1, len(call.branches)) if self.parallel == "cfg" else 1

    def units(self, calls: Sequence[ModelCall]) -> list[tuple[int, slice | None]]:
        """``(call index, rows or None for the whole call)`` of every unit, in order."""
        units: list[tuple[int, slice | None]] = []
        for index, call in enumerate(calls):
            parts = self.parts(call)
            rows = call.sample.shape[0] // parts
            units.extend((index, None if parts == 1 else slice(part * rows, (part + 1) * rows))
                         for part in range(parts))
        return units

    def share(self, count: int, rank: int | None = None) -> range:
        """The units of ``rank`` (default this one) among ``count``: a contiguous range."""
        rank = self.comm.rank if rank is None else rank
        per_rank = -(-count // self.comm.world_size)
        return range(min(count, rank * per_rank), min(count, (rank + 1) * per_rank))

    def run(self, evaluate: Callable[[ModelCall], torch.Tensor], calls: Sequence[ModelCall],
            consume: Consume) -> None:
        units = self.units(calls)
        outputs = []
        for position in self.share(len(units)):
            index, rows = units[position]
            call = calls[index] if rows is None else calls[index].select_rows(rows)
            # A copy: the model may hand back a buffer its next call reuses (CUDA graphs).
            outputs.append(evaluate(call).clone())
        device = calls[0].sample.device
        gathered = [item for items in self.comm.exchange(outputs, "model calls", device)
                    for item in items]
        position = 0
        for index, call in enumerate(calls):
            parts = self.parts(call)
            pieces = gathered[position:position + parts]
            consume(index, pieces[0] if parts == 1 else torch.cat(pieces))
            position += parts

    @property
    def stats(self) -> CommStats:
        """The current session's exchanges."""
        return self.comm.stats


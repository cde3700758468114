"""The one way ranks talk: :class:`Communicator` (tensor exchange with a status check before it,
failure reports, per-collective statistics) over ``torch.distributed`` process groups.

Every exchange is two collectives:

1. a **control** ``all_gather_object`` on a CPU (gloo) group: each rank says ``("ok", what,
   shapes)`` (or, from :meth:`Communicator.session`'s error path, ``("failed", message)``). Every
   rank thus learns, on the host and without a device synchronisation, whether a peer failed
   (then all raise, naming it) and the shapes and dtypes of every rank's items;
2. a **data** ``all_gather_single`` (``all_gather_into_tensor`` before torch 2.13) of one byte
   buffer per rank (each rank's items packed, 16-byte aligned, padded to the longest rank's bytes)
   on the data group (NCCL on CUDA, gloo on the CPU). The items come back as views of the
   gathered buffer, bit for bit as sent.

A rank that raises inside :meth:`Communicator.session` joins its peers' next control collective
with its error, so they raise :class:`RankFailedError` naming it (instead of waiting); a rank that
dies without reporting (killed, segfault) or stalls makes the others raise
:class:`RankLostError` when the control collective fails (gloo notices a closed connection at
once) or times out (the process group's ``timeout``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch

__all__ = ["CommRecord", "CommStats", "Communicator", "RankFailedError", "RankLostError"]

# Items are packed at offsets that are multiples of this (any dtype's view of the bytes is aligned).
ALIGNMENT = 16


class RankFailedError(RuntimeError):
    """Another rank raised; ``ranks`` maps each failed rank to its error message."""

    def __init__(self, rank: int, what: str, failures: dict[int, str]) -> None:
        self.rank, self.failures = rank, failures
        named = "; ".join(f"rank {r}: {message}" for r, message in sorted(failures.items()))
        plural = "s" if len(failures) > 1 else ""
        super().__init__(f"hrkernels.distributed: rank{plural} "
                         f"{', '.join(str(r) for r in sorted(failures))} failed during {what}, "
                         f"so rank {rank} stops too ({named})")


class RankLostError(RuntimeError):
    """A collective failed or timed out: a peer died without reporting, or stalls."""


@dataclass
class CommRecord:
    """One exchange: what it carried, the bytes this rank sent (its packed buffer, padding
    included) and received (the other ranks' buffers), and the seconds of its control collective
    (host clock) and data collective (host clock on the CPU; CUDA events on a GPU, read by
    :meth:`CommStats.summary`). Both include the wait for the slowest rank (an imbalance of the
    shares shows there)."""

    what: str
    sent_bytes: int
    received_bytes: int
    control_seconds: float
    data_seconds: float | None = None
    events: tuple[Any, Any] | None = None

    def resolve(self) -> None:
        if self.events is not None:
            start, end = self.events
            end.synchronize()
            self.data_seconds = start.elapsed_time(end) / 1e3
            self.events = None


@dataclass
class CommStats:
    """Every exchange of a session (e.g. one sampler call), in order."""

    records: list[CommRecord] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Totals per kind of exchange (``what``) and overall: ``exchanges``, ``sent_bytes``,
        ``received_bytes``, ``control_seconds``, ``data_seconds``. Synchronises the device once
        (the data collectives' CUDA events)."""
        for record in self.records:
            record.resolve()

        def total(records: Sequence[CommRecord]) -> dict[str, Any]:
            return {"exchanges": len(records),
                    "sent_bytes": sum(r.sent_bytes for r in records),
                    "received_bytes": sum(r.received_bytes for r in records),
                    "control_seconds": sum(r.control_seconds for r in records),
                    "data_seconds": sum(r.data_seconds or 0.0 for r in records)}

        kinds: dict[str, list[CommRecord]] = {}
        for record in self.records:
            kinds.setdefault(record.what, []).append(record)
        return {**total(self.records), "by_kind": {k: total(v) for k, v in kinds.items()}}


class Communicator:
    """Exchanges tensors between the ranks of a process group (see the module docstring).

    Args:
        group: the data group (None: the default group).
        control_group: a gloo group over the same ranks for the host-side status collective (None:
            ``group``, which must then be a gloo group).
        timeout: the groups' timeout (for messages).
    """

    def __init__(self, group: Any = None, control_group: Any = None,
                 timeout: timedelta | None = None) -> None:
        import torch.distributed as dist

        self._dist = dist
        # torch 2.13 renames all_gather_into_tensor (deprecated there) to all_gather_single.
        self._all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        self.group = group
        self.control_group = control_group if control_group is not None else group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.backend = str(dist.get_backend(group))
        self.timeout = timeout
        self.stats = CommStats()
        self._depth = 0
        self._session: str | None = None

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0 (the rank that shows progress and writes files)."""
        return self.rank == 0

    # -- the control collective -------------------------------------------------------------------

    def _context(self, what: str) -> str:
        """``what`` within the current session (for messages)."""
        return what if self._session in (None, what) else f"{self._session} ({what})"

    def _control(self, status: tuple, what: str) -> list[tuple]:
        statuses: list[Any] = [None] * self.world_size
        started = time.perf_counter()
        try:
            self._dist.all_gather_object(statuses, status, group=self.control_group)
        except Exception as error:  # gloo: a closed connection; a timeout
            elapsed = time.perf_counter() - started
            reason = " ".join(str(error).split())[:300]
            raise RankLostError(
                f"hrkernels.distributed: rank {self.rank} lost the other ranks during "
                f"{self._context(what)} "
                f"after {elapsed:.1f} s (a rank was killed or crashed without reporting, or is "
                f"stuck past the timeout {self.timeout}); see the other ranks' output. Cause: "
                f"{reason}") from error
        failures = {rank: s[1] for rank, s in enumerate(statuses) if s[0] == "failed"}
        if failures and status[0] != "failed":
            raise RankFailedError(self.rank, self._context(what), failures)
        kinds = {(s[0], s[1]) for s in statuses if s[0] != "failed"}
        if status[0] != "failed" and len(kinds) > 1:
            listed = ", ".join(f"rank {rank}: {s[0]} {s[1]}" for rank, s in enumerate(statuses))
            raise RuntimeError(f"hrkernels.distributed: the ranks diverged ({listed}); every rank "
                               "must make the same calls in the same order")
        return statuses

    # -- sessions ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def session(self, what: str) -> Iterator[CommStats]:
        """A block every rank runs in step (a sampler call): yields a fresh :class:`CommStats`
        (also :attr:`stats` meanwhile). An exception inside the block on this rank is reported to
        the other ranks (they raise :class:`RankFailedError` naming this rank) and re-raised
        here; a clean exit ends with a closing control collective, so a rank that fails after
        its last exchange still finds its peers. Nested sessions belong to the outermost."""
        if self._depth:
            self._depth += 1
            try:
                yield self.stats
            finally:
                self._depth -= 1
            return
        self.stats = CommStats()
        self._depth, self._session = 1, what
        try:
            yield self.stats
        except (RankFailedError, RankLostError):
            raise
        except BaseException as error:
            message = f"{type(error).__name__}: {error}"
            with contextlib.suppress(RankLostError, RankFailedError):
                self._control(("failed", message[:2000]), what)
            raise
        else:
            self._control(("done", what, ()), what)
        finally:
            self._depth, self._session = 0, None

    # -- exchange ---------------------------------------------------------------------------------

    def exchange(self, items: Sequence[torch.Tensor], what: str,
                 device: torch.device | None = None) -> list[list[torch.Tensor]]:
        """Every rank's ``items``, bit for bit: ``result[r]`` is rank ``r``'s list (views of one
        gathered byte buffer; this rank's own come back through it too).

        Args:
            items: this rank's tensors (any shapes and dtypes; may be empty), on ``device``.
            what: what is exchanged (messages, statistics); every rank passes the same.
            device: where the buffers live (default: the first item's; a rank without items must
                pass it).

        Raises:
            RankFailedError: another rank reported an error (names it).
            RankLostError: the collective failed or timed out.
        """
        if device is None:
            if not items:
                raise ValueError("exchange: pass device when this rank has no items")
            device = items[0].device
        specs = tuple((tuple(item.shape), str(item.dtype).removeprefix("torch."))
                      for item in items)
        started = time.perf_counter()
        statuses = self._control(("ok", what, specs), what)
        control_seconds = time.perf_counter() - started
        layouts = [_layout(status[2]) for status in statuses]
        size = max(1, max(total for _, total in layouts))
        send = torch.empty(size, dtype=torch.uint8, device=device)
        offsets, _ = layouts[self.rank]
        for item, offset in zip(items, offsets, strict=True):
            nbytes = item.numel() * item.element_size()
            send[offset:offset + nbytes].copy_(item.contiguous().view(-1).view(torch.uint8))
        received = torch.empty(self.world_size * size, dtype=torch.uint8, device=device)
        record = CommRecord(what, size, (self.world_size - 1) * size, control_seconds)
        timing = device.type == "cuda"
        if timing:
            events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            events[0].record()
        started = time.perf_counter()
        try:
            self._all_gather(received, send, group=self.group)
        except Exception as error:
            raise RankLostError(f"hrkernels.distributed: rank {self.rank}: the data collective of "
                                f"{self._context(what)} failed: {error}") from error
        if timing:
            events[1].record()
            record.events = events
        else:
            record.data_seconds = time.perf_counter() - started
        self.stats.records.append(record)
        result = []
        for rank, status in enumerate(statuses):
            base = rank * size
            views = []
            for (shape, dtype), offset in zip(status[2], layouts[rank][0], strict=True):
                dtype = getattr(torch, dtype)
                nbytes = _numel(shape) * dtype.itemsize
                chunk = received[base + offset:base + offset + nbytes]
                views.append(chunk.view(dtype).view(shape))
            result.append(views)
        return result


def _numel(shape: Sequence[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _layout(specs: Sequence[tuple[tuple[int, ...], str]]) -> tuple[list[int], int]:
    """Byte offsets of items of these ``(shape, dtype name)`` packed at :data:`ALIGNMENT`, and the
    total."""
    offsets, total = [], 0
    for shape, dtype in specs:
        offsets.append(total)
        nbytes = _numel(shape) * getattr(torch, dtype).itemsize
        total += -(-nbytes // ALIGNMENT) * ALIGNMENT
    return offsets, total

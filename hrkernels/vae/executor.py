"""Runs a VAE program (``program.py``) over row strips as a :class:`~hrkernels.vae.plan.TilePlan`
says: checkpoints kept whole on the device or the host, every other value only as strips.

For each segment of the plan: one statistics pass per GroupNorm inside it (the segment's steps up
to that GroupNorm over every strip, keeping only ``group_stats`` of each strip), then the final
pass, which writes the segment's output value into its store (and gathers the statistics its next
GroupNorm needs). Statistics are fp32 ``(count, mean, M2)`` per image and group, merged over the
strips with Chan's formula (``hrkernels.ops.combine_group_stats``). A store is allocated when its
segment's final pass starts and dropped after the last segment that reads it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch
import torch.nn.functional as F

from hrkernels.ops import combine_group_stats, group_norm_silu, group_stats
from hrkernels.vae.plan import TilePlan
from hrkernels.vae.program import Attention, Grid, Program, Residual

__all__ = ["execute"]

Statistics = tuple[torch.Tensor, torch.Tensor]  # mean, rstd: [B, G] fp32
Sink = Callable[[torch.Tensor, int], None]


class Exchange(Protocol):
    """Ranks that share a run's strips (:class:`hrkernels.distributed.Communicator`)."""

    rank: int
    world_size: int

    def exchange(self, items: Sequence[torch.Tensor], what: str,
                 device: torch.device | None = None) -> list[list[torch.Tensor]]: ...


def _local_strips(firsts: Sequence[int], strip: Callable[[int], torch.Tensor],
                  sink: Sink) -> None:
    """Every strip in this process, in order."""
    for first in firsts:
        sink(strip(first), first)


def _shared_strips(comm: Exchange, device: torch.device) -> Callable[..., None]:
    """Strips dealt out round-robin over the ranks, one round of ``world_size`` strips at a time
    (each rank holds one strip's result more than one process would); after each round every
    rank sinks every strip of the round in order, so every rank holds the same values and
    statistics as one process, bit for bit."""
    def run(firsts: Sequence[int], strip: Callable[[int], torch.Tensor], sink: Sink) -> None:
        for round_start in range(0, len(firsts), comm.world_size):
            members = firsts[round_start:round_start + comm.world_size]
            mine = [strip(members[comm.rank])] if comm.rank < len(members) else []
            gathered = comm.exchange(mine, "vae strips", device)
            for first, items in zip(members, gathered, strict=False):
                sink(items[0], first)
    return run


class _DeviceStore:
    """A value whole on the device, ``[B, C, H, W]``; strips are views. Allocated on the first
    write, unless that write is the whole value (one strip), which becomes the store (no copy)."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                 tensor: torch.Tensor | None = None):
        self.shape, self.dtype, self.device = shape, dtype, device
        self.tensor = tensor

    def read(self, first: int, last: int) -> torch.Tensor:
        return self.tensor[:, :, first:last]

    def write(self, strip: torch.Tensor, first: int) -> None:
        if self.tensor is None:
            if first == 0 and strip.shape == self.shape:
                self.tensor = strip
                return
            self.tensor = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        self.tensor[:, :, first:first + strip.shape[2]].copy_(strip)


class _HostStore:
    """A value on the host, rows outermost (``[H, B, C, W]``, pinned when the device is CUDA) so
    that a strip is one contiguous block for each copy; copies are asynchronous on the current
    stream (the pinned allocator keeps a block until its copies are done)."""

    def __init__(self, batch: int, grid: Grid, dtype: torch.dtype, device: torch.device):
        self.device = device
        self.tensor = torch.empty((grid.height, batch, grid.channels, grid.width), dtype=dtype,
                                  pin_memory=device.type == "cuda")

    def read(self, first: int, last: int) -> torch.Tensor:
        rows = self.tensor[first:last].to(self.device, non_blocking=True)
        return rows.permute(1, 2, 0, 3).contiguous()

    def write(self, strip: torch.Tensor, first: int) -> None:
        self.tensor[first:first + strip.shape[2]].copy_(strip.permute(2, 0, 1, 3).contiguous(),
                                                        non_blocking=True)


class _InputStore:
    """The program's input, wherever it is: strips converted to the device and dtype on read."""

    def __init__(self, tensor: torch.Tensor, dtype: torch.dtype, device: torch.device):
        self.tensor, self.dtype, self.device = tensor, dtype, device

    def read(self, first: int, last: int) -> torch.Tensor:
        return self.tensor[:, :, first:last].to(self.device, self.dtype, non_blocking=True)


def _finish(parts: list[torch.Tensor], eps: float) -> Statistics:
    """Mean and ``1 / sqrt(var + eps)`` of the merged per-strip statistics (biased variance, as
    GroupNorm)."""
    merged = combine_group_stats(torch.stack(parts), dim=0)
    return merged[..., 1], torch.rsqrt(merged[..., 2] / merged[..., 0] + eps)


class _Run:
    """One chunk of images through the program."""

    def __init__(self, program: Program, plan: TilePlan, source: torch.Tensor,
                 out: torch.Tensor, comm: Exchange | None = None):
        self.program, self.plan, self.steps = program, plan, program.steps
        self.strips = _local_strips if comm is None else _shared_strips(comm, out.device)
        self.grids = program.grids(*source.shape[2:])
        self.batch, self.dtype, self.device = source.shape[0], out.dtype, out.device
        self.stores: dict[int, object] = {0: _InputStore(source, self.dtype, self.device)}
        self.statistics: dict[int, Statistics] = {}
        self.out = out

    def run(self) -> None:
        last_use = self._last_use()
        for index, segment in enumerate(self.plan.segments):
            if isinstance(self.steps[segment.start], Attention):
                self._attention(segment.start, segment.rows)
            else:
                self._segment(segment.start, segment.stop, segment.rows)
            for p in [p for p, last in last_use.items() if last == index]:
                del self.stores[p]

    def _last_use(self) -> dict[int, int]:
        last_use: dict[int, int] = {}
        for index, segment in enumerate(self.plan.segments):
            last_use[segment.start] = index
            for step in self.steps[segment.start:segment.stop]:
                if isinstance(step, Residual) and step.source < segment.start:
                    last_use[step.source] = index
        return last_use

    # -- stores and statistics --------------------------------------------------------------------

    def _new_store(self, p: int):
        grid = self.grids[p]
        shape = (self.batch, grid.channels, grid.height, grid.width)
        if p == len(self.steps):
            return _DeviceStore(shape, self.dtype, self.device, self.out)
        if p in self.plan.host:
            return _HostStore(self.batch, grid, self.dtype, self.device)
        return _DeviceStore(shape, self.dtype, self.device)

    def _needs_statistics(self, p: int) -> bool:
        return p < len(self.steps) and self.steps[p].norm_groups is not None

    def _gather(self, start: int, stop: int, rows: int) -> None:
        """A statistics pass: the statistics of value ``stop`` for the step that reads it."""
        step = self.steps[stop]
        parts: list[torch.Tensor] = []
        self._pass(start, stop, rows, lambda stats, first: parts.append(stats),
                   reduce=lambda strip: group_stats(strip, step.norm_groups))
        self.statistics[stop] = _finish(parts, step.eps)

    # -- passes -----------------------------------------------------------------------------------

    def _segment(self, start: int, stop: int, rows: int) -> None:
        if self._needs_statistics(start) and start not in self.statistics:
            self._gather(start, start, rows)
        for q in range(start + 1, stop):
            if self._needs_statistics(q):
                self._gather(start, q, rows)
        store = self.stores[stop] = self._new_store(stop)
        self._pass(start, stop, rows, self._store_sink(stop, store))

    def _store_sink(self, p: int, store) -> Sink:
        """Writes strips of value ``p`` into ``store`` and, when a GroupNorm reads ``p``,
        finishes its statistics after the last strip."""
        if not self._needs_statistics(p):
            return store.write
        step, parts = self.steps[p], []
        height = self.grids[p].height

        def sink(strip: torch.Tensor, first: int) -> None:
            store.write(strip, first)
            parts.append(group_stats(strip, step.norm_groups))
            if first + strip.shape[2] == height:
                self.statistics[p] = _finish(parts, step.eps)

        return sink

    def _pass(self, start: int, stop: int, rows: int, sink: Sink,
              reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Steps ``start .. stop - 1`` over strips of ``rows`` rows of value ``stop``; each strip
        of value ``stop`` (or ``reduce(strip)``, e.g. its statistics) goes to
        ``sink(strip, first_row)``, in order (the strips shared across ranks when a
        communicator is given)."""
        height = self.grids[stop].height
        sources = {step.source for step in self.steps[start:stop]
                   if isinstance(step, Residual) and step.source >= start}

        def strip(first: int) -> torch.Tensor:
            ranges = self.program.row_ranges(start, stop, first, min(first + rows, height),
                                             self.grids)
            x = self.stores[start].read(*ranges[0])
            row0 = ranges[0][0]
            kept: dict[int, tuple[torch.Tensor, int]] = {}
            for p in range(start, stop):
                step = self.steps[p]
                if p in sources:
                    kept[p] = (x, row0)
                extra = {}
                if step.norm_groups is not None:
                    extra["statistics"] = self.statistics[p]
                if isinstance(step, Residual):
                    extra["source"] = (kept.pop(step.source) if step.source >= start else
                                       (self.stores[step.source].read(*ranges[p + 1 - start]),
                                        ranges[p + 1 - start][0]))
                x = step.run(x, row0, *ranges[p + 1 - start], self.grids[p].height, **extra)
                row0 = ranges[p + 1 - start][0]
            return x if reduce is None else reduce(x)

        self.strips(range(0, height, rows), strip, sink)

    def _attention(self, p: int, rows: int) -> None:
        """The attention over the whole value ``p`` (a device store): keys and values of every
        position, then queries in strips of ``rows`` rows through SDPA (no ``N x N`` matrix)."""
        attention = self.steps[p].module
        x = self.stores[p].read(0, self.grids[p].height)
        batch, channels, height, width = x.shape
        heads = attention.heads
        head_dim = attention.inner_dim // heads
        norm = attention.group_norm

        def tokens(first: int, last: int) -> torch.Tensor:  # [B, rows * W, C]
            strip = x[:, :, first:last]
            if norm is not None:
                strip = group_norm_silu(strip, *self.statistics[p], norm.weight, norm.bias,
                                        silu=False)
            return strip.flatten(2).transpose(1, 2)

        def project(linear, values: torch.Tensor) -> torch.Tensor:  # [B, heads, n, head_dim]
            projected = F.linear(values, linear.weight, linear.bias)
            return projected.unflatten(-1, (heads, head_dim)).transpose(1, 2)

        keys = x.new_empty((batch, heads, height * width, head_dim))
        values = torch.empty_like(keys)
        for first in range(0, height, rows):
            last = min(first + rows, height)
            strip = tokens(first, last)
            keys[:, :, first * width:last * width] = project(attention.to_k, strip)
            values[:, :, first * width:last * width] = project(attention.to_v, strip)
        store = self.stores[p + 1] = self._new_store(p + 1)
        out_projection = attention.to_out[0]

        def strip(first: int) -> torch.Tensor:
            last = min(first + rows, height)
            queries = project(attention.to_q, tokens(first, last))
            attended = F.scaled_dot_product_attention(queries, keys, values)
            attended = F.linear(attended.transpose(1, 2).flatten(2), out_projection.weight,
                                out_projection.bias)
            out = attended.transpose(1, 2).unflatten(2, (last - first, width))
            if attention.residual_connection:
                out = out + x[:, :, first:last]
            if attention.rescale_output_factor != 1.0:
                out = out / attention.rescale_output_factor
            return out

        self.strips(range(0, height, rows), strip, self._store_sink(p + 1, store))


def execute(program: Program, plan: TilePlan, source: torch.Tensor, dtype: torch.dtype,
            device: torch.device, comm: Exchange | None = None) -> torch.Tensor:
    """Run ``program`` on ``source`` (``[B, C, H, W]``, any device and float dtype) as ``plan``
    says, in ``dtype`` on ``device``; with ``comm``, every pass's strips dealt out over its ranks
    (each rank computes ``1 / world_size`` of them; every rank returns the whole output, equal
    bit for bit to one process's).

    Returns:
        The program's output value ``[B, C', H', W']`` in ``dtype`` on ``device``.
    """
    grid = program.grids(*source.shape[2:])[-1]
    out = torch.empty((source.shape[0], grid.channels, grid.height, grid.width), dtype=dtype,
                      device=device)
    for first in range(0, source.shape[0], plan.batch):
        last = first + plan.batch
        _Run(program, plan, source[first:last], out[first:last], comm).run()
    return out

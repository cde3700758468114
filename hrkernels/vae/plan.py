"""Tile plans: which values of a VAE program are kept whole (checkpoints, on the device or the
host), how high the row strips are, and what that costs. See README.md for the model.

A plan splits the program into *segments* between checkpoints. A segment reads its first value
(a checkpoint) in strips, recomputes its steps on each strip (with the halo every convolution
needs) and writes its last value. Each GroupNorm inside a segment needs the statistics of its
whole input first: one *statistics pass* per such GroupNorm recomputes the segment up to it over
all strips, then the *final pass* writes the segment's output (and the statistics of the next
GroupNorm's input, for free). More checkpoints: fewer recomputed FLOPs, more memory held.

The program is cut into *levels* at every resolution change (on the smaller side: before a
decoder's upsampler, after an encoder's downsampler); level boundaries are always checkpoints,
so are the input and output of an attention (global: it needs its whole input). Inside a level
the planner chooses a *mode*, the set of GroupNorm inputs kept (all; those up to a size; block
ends only; none) and where its checkpoints live (device; host on CUDA); per segment the strip
height is the largest that fits the budget. A dynamic programme over the levels (state: where the
level's input lives) picks the cheapest plan by :class:`CostModel`, for the whole batch at once or
in chunks of images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from hrkernels.ops import select_backend
from hrkernels.vae.program import Attention, Conv, Grid, Program, Residual, Upsample

__all__ = ["CostModel", "Segment", "TilePlan", "TilePlanError", "make_plan"]

DEVICE, HOST, INPUT, OUTPUT = "device", "host", "input", "output"


class TilePlanError(MemoryError):
    """No tile plan fits the memory budget."""


@dataclass(frozen=True)
class CostModel:
    """Rough rates that rank plans (only their ratios matter): convolution and linear FLOP/s by
    element size, device memory bandwidth, host<->device bandwidth and the host cost of one
    launch. The defaults for CUDA are an H100-class GPU with PCIe (cuDNN at ~30% of peak), those
    for CPU a few cores."""

    flops_per_s: dict[int, float]
    device_bytes_per_s: float
    host_bytes_per_s: float
    launch_s: float

    @staticmethod
    def for_device(device: torch.device) -> CostModel:
        if device.type == "cuda":
            return CostModel({2: 250e12, 4: 60e12}, 2.5e12, 20e9, 8e-6)
        return CostModel({2: 50e9, 4: 100e9}, 10e9, 10e9, 20e-6)


@dataclass(frozen=True)
class Segment:
    """Steps ``start .. stop - 1``: reads value ``start``, writes value ``stop``; ``rows`` is the
    strip height of each of its passes, in rows of the pass's output value."""

    start: int
    stop: int
    rows: int


@dataclass(frozen=True)
class TilePlan:
    """How a decode or encode runs, and its estimated cost.

    Attributes:
        batch: images per run (the batch runs in chunks of this many; statistics are per image).
        segments: the segments in order (see the module docstring).
        host: checkpoint values kept on the host (the others are on the device).
        passes: sweeps over strips in one run (a segment's statistics passes and its final pass;
            an attention sweeps twice: keys and values, then queries).
        peak_bytes: estimated device memory of activations and workspace of one run (not weights,
            the input or the output); at most the budget.
        flops: convolution and attention FLOPs of the whole batch, recomputation included.
        untiled_flops: the same for one untiled pass (no recomputation).
        host_bytes: bytes copied between host and device for the whole batch.
        seconds: the cost model's time for the whole batch (to rank plans; not a measurement).
        budget: the budget it was planned for, in bytes.
    """

    batch: int
    segments: tuple[Segment, ...]
    host: frozenset[int]
    passes: int
    peak_bytes: int
    flops: float
    untiled_flops: float
    host_bytes: int
    seconds: float
    budget: int

    @property
    def checkpoints(self) -> tuple[int, ...]:
        """The values kept whole (segment boundaries, without the program's input and output)."""
        return tuple(segment.stop for segment in self.segments[:-1])

    def describe(self) -> str:
        """One line: segments, strips, recomputation, host traffic, peak against the budget."""
        rows = sorted({segment.rows for segment in self.segments})
        return (f"{len(self.segments)} segments, {self.passes} passes, strips of "
                f"{rows[0]}-{rows[-1]} rows, "
                f"{self.batch} image(s) per run, {len(self.host)} checkpoint(s) on the host; "
                f"{self.flops / max(self.untiled_flops, 1.0):.2f}x the untiled FLOPs, "
                f"{self.host_bytes / 2**20:.0f} MiB host traffic; peak {_mib(self.peak_bytes)} of "
                f"{_mib(self.budget)}")


def _mib(size: float) -> str:
    return f"{size / 2**20:.1f} MiB"


@dataclass
class _Pass:
    flops: float = 0.0
    device_bytes: float = 0.0
    host_bytes: float = 0.0
    launches: int = 0

    def add(self, other: _Pass, times: float = 1.0) -> None:
        self.flops += other.flops * times
        self.device_bytes += other.device_bytes * times
        self.host_bytes += other.host_bytes * times
        self.launches += int(other.launches * times)


@dataclass
class _LevelResult:
    segments: list[Segment]
    host: set[int]
    peak: int
    cost: _Pass = field(default_factory=_Pass)
    passes: int = 0


class _Model:
    """Memory and cost of passes over one program at one input size, dtype and device."""

    def __init__(self, program: Program, grids: list[Grid], dtype: torch.dtype,
                 device: torch.device, input_bytes: bool, batch: int):
        self.program = program
        self.steps = program.steps
        self.grids = grids
        self.element = torch.empty((), dtype=dtype).element_size()
        self.device = device
        self.costs = CostModel.for_device(device)
        # The input value (decode: the unscaled latents of the whole batch) is the call's
        # allocation, held until it returns, or the user's (read in converted strips).
        self.input_bytes = input_bytes
        # Which implementation of the norm ops runs: the reference keeps fp32 copies of strips.
        self.reference = select_backend("group_norm_silu", device) == "torch"
        self.levels = self._levels()
        self.held_input = self.value_bytes(0, batch) if input_bytes else 0
        # The statistics kept for every GroupNorm (merged triples and rstd, [B, G] each).
        self.held_statistics = sum(2 * self._small(batch * step.norm_groups * 3)
                                   for step in self.steps if step.norm_groups is not None)

    # -- sizes ------------------------------------------------------------------------------------

    def value_bytes(self, p: int, batch: int) -> int:
        grid = self.grids[p]
        return batch * grid.channels * grid.height * grid.width * self.element

    def _rows_bytes(self, p: int, rows: int, batch: int, element: int | None = None) -> int:
        return batch * rows * self.grids[p].row_elements() * (element or self.element)

    def _levels(self) -> list[tuple[int, int]]:
        """Values where the resolution changes, on the side with fewer elements per image."""
        boundaries = [0]
        for index in range(len(self.steps)):
            before, after = self.grids[index], self.grids[index + 1]
            if before.height != after.height:
                smaller_after = (after.channels * after.height * after.width
                                 < before.channels * before.height * before.width)
                boundaries.append(index + 1 if smaller_after else index)
        boundaries.append(len(self.steps))
        boundaries = sorted(set(boundaries))
        return list(zip(boundaries, boundaries[1:], strict=False))

    @staticmethod
    def _small(elements: int) -> int:
        """Bytes of a small fp32 tensor, as the CUDA allocator rounds it (512-byte blocks)."""
        return -(-4 * elements // 512) * 512

    def _norm_temp(self, elements: int) -> int:
        """fp32 copy the norm ops keep of a strip of ``elements`` (reference path, low precision;
        also for strips past the kernels' int32 offsets)."""
        if self.element == 4 or (not self.reference and elements < 2**31):
            return 0
        return 4 * elements

    # -- one strip --------------------------------------------------------------------------------

    def strip_ranges(self, start: int, stop: int, rows: int, where: str) -> list[tuple[int, int]]:
        """Row ranges (``Program.row_ranges``) of the first, a middle or the last strip of a pass
        ``start -> stop`` in strips of ``rows``."""
        height = self.grids[stop].height
        rows = min(rows, height)
        if where == "first":
            first = 0
        elif where == "last":
            first = (height - 1) // rows * rows
        else:
            first = min(max(height // 2 - rows // 2, 0), height - rows)
        return self.program.row_ranges(start, stop, first, min(first + rows, height), self.grids)

    def pass_workspace(self, start: int, stop: int, rows: int, batch: int,
                       storage: dict[int, str], sink_stats: bool) -> int:
        """Peak bytes a pass allocates on the device besides the stores (an interior strip):
        loaded strips, each step's output and temporaries, the residual sources it keeps."""
        ranges = self.strip_ranges(start, stop, rows, "middle")

        def strip(p: int, element: int | None = None) -> int:
            first, last = ranges[p - start]
            return self._rows_bytes(p, last - first, batch, element)

        current = self._read_bytes(storage.get(start, DEVICE), strip(start))
        sources = {step.source for step in self.steps[start:stop]
                   if isinstance(step, Residual) and step.source >= start}
        kept: dict[int, int] = {}
        peak = current
        # Whether the step's input is a view of part of a larger tensor: a strip of a store on
        # the device, or the crop of an upsampled strip.
        strided = current == 0 and ranges[0] != (0, self.grids[start].height)
        for p in range(start, stop):
            step = self.steps[p]
            if p in sources:
                kept[p] = current
            out = strip(p + 1)
            temp = 0
            if isinstance(step, Conv):
                kh, kw = step.module.kernel_size
                top, bottom, left, right = step.padding
                if step.module.stride[0] == 1 and left == right:
                    out += 2 * self._rows_bytes(p + 1, max(top, bottom), batch)  # extra rows
                    if strided:  # the contiguous copy of a strided view
                        temp = strip(p)
                else:  # the zero-padded copy of the input strip
                    first, last = ranges[p - start]
                    temp = batch * (last - first + kh - 1) * (self.grids[p].width + kw - 1) * \
                        self.grids[p].channels * self.element
            elif isinstance(step, Upsample):
                first, last = ranges[p - start]
                out = 4 * self._rows_bytes(p, last - first, batch)  # the crop keeps it whole
            elif isinstance(step, Residual):
                first, last = ranges[p + 1 - start]
                source = self._rows_bytes(step.source, last - first, batch)
                if step.source < start:
                    temp += self._read_bytes(storage.get(step.source, DEVICE), source)
                if step.shortcut is not None:
                    temp += out  # the 1x1 convolution's output, and the copy of a cropped source
                    temp += source if (first, last) != (0, self.grids[p + 1].height) else 0
                if step.scale != 1.0:
                    temp += out
            elif step.norm_groups is not None:  # Norm
                temp = self._norm_temp(out // self.element)
            live = sum(kept.values()) + (0 if p in kept else current) + temp + out
            peak = max(peak, live)
            if isinstance(step, Residual):
                kept.pop(step.source, None)
            current = out
            strided = isinstance(step, Upsample) and ranges[p + 1 - start] != (
                0, self.grids[p + 1].height)
        sink = 0
        if sink_stats:  # a strip's fp32 copy; the statistics of every strip, and their stack
            strips = -(-self.grids[stop].height // min(rows, self.grids[stop].height))
            sink = self._norm_temp(current // self.element) + 2 * strips * self._small(
                batch * self.steps[stop].norm_groups * 3)
        if storage.get(stop) == HOST:
            sink += current  # the permuted copy sent to the host
        return max(peak, sum(kept.values()) + current + sink)

    def _read_bytes(self, kind: str, size: int) -> int:
        """Device bytes a strip read from a store allocates: none for a view of a device store;
        the copy and its contiguous layout from the host; a converted copy of the input."""
        if kind == HOST:
            return 2 * size
        if kind == INPUT and not self.input_bytes:
            return size
        return 0

    def pass_cost(self, start: int, stop: int, rows: int, batch: int,
                  storage: dict[int, str]) -> _Pass:
        """FLOPs, bytes and launches of a whole pass: the first, a middle and the last strip,
        the middle one counted for all interior strips."""
        height = self.grids[stop].height
        count = -(-height // min(rows, height))
        total = _Pass()
        wheres = ["first"] + (["middle"] if count > 2 else []) + (["last"] if count > 1 else [])
        for where in wheres:
            total.add(self._strip_cost(start, stop, rows, batch, storage, where),
                      count - 2 if where == "middle" else 1)
        return total

    def _strip_cost(self, start: int, stop: int, rows: int, batch: int,
                    storage: dict[int, str], where: str) -> _Pass:
        ranges = self.strip_ranges(start, stop, rows, where)
        cost = _Pass(launches=stop - start + 2)
        for p in range(start, stop):
            step = self.steps[p]
            first, last = ranges[p - start]
            out_first, out_last = ranges[p + 1 - start]
            cost.flops += batch * step.flops(out_last - out_first, self.grids[p],
                                             self.grids[p + 1])
            cost.device_bytes += (self._rows_bytes(p, last - first, batch)
                                  + self._rows_bytes(p + 1, out_last - out_first, batch))
            if isinstance(step, Residual) and storage.get(step.source) == HOST:
                cost.host_bytes += self._rows_bytes(p + 1, out_last - out_first, batch)
        first, last = ranges[0]
        if storage.get(start) == HOST:
            cost.host_bytes += self._rows_bytes(start, last - first, batch)
        if storage.get(stop) == HOST:
            first, last = ranges[-1]
            cost.host_bytes += self._rows_bytes(stop, last - first, batch)
        return cost

    # -- attention ---------------------------------------------------------------------------------

    def attention_workspace(self, p: int, rows: int, batch: int) -> int:
        """Keys and values of the whole value, and about six query-strip tensors."""
        grid = self.grids[p]
        rows = min(rows, grid.height)
        strip = self._rows_bytes(p, rows, batch)
        return 2 * self.value_bytes(p, batch) + 6 * strip + self._norm_temp(strip // self.element)

    def attention_cost(self, p: int, rows: int, batch: int) -> _Pass:
        grid = self.grids[p]
        strips = -(-grid.height // min(rows, grid.height))
        return _Pass(flops=batch * self.steps[p].flops(grid.height, grid, grid),
                     device_bytes=6 * self.value_bytes(p, batch), launches=12 * strips)

    def seconds(self, cost: _Pass) -> float:
        rates = self.costs
        return (cost.flops / rates.flops_per_s.get(self.element, rates.flops_per_s[4])
                + cost.device_bytes / rates.device_bytes_per_s
                + cost.host_bytes / rates.host_bytes_per_s + cost.launches * rates.launch_s)

    # -- levels -----------------------------------------------------------------------------------

    def forced(self, start: int, stop: int) -> set[int]:
        """Checkpoints an attention needs in ``[start, stop]``: its input and output."""
        forced = set()
        for p in range(start, stop):
            if isinstance(self.steps[p], Attention):
                forced.update((p, p + 1))
        return forced

    def modes(self, start: int, stop: int) -> list[frozenset[int]]:
        """Checkpoint sets to try inside a level, most memory first: GroupNorm inputs up to a size
        (with or without those inside a block), down to none."""
        candidates = [p for p in range(start + 1, stop)
                      if self.steps[p].norm_groups is not None and p not in self.forced(start,
                                                                                        stop)]
        sizes = sorted({self.value_bytes(p, 1) for p in candidates}, reverse=True) + [0]
        modes: list[frozenset[int]] = []
        for limit in sizes:
            for inner in (True, False):
                chosen = {p for p in candidates if self.value_bytes(p, 1) <= limit
                          and (inner or p in self.program.blocks)}
                chosen = frozenset(self._close(chosen, start, stop))
                if chosen not in modes:
                    modes.append(chosen)
        return modes

    def _close(self, chosen: set[int], start: int, stop: int) -> set[int]:
        """Drop checkpoints that split a ResNet block whose input is not kept (its residual
        would have no source)."""
        kept = chosen | {start} | self.forced(start, stop)
        for index in range(start, stop):
            step = self.steps[index]
            if isinstance(step, Residual) and step.source not in kept:
                chosen = {p for p in chosen if not step.source < p <= index}
        return chosen

    def level(self, start: int, stop: int, chosen: frozenset[int], input_storage: str,
              storage: str, batch: int, budget: int, tile: int | None) -> _LevelResult | None:
        """Segments, strip heights, peak and cost of one level option; None if it cannot fit."""
        forced = self.forced(start, stop)
        if start in forced and input_storage == HOST:
            return None  # an attention needs its whole input on the device
        points = sorted({start, stop} | chosen | forced)
        final = stop == len(self.steps)
        where = {p: DEVICE if p in forced else storage for p in points}
        where[start] = input_storage
        if final:
            where[stop] = OUTPUT
        pairs = list(zip(points, points[1:], strict=False))
        # The last segment that reads each checkpoint: the one it starts, or one whose residual
        # takes it as the source (a ResNet block cut by a checkpoint).
        last_use = {}
        for index, (first, last) in enumerate(pairs):
            last_use[first] = index
            for step in self.steps[first:last]:
                if isinstance(step, Residual) and step.source < first:
                    last_use[step.source] = index
        result = _LevelResult([], {p for p in points if where[p] == HOST}, 0)
        for index, (first, last) in enumerate(pairs):
            live = self.held_input + self.held_statistics + sum(
                self._held(p, where[p], batch) for p in points
                if p <= first and last_use.get(p, -1) >= index)
            out_store = self._held(last, where[last], batch)
            found = self._segment(first, last, where, live, out_store, batch, budget, tile)
            if found is None:
                return None
            rows, peak, cost = found
            result.segments.append(Segment(first, last, rows))
            result.passes += 2 if isinstance(self.steps[first], Attention) else 1 + sum(
                self.steps[q].norm_groups is not None for q in range(first + 1, last))
            result.peak = max(result.peak, peak)
            result.cost.add(cost)
        return result

    def _held(self, p: int, kind: str, batch: int) -> int:
        """Device bytes a store holds while it lives."""
        return self.value_bytes(p, batch) if kind == DEVICE else 0

    def _segment(self, first: int, last: int, where: dict[int, str], live: int, out_store: int,
                 batch: int, budget: int, tile: int | None) -> tuple[int, int, _Pass] | None:
        """The largest strip height whose passes fit: ``(rows, peak, cost)``, or None."""
        height = self.grids[last].height
        candidates = [tile] if tile is not None else [height] + [
            1 << k for k in range(max(height - 1, 1).bit_length() - 1, -1, -1)]
        attention = isinstance(self.steps[first], Attention)
        stats = [q for q in range(first + 1, last) if self.steps[q].norm_groups is not None]
        sink_stats = last < len(self.steps) and self.steps[last].norm_groups is not None
        for rows in candidates:
            if attention:
                peak = live + out_store + self.attention_workspace(first, rows, batch)
            else:
                peak = live + out_store + self.pass_workspace(first, last, rows, batch, where,
                                                              sink_stats)
                for q in stats:
                    peak = max(peak, live + self.pass_workspace(first, q, rows, batch, where,
                                                                True))
            if peak > budget:
                continue
            if attention:
                return rows, peak, self.attention_cost(first, rows, batch)
            cost = self.pass_cost(first, last, rows, batch, where)
            for q in stats:
                cost.add(self.pass_cost(first, q, rows, batch, where))
            return rows, peak, cost
        return None


def _batch_sizes(batch: int) -> list[int]:
    sizes = [batch]
    while sizes[-1] > 1:
        sizes.append(-(-sizes[-1] // 2))
    return sizes


def make_plan(program: Program, batch: int, height: int, width: int, dtype: torch.dtype,
              device: torch.device, budget: int, tile: int | None = None,
              input_bytes: bool = True, what: str = "the VAE") -> TilePlan:
    """The cheapest plan (by :class:`CostModel`) whose estimated peak fits ``budget`` bytes.

    Args:
        program: the decoder or encoder program.
        batch, height, width: the input value's size (latents for a decoder, images for an
            encoder).
        dtype, device: what the program runs in.
        budget: bytes of device memory for activations and workspace.
        tile: force every strip to this many rows (of each pass's output value).
        input_bytes: the call allocated the input value on the device (held until it returns,
            counted against the budget); else strips of it are converted as they are read.
        what: names the call in errors.

    Raises:
        TilePlanError: nothing fits; the message names the part that does not fit and the least
            it needs.
    """
    grids = program.grids(height, width)
    model = _Model(program, grids, dtype, device, input_bytes, batch)
    storages = [DEVICE, HOST] if device.type == "cuda" else [DEVICE]
    untiled = _untiled_flops(model)
    best: TilePlan | None = None
    failure = ""
    for chunk in _batch_sizes(batch):
        runs = -(-batch // chunk)
        found = _plan_chunk(model, chunk, budget, tile, storages)
        if isinstance(found, str):
            failure = found  # the last: the fewest images per run
            continue
        segments, host, passes, peak, cost = found
        scale = batch / chunk
        total = _Pass()
        total.add(cost, scale)
        plan = TilePlan(batch=chunk, segments=tuple(segments), host=frozenset(host),
                        passes=passes, peak_bytes=peak, flops=total.flops,
                        untiled_flops=untiled * batch, host_bytes=int(total.host_bytes),
                        seconds=model.seconds(total), budget=budget)
        if best is None or plan.seconds < best.seconds:
            best = plan
        if runs == 1 and not host and all(s.rows >= grids[s.stop].height for s in segments) \
                and len(segments) == len(_dense_points(model)) - 1:
            break  # the untiled plan: nothing is cheaper
    if best is None:
        strips = f"with strips of {tile} rows" if tile else "in 1-row strips"
        raise TilePlanError(f"hrkernels.vae: {what} does not fit max_memory={budget} bytes "
                            f"({_mib(budget)}) even one image at a time {strips}: {failure}. "
                            "Allow more memory or use a smaller image.")
    return best


def _dense_points(model: _Model) -> list[int]:
    points = {0, len(model.steps)}
    for start, stop in model.levels:
        points |= {start, stop} | model.modes(start, stop)[0] | model.forced(start, stop)
    return sorted(points)


def _untiled_flops(model: _Model) -> float:
    """FLOPs of one image through every step once (no halo, no recomputation)."""
    return sum(step.flops(model.grids[p + 1].height, model.grids[p], model.grids[p + 1])
               for p, step in enumerate(model.steps))


def _plan_chunk(model: _Model, batch: int, budget: int, tile: int | None,
                storages: list[str]) -> tuple[list[Segment], set[int], int, int, _Pass] | str:
    """Dynamic programme over the levels: state = where the level's input lives. The first
    option that fits every level whole (dense, device, one strip) is taken at once."""
    states: dict[str, tuple[float, list[_LevelResult]]] = {INPUT: (0.0, [])}
    for start, stop in model.levels:
        next_states: dict[str, tuple[float, list[_LevelResult]]] = {}
        for input_storage, (spent, chosen) in states.items():
            for storage in storages:
                for mode in model.modes(start, stop):
                    result = model.level(start, stop, mode, input_storage, storage, batch,
                                         budget, tile)
                    if result is None:
                        continue
                    key = OUTPUT if stop == len(model.steps) else storage
                    total = spent + model.seconds(result.cost)
                    if key not in next_states or total < next_states[key][0]:
                        next_states[key] = (total, chosen + [result])
                    if storage == DEVICE and _whole(model, result, start, stop):
                        break  # no other mode of this level is cheaper on the device
        if not next_states:
            return _least(model, start, stop, batch, tile, list(states), storages)
        states = next_states
    _, results = min(states.values(), key=lambda state: state[0])
    segments = [segment for result in results for segment in result.segments]
    host = set().union(*(result.host for result in results))
    cost = _Pass()
    for result in results:
        cost.add(result.cost)
    passes = sum(result.passes for result in results)
    return segments, host, passes, max(result.peak for result in results), cost


def _whole(model: _Model, result: _LevelResult, start: int, stop: int) -> bool:
    """The level runs with every GroupNorm input kept and every strip the whole height."""
    return (result.segments[0].start == start and len(result.segments) == len(
        {start, stop} | model.modes(start, stop)[0] | model.forced(start, stop)) - 1
            and all(s.rows >= model.grids[s.stop].height for s in result.segments))


def _least(model: _Model, start: int, stop: int, batch: int, tile: int | None,
           input_storages: list[str], storages: list[str]) -> str:
    """Why a level does not fit: the least peak any of its options needs."""
    least = math.inf
    for input_storage in input_storages:
        for mode in model.modes(start, stop):
            for storage in storages:
                result = model.level(start, stop, mode, input_storage, storage, batch,
                                     2**62, tile or 1)
                if result is not None:
                    least = min(least, result.peak)
    grid = model.grids[start]
    attention = (" and an attention that keeps keys and values of every position"
                 if model.forced(start, stop) else "")
    return (f"steps {start}..{stop - 1} (from a {grid.channels}-channel {grid.height}x{grid.width} "
            f"value{attention}) need at least {int(least)} bytes ({_mib(least)})")

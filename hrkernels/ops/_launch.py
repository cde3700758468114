"""Launch helpers shared by the Triton wrappers of every op family: tile shapes and grids.

Kernels address feature maps by explicit strides and move a tile of ``[BLOCK_W, BLOCK_C]``
(columns x channels) of one row at a time. Which axis is contiguous decides the tile's shape: NCHW
data wants a wide ``BLOCK_W``, channels-last data a wide ``BLOCK_C``. Triton specialises integer
arguments equal to 1, so the unit stride is known to the compiler and its loads and stores become
16-byte vectors.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch

from hrkernels.ops._backend import interpreter_enabled
from hrkernels.ops._checks import output_memory_format


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@dataclass(frozen=True)
class RowTile:
    """A ``[BLOCK_W, BLOCK_C]`` tile of one row, and the warps that move it."""

    block_w: int
    block_c: int
    num_warps: int

    def blocks(self, width: int, channels: int) -> tuple[int, int]:
        """How many tiles cover ``width`` columns and ``channels`` channels."""
        return -(-width // self.block_w), -(-channels // self.block_c)


def row_tile(channels: int, width: int, channels_contiguous: bool, elements: int = 4096) -> RowTile:
    """Pick a tile of about ``elements`` elements for rows of ``width`` x ``channels``.

    The contiguous axis gets up to 128 (channels) or 256 (columns) elements, the other axis the
    rest. Under Triton's interpreter tiles stay small: the interpreter's cost grows with tile size.
    """
    if interpreter_enabled():
        elements = 64
    if channels_contiguous:
        block_c = min(next_power_of_2(channels), 128)
        block_w = min(next_power_of_2(width), max(1, elements // block_c))
    else:
        block_w = min(next_power_of_2(width), 256)
        block_c = min(next_power_of_2(channels), max(1, elements // block_w))
    num_warps = 4 if block_w * block_c >= 2048 else 2 if block_w * block_c >= 512 else 1
    return RowTile(block_w, block_c, num_warps)


def channels_contiguous(*tensors: torch.Tensor) -> bool:
    """True when the channel axis (dim 1 of ``[B, C, H, W]``) is the unit-stride axis of the first
    tensor whose channel count is > 1 (the layout that decides coalescing)."""
    for tensor in tensors:
        if tensor.shape[1] > 1:
            return tensor.stride(1) == 1
    return False


def image_offsets_fit_int32(*tensors: torch.Tensor) -> bool:
    """True when, in each ``[B, ...]`` tensor, every element of one image is at an int32 offset from
    the image's start (kernels that compute only the batch and row terms in int64 need this)."""
    for t in tensors:
        if t.numel() < 2**31 and _dense(t):
            continue  # every offset is below numel
        span = sum((size - 1) * abs(stride)
                   for size, stride in zip(t.shape[1:], t.stride()[1:], strict=True))
        if span >= 2**31:
            return False
    return True


@functools.cache
def multiprocessor_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached), for sizing grids; 1 elsewhere (the
    interpreter runs programs one at a time)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


# Tests set this (tests/conftest.py) so that every output a kernel allocates starts as NaN: an
# element the kernel forgets to write then fails loudly instead of passing as stale memory.
POISON_OUTPUTS = False


def _dense(t: torch.Tensor) -> bool:
    """Contiguous or channels-last contiguous: no gaps, and a layout ``empty_like`` keeps."""
    return t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)


def _poisoned(out: torch.Tensor) -> torch.Tensor:
    if POISON_OUTPUTS:
        out.fill_(float("nan"))
    return out


def output_like(x: torch.Tensor) -> torch.Tensor:
    """An output of ``x``'s shape and dtype in ``x``'s layout (``_checks.output_memory_format``:
    channels-last when ``x`` is, else contiguous); ``torch.empty_like`` when ``x`` is dense, which
    costs about half of ``torch.empty`` on the host. NaN-filled like :func:`empty_output`."""
    if _dense(x):
        return _poisoned(torch.empty_like(x))  # a dense tensor's layout is kept
    return empty_output(tuple(x.shape), x.dtype, x.device, output_memory_format(x))


def empty_output(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> torch.Tensor:
    """Allocate a kernel's output (NaN-filled when :data:`POISON_OUTPUTS` is set)."""
    return _poisoned(torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format))


# --------------------------------------------------------------------------------------------------
# Direct launches of compiled kernels
# --------------------------------------------------------------------------------------------------


# Keys a Launcher keeps before it starts over (they hold exact sizes: one per shape seen).
MAX_KERNELS = 4096


def _specialization(arg: object) -> object:
    """What Triton may specialise a kernel on for one runtime argument that is not an int (an int
    is its own key, finer than Triton's ``== 1``, ``% 16 == 0`` and width), as a hashable key: a
    tensor's dtype and 16-byte alignment, otherwise the type (floats are not specialised; ``None``
    becomes a constexpr)."""
    kind = type(arg)
    if kind is torch.Tensor:
        return arg.dtype, arg.data_ptr() % 16 == 0
    if kind is bool:  # True == 1 as a dict key: keep bools apart from ints
        return bool, arg
    return kind


@functools.cache
def _triton_version() -> tuple[int, int]:
    import triton

    major, minor = triton.__version__.split(".")[:2]
    return int(major), int(minor)


@functools.cache
def _hook_holder() -> object:
    """Where Triton keeps its launch enter/exit hooks (where profilers such as proton attach)."""
    import triton

    knobs = getattr(triton, "knobs", None)
    if knobs is not None:  # triton >= 3.4
        return knobs.runtime
    from triton.compiler import CompiledKernel

    return CompiledKernel


def _hooks_installed() -> bool:
    # A hook is a callable, None, or (triton >= 3.6) a HookChain whose ``calls`` may be empty.
    holder = _hook_holder()
    return any(hook is not None and getattr(hook, "calls", True)
               for hook in (holder.launch_enter_hook, holder.launch_exit_hook))


class Launcher:
    """``launcher(fn)[grid](*args, **constexprs)``: ``fn[grid](...)``, with a repeated launch's
    host work cut to a dictionary lookup and the compiled kernel's own C launcher.

    ``fn[grid](...)`` binds, specialises and hashes every argument in Python on each call: 17-23 us
    per launch on the lent H100's host, more than the kernels of a latent-sized op take. This
    launcher keys the compiled kernel on everything Triton specialises on (:func:`_specialization`
    of each runtime argument, the keyword arguments: constexprs and launch options such as
    ``num_warps``, and the current device); the first launch of a key goes through ``fn[grid]``
    and keeps the kernel it compiled, later ones call that kernel's launcher with the arguments
    Triton's own launch passes, on the current stream (5-6 us on that host).

    Calls go through ``fn[grid]`` every time under Triton's interpreter and while launch hooks are
    installed (profilers need them called). Triton's check that a kernel's global variables have
    not changed since it was compiled is not repeated: kernels here read no mutable globals.

    Calling convention, checked on every path (the interpreter's too): runtime parameters
    positionally, in signature order; constexpr parameters and launch options by keyword.
    ``grid`` is a tuple of 1 to 3 ints.
    """

    def __init__(self, fn):
        self.fn = fn
        self.direct = not interpreter_enabled()
        self.kernels: dict[tuple, tuple] = {}  # key -> (compiled kernel, trailing arguments)
        self.checked: set[tuple] = set()  # calling conventions already checked (interpreter)

    def __getitem__(self, grid: tuple[int, ...]):
        if self.direct:
            return lambda *args, **kwargs: self._launch(grid, args, kwargs)
        return lambda *args, **kwargs: self._interpret(grid, args, kwargs)

    def _launch(self, grid: tuple[int, ...], args: tuple, kwargs: dict) -> None:
        device = torch._C._cuda_getDevice()  # torch.cuda.current_device() without its Python layer
        key = (device, tuple(kwargs), *kwargs.values(),
               *[arg if type(arg) is int else _specialization(arg) for arg in args])
        entry = self.kernels.get(key)
        if entry is None:
            trailing = self._trailing_arguments(len(args), kwargs)
            kernel = self.fn[grid](*args, **kwargs)
            if len(self.kernels) >= MAX_KERNELS:
                self.kernels.clear()  # many shapes: forget (the compiled kernels stay cached)
            self.kernels[key] = (kernel, trailing)
            return
        if _hooks_installed():
            self.fn[grid](*args, **kwargs)
            return
        kernel, trailing = entry
        size = len(grid)
        kernel.run(grid[0], grid[1] if size > 1 else 1, grid[2] if size > 2 else 1,
                   torch._C._cuda_getCurrentRawStream(device), kernel.function,
                   kernel.packed_metadata, None, None, None, *args, *trailing)

    def _interpret(self, grid: tuple[int, ...], args: tuple, kwargs: dict) -> None:
        convention = (len(args), *kwargs)
        if convention not in self.checked:
            self._trailing_arguments(len(args), kwargs)
            self.checked.add(convention)
        self.fn[grid](*args, **kwargs)

    def _trailing_arguments(self, positional: int, kwargs: dict) -> tuple:
        """The arguments a compiled kernel's launcher takes after the positional ones: the
        constexprs in signature order from Triton 3.3 on, none before (it took runtime ones
        only). Raises TypeError where a call breaks the calling convention."""
        name = self.fn.__name__
        params = list(inspect.signature(self.fn.fn).parameters.values())
        constexpr = ["constexpr" in str(param.annotation) for param in params]
        if positional > len(params) or any(constexpr[:positional]):
            raise TypeError(f"{name}: pass exactly the runtime parameters positionally; got "
                            f"{positional} positional arguments")
        trailing = []
        for param, is_constexpr in zip(params[positional:], constexpr[positional:], strict=True):
            if not is_constexpr:
                raise TypeError(f"{name}: pass runtime parameter {param.name!r} positionally")
            if param.name in kwargs:
                trailing.append(kwargs[param.name])
            elif param.default is not inspect.Parameter.empty:
                trailing.append(param.default)
            else:
                raise TypeError(f"{name}: missing constexpr {param.name!r}")
        return tuple(trailing) if _triton_version() >= (3, 3) else ()


@functools.cache
def launcher(fn) -> Launcher:
    """The :class:`Launcher` of one ``@triton.jit`` kernel (one per kernel, for the process)."""
    return Launcher(fn)

"""Launch helpers shared by the Triton wrappers of every op family: tile shapes and grids.

Kernels address feature maps by explicit strides and move a tile of ``[BLOCK_W, BLOCK_C]``
(columns x channels) of one row at a time. Which axis is contiguous decides the tile's shape: NCHW
data wants a wide ``BLOCK_W``, channels-last data a wide ``BLOCK_C``. Triton specialises integer
arguments equal to 1, so the unit stride is known to the compiler and its loads and stores become
16-byte vectors.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from hrkernels.ops._backend import interpreter_enabled


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
    return all(
        sum((size - 1) * abs(stride) for size, stride in zip(t.shape[1:], t.stride()[1:],
                                                              strict=True)) < 2**31
        for t in tensors
    )


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


def empty_output(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> torch.Tensor:
    """Allocate a kernel's output (NaN-filled when :data:`POISON_OUTPUTS` is set)."""
    out = torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)
    if POISON_OUTPUTS:
        out.fill_(float("nan"))
    return out

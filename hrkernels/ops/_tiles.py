"""``@triton.jit`` helpers shared by the kernels of every op family."""

import triton
import triton.language as tl


@triton.jit
def split_row_tile(pid, C, W, BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr):
    # The 1-D grids of the row-tile kernels: program id -> (channel block, column block, row
    # index), channel blocks fastest, so that programs touching neighbouring memory run together.
    # The caller decomposes the row index further (image, window, row...).
    num_c = tl.cdiv(C, BLOCK_C)
    c_block = pid % num_c
    rest = pid // num_c
    num_w = tl.cdiv(W, BLOCK_W)
    return c_block, rest % num_w, rest // num_w

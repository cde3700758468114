"""Argument validation shared by the public op wrappers.

Every public op checks its arguments here, before the registered operator runs, so that a user gets
a ``ValueError``/``TypeError`` that names the argument, what was given and what is allowed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def as_pair(value: int | Sequence[int], name: str, minimum: int = 1) -> tuple[int, int]:
    """An int (square) or an ``(h, w)`` pair of ints, each ``>= minimum``, as a tuple."""
    if (type(value) is tuple and len(value) == 2 and type(value[0]) is int
            and type(value[1]) is int and min(value) >= minimum):
        return value  # the common case, without the checks below
    if isinstance(value, torch.Tensor) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int or an (h, w) pair of ints; got {value!r}")
    if isinstance(value, int):
        pair = (value, value)
    elif isinstance(value, Sequence) and len(value) == 2:
        pair = tuple(value)
    else:
        raise TypeError(f"{name} must be an int or an (h, w) pair of ints; got {value!r}")
    for item in pair:
        if isinstance(item, bool) or not isinstance(item, int):
            raise TypeError(f"{name} must hold ints; got {value!r} (a {type(item).__name__})")
        if item < minimum:
            raise ValueError(f"{name} must be >= {minimum}; got {value!r}")
    return pair  # type: ignore[return-value]


def check_feature_map(x: torch.Tensor, name: str = "x") -> None:
    """``x`` is a non-empty ``[B, C, H, W]`` float tensor (fp32, fp16 or bf16), any strides."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be 4-D [B, C, H, W]; got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16; got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{name} must not be empty; got shape {tuple(x.shape)}")


def check_starts(starts: torch.Tensor, device: torch.device) -> None:
    """``starts`` is an integer ``[N, 2]`` tensor of (top, left) on ``device``, with N >= 1."""
    if not isinstance(starts, torch.Tensor):
        raise TypeError(f"starts must be a torch.Tensor [N, 2]; got {type(starts).__name__}")
    if starts.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"starts must be int64 or int32 (see window_grid); got {starts.dtype}")
    if starts.dim() != 2 or starts.shape[1] != 2 or starts.shape[0] == 0:
        raise ValueError(f"starts must have shape [N, 2] with N >= 1; got {tuple(starts.shape)}")
    if starts.device != device:
        raise ValueError(f"starts is on {starts.device} but the feature map is on {device}")


def output_memory_format(x: torch.Tensor) -> torch.memory_format:
    """The layout an op's output keeps: channels-last when ``x`` is (and is not also NCHW)."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def host_readable(tensor: torch.Tensor) -> bool:
    """Whether a check may read ``tensor``'s values: a plain CPU tensor, outside ``torch.compile``
    and dispatch modes, where reading costs no device synchronisation and no graph break. Tensors
    on a GPU are not read (that would synchronise the device inside a sampler's step loop)."""
    return (type(tensor) is torch.Tensor and tensor.device.type == "cpu"
            and not torch.compiler.is_compiling() and torch._C._len_torch_dispatch_stack() == 0)


def check_tensor_values(tensor: torch.Tensor, name: str, *, greater_than: float | None = None,
                        minimum: float | None = None) -> None:
    """Where :func:`host_readable`: no value of ``tensor`` at or below ``greater_than`` / below
    ``minimum``, else ``ValueError`` (a zero blur ``sigma`` would give NaN, a negative ``std`` flip
    the sign). NaN passes, as NaN in the input does: a sampler reports it with its stage and step.
    On a GPU nothing is checked (see :func:`host_readable`)."""
    if not host_readable(tensor):
        return
    if greater_than is not None and bool((tensor <= greater_than).any()):
        bound = f"> {greater_than:g}"
    elif minimum is not None and bool((tensor < minimum).any()):
        bound = f">= {minimum:g}"
    else:
        return
    shown = tensor.tolist() if tensor.numel() <= 8 else f"a tensor of shape {list(tensor.shape)}"
    raise ValueError(f"{name} must be {bound}; got {shown}")

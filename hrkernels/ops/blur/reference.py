"""PyTorch references of the ``blur`` ops: what CPU/MPS tensors run, and what the kernels are tested
against. Arguments arrive validated (see ``op.py``); results never alias the inputs.

The blur is separable: a depthwise ``conv2d`` along W, then one along H (and a ``conv1d`` along C
for ``feature_blur``), all with zero padding ``K // 2``, in fp32; the result is cast back once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gaussian_kernel1d(
    sigma: float | torch.Tensor, kernel_size: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """The normalised 1-D Gaussian ``g[i] = exp(-(i - (k-1)/2)^2 / (2 sigma^2)) / sum``, fp32.

    ``sigma`` may be a 0-d tensor: the weights are then computed on its device without reading it on
    the host. ``device`` defaults to ``sigma``'s device (CPU for a float).

    Example::

        >>> gaussian_kernel1d(1.0, 3)
        tensor([0.2741, 0.4519, 0.2741])
    """
    if device is None:
        device = sigma.device if isinstance(sigma, torch.Tensor) else torch.device("cpu")
    offsets = torch.arange(kernel_size, dtype=torch.float32, device=device) - (kernel_size // 2)
    if isinstance(sigma, torch.Tensor):
        sigma = sigma.to(device=device, dtype=torch.float32)
    weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return weights / weights.sum()


def blur_fp32(x: torch.Tensor, weights: torch.Tensor, feature_blur: bool = False) -> torch.Tensor:
    """``G(x)`` for an fp32 ``[B, C, H, W]`` map: the 1-D ``weights`` along W and H (and C).

    Taps farther than ``max(H, W) - 1`` (and ``C - 1`` with ``feature_blur``) from the centre only
    ever read zero padding: they are dropped (``weights`` keep their normalisation, so the output is
    the same), and a kernel much larger than the map costs what the map needs.
    """
    channels = x.shape[1]
    size = weights.numel()
    reach = max(x.shape[2], x.shape[3], channels if feature_blur else 1) - 1
    if size // 2 > reach:
        weights = weights[size // 2 - reach: size // 2 + reach + 1]
        size = weights.numel()
    pad = size // 2
    along_w = weights.view(1, 1, 1, size).expand(channels, 1, 1, size).contiguous()
    along_h = weights.view(1, 1, size, 1).expand(channels, 1, size, 1).contiguous()
    out = F.conv2d(x, along_w, padding=(0, pad), groups=channels)
    out = F.conv2d(out, along_h, padding=(pad, 0), groups=channels)
    if feature_blur:
        # Shifted sums rather than a conv1d over C: cuDNN may run that one in TF32 on a GPU, and
        # the reference must be fp32.
        padded = F.pad(out, (0, 0, 0, 0, pad, pad))
        out = sum(weights[m] * padded[:, m:m + channels] for m in range(size))
    return out


def _fresh(value: torch.Tensor, dtype: torch.dtype,
           memory_format: torch.memory_format) -> torch.Tensor:
    return torch.empty(value.shape, dtype=dtype, device=value.device,
                       memory_format=memory_format).copy_(value)


def gaussian_blur2d(
    x: torch.Tensor,
    sigma: float | torch.Tensor,
    kernel_size: int,
    memory_format: torch.memory_format,
) -> torch.Tensor:
    """``G(x)``: the separable Gaussian over (H, W), zero padding, computed in fp32."""
    weights = gaussian_kernel1d(sigma, kernel_size, x.device)
    return _fresh(blur_fp32(x.float(), weights), x.dtype, memory_format)


def frequency_fusion(
    global_: torch.Tensor,
    local: torch.Tensor,
    sigma: float | torch.Tensor,
    kernel_size: int,
    feature_blur: bool,
    memory_format: torch.memory_format,
) -> torch.Tensor:
    """``global_ + G(local - global_)`` in fp32 (= FreeScale's ``G(local) + global_ - G(global_)``).
    """
    weights = gaussian_kernel1d(sigma, kernel_size, global_.device)
    base = global_.float()
    fused = base + blur_fp32(local.float() - base, weights, feature_blur)
    return _fresh(fused, global_.dtype, memory_format)

"""PyTorch references of the ``norm`` family: what CPU/MPS tensors run, and what the kernels are
tested against. Arguments arrive validated (see ``op.py``); results never alias the inputs.

Both work in fp32 whatever the input dtype. ``group_norm_silu`` keeps one fp32 temporary the size
of ``x`` for fp16/bf16 inputs and none for fp32 (it computes in the output); ``group_stats`` reads
fp16/bf16 inputs through one fp32 copy.
"""

from __future__ import annotations

import torch


def group_stats(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``[B, G, 3]`` fp32: ``(count, mean, M2)`` of each group of ``C / G`` channels of each image
    (``M2``: the sum of squared deviations from the mean)."""
    batch, channels = x.shape[:2]
    values = x.float().unflatten(1, (groups, channels // groups))  # [B, G, C/G, H, W]
    variance, mean = torch.var_mean(values, dim=(2, 3, 4), correction=0)
    count = values[0, 0].numel()
    return torch.stack([torch.full_like(mean, count), mean, variance * count], dim=-1)


def combine_group_stats(stats: torch.Tensor, dim: int) -> torch.Tensor:
    """Merge ``(count, mean, M2)`` triples (last axis) along ``dim`` with the exact parallel
    formula (Chan, Golub and LeVeque): ``n = sum n_i``, ``mean = sum n_i m_i / n``,
    ``M2 = sum (M2_i + n_i (m_i - mean)^2)``. Empty parts (``n_i = 0``) add nothing."""
    count, mean, m2 = stats.unbind(-1)
    total = count.sum(dim, keepdim=True)
    merged_mean = (count * mean).sum(dim, keepdim=True) / total.clamp_min(1.0)
    merged_m2 = (m2 + count * (mean - merged_mean).square()).sum(dim)
    return torch.stack([total.squeeze(dim), merged_mean.squeeze(dim), merged_m2], dim=-1)


def group_norm_silu(
    x: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    silu: bool,
    memory_format: torch.memory_format,
) -> torch.Tensor:
    """``silu((x - mean[b, g]) * rstd[b, g] * weight[c] + bias[c])`` (without ``silu`` when
    ``silu=False``); ``mean``/``rstd`` ``[B, G]`` fp32, ``weight``/``bias`` ``[C]`` or None."""
    batch, channels = x.shape[:2]
    per_group = channels // mean.shape[1]
    scale = rstd.float().repeat_interleave(per_group, dim=1)  # [B, C]
    if weight is not None:
        scale = scale * weight.float()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=memory_format)
    work = out if x.dtype == torch.float32 else torch.empty_like(out, dtype=torch.float32)
    torch.sub(x, mean.float().repeat_interleave(per_group, dim=1)[:, :, None, None], out=work)
    if bias is None:
        work.mul_(scale[:, :, None, None])
    else:
        torch.addcmul(bias.float()[None, :, None, None], work, scale[:, :, None, None], out=work)
    if silu:
        torch.nn.functional.silu(work, inplace=True)
    if work is not out:
        out.copy_(work)
    return out

"""Tuning API: the launch plans of the Triton kernels, and runs of a kernel under a given plan.

For sweeps of launch knobs (``bench/tune_blur.py``, ``bench/tune_stats.py``) and for anyone tuning
the kernels on a new GPU. A *plan* is what a Triton launcher decides for one shape and layout
(kernel variant, tiles, rows per program, grid); the ops make it with their tuned default knobs,
and the ``*_plan`` functions here make it with other knob values. The ``run_*`` functions launch
the op's Triton kernel under a plan, with the op's own argument checks but without backend
selection, so that plans can be timed and their outputs compared; with ``plan=None`` they compute
exactly what the op computes on the Triton backend.

This module is the one place outside ``hrkernels/ops`` that calls the launchers' private
functions (the ops' ``_plan`` and launchers, whose signatures follow the kernels): it is their
named, documented face. Plans and knobs are the ops' own; nothing is re-implemented here.

Tensors are ``[B, C, H, W]``, fp32/fp16/bf16, any strides: a channels-last ``[B, H, W, C]``
tensor passed as ``x.permute(0, 3, 1, 2)`` is planned and run in its own layout. The ``run_*``
functions need the Triton kernels to run on the tensors' device: a CUDA GPU, or Triton's
interpreter on CPU (``TRITON_INTERPRET=1`` set before triton is imported).

Example (on a GPU)::

    >>> x = torch.randn(2, 128, 128, 640, device="cuda", dtype=torch.float16).permute(0, 3, 1, 2)
    >>> plan = blur_plan(x, 7, tile_w=3, per_thread=4, unroll=2)
    >>> out = run_gaussian_blur2d(x, 1.0, 7, plan=plan)
    >>> ms = triton.testing.do_bench(lambda: run_gaussian_blur2d(x, 1.0, 7, plan=plan))
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hrkernels._validate import check_bool, check_int, describe
from hrkernels.ops._backend import BackendUnavailableError, triton_unavailable_reason
from hrkernels.ops._checks import check_feature_map
from hrkernels.ops._launch import channels_contiguous, image_offsets_fit_int32
from hrkernels.ops.blur import op as blur_op
from hrkernels.ops.blur.op import BlurPlan, Sigma
from hrkernels.ops.stats import op as stats_op
from hrkernels.ops.stats.op import MatchStatsPlan, Target

__all__ = [
    "BLUR_KNOBS",
    "MATCH_STATS_KNOBS",
    "BlurPlan",
    "MatchStatsPlan",
    "blur_plan",
    "default_blur_knobs",
    "match_stats_plan",
    "run_frequency_fusion",
    "run_gaussian_blur2d",
    "run_match_stats",
]

# The knobs of blur_plan (see its docstring) and of match_stats_plan.
BLUR_KNOBS = ("per_thread", "unroll", "programs_per_sm", "prefetch", "iterations", "tile_w",
              "max_registers", "block_c")
MATCH_STATS_KNOBS = ("programs_per_sm", "unroll_stats", "unroll_normalize")

_BLUR_LIMITS = (f"kernel_size <= {blur_op.MAX_TRITON_KERNEL_SIZE} and in-image offsets that fit "
                "int32")


def _check_knobs(knobs: dict, allowed: tuple[str, ...], function: str) -> None:
    unknown = sorted(set(knobs) - set(allowed))
    if unknown:
        raise TypeError(f"{function}: unknown knobs {unknown}; the knobs are {list(allowed)}")


def _check_plan(plan: object, kind: type) -> None:
    if plan is not None and not isinstance(plan, kind):
        raise TypeError(f"plan must be a {kind.__name__} or None; got {describe(plan)}")


def _check_triton_runs(op: str, device: torch.device, applies: bool, limits: str) -> None:
    """The op's Triton kernel can run on ``device`` and covers the arguments (``applies``)."""
    reason = triton_unavailable_reason(device)
    if reason is not None:
        raise BackendUnavailableError(f"hrkernels.bench.tuning: {op}'s Triton kernel cannot run "
                                      f"here: {reason}")
    if not applies:
        raise ValueError(f"{op}'s Triton kernel does not cover these arguments ({limits}); the op "
                         "runs the PyTorch reference for them")



# --------------------------------------------------------------------------------------------------
# gaussian_blur2d / frequency_fusion
# --------------------------------------------------------------------------------------------------


def _check_blur_plan_arguments(x: torch.Tensor, kernel_size: int, fusion: bool,
                                feature_blur: bool) -> int:
    """The checks of :func:`default_blur_knobs` and :func:`blur_plan`; the kernel size."""
    check_feature_map(x)
    kernel_size = check_int(kernel_size, "kernel_size", minimum=1,
                            maximum=blur_op.MAX_TRITON_KERNEL_SIZE)
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd; got {kernel_size}")
    check_bool(fusion, "fusion")
    check_bool(feature_blur, "feature_blur")
    return kernel_size


def default_blur_knobs(x: torch.Tensor, kernel_size: int, *, fusion: bool = False,
                       feature_blur: bool = False) -> dict[str, int | bool]:
    """The tuned knobs (a subset of :data:`BLUR_KNOBS`) that :func:`blur_plan` uses when given
    none, for maps shaped, typed and laid out like ``x`` (``[B, C, H, W]``).

    Args:
        x: a map of the shape, dtype and layout to plan for (its values are not read).
        kernel_size: odd ``k`` in ``[1, 15]`` (the sizes the Triton kernel is compiled for).
        fusion: the plan of :func:`~hrkernels.ops.frequency_fusion` (else
            :func:`~hrkernels.ops.gaussian_blur2d`).
        feature_blur: the fusion's channel blur.

    Returns:
        ``{"per_thread": ..., "unroll": ..., "prefetch": ..., ...}``: keyword arguments of
        :func:`blur_plan`.

    Raises:
        TypeError/ValueError: ``x`` not a float ``[B, C, H, W]`` tensor, ``kernel_size`` not an odd
            int in ``[1, 15]``, ``fusion``/``feature_blur`` not bools.
    """
    kernel_size = _check_blur_plan_arguments(x, kernel_size, fusion, feature_blur)
    return blur_op._default_knobs(x.shape[1], channels_contiguous(x), x.element_size(),
                                  kernel_size, fusion, feature_blur)


def blur_plan(x: torch.Tensor, kernel_size: int, *, fusion: bool = False,
              feature_blur: bool = False, **knobs: int | bool | None) -> BlurPlan:
    """The launch plan of the blur kernels for maps shaped, typed and laid out like ``x``.

    With no knob, the plan the op uses (the tuned knobs of :func:`default_blur_knobs`). Knobs
    (:data:`BLUR_KNOBS`; None leaves a knob to the default rules):

    * ``tile_w``: the register-blocked columns kernel with that many columns per program (only
      for maps whose channel axis is contiguous, without ``feature_blur``); None: the rows kernel.
    * ``per_thread``: elements per thread of a program's strip.
    * ``unroll``: input rows per loop iteration.
    * ``programs_per_sm``: the grid size (per SM) below which strips get shorter (default 6).
    * ``prefetch``: the L2 prefetch of the next iteration's rows (NVIDIA GPUs only).
    * ``max_registers``: a register cap per thread (more resident programs).
    * ``block_c``: channels of a columns-kernel program (at most the tile's).
    * ``iterations``: loop iterations of a program (``rows = iterations * unroll - 2 (k // 2)``).

    Args:
        x: ``[B, C, H, W]`` map of the shape, dtype and layout to plan for (values not read).
        kernel_size: odd ``k`` in ``[1, 15]``.
        fusion: plan :func:`~hrkernels.ops.frequency_fusion` (else
            :func:`~hrkernels.ops.gaussian_blur2d`).
        feature_blur: the fusion's channel blur.

    Returns:
        A :class:`BlurPlan` (cached: equal arguments give the same object) for the ``plan``
        argument of :func:`run_gaussian_blur2d` / :func:`run_frequency_fusion` on maps like ``x``.

    Raises:
        TypeError/ValueError: as :func:`default_blur_knobs`; an unknown knob (TypeError);
            ``iterations`` that leave no output row (ValueError).
    """
    kernel_size = _check_blur_plan_arguments(x, kernel_size, fusion, feature_blur)
    _check_knobs(knobs, BLUR_KNOBS, "blur_plan")
    return blur_op._plan(tuple(x.shape), channels_contiguous(x), x.element_size(), kernel_size,
                         x.device, fusion=fusion, feature_blur=feature_blur, **knobs)


def run_gaussian_blur2d(x: torch.Tensor, sigma: Sigma, kernel_size: int | None = None, *,
                        plan: BlurPlan | None = None) -> torch.Tensor:
    """:func:`~hrkernels.ops.gaussian_blur2d` through its Triton kernel under ``plan``.

    Args:
        x, sigma, kernel_size: as in :func:`~hrkernels.ops.gaussian_blur2d` (``[B, C, H, W]``).
        plan: from :func:`blur_plan` for ``x``'s shape, dtype and layout, this ``kernel_size`` and
            ``fusion=False``; None: the op's own plan (the result is then the op's, bitwise).

    Returns:
        ``[B, C, H, W]`` with ``x``'s dtype; channels-last when ``x`` is.

    Raises:
        TypeError/ValueError: as :func:`~hrkernels.ops.gaussian_blur2d`; ``plan`` not a
            :class:`BlurPlan`; arguments the kernel does not cover (``kernel_size > 15``).
        BackendUnavailableError: the Triton kernels cannot run on ``x``'s device.
    """
    _check_plan(plan, BlurPlan)
    x, sigma_value, sigma_tensor, kernel_size = blur_op._blur_arguments(x, sigma, kernel_size)
    _check_triton_runs("gaussian_blur2d", x.device, blur_op._kernel_applies(kernel_size, x),
                       _BLUR_LIMITS)
    return blur_op._blur_triton(x, None, sigma_value, sigma_tensor, kernel_size, False, plan)


def run_frequency_fusion(global_: torch.Tensor, local: torch.Tensor, sigma: Sigma,
                         kernel_size: int | None, feature_blur: bool = False, *,
                         plan: BlurPlan | None = None) -> torch.Tensor:
    """:func:`~hrkernels.ops.frequency_fusion` through its Triton kernel under ``plan``.

    Args:
        global_, local, sigma, kernel_size, feature_blur: as in
            :func:`~hrkernels.ops.frequency_fusion` (``[B, C, H, W]`` each).
        plan: from :func:`blur_plan` for ``global_``'s shape, dtype and layout, this
            ``kernel_size``, ``fusion=True`` and this ``feature_blur``; None: the op's own plan
            (the result is then the op's, bitwise).

    Returns:
        ``[B, C, H, W]`` with ``global_``'s dtype; channels-last when ``global_`` is.

    Raises:
        TypeError/ValueError: as :func:`~hrkernels.ops.frequency_fusion`; ``plan`` not a
            :class:`BlurPlan`; arguments the kernel does not cover (``kernel_size > 15``).
        BackendUnavailableError: the Triton kernels cannot run on the maps' device.
    """
    _check_plan(plan, BlurPlan)
    arguments = blur_op._fusion_arguments(global_, local, sigma, kernel_size, feature_blur)
    _check_triton_runs("frequency_fusion", global_.device,
                       blur_op._kernel_applies(arguments[4], global_, local), _BLUR_LIMITS)
    return blur_op._blur_triton(*arguments, plan)


# --------------------------------------------------------------------------------------------------
# match_stats
# --------------------------------------------------------------------------------------------------


def match_stats_plan(x: torch.Tensor, factor: int | Sequence[int] = (1, 1), *,
                     per_channel: bool = False, **knobs: int | None) -> MatchStatsPlan:
    """The launch plan of :func:`~hrkernels.ops.match_stats` for maps shaped and laid out like
    ``x``.

    With no knob, the plan the op uses. Knobs (:data:`MATCH_STATS_KNOBS`): ``programs_per_sm``,
    the programs per SM the chunks of the sub-lattices aim for (default 4 for ``factor = (1, 1)``,
    8 for dilated sub-lattices); ``unroll_stats`` and ``unroll_normalize``, rows per loop
    iteration of the statistics pass and of the normalisation pass (both 2 under the interpreter).

    Args:
        x: ``[B, C, H, W]`` map of the shape and layout to plan for (values not read).
        factor: int or ``(sh, sw)``, as in :func:`~hrkernels.ops.match_stats`.
        per_channel: statistics per channel.

    Returns:
        A :class:`MatchStatsPlan` (cached) for the ``plan`` argument of :func:`run_match_stats`
        on maps like ``x`` with this ``factor`` and ``per_channel``.

    Raises:
        TypeError/ValueError: as :func:`~hrkernels.ops.match_stats` for ``x``, ``factor`` and
            ``per_channel``; an unknown knob (TypeError).
    """
    # The op's checks of x, factor and per_channel (with placeholder targets).
    x, _, _, _, _, sh, sw, per_channel = stats_op._match_stats_arguments(x, 0.0, 1.0, factor,
                                                                         per_channel)
    _check_knobs(knobs, MATCH_STATS_KNOBS, "match_stats_plan")
    return stats_op._plan(tuple(x.shape), channels_contiguous(x), sh, sw, per_channel, x.device,
                          **knobs)


def run_match_stats(x: torch.Tensor, mean: Target, std: Target,
                    factor: int | Sequence[int] = (1, 1), per_channel: bool = False, *,
                    plan: MatchStatsPlan | None = None) -> torch.Tensor:
    """:func:`~hrkernels.ops.match_stats` through its Triton kernels under ``plan``.

    Args:
        x, mean, std, factor, per_channel: as in :func:`~hrkernels.ops.match_stats`
            (``x``: ``[B, C, H, W]``; tensor targets broadcastable to ``[B]`` or ``[B, C]``).
        plan: from :func:`match_stats_plan` for ``x``'s shape and layout, this ``factor`` and
            ``per_channel``; None: the op's own plan (the result is then the op's, bitwise).

    Returns:
        ``[B, C, H, W]`` with ``x``'s dtype; channels-last when ``x`` is.

    Raises:
        TypeError/ValueError: as :func:`~hrkernels.ops.match_stats`; ``plan`` not a
            :class:`MatchStatsPlan`; in-image offsets past int32.
        BackendUnavailableError: the Triton kernels cannot run on ``x``'s device.
    """
    _check_plan(plan, MatchStatsPlan)
    arguments = stats_op._match_stats_arguments(x, mean, std, factor, per_channel)
    _check_triton_runs("match_stats", x.device, image_offsets_fit_int32(x),
                       "in-image offsets that fit int32")
    return stats_op._match_stats_triton(*arguments, plan)

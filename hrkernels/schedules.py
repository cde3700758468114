"""Pure functions on noise tables and per-stage plans, shared by the samplers.

Nothing here touches a model: inputs are numbers (and, for :func:`cosine_decay`, optionally a
tensor of timesteps), outputs are numbers, tuples or small CPU tensors. See METHODS.md ("Common",
"DemoFusion", "APT") for the formulas.

* :func:`cosine_decay` -- ``c(t) = (0.5 * (1 + cos(pi * (T - t) / T))) ** alpha``.
* :func:`scale_aware_betas` -- APT's beta table
  ``beta_t = (b0^eta + t (bT^eta - b0^eta) / T')^(1/eta)``.
* :func:`apt_default_eta` -- APT's ``eta_s`` for a stage's upscale factor (paper, Table B).
* :func:`stage_count` / :func:`stage_sizes` -- DemoFusion's progressive stages: how many (closed
  form) and their sizes.
* :func:`sublattice_factor` -- APT's statistical-matching lattice of a stage.
* :func:`redilation_factor` -- ScaleCrafter's re-dilation factor of a layer at a step (progressive
  schedule).
* :func:`rescheduled_alphas_cumprod` / :func:`rescheduled_betas` / :func:`rescheduled_scheduler` --
  MegaFusion++'s noise re-scheduling ``abar' = abar / (gamma - (gamma - 1) abar)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import torch

from hrkernels._validate import check_int, check_real

__all__ = [
    "MAX_STAGES",
    "apt_default_eta",
    "cosine_decay",
    "redilation_factor",
    "rescheduled_alphas_cumprod",
    "rescheduled_betas",
    "rescheduled_scheduler",
    "scale_aware_betas",
    "stage_count",
    "stage_sizes",
    "sublattice_factor",
]

# APT, Table B: the best eta_s for a stage that upsamples by 2.0, 1.5 and 4/3 (the "1.33"/"1.3" of
# the paper: the third stage of a x4 run), as (upscale factor, eta) in increasing factor order.
_APT_ETA_TABLE: tuple[tuple[float, float], ...] = ((4.0 / 3.0, 3.5), (1.5, 3.0), (2.0, 2.0))

# The most stages :func:`stage_sizes` lists. No sampler could run more (DemoFusion's stage s alone
# evaluates s^2 dilated views per step: 1000 stages are over 3e8 views per step), and a size far
# beyond it must fail at once, not after listing millions of stages.
MAX_STAGES = 1000


def cosine_decay(
    timestep: float | torch.Tensor, num_train_timesteps: int = 1000, alpha: float = 1.0
) -> float | torch.Tensor:
    """The cosine decay ``c(t) = (0.5 * (1 + cos(pi * (T - t) / T))) ** alpha`` (METHODS.md,
    Common).

    ``c(T) = 1`` (the first, noisiest steps) and ``c(0) = 0``; DemoFusion uses it with
    ``alpha = 3, 1, 1`` for the skip residual, the fusion weight and the blur, APT likewise,
    FreeScale with ``alpha = 2``.

    Args:
        timestep: a timestep value ``t`` (a float, or a float/int tensor of any shape: the
            formula is applied elementwise in float64 on the tensor's device).
        num_train_timesteps: ``T``, ``>= 1`` (``scheduler.config.num_train_timesteps``).
        alpha: exponent ``>= 0``.

    Returns:
        A Python float for a number, a float64 tensor of the same shape for a tensor.

    Raises:
        TypeError: ``num_train_timesteps`` not an int or ``alpha`` not a number.
        ValueError: ``num_train_timesteps < 1`` or ``alpha < 0``.

    Example::

        >>> round(cosine_decay(500, 1000, alpha=1.0), 6)
        0.5
    """
    check_int(num_train_timesteps, "num_train_timesteps", minimum=1)
    alpha = check_real(alpha, "alpha", minimum=0)
    T = num_train_timesteps
    if isinstance(timestep, torch.Tensor):
        t = timestep.to(torch.float64)
        return (0.5 * (1.0 + torch.cos(math.pi * (T - t) / T))) ** alpha
    return (0.5 * (1.0 + math.cos(math.pi * (T - float(timestep)) / T))) ** alpha


def scale_aware_betas(
    beta_start: float, beta_end: float, eta: float, num_train_timesteps: int = 1000
) -> torch.Tensor:
    """APT's scale-aware beta table (paper eq. 5):
    ``beta_t = (b0^eta + t * (bT^eta - b0^eta) / T')^(1/eta)``.

    ``t = 0 .. T-1`` indexes the table of a diffusers scheduler (``T = num_train_timesteps``), whose
    first entry is ``beta_start`` and last ``beta_end``. The paper writes the divisor as ``T`` with
    ``t = 0 .. T``, i.e. ``T`` *intervals* between the two ends; a diffusers table has ``T``
    entries, hence ``T' = T - 1`` intervals. So the table is computed exactly as diffusers builds
    its own schedules, ``torch.linspace(b0**eta, bT**eta, T, dtype=float32) ** (1/eta)``: at
    ``eta = 0.5`` it is bitwise the ``"scaled_linear"`` table of SD 1.5/2.x/SDXL, at ``eta = 1``
    the ``"linear"`` one. Larger ``eta`` makes the noise grow faster (APT uses 2 to 3.5 in later
    stages).

    Args:
        beta_start: ``beta_0 > 0`` (``scheduler.config.beta_start``).
        beta_end: ``beta_T > 0`` (``scheduler.config.beta_end``).
        eta: the exponent ``eta > 0``.
        num_train_timesteps: ``T >= 2``.

    Returns:
        ``float32`` CPU tensor ``[T]`` of betas (pass as ``trained_betas`` to a scheduler).

    Raises:
        TypeError: an argument of the wrong type.
        ValueError: non-positive ``beta_start``, ``beta_end`` or ``eta``, or ``T < 2``; an ``eta``
            so small or large that the float32 table does not run from ``beta_start`` to
            ``beta_end`` inside (0, 1) (for SD's betas: outside about ``[1e-5, 13]``).

    Example::

        >>> betas = scale_aware_betas(0.00085, 0.012, 0.5)
        >>> bool(torch.equal(betas, torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2))
        True
    """
    check_int(num_train_timesteps, "num_train_timesteps", minimum=2)
    beta_start = check_real(beta_start, "beta_start", greater_than=0)
    beta_end = check_real(beta_end, "beta_end", greater_than=0)
    eta = check_real(eta, "eta", greater_than=0)
    start, end = float(beta_start) ** eta, float(beta_end) ** eta
    betas = torch.linspace(start, end, num_train_timesteps, dtype=torch.float32) ** (1.0 / eta)
    ends = torch.tensor([beta_start, beta_end], dtype=torch.float32)
    if not (bool(((betas > 0) & (betas < 1)).all())
            and torch.allclose(betas[[0, -1]], ends, rtol=1e-3, atol=0)):
        raise ValueError(f"eta={eta!r} gives a beta table that float32 cannot hold (it must run "
                         f"from beta_start={beta_start} to beta_end={beta_end} inside (0, 1)); "
                         "APT uses 2 to 3.5")
    return betas


def apt_default_eta(upscale_factor: float) -> float:
    """APT's default ``eta_s`` for a stage that upsamples by ``upscale_factor`` (paper, Table B).

    ``2.0 -> 2``, ``1.5 -> 3``, ``4/3 -> 3.5`` (the paper's "1.33"), linear in between, clamped
    outside (``>= 2`` gives 2, ``<= 4/3`` gives 3.5). The upscale factor of stage ``s`` is its long
    side over stage ``s - 1``'s: with DemoFusion's stages that is ``s / (s - 1)``.

    Args:
        upscale_factor: a number > 0.

    Returns:
        ``eta_s`` as a float.

    Raises:
        TypeError: ``upscale_factor`` not a number.
        ValueError: ``upscale_factor <= 0``.

    Example::

        >>> apt_default_eta(2.0), apt_default_eta(1.75), apt_default_eta(1.2)
        (2.0, 2.5, 3.5)
    """
    factor = check_real(upscale_factor, "upscale_factor", greater_than=0)
    (low_factor, low_eta), (high_factor, high_eta) = _APT_ETA_TABLE[0], _APT_ETA_TABLE[-1]
    if factor <= low_factor:
        return low_eta
    if factor >= high_factor:
        return high_eta
    for (f0, e0), (f1, e1) in zip(_APT_ETA_TABLE, _APT_ETA_TABLE[1:], strict=False):
        if f0 <= factor <= f1:
            return e0 + (e1 - e0) * (factor - f0) / (f1 - f0)
    raise AssertionError("unreachable")  # pragma: no cover


def stage_count(height: int, width: int, base_size: int, multiple: int = 8) -> int:
    """How many stages :func:`stage_sizes` has, ``ceil(max(H, W) / b)``, in closed form; checks
    the size as :func:`stage_sizes` does.

    Example::

        >>> stage_count(4096, 4096, 1024), stage_count(1032, 1032, 1024)
        (4, 2)
    """
    for name, value in (("base_size", base_size), ("multiple", multiple)):
        check_int(value, name, minimum=1)
    for name, value in (("height", height), ("width", width)):
        check_int(value, name, minimum=1)
        if value % multiple:
            raise ValueError(f"{name} must be a multiple of {multiple} (the VAE's scale factor); "
                             f"got {value}")
    long_side = max(height, width)
    if long_side < base_size:
        raise ValueError(f"the long side of (height, width) = ({height}, {width}) must be >= the "
                         f"model's base size {base_size}")
    return -(-long_side // base_size)


def stage_sizes(
    height: int, width: int, base_size: int, multiple: int = 8
) -> list[tuple[int, int]]:
    """DemoFusion's progressive stage sizes (METHODS.md, DemoFusion, "Stages").

    With ``r = max(H, W) / b``: ``S = ceil(r)`` stages; stage ``k = 1..S`` has ratio
    ``r_k = min(k, r)`` and size ``(H, W) * r_k / r`` rounded (half up) to a multiple of ``f`` (at
    least ``f``). So stage 1 is at the base size (long side ``b``, the target's aspect ratio) and
    stage ``S`` is exactly ``(H, W)``; for an integer ``r`` these are the paper's ``1, 2, ..., S``
    times the base. A stage's dilation factor (DemoFusion's dilated sampling: ``k x k``
    sub-lattices, blur kernel ``2k - 1``) is ``ceil(r_k)``, which is ``k`` for every stage (the last
    has ``k - 1 < r <= k``).

    Args:
        height, width: target size in pixels, each a multiple of ``multiple``, long side ``>= b``.
        base_size: ``b``, the model's native size in pixels (``unet.config.sample_size * f``).
        multiple: ``f``, the VAE's scale factor (8).

    Returns:
        ``[(h_1, w_1), ..., (H, W)]`` in pixels.

    Raises:
        TypeError: a size that is not an int.
        ValueError: a size not a positive multiple of ``multiple``, a long side below ``b``, or
            more than :data:`MAX_STAGES` stages.

    Example::

        >>> stage_sizes(4096, 4096, 1024)
        [(1024, 1024), (2048, 2048), (3072, 3072), (4096, 4096)]
        >>> stage_sizes(2048, 1536, 1024)
        [(1024, 768), (2048, 1536)]
        >>> stage_sizes(1032, 1032, 1024)
        [(1024, 1024), (1032, 1032)]
    """
    count = stage_count(height, width, base_size, multiple)
    if count > MAX_STAGES:
        raise ValueError(f"(height, width) = ({height}, {width}) is {count} times the model's base "
                         f"size {base_size}: {count} stages; at most {MAX_STAGES}")
    long_side = max(height, width)

    def rounded(size: int, stage: int) -> int:
        # size * r_k / r with r_k = k < r: size * k * b / long_side, exactly, rounded half up.
        exact = Fraction(size * stage * base_size, long_side * multiple)
        return max(multiple, multiple * math.floor(exact + Fraction(1, 2)))

    sizes = [(rounded(height, k), rounded(width, k)) for k in range(1, count)]
    return [*sizes, (height, width)]


def sublattice_factor(size: Sequence[int], base: int) -> tuple[int, int]:
    """APT's statistical-matching lattice ``(s_h, s_w)`` of a stage (METHODS.md, APT).

    Each axis: the stage's latent size over the base latent size ``b / f``, rounded half up, at
    least 1 (the paper's ``S_h = H / h``, ``S_w = W / w``).

    Example::

        >>> sublattice_factor((256, 192), 128)
        (2, 2)
    """
    check_int(base, "base", minimum=1)
    return tuple(max(1, math.floor(side / base + 0.5)) for side in size)  # type: ignore[return-value]


def redilation_factor(
    factor: float, step_index: int, until_step: int | None, progressive: bool
) -> float | None:
    """A layer's re-dilation factor at a step: None (off) when ``step_index >= until_step``, else
    ``factor``, or with ``progressive`` ``max(ceil(factor * (until_step - i) / until_step), 2)``
    (METHODS.md; exact rational arithmetic on the decimal value of ``factor``).

    Example:
        >>> [redilation_factor(4, i, 35, True) for i in (0, 9, 18, 34, 35)]
        [4.0, 3.0, 2.0, 2.0, None]
    """
    if until_step is not None and step_index >= until_step:
        return None
    if not progressive:
        return float(factor)
    if until_step is None:
        raise ValueError("the progressive schedule needs until_step")
    exact = Fraction(str(factor)) * (until_step - step_index) / until_step
    return float(max(math.ceil(exact), 2))


def _check_gamma(gamma: Any) -> float:
    return check_real(gamma, "gamma", greater_than=0)


def rescheduled_alphas_cumprod(alphas_cumprod: torch.Tensor, gamma: float) -> torch.Tensor:
    """MegaFusion++'s noise re-scheduling (METHODS.md, MegaFusion, "Noise re-scheduling"):
    ``abar'_t = abar_t / (gamma - (gamma - 1) * abar_t)``.

    ``gamma = (stage_res / b)^2`` (4 for a stage at twice the base size, 2.25 at 1.5x): the same
    signal-to-noise ratio ``abar / (1 - abar)`` divided by ``gamma``, i.e. more noise at every
    timestep for a larger image. ``gamma = 1`` returns the table unchanged.

    Args:
        alphas_cumprod: ``[T]`` float tensor of ``abar_t`` in (0, 1] (``scheduler.alphas_cumprod``).
        gamma: ``> 0``.

    Returns:
        ``[T]`` float64 CPU tensor (compute the betas from it in float64:
        :func:`rescheduled_betas`).

    Raises:
        TypeError: ``alphas_cumprod`` not a float tensor, ``gamma`` not a number.
        ValueError: ``alphas_cumprod`` not 1-D with values in (0, 1], ``gamma <= 0``.

    Example::

        >>> rescheduled_alphas_cumprod(torch.tensor([0.5]), 4.0)
        tensor([0.2000], dtype=torch.float64)
    """
    gamma = _check_gamma(gamma)
    if not isinstance(alphas_cumprod, torch.Tensor) or not alphas_cumprod.is_floating_point():
        raise TypeError("alphas_cumprod must be a float tensor [T]; got "
                        f"{type(alphas_cumprod).__name__}")
    table = alphas_cumprod.detach().to("cpu", torch.float64)
    if table.dim() != 1 or table.numel() == 0 or not bool(((table > 0) & (table <= 1)).all()):
        raise ValueError("alphas_cumprod must be a non-empty 1-D tensor with values in (0, 1]; got "
                         f"shape {tuple(table.shape)}")
    return table / (gamma - (gamma - 1.0) * table)


def rescheduled_betas(alphas_cumprod: torch.Tensor, gamma: float) -> torch.Tensor:
    """The betas of :func:`rescheduled_alphas_cumprod`'s table: ``alpha'_t = abar'_t / abar'_{t-1}``
    (``abar'_{-1} = 1``), ``beta'_t = 1 - alpha'_t``, computed in float64 and returned as a
    float32 CPU tensor ``[T]``; pass it as ``trained_betas`` (``.tolist()``: a tensor makes
    diffusers warn) to a diffusers scheduler, which re-derives its ``alphas``,
    ``alphas_cumprod`` and everything else from them.

    Raises:
        as :func:`rescheduled_alphas_cumprod`.
    """
    table = rescheduled_alphas_cumprod(alphas_cumprod, gamma)
    previous = torch.cat([table.new_ones(1), table[:-1]])
    return (1.0 - table / previous).to(torch.float32)


def rescheduled_scheduler(scheduler: Any, gamma: float) -> Any:
    """A new scheduler of ``scheduler``'s class and config whose noise table is re-scheduled with
    ``gamma`` (:func:`rescheduled_alphas_cumprod`), built with ``trained_betas`` from
    :func:`rescheduled_betas`; its timesteps are not set (call ``set_timesteps``).

    Works for every diffusers scheduler class that builds its tables from ``trained_betas`` and
    reads ``alphas_cumprod`` (its ``alphas_cumprod`` then equals the formula up to float32
    rounding of the product): tested with DDIM, DDPM, PNDM, Euler, Euler ancestral, LMS,
    DPM-Solver++ multistep and UniPC (``tests/test_schedules.py``). The model keeps receiving the
    scheduler's integer timesteps; only the noise level at each timestep changes.

    Raises:
        TypeError: ``scheduler`` has no ``alphas_cumprod`` or takes no ``trained_betas``
            (flow-matching schedulers).
        ValueError: a bad ``gamma``.

    Example::

        >>> from diffusers import DDIMScheduler
        >>> ddim = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
        >>> new = rescheduled_scheduler(ddim, 4.0)
        >>> bool(torch.allclose(new.alphas_cumprod.double(),
        ...                     rescheduled_alphas_cumprod(ddim.alphas_cumprod, 4.0), rtol=1e-4))
        True
    """
    import inspect

    table = getattr(scheduler, "alphas_cumprod", None)
    cls = type(scheduler)
    if (not isinstance(table, torch.Tensor) or not hasattr(cls, "from_config")
            or "trained_betas" not in inspect.signature(cls.__init__).parameters):
        raise TypeError("scheduler must be a diffusers scheduler with an alphas_cumprod table "
                        f"that takes trained_betas (DDIM, DDPM, Euler, ...); got {cls.__name__}")
    return cls.from_config(scheduler.config, trained_betas=rescheduled_betas(table, gamma).tolist())

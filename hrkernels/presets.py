"""Per-method presets: the patch specs a method uses for a model and a size, usable on a stock
diffusers pipeline as well as by our samplers (docs/METHODS.md).

* :func:`scalecrafter` -> :class:`ScaleCrafterPlan`: ScaleCrafter's re-dilation (and dispersion,
  progressive schedule, noise-damped guidance) for SD 1.5/2.x or SDXL at a size.
* :func:`freescale` -> :class:`FreeScalePlan`: FreeScale's self-cascade (stage sizes, restart step)
  and each stage's specs (Scale Fusion, restrained dilation).
* :func:`megafusion` -> :class:`~hrkernels.ReDilation`: MegaFusion++'s dilated mid block (for the
  stages above the base size).

Example (the re-dilation alone, on a stock pipeline)::

    plan = hrkernels.presets.scalecrafter(pipe, height=2048, width=2048)
    with hrkernels.patched(pipe.unet, plan.specs):
        image = pipe(prompt="...", height=2048, width=2048,
                     callback_on_step_end=plan.step_callback).images[0]

A stock pipeline runs one UNet configuration per step, so it cannot run the noise-damped guidance
(``plan.base``); :class:`hrkernels.samplers.ScaleCrafter` does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from hrkernels._validate import check_int
from hrkernels.patching import ReDilation, ScaleFusion, set_step

__all__ = ["FREESCALE_DILATED_LAYERS", "SCALECRAFTER_PRESETS", "FreeScalePlan", "FreeScaleStage",
           "MEGAFUSION_DILATION", "ScaleCrafterPlan", "ScaleCrafterPreset", "freescale",
           "megafusion", "model_family", "scalecrafter"]


def model_family(unet: nn.Module) -> str:
    """``"sdxl"`` for an SDXL UNet (its ``text_time`` additional embedding), else ``"sd"`` (SD 1.x
    and 2.x share one block layout), read from the UNet's config, not the pipeline's class."""
    config = getattr(unet, "config", None)
    if config is None:
        raise TypeError(f"unet must be a diffusers UNet2DConditionModel; got {type(unet).__name__}")
    return "sdxl" if getattr(config, "addition_embed_type", None) == "text_time" else "sd"


@dataclass(frozen=True)
class ScaleCrafterPreset:
    """One row of ScaleCrafter's preset table (docs/METHODS.md, "ScaleCrafter", "Presets").

    Attributes:
        size: ``(H0, W0)`` in pixels the preset was made for.
        layers: block (or layer) name -> re-dilation factor of the main configuration.
        tau: re-dilation until step ``tau`` of 50.
        progressive: ScaleCrafter's progressive schedule.
        dispersed: block name -> dispersion scale (each also in ``layers``).
        noise_damped: the blocks turned back into ordinary convolutions in the noise-damped
            guidance's base model (empty: no noise-damped guidance), or None when ``base_layers``
            gives the base model directly.
        base_layers: the base model's re-dilated layers and factors, when it is not the main
            configuration minus ``noise_damped`` (SDXL 4096^2).
    """

    size: tuple[int, int]
    layers: Mapping[str, float]
    tau: int
    progressive: bool = False
    dispersed: Mapping[str, int] | None = None
    noise_damped: tuple[str, ...] = ()
    base_layers: Mapping[str, float] | None = None

    @property
    def has_noise_damped(self) -> bool:
        return bool(self.noise_damped) or self.base_layers is not None


def _blocks(names: str, factor: float) -> dict[str, float]:
    return {name: factor for name in names.split()}


_SD_ALL = "down_blocks.0 down_blocks.1 down_blocks.2 down_blocks.3 mid_block up_blocks.0 " \
          "up_blocks.1 up_blocks.2 up_blocks.3"
_SD_DISPERSED = "down_blocks.2 down_blocks.3 mid_block up_blocks.0 up_blocks.1"

# docs/METHODS.md, ScaleCrafter, "Presets" (SD block names DBk = down_blocks.k, MB = mid_block,
# UBk = up_blocks.k; sizes (H, W): the paper's "2048x1024" is a 1024 x 2048 latent of 128 x 256).
SCALECRAFTER_PRESETS: dict[str, tuple[ScaleCrafterPreset, ...]] = {
    "sd": (
        ScaleCrafterPreset((1024, 1024), _blocks("down_blocks.3 mid_block up_blocks.0", 2), 30),
        ScaleCrafterPreset((1280, 1280), _blocks("down_blocks.3 mid_block up_blocks.0", 2.5), 30),
        ScaleCrafterPreset(
            (1024, 2048), _blocks(_SD_ALL, 2), 30,
            noise_damped=tuple("down_blocks.0 down_blocks.1 down_blocks.2 up_blocks.1 up_blocks.2 "
                               "up_blocks.3".split())),
        ScaleCrafterPreset(
            (2048, 2048),
            {"down_blocks.0": 2, "down_blocks.1": 4, "up_blocks.2": 4, "up_blocks.3": 2,
             **_blocks(_SD_DISPERSED, 2)},
            35, progressive=True, dispersed={name: 2 for name in _SD_DISPERSED.split()},
            noise_damped=("down_blocks.0", "down_blocks.1", "up_blocks.2", "up_blocks.3")),
    ),
    # SDXL: the layer sets the official code actually dilated (its tables use SD 1.5 names).
    "sdxl": (
        ScaleCrafterPreset((2048, 2048), _blocks("mid_block up_blocks.0", 2), 30),
        ScaleCrafterPreset((2560, 2560), _blocks("mid_block up_blocks.0", 2.5), 30),
        ScaleCrafterPreset(
            (4096, 4096),
            {"down_blocks.2.resnets": 4, "mid_block": 4, "up_blocks.0": 4, "up_blocks.1": 3,
             "up_blocks.2.resnets": 2},
            35, progressive=True, base_layers=_blocks("mid_block up_blocks.0", 2)),
    ),
}


def _scaled_until(tau: int, num_inference_steps: int) -> int:
    """A step index given for 50 steps, for ``num_inference_steps`` (rounded half up)."""
    return math.floor(tau * num_inference_steps / 50 + 0.5)


@dataclass(frozen=True)
class ScaleCrafterPlan:
    """What ScaleCrafter changes in a UNet for one size (docs/METHODS.md, "ScaleCrafter").

    Attributes:
        specs: the :class:`~hrkernels.ReDilation` of the main UNet (give it to
            :func:`hrkernels.patch`).
        base: None (no noise-damped guidance), or the :class:`~hrkernels.ReDilation` of the
            noise-damped guidance's base model: the layers that stay re-dilated in it (the preset's
            "noise-damped blocks" run their ordinary convolution).
        noise_damped_until: noise-damped guidance for steps ``i < noise_damped_until``; None means
            ``until_step`` when there is a ``base``, 0 without one. At most ``until_step``.

    Properties: ``until_step``, ``progressive`` and ``dispersed`` (of ``specs``), and
    ``step_callback``.

    Raises:
        TypeError: ``specs`` or ``base`` is not a ReDilation.
        ValueError: ``noise_damped_until`` out of range (above ``until_step``, or set without a
            ``base``).
    """

    specs: ReDilation
    base: ReDilation | None = None
    noise_damped_until: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.specs, ReDilation):
            raise TypeError("specs must be a hrkernels.ReDilation; got "
                            f"{type(self.specs).__name__}")
        if self.base is not None and not isinstance(self.base, ReDilation):
            raise TypeError(f"base must be None or a hrkernels.ReDilation; got "
                            f"{type(self.base).__name__}")
        until = self.specs.until_step
        value = self.noise_damped_until
        if value is None:
            value = (until if until is not None else 0) if self.base is not None else 0
        else:
            value = check_int(value, "noise_damped_until", minimum=0)
            if self.base is None and value > 0:
                raise ValueError("noise_damped_until > 0 needs a base configuration (base=)")
            if until is not None and value > until:
                raise ValueError(f"noise_damped_until ({value}) must be <= until_step ({until}): "
                                 "the noise-damped guidance only runs while the UNet is "
                                 "re-dilated")
        object.__setattr__(self, "noise_damped_until", value)

    @property
    def until_step(self) -> int | None:
        return self.specs.until_step

    @property
    def progressive(self) -> bool:
        return self.specs.progressive

    @property
    def dispersed(self) -> Mapping[str, int] | None:
        return self.specs.dispersed

    @property
    def step_callback(self):
        """A diffusers ``callback_on_step_end`` that calls :func:`hrkernels.set_step` after every
        step, so that a stock pipeline's patched UNet switches the re-dilation off at
        ``until_step`` (and back to step 0 after the last step, ready for the next call).

        Returns the ``callback_kwargs`` it is given.
        """

        def callback(pipe: Any, step_index: int, timestep: Any,
                     callback_kwargs: dict[str, Any]) -> dict[str, Any]:
            following = step_index + 1
            total = getattr(pipe, "num_timesteps", None)
            set_step(pipe.unet, 0 if total is not None and following >= total else following,
                     timestep)
            return callback_kwargs

        return callback


def _nearest(presets: tuple[ScaleCrafterPreset, ...], pixels: int) -> ScaleCrafterPreset:
    """The preset whose pixel count is nearest in log ratio (ties: the first, the smaller)."""
    return min(presets, key=lambda p: abs(math.log(pixels / (p.size[0] * p.size[1]))))


def _base_size(pipe: Any) -> int:
    """``b``: the UNet's native size in pixels (``sample_size`` x the VAE's factor)."""
    unet = getattr(pipe, "unet", pipe)
    size = unet.config.sample_size
    return int(size if isinstance(size, int) else max(size)) * int(
        getattr(pipe, "vae_scale_factor", 8))


def _check_size(height: int, width: int, base: int) -> None:
    for name, value in (("height", height), ("width", width)):
        check_int(value, name, minimum=1)
        if value % 8:
            raise ValueError(f"{name} must be a multiple of 8; got {value}")
    if max(height, width) < base:
        raise ValueError(f"the long side of (height, width) = ({height}, {width}) must be >= the "
                         f"model's base size {base}")


def scalecrafter(pipe: Any, height: int, width: int,
                 num_inference_steps: int = 50) -> ScaleCrafterPlan:
    """ScaleCrafter's plan for ``pipe``'s UNet at ``height x width`` (docs/METHODS.md).

    The preset table of the model family (:func:`model_family`: SD 1.x/2.x or SDXL) is searched
    for the preset whose pixel count is nearest in log ratio (``|log(H W / (H0 W0))|``); its
    factors are scaled by ``sqrt(H W) / sqrt(H0 W0)`` (never below 1; a dispersed layer's factor
    never below its integer dispersion scale, so its kernel never runs below dilation 1). ``tau``
    (and the noise-damped guidance's end, which equals it) are given for 50 steps and scale with
    ``num_inference_steps``, rounded.

    Args:
        pipe: a diffusers SD 1.5/2.x or SDXL pipeline (or its UNet).
        height, width: the target size in pixels (multiples of 8, long side at least the model's
            base size).
        num_inference_steps: the steps the plan is for.

    Returns:
        A :class:`ScaleCrafterPlan`.

    Raises:
        TypeError / ValueError: bad sizes or steps (the message names the argument).

    Example::

        >>> from hrkernels.testing import tiny_pipeline
        >>> plan = scalecrafter(tiny_pipeline("sdxl"), 256, 256)   # 2x the tiny base size
    """
    family = model_family(getattr(pipe, "unet", pipe))
    base = _base_size(pipe)
    _check_size(height, width, base)
    steps = check_int(num_inference_steps, "num_inference_steps", minimum=1)
    # The tables are written for the real models' base sizes (512 for SD, 1024 for SDXL); a model
    # with another base (SD 2.1 at 768, the tiny test models) uses them at its own scale.
    table_base = 1024 if family == "sdxl" else 512
    pixels = height * width * (table_base / base) ** 2
    preset = _nearest(SCALECRAFTER_PRESETS[family], pixels)
    scale = math.sqrt(pixels / (preset.size[0] * preset.size[1]))
    dispersed = dict(preset.dispersed or {})

    def scaled(layers: Mapping[str, float]) -> dict[str, float]:
        return {name: max(float(dispersed.get(name, 1)), 1.0, factor * scale)
                for name, factor in layers.items()}

    until = _scaled_until(preset.tau, steps)
    layers = scaled(preset.layers)
    specs = ReDilation(layers, until_step=until, progressive=preset.progressive and until > 0,
                       dispersed=dispersed or None)
    base_spec = None
    if preset.has_noise_damped:
        base_layers = (scaled(preset.base_layers) if preset.base_layers is not None else
                       {name: f for name, f in layers.items() if name not in preset.noise_damped})
        base_dispersed = {name: s for name, s in dispersed.items() if name in base_layers}
        base_spec = ReDilation(base_layers, until_step=until,
                               progressive=preset.progressive and until > 0,
                               dispersed=base_dispersed or None)
    return ScaleCrafterPlan(specs=specs, base=base_spec,
                            noise_damped_until=until if base_spec is not None else 0)


# docs/METHODS.md, FreeScale, "Restrained dilation": the 3x3 convolutions of the down path below the
# first level and of the mid block, never the up blocks. SDXL: as the authors' code; SD 1.x/2.x (not
# in the authors' code): the same rule on its four levels.
FREESCALE_DILATED_LAYERS: dict[str, tuple[str, ...]] = {
    "sdxl": ("down_blocks.1.downsamplers.0.conv", "down_blocks.2.resnets", "mid_block.resnets"),
    "sd": ("down_blocks.1.downsamplers.0.conv", "down_blocks.2", "down_blocks.3.resnets",
           "mid_block.resnets"),
}


@dataclass(frozen=True)
class FreeScaleStage:
    """One stage of FreeScale's self-cascade.

    Attributes:
        height, width: the stage's size in pixels.
        scale: its long side over the base size, rounded half up (the restrained dilation).
        specs: what the UNet runs with in the stage: ``()`` for the first stage (plain sampling),
            else ``(ScaleFusion, ReDilation)``.
    """

    height: int
    width: int
    scale: int
    specs: tuple[Any, ...]


@dataclass(frozen=True)
class FreeScalePlan:
    """FreeScale's self-cascade for one size (docs/METHODS.md, "FreeScale").

    Attributes:
        stages: the stages, first (the base size) to last (the target).
        dilated_until: the restrained dilation runs for step indices ``< dilated_until`` of
            stages >= 2 (35 of 50, scaled with the step count: never in the last 15 of 50).
    """

    stages: tuple[FreeScaleStage, ...]
    dilated_until: int


def freescale(pipe: Any, height: int, width: int, num_inference_steps: int = 50,
              fusion: ScaleFusion | None = None) -> FreeScalePlan:
    """FreeScale's cascade and per-stage specs for ``pipe``'s UNet at ``height x width``.

    Stage sizes: the base size ``b`` (long side, the target's aspect ratio), then doubling while
    below the target, then the target (``4096 -> 1024, 2048, 4096``; ``3000 -> 1024, 2048,
    3000``), each rounded to a multiple of 8. Stages >= 2 run :class:`hrkernels.ScaleFusion` in
    every transformer and the restrained dilation (:data:`FREESCALE_DILATED_LAYERS`, integer factor
    = the stage's scale) for steps ``< dilated_until``.

    Args:
        pipe: an SD 1.5/2.x or SDXL pipeline (or its UNet).
        height, width: the target in pixels (multiples of 8, long side at least the base size).
        num_inference_steps: the steps the plan is for.
        fusion: the :class:`hrkernels.ScaleFusion` of stages >= 2 (default ``ScaleFusion()``).

    Example::

        >>> from hrkernels.testing import tiny_pipeline
        >>> [(s.height, s.width) for s in freescale(tiny_pipeline("sdxl"), 512, 512).stages]
        [(128, 128), (256, 256), (512, 512)]
    """
    family = model_family(getattr(pipe, "unet", pipe))
    base = _base_size(pipe)
    _check_size(height, width, base)
    steps = check_int(num_inference_steps, "num_inference_steps", minimum=1)
    long_side = max(height, width)
    ratios = []
    ratio = 1.0
    while ratio * base < long_side:
        ratios.append(ratio)
        ratio *= 2
    ratios.append(long_side / base)
    until = _scaled_until(35, steps)
    if fusion is None:
        fusion = ScaleFusion()
    elif not isinstance(fusion, ScaleFusion):
        raise TypeError(f"fusion must be None or a hrkernels.ScaleFusion; got {fusion!r}")
    stages = []
    for index, ratio in enumerate(ratios):
        if index == len(ratios) - 1:
            size = (height, width)
        else:
            size = tuple(max(8, 8 * math.floor(side * ratio * base / long_side / 8 + 0.5))
                         for side in (height, width))
        scale = max(1, math.floor(ratio + 0.5))
        specs: tuple[Any, ...] = ()
        if index > 0:
            dilation = ReDilation({name: scale for name in FREESCALE_DILATED_LAYERS[family]},
                                  until_step=until)
            specs = (fusion, dilation)
        stages.append(FreeScaleStage(size[0], size[1], scale, specs))
    return FreeScalePlan(tuple(stages), until)


# docs/METHODS.md, MegaFusion, "Dilated convolution" (paper, appendix C.1).
MEGAFUSION_DILATION = 2


def megafusion(pipe: Any) -> ReDilation:
    """MegaFusion++'s dilated convolutions for ``pipe``'s UNet: every 3x3 convolution of the mid
    block (its resnets' ``conv1``/``conv2``) at dilation 2, at every step.

    Patch it only while sampling above the base size (MegaFusion's stages >= 2: the paper's
    appendix C.1 uses none at the original size; the authors' code dilates every stage, which
    :class:`hrkernels.samplers.MegaFusion` does not reproduce). Works for any UNet with a
    ``mid_block`` (SD 1.x/2.x, SDXL, DeepFloyd IF); SD3's transformer has none.

    Raises:
        TypeError: ``pipe`` (or the UNet given) has no UNet with a ``mid_block``.

    Example (a stock pipeline's second, larger pass)::

        >>> from hrkernels.testing import tiny_pipeline
        >>> spec = megafusion(tiny_pipeline("sdxl"))
        >>> dict(spec.layers), spec.until_step
        ({'mid_block': 2.0}, None)
    """
    unet = getattr(pipe, "unet", pipe)
    if getattr(unet, "mid_block", None) is None:
        raise TypeError("megafusion needs a pipeline (or UNet) whose UNet has a mid_block "
                        f"(SD 1.x/2.x, SDXL, DeepFloyd IF); got {type(pipe).__name__}")
    return ReDilation({"mid_block": MEGAFUSION_DILATION})

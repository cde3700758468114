"""High-resolution samplers over diffusers pipelines (docs/METHODS.md; docs/DESIGN.md, "Samplers").

* :class:`DemoFusion` -- progressive upscaling, skip residual, dilated sampling.
* :class:`APT` -- Adaptive Path Tracing on DemoFusion: statistical matching, scale-aware
  scheduling, shortcut.
* :class:`FreeScale` -- self-cascade in RGB, restrained dilation, Scale Fusion attention.
* :class:`ScaleCrafter` -- direct inference with a re-dilated UNet (presets from
  :mod:`hrkernels.presets`) and noise-damped guidance.
* :class:`MegaFusion` -- truncate-and-relay over one shared timestep sequence (SD 1.x/2.x, SDXL,
  DeepFloyd IF stage I and II, SD3); MegaFusion++ with ``mega_plus=True``.

The framework they stand on (each module imports only the ones above it):

* :mod:`~hrkernels.samplers.outputs` -- :class:`SamplerOutput`, :class:`StageResult`,
  :class:`NonFiniteLatentsError`.
* :mod:`~hrkernels.samplers.pipelines` -- one adapter per model family (SD 1.5/2.x, SDXL, IF stage
  I and II, SD3): prompt
  encoding, the model call and its extra inputs, latents -> images.
* :mod:`~hrkernels.samplers.inputs` -- the input image, ControlNet images per view and IP-Adapter
  embeddings of a call, checked before any model work.
* :mod:`~hrkernels.samplers.schedulers` -- fresh schedulers per stage, noising coefficients by step,
  step options, which schedulers keep a skip residual.
* :mod:`~hrkernels.samplers.engine` -- fixed-shape view batches, guidance strategies (CFG,
  noise-damped CFG, none), the executor, the one choke point for model calls.
* :mod:`~hrkernels.samplers.stages` -- the stage loop (schedules, skip residual, ``set_step`` on a
  patched model, callbacks, progress, the non-finite watch).
* :mod:`~hrkernels.samplers.base` -- :class:`Sampler`, the call every method shares.

Each sampler wraps a ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline`` (MegaFusion
also DeepFloyd ``IFPipeline`` / ``IFSuperResolutionPipeline`` and ``StableDiffusion3Pipeline``), is
called with the pipeline's prompt arguments plus ``height``/``width``, and returns a
:class:`SamplerOutput`.
:data:`SAMPLERS` maps the ``hrkernels generate --method`` names to the classes; later samplers
join it with :func:`register_sampler`.

Example::

    >>> import hrkernels, torch
    >>> from hrkernels.testing import tiny_pipeline
    >>> out = hrkernels.samplers.DemoFusion(tiny_pipeline("sdxl"))(
    ...     prompt="a cat", height=256, width=256, num_inference_steps=2, progress=False,
    ...     generator=torch.Generator().manual_seed(0))
    >>> [(stage.height, stage.width) for stage in out.stages]
    [(128, 128), (256, 256)]
"""

from __future__ import annotations

from hrkernels.samplers.apt import APT
from hrkernels.samplers.base import Sampler
from hrkernels.samplers.demofusion import DemoFusion
from hrkernels.samplers.freescale import FreeScale
from hrkernels.samplers.megafusion import MegaFusion
from hrkernels.samplers.outputs import NonFiniteLatentsError, SamplerOutput, StageResult
from hrkernels.samplers.scalecrafter import ScaleCrafter

SAMPLERS: dict[str, type[Sampler]] = {}


def register_sampler(name: str, sampler: type[Sampler]) -> None:
    """Make ``sampler`` available as ``hrkernels generate --method NAME``.

    ``sampler(pipe, view_batch_size=...)`` must build it with default hyperparameters, and calling
    it must accept :meth:`Sampler.__call__`'s arguments.

    Raises:
        TypeError: ``sampler`` is not a :class:`Sampler` subclass.
        ValueError: ``name`` is taken by another class.
    """
    if not (isinstance(sampler, type) and issubclass(sampler, Sampler)):
        raise TypeError(f"sampler must be a Sampler subclass; got {sampler!r}")
    if SAMPLERS.get(name, sampler) is not sampler:
        raise ValueError(f"sampler name {name!r} is already registered to {SAMPLERS[name]!r}")
    SAMPLERS[name] = sampler


register_sampler("demofusion", DemoFusion)
register_sampler("apt", APT)
register_sampler("scalecrafter", ScaleCrafter)
register_sampler("freescale", FreeScale)
register_sampler("megafusion", MegaFusion)

__all__ = [
    "APT",
    "SAMPLERS",
    "DemoFusion",
    "FreeScale",
    "MegaFusion",
    "NonFiniteLatentsError",
    "Sampler",
    "SamplerOutput",
    "ScaleCrafter",
    "StageResult",
    "register_sampler",
]

"""High-resolution samplers over diffusers pipelines (METHODS.md; DESIGN.md, "Samplers").

* :class:`DemoFusion` -- progressive upscaling, skip residual, dilated sampling.
* :class:`APT` -- Adaptive Path Tracing on DemoFusion: statistical matching, scale-aware
  scheduling, shortcut.

Each sampler wraps a ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline``, is called with
the pipeline's prompt arguments plus ``height``/``width``, and returns a :class:`SamplerOutput`.
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

from hrkernels.samplers._core import NonFiniteLatentsError, SamplerOutput, StageResult
from hrkernels.samplers.apt import APT
from hrkernels.samplers.demofusion import DemoFusion

SAMPLERS: dict[str, type] = {}


def register_sampler(name: str, sampler: type) -> None:
    """Make ``sampler`` available as ``hrkernels generate --method NAME``.

    ``sampler(pipe)`` must build it with default hyperparameters and calling it must accept
    ``prompt``, ``negative_prompt``, ``height``, ``width``, ``num_inference_steps``,
    ``guidance_scale``, ``generator``, ``output_type``, ``decode_stages`` and ``progress``.

    Raises:
        ValueError: ``name`` is taken by another class.
    """
    if SAMPLERS.get(name, sampler) is not sampler:
        raise ValueError(f"sampler name {name!r} is already registered to {SAMPLERS[name]!r}")
    SAMPLERS[name] = sampler


register_sampler("demofusion", DemoFusion)
register_sampler("apt", APT)

__all__ = [
    "APT",
    "SAMPLERS",
    "DemoFusion",
    "NonFiniteLatentsError",
    "SamplerOutput",
    "StageResult",
    "register_sampler",
]

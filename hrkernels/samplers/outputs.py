"""What a sampler returns, and the error it raises when the latents stop being finite."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["NonFiniteLatentsError", "SamplerOutput", "StageResult"]


class NonFiniteLatentsError(FloatingPointError):
    """NaN or inf appeared in the latents; ``stage`` (1-based) and ``step`` (0-based, within the
    stage) name the first step whose result was not finite. The hint blames half precision only
    when the model runs in ``torch.float16`` (``dtype``)."""

    def __init__(self, sampler: str, stage: int, step: int, timestep: Any,
                 dtype: torch.dtype | None = None) -> None:
        self.stage, self.step, self.timestep = stage, step, timestep
        causes = ("a callback that returned NaN/inf, a scheduler/model mismatch, or non-finite "
                  "weights")
        if dtype == torch.float16:
            causes = "the fp16 UNet overflowing (try torch.float32 or bfloat16), " + causes
        super().__init__(
            f"{sampler}: NaN or inf in the latents at stage {stage}, step {step} (timestep "
            f"{timestep}). Common causes: {causes}."
        )


@dataclass
class StageResult:
    """One resolution stage of a sampler.

    Attributes:
        stage: 1-based stage number.
        height, width: the stage's size in pixels.
        latents: ``[B, C, height/f, width/f]`` float32: the stage's result (for DemoFusion and APT
            the clean latent after the end-of-stage renormalisation), the input of the next stage.
        images: the decoded preview (same type as the call's ``output_type``) when the call asked
            for previews (``decode_stages=True``), else None.
    """

    stage: int
    height: int
    width: int
    latents: torch.Tensor
    images: Any = None


@dataclass
class SamplerOutput:
    """What a sampler returns.

    Attributes:
        images: the final images: a list of PIL images (``output_type="pil"``), a ``[B, 3, H, W]``
            tensor in [0, 1] (``"pt"``), a ``[B, H, W, 3]`` array (``"np"``) or the final latents
            (``"latent"``).
        stages: one :class:`StageResult` per resolution stage, first to last.
        latents: the final latents ``[B, C, H/f, W/f]`` float32.
        unet_calls: how many model calls of which input shape the run made, as
            ``{(batch_rows, latent_h, latent_w): count}`` (the "UNet floor" of the benchmarks).
        plan: what the sampler stated before any model work, one line per stage (methods that
            state it; also logged at INFO on the ``hrkernels`` logger).
        communication: a parallel sampler's exchanges between ranks during the call
            (:meth:`hrkernels.distributed.CommStats.summary`: counts, bytes sent and received,
            seconds of the control and data collectives, in total and per kind); None in one
            process. ``unet_calls`` then counts this rank's model calls only.
        memory: the call's :class:`hrkernels.MemoryPlan` (phases, budget, choices), made before
            any model work (``print(out.memory)`` shows its table).
    """

    images: Any
    stages: list[StageResult]
    latents: torch.Tensor
    unet_calls: dict[tuple[int, int, int], int] = field(default_factory=dict)
    plan: list[str] = field(default_factory=list)
    communication: dict[str, Any] | None = None
    memory: Any = None

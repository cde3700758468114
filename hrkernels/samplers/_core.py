"""The pieces every sampler shares: prompt encoding, the view-batching UNet engine, scheduler
copies, non-finite detection, outputs and decoding.

Layout conventions: latents are ``[B, C, h, w]`` float32 on the pipeline's execution device (the
samplers keep their state in fp32; only the UNet inputs are cast to the UNet's dtype); "views" are
``[N*B, C, vh, vw]`` window-major as :func:`hrkernels.ops.gather_windows` and
:func:`hrkernels.ops.gather_dilated` return them, so view row ``r`` belongs to image ``r % B``.
"""

from __future__ import annotations

import inspect
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

SUPPORTED_PIPELINES = (StableDiffusionPipeline, StableDiffusionXLPipeline)
OUTPUT_TYPES = ("pil", "pt", "np", "latent")

# ``view_batch_size="auto"`` on a device whose free memory cannot be queried (CPU, MPS): views per
# UNet call.
DEFAULT_CPU_VIEW_BATCH = 8
# Bytes of UNet activations per batch row, per latent pixel and per channel of the UNet's first
# level, at the UNet's element size. Measured: 16.0 for the SDXL UNet in fp16 with PyTorch's SDPA on
# an H100 (160 MiB per row of 128x128, batches of 2 to 52 rows); 20 leaves a margin.
# ``view_batch_size="auto"`` divides the free memory by it.
ACTIVATION_BYTES_FACTOR = 20
# Memory ``"auto"`` leaves free (bytes): the allocator's fragmentation, cuBLAS/cuDNN workspaces.
AUTO_MEMORY_RESERVE = 2 * 2**30

StepCallback = Callable[[int, int, Any, torch.Tensor], Any]


class NonFiniteLatentsError(FloatingPointError):
    """NaN or inf appeared in the latents; ``stage`` (1-based) and ``step`` (0-based, within the
    stage) name the first step whose result was not finite."""

    def __init__(self, sampler: str, stage: int, step: int, timestep: Any) -> None:
        self.stage, self.step, self.timestep = stage, step, timestep
        super().__init__(
            f"{sampler}: NaN or inf in the latents at stage {stage}, step {step} (timestep "
            f"{timestep}). Common causes: an fp16 VAE/UNet overflowing (try torch.float32 or "
            "bfloat16), or a scheduler/model mismatch."
        )


@dataclass
class StageResult:
    """One resolution stage of a progressive sampler.

    Attributes:
        stage: 1-based stage number.
        height, width: the stage's size in pixels.
        latents: ``[B, C, height/f, width/f]`` float32: the stage's clean latent (after the
            end-of-stage renormalisation), the input of the next stage.
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
        unet_calls: how many UNet calls of which input shape the run made, as
            ``{(batch_rows, latent_h, latent_w): count}`` (used for the "UNet floor" of benchmarks).
    """

    images: Any
    stages: list[StageResult]
    latents: torch.Tensor
    unet_calls: dict[tuple[int, int, int], int] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# Pipeline checks and prompt encoding
# --------------------------------------------------------------------------------------------------


def check_pipeline(pipe: Any, sampler: str) -> None:
    """Raise TypeError unless ``pipe`` is a supported diffusers pipeline."""
    if not isinstance(pipe, SUPPORTED_PIPELINES):
        names = ", ".join(cls.__name__ for cls in SUPPORTED_PIPELINES)
        raise TypeError(f"{sampler} supports {names} (or subclasses); got {type(pipe).__name__}")
    if pipe.unet is None or pipe.vae is None or pipe.scheduler is None:
        raise TypeError(f"{sampler} needs a pipeline with a unet, a vae and a scheduler")


def is_sdxl(pipe: Any) -> bool:
    return isinstance(pipe, StableDiffusionXLPipeline)


def vae_scale_factor(pipe: Any) -> int:
    default = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    return int(getattr(pipe, "vae_scale_factor", default))


def base_latent_size(pipe: Any) -> int:
    """The UNet's native latent size (``unet.config.sample_size``): 128 for SDXL, 64 for SD 1.5."""
    size = pipe.unet.config.sample_size
    if not isinstance(size, int):
        size = max(size)
    return int(size)


@dataclass
class Conditioning:
    """Encoded prompts, one row per image (``B = batch * num_images_per_prompt``).

    ``embeds``/``negative`` are ``[B, L, D]`` (``negative`` None without CFG); SDXL adds
    ``pooled``/``negative_pooled`` ``[B, P]`` and the micro-conditioning ``size = (H, W)`` of the
    final image (``original_size = target_size``).
    """

    embeds: torch.Tensor
    negative: torch.Tensor | None
    pooled: torch.Tensor | None = None
    negative_pooled: torch.Tensor | None = None
    size: tuple[int, int] | None = None

    @property
    def batch(self) -> int:
        return self.embeds.shape[0]

    @property
    def guided(self) -> bool:
        return self.negative is not None


def encode_prompts(
    pipe: Any,
    *,
    sampler: str,
    device: torch.device,
    guided: bool,
    size: tuple[int, int],
    prompt: str | list[str] | None,
    prompt_2: str | list[str] | None,
    negative_prompt: str | list[str] | None,
    negative_prompt_2: str | list[str] | None,
    prompt_embeds: torch.Tensor | None,
    negative_prompt_embeds: torch.Tensor | None,
    pooled_prompt_embeds: torch.Tensor | None,
    negative_pooled_prompt_embeds: torch.Tensor | None,
    num_images_per_prompt: int,
) -> Conditioning:
    """Encode the prompts with the pipeline's own ``encode_prompt`` (SD and SDXL differ)."""
    if (prompt is None) == (prompt_embeds is None):
        raise ValueError(f"{sampler}: pass exactly one of prompt and prompt_embeds")
    if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int) \
            or num_images_per_prompt < 1:
        raise ValueError("num_images_per_prompt must be an int >= 1; got "
                         f"{num_images_per_prompt!r}")
    if is_sdxl(pipe):
        if prompt_embeds is not None and pooled_prompt_embeds is None:
            raise ValueError(f"{sampler}: SDXL needs pooled_prompt_embeds with prompt_embeds")
        if negative_prompt_embeds is not None and negative_pooled_prompt_embeds is None and guided:
            raise ValueError(f"{sampler}: SDXL needs negative_pooled_prompt_embeds with "
                             "negative_prompt_embeds")
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompt=prompt, prompt_2=prompt_2, device=device,
            num_images_per_prompt=num_images_per_prompt, do_classifier_free_guidance=guided,
            negative_prompt=negative_prompt, negative_prompt_2=negative_prompt_2,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
        )
        dtype = pipe.unet.dtype
        return Conditioning(
            embeds=embeds.to(device, dtype),
            negative=negative.to(device, dtype) if guided else None,
            pooled=pooled.to(device, dtype),
            negative_pooled=negative_pooled.to(device, dtype) if guided else None,
            size=size,
        )
    extras = {"prompt_2": prompt_2, "negative_prompt_2": negative_prompt_2,
              "pooled_prompt_embeds": pooled_prompt_embeds,
              "negative_pooled_prompt_embeds": negative_pooled_prompt_embeds}
    given = [name for name, value in extras.items() if value is not None]
    if given:
        raise ValueError(f"{sampler}: {', '.join(given)} only apply to SDXL pipelines; "
                         f"{type(pipe).__name__} takes prompt/negative_prompt (or their embeds)")
    if guided and pipe.text_encoder is None and negative_prompt_embeds is None:
        raise ValueError(f"{sampler}: this pipeline has no text encoder; with guidance_scale > 1 "
                         "pass negative_prompt_embeds too")
    embeds, negative = pipe.encode_prompt(
        prompt, device, num_images_per_prompt, guided, negative_prompt,
        prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
    )
    dtype = pipe.unet.dtype
    return Conditioning(embeds=embeds.to(device, dtype),
                        negative=negative.to(device, dtype) if guided else None)


# --------------------------------------------------------------------------------------------------
# View batching
# --------------------------------------------------------------------------------------------------


def choose_view_batch(counts: Sequence[int], limit: int) -> int:
    """One batch size (views per UNet call) for every view group of one input shape.

    ``counts`` are the views of that shape in each step of each stage that uses it (e.g. 13, 34,
    65 for the 128x128 views of a 4096^2 SDXL run). Every group runs as ``ceil(n / k)`` calls of
    exactly ``k`` views (the last padded), so a run compiles/captures one graph per shape.
    ``k <= limit`` minimises the padded work plus one view's worth of cost per call,
    ``sum(ceil(n / k) * (k + 1))``; ties go to the larger ``k``.

    Example::

        >>> choose_view_batch([13, 34, 65], 16)
        13
    """
    limit = max(1, min(limit, max(counts)))
    best, best_cost = 1, math.inf
    for k in range(1, limit + 1):
        cost = sum(-(-n // k) * (k + 1) for n in counts)
        if cost <= best_cost:
            best, best_cost = k, cost
    return best


def auto_view_batch_limit(unet: torch.nn.Module, shape: tuple[int, int], rows_per_view: int,
                          device: torch.device) -> int:
    """The most views per UNet call that fit the free memory of ``device`` (``"auto"``).

    On CUDA: (free memory + memory cached by PyTorch's allocator but unused - a 2 GiB reserve)
    divided by an estimate of the activation bytes of one view (``rows_per_view`` UNet rows of
    ``shape``, :data:`ACTIVATION_BYTES_FACTOR` x latent pixels x first-level channels x element
    size). Elsewhere :data:`DEFAULT_CPU_VIEW_BATCH`.
    """
    if device.type != "cuda":
        return DEFAULT_CPU_VIEW_BATCH
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    budget = free + cached - AUTO_MEMORY_RESERVE
    channels = unet.config.block_out_channels[0]
    element = torch.finfo(unet.dtype).bits // 8
    per_view = rows_per_view * ACTIVATION_BYTES_FACTOR * shape[0] * shape[1] * channels * element
    return max(1, int(budget // per_view))


@dataclass
class ViewSet:
    """UNet inputs of one kind for one step.

    ``views``: ``[N*B, C, vh, vw]`` (already scaled by ``scheduler.scale_model_input``), any float
    dtype; ``crops``: ``[N*B, 2]`` integer (top, left) in pixels for SDXL's
    ``crops_coords_top_left`` (None: (0, 0)).
    """

    views: torch.Tensor
    crops: torch.Tensor | None = None


class UNetEngine:
    """Runs the guided UNet on lists of views in batches of a fixed shape.

    Views with the same spatial size are concatenated (local windows and dilated views of a
    square multiple of the base size share one shape), padded with zero rows to a multiple of the
    batch size ``k`` chosen for that shape, and run ``k`` views per call: ``2k`` UNet rows with
    classifier-free guidance (``[uncond x k, cond x k]``), ``k`` without. The guided noise
    predictions ``eps_u + w (eps_c - eps_u)`` come back in float32, one tensor per input
    :class:`ViewSet`.

    Everything per step stays on the device: the timestep is a device tensor, SDXL's per-row
    ``time_ids`` are built from the device tensor of crops; the per-call text conditioning depends
    only on the row layout and is cached.
    """

    def __init__(self, pipe: Any, cond: Conditioning, guidance_scale: float) -> None:
        self.unet = pipe.unet
        self.cond = cond
        self.guidance_scale = float(guidance_scale)
        self.dtype = pipe.unet.dtype
        self.device = cond.embeds.device
        self.calls: Counter[tuple[int, int, int]] = Counter()
        self._chunk_cache: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor | None]] = {}
        if cond.size is not None:
            height, width = cond.size
            self._size_ids = torch.tensor([[height, width]], dtype=self.dtype, device=self.device)

    def _chunk_conditioning(
        self, images: tuple[int, ...]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``encoder_hidden_states`` and SDXL ``text_embeds`` of a call whose view rows belong to
        ``images`` (cached: with one image every call shares them)."""
        cached = self._chunk_cache.get(images)
        if cached is not None:
            return cached
        index = torch.tensor(images, device=self.device)
        cond = self.cond
        states = cond.embeds.index_select(0, index)
        pooled = None if cond.pooled is None else cond.pooled.index_select(0, index)
        if cond.guided:
            states = torch.cat([cond.negative.index_select(0, index), states])
            if pooled is not None:
                pooled = torch.cat([cond.negative_pooled.index_select(0, index), pooled])
        self._chunk_cache[images] = (states, pooled)
        return states, pooled

    def _time_ids(self, crops: torch.Tensor) -> torch.Tensor:
        """SDXL micro-conditioning rows ``[H, W, crop_top, crop_left, H, W]`` for ``crops``
        ``[n, 2]``."""
        sizes = self._size_ids.expand(crops.shape[0], 2)
        return torch.cat([sizes, crops.to(self.dtype), sizes], dim=1)

    def __call__(self, timestep: torch.Tensor, view_sets: Sequence[ViewSet],
                 batch_sizes: dict[tuple[int, int], int]) -> list[torch.Tensor]:
        """Guided noise predictions (float32, same shapes as the views) for every view set.

        ``timestep``: 0-d device tensor; ``batch_sizes``: views per UNet call for each view shape
        (from :func:`plan_view_batches`).
        """
        results: list[torch.Tensor | None] = [None] * len(view_sets)
        groups: dict[tuple[int, int], list[int]] = {}
        for index, view_set in enumerate(view_sets):
            groups.setdefault(tuple(view_set.views.shape[2:]), []).append(index)
        for shape, members in groups.items():
            predictions = self._run_group(timestep, shape, [view_sets[i] for i in members],
                                           batch_sizes[shape])
            offset = 0
            for i in members:
                rows = view_sets[i].views.shape[0]
                results[i] = predictions[offset:offset + rows]
                offset += rows
        return results  # type: ignore[return-value]

    def _run_group(self, timestep: torch.Tensor, shape: tuple[int, int],
                   view_sets: Sequence[ViewSet], k: int) -> torch.Tensor:
        batch = self.cond.batch
        channels = view_sets[0].views.shape[1]
        rows = sum(view_set.views.shape[0] for view_set in view_sets)
        calls = -(-rows // k)
        padding = calls * k - rows
        parts = [view_set.views.to(self.dtype) for view_set in view_sets]
        if padding:
            parts.append(torch.zeros(padding, channels, *shape, dtype=self.dtype,
                                     device=self.device))
        inputs = torch.cat(parts) if len(parts) > 1 else parts[0]
        time_ids = None
        if self.cond.size is not None:
            crops = [view_set.crops if view_set.crops is not None else
                     torch.zeros(view_set.views.shape[0], 2, dtype=torch.int64, device=self.device)
                     for view_set in view_sets]
            if padding:
                crops.append(torch.zeros(padding, 2, dtype=torch.int64, device=self.device))
            time_ids = self._time_ids(torch.cat(crops))
        out = torch.empty(calls * k, channels, *shape, dtype=torch.float32, device=self.device)
        for call in range(calls):
            rows_slice = slice(call * k, (call + 1) * k)
            images = tuple((call * k + q) % batch for q in range(k))
            self._call(timestep, inputs[rows_slice],
                       None if time_ids is None else time_ids[rows_slice], images, out[rows_slice])
        return out[:rows]

    def _call(self, timestep: torch.Tensor, sample: torch.Tensor, time_ids: torch.Tensor | None,
              images: tuple[int, ...], out: torch.Tensor) -> None:
        """One UNet call on ``k`` views; writes the guided prediction into ``out``.

        A function of its own so that no reference to the UNet's output outlives the call (CUDA
        graphs of ``torch.compile(mode="reduce-overhead")`` reuse the output buffers).
        """
        guided = self.cond.guided
        states, pooled = self._chunk_conditioning(images)
        added = None
        if time_ids is not None:
            added = {"text_embeds": pooled,
                     "time_ids": torch.cat([time_ids, time_ids]) if guided else time_ids}
        if guided:
            sample = torch.cat([sample, sample])
        prediction = self.unet(sample, timestep, encoder_hidden_states=states,
                               added_cond_kwargs=added, return_dict=False)[0]
        self.calls[(sample.shape[0], *sample.shape[2:])] += 1
        if guided:
            uncond, text = prediction.float().chunk(2)
            torch.add(uncond, text - uncond, alpha=self.guidance_scale, out=out)
        else:
            out.copy_(prediction)


def plan_view_batches(
    shape_counts: dict[tuple[int, int], list[int]],
    view_batch_size: int | str,
    unet: torch.nn.Module,
    guided: bool,
    device: torch.device,
) -> dict[tuple[int, int], int]:
    """Views per UNet call for every input shape of a run (see :func:`choose_view_batch`)."""
    sizes = {}
    for shape, counts in shape_counts.items():
        if view_batch_size == "auto":
            limit = auto_view_batch_limit(unet, shape, 2 if guided else 1, device)
        else:
            limit = int(view_batch_size)
        sizes[shape] = choose_view_batch(counts, limit)
    return sizes


def check_view_batch_size(value: int | str) -> int | str:
    if value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f'view_batch_size must be "auto" or an int >= 1; got {value!r}')
    return value


# --------------------------------------------------------------------------------------------------
# Schedulers
# --------------------------------------------------------------------------------------------------


def fresh_scheduler(template: Any, num_inference_steps: int, begin_index: int | None = 0,
                    scheduler_class: type | None = None, **overrides: Any) -> Any:
    """A new scheduler of ``template``'s class (or ``scheduler_class``) and config, with its
    timesteps set on the CPU.

    Schedulers keep internal step counters and multistep history, so every stage gets its own.
    Timesteps and tables stay on the CPU: ``step`` then reads them on the host, never the device.
    ``begin_index`` (when the scheduler supports ``set_begin_index``) is where the stage starts in
    the timestep list, so ``step`` never searches the timestep list.
    """
    cls = scheduler_class or type(template)
    scheduler = cls.from_config(template.config, **overrides)
    scheduler.set_timesteps(num_inference_steps, device="cpu")
    if begin_index is not None and hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(begin_index)
    return scheduler


def noising_coefficients(template: Any, num_inference_steps: int, timesteps: torch.Tensor,
                         scheduler_class: type | None = None,
                         **overrides: Any) -> tuple[list[float], list[float]]:
    """``(a_i, b_i)`` with ``scheduler.add_noise(z0, noise, t_i) == a_i * z0 + b_i * noise``.

    ``add_noise`` is linear in ``(z0, noise)``; it is evaluated once per stage on a fresh CPU copy
    of the scheduler for all the stage's timesteps, so that the noised copies ``z'_t`` can be formed
    on the fly in the step loop without host synchronisation (several schedulers search their
    timestep list inside ``add_noise``).
    """
    scheduler = fresh_scheduler(template, num_inference_steps, begin_index=None,
                                scheduler_class=scheduler_class, **overrides)
    count = timesteps.shape[0]
    ones, zeros = torch.ones(count), torch.zeros(count)
    scale = scheduler.add_noise(ones, zeros, timesteps)
    sigma = scheduler.add_noise(zeros, ones, timesteps)
    return scale.tolist(), sigma.tolist()


def step_kwargs(scheduler: Any, generator: torch.Generator | None) -> dict[str, Any]:
    """Keyword arguments for ``scheduler.step``: the generator where the scheduler takes one."""
    if "generator" in inspect.signature(scheduler.step).parameters:
        return {"generator": generator}
    return {}


# --------------------------------------------------------------------------------------------------
# Randomness, checks, progress
# --------------------------------------------------------------------------------------------------


def resolve_generator(generator: torch.Generator | None, device: torch.device) -> torch.Generator:
    """The caller's generator, or a new one on ``device`` seeded from torch's global CPU RNG (so
    ``torch.manual_seed`` before the call makes a run reproducible)."""
    if generator is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
        return torch.Generator(device=device).manual_seed(seed)
    if not isinstance(generator, torch.Generator):
        raise TypeError("generator must be one torch.Generator (lists of generators are not "
                        f"supported); got {type(generator).__name__}")
    return generator


def randn(shape: Sequence[int], generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Standard normal float32 noise drawn on the generator's device, then moved to ``device``."""
    noise = torch.randn(tuple(shape), generator=generator, device=generator.device,
                        dtype=torch.float32)
    return noise.to(device)


class FiniteWatch:
    """Per-step NaN/inf flags kept on the device; checked once per stage (one host sync)."""

    def __init__(self, sampler: str, stage: int, timesteps: Sequence[Any], device: torch.device):
        self.sampler, self.stage, self.timesteps = sampler, stage, list(timesteps)
        self.flags = torch.zeros(len(self.timesteps), dtype=torch.bool, device=device)

    def record(self, step: int, latents: torch.Tensor) -> None:
        self.flags[step] = ~torch.isfinite(latents).all()

    def check(self) -> None:
        if bool(self.flags.any()):
            step = int(self.flags.nonzero()[0, 0])
            raise NonFiniteLatentsError(self.sampler, self.stage, step, self.timesteps[step])


def progress_bar(total: int, description: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, disable=not enabled)


def run_callback(callback: StepCallback | None, stage: int, step: int, timestep: Any,
                 latents: torch.Tensor) -> torch.Tensor:
    """Call ``callback(stage, step, timestep, latents)``; a returned tensor replaces the latents."""
    if callback is None:
        return latents
    result = callback(stage, step, timestep, latents)
    if result is None:
        return latents
    if not isinstance(result, torch.Tensor) or result.shape != latents.shape:
        raise TypeError("callback_on_step_end must return None or a tensor shaped like the latents "
                        f"{tuple(latents.shape)}; got {type(result).__name__}")
    return result.to(latents.dtype)


def global_stats(x: torch.Tensor, per_channel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std (``torch.std``'s default correction) of each image ``[B]`` (or of each image's
    channels ``[B, C]``), in float32."""
    x = x.float()
    flat = x.flatten(2) if per_channel else x.flatten(1)
    return flat.mean(dim=-1), flat.std(dim=-1)


# --------------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------------


def check_output_type(output_type: str) -> None:
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}; got {output_type!r}")


@torch.no_grad()
def decode(pipe: Any, latents: torch.Tensor, output_type: str) -> Any:
    """Decode float32 latents with the pipeline's VAE into ``output_type`` images.

    As the diffusers pipelines do: an fp16 VAE with ``force_upcast`` decodes in fp32; latents are
    unscaled by ``scaling_factor`` (and ``latents_mean``/``latents_std`` where the VAE has them).
    Latents larger than the VAE's tile are decoded with diffusers' tiling, switched on for this
    call only. SD 1.5 pipelines run their safety checker when they have one.
    """
    if output_type == "latent":
        return latents
    vae = pipe.vae
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    original_dtype = vae.dtype
    if upcast:
        vae.to(dtype=torch.float32)
    mean = getattr(vae.config, "latents_mean", None)
    std = getattr(vae.config, "latents_std", None)
    z = latents.to(vae.dtype)
    if mean is not None and std is not None:
        channels = z.shape[1]
        mean_t = torch.tensor(mean, device=z.device, dtype=z.dtype).view(1, channels, 1, 1)
        std_t = torch.tensor(std, device=z.device, dtype=z.dtype).view(1, channels, 1, 1)
        z = z * std_t / vae.config.scaling_factor + mean_t
    else:
        z = z / vae.config.scaling_factor
    tile = getattr(vae, "tile_latent_min_size", None)
    enable_tiling = (hasattr(vae, "use_tiling") and not vae.use_tiling and tile is not None
                     and max(z.shape[-2:]) > tile)
    # Tiles of half the VAE's native size keep the fp32 decode's activations (about 5 GiB for a
    # 1024^2 SDXL tile) below what the sampling itself needs; diffusers blends the tile seams.
    tile_sizes = (getattr(vae, "tile_sample_min_size", None), tile)
    try:
        if enable_tiling:
            vae.enable_tiling()
            vae.tile_sample_min_size, vae.tile_latent_min_size = (tile_sizes[0] // 2, tile // 2)
        image = vae.decode(z, return_dict=False)[0]
    finally:
        if enable_tiling:
            vae.disable_tiling()
            vae.tile_sample_min_size, vae.tile_latent_min_size = tile_sizes
        if upcast:
            vae.to(dtype=original_dtype)
    do_denormalize = None
    if not is_sdxl(pipe) and getattr(pipe, "safety_checker", None) is not None:
        image, flagged = pipe.run_safety_checker(image, image.device, pipe.unet.dtype)
        if flagged is not None:
            do_denormalize = [not value for value in flagged]
    return pipe.image_processor.postprocess(image, output_type=output_type,
                                            do_denormalize=do_denormalize)

"""``hrkernels generate``: run a registered sampler (:data:`hrkernels.samplers.SAMPLERS`) on a
diffusers pipeline and save the image (and, when asked, every stage's preview).

``--model tiny-sd15`` / ``--model tiny-sdxl`` build :func:`hrkernels.testing.tiny_pipeline` (random
weights, nothing downloaded): the whole path runs anywhere, and the images are noise by
construction. Any other value is a local path or hub id loaded with
``DiffusionPipeline.from_pretrained``; it must be an SD 1.5/2.x or SDXL pipeline.

Example::

    hrkernels generate --model stabilityai/stable-diffusion-xl-base-1.0 --method demofusion \\
        --prompt "a castle on a hill" --height 2048 --width 2048 --out castle.png --previews stages/
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

TINY_MODELS = {"tiny-sd15": "sd15", "tiny-sdxl": "sdxl"}
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
SCHEDULERS = ("ddim", "euler", "dpm", "unipc")


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``generate`` options to ``parser`` (the ``generate`` subcommand's parser)."""
    from hrkernels.samplers import SAMPLERS

    parser.add_argument("--model", required=True,
                        help="a diffusers SD 1.5/2.x or SDXL pipeline (path or hub id), or "
                             "tiny-sd15 / tiny-sdxl (random tiny models: noise images, no "
                             "download)")
    parser.add_argument("--method", required=True, choices=sorted(SAMPLERS),
                        help="the high-resolution sampler")
    parser.add_argument("--prompt", required=True, help="text prompt")
    parser.add_argument("--negative-prompt", default=None, help="negative prompt")
    parser.add_argument("--height", type=int, default=None,
                        help="image height in pixels, a multiple of 8 (default: 2x the model's "
                             "base size)")
    parser.add_argument("--width", type=int, default=None,
                        help="image width in pixels, a multiple of 8 (default: 2x the model's base "
                             "size)")
    parser.add_argument("--steps", type=int, default=50, help="steps per stage (default: 50)")
    parser.add_argument("--guidance", type=float, default=7.5,
                        help="classifier-free guidance scale (default: 7.5)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--out", required=True, type=Path,
                        help="output image file (.png); several images get _1, _2, ... suffixes")
    parser.add_argument("--previews", type=Path, default=None,
                        help="directory for every stage's decoded preview (stage_<s>_<h>x<w>.png)")
    parser.add_argument("--scheduler", choices=SCHEDULERS, default=None,
                        help="replace the pipeline's scheduler (built from its config)")
    parser.add_argument("--view-batch-size", default="auto",
                        help='views per UNet call, or "auto" (default)')
    parser.add_argument("--device", default=None,
                        help="cuda, cpu, ... (default: cuda when available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="model dtype (default: fp16 on a GPU, fp32 on a CPU)")


def load_pipeline(model: str, device: str, dtype: Any, scheduler: str | None = None) -> Any:
    """The pipeline named by ``--model`` on ``device`` in ``dtype``, optionally with another
    scheduler class built from its scheduler's config."""
    from diffusers import (
        DDIMScheduler,
        DiffusionPipeline,
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
        UniPCMultistepScheduler,
    )

    from hrkernels.samplers._core import check_pipeline

    if model in TINY_MODELS:
        from hrkernels.testing import tiny_pipeline

        pipe = tiny_pipeline(TINY_MODELS[model], dtype=dtype, device=device)
    else:
        pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype)
        check_pipeline(pipe, "hrkernels generate")
        pipe = pipe.to(device)
    if scheduler is not None:
        classes = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler,
                   "dpm": DPMSolverMultistepScheduler, "unipc": UniPCMultistepScheduler}
        pipe.scheduler = classes[scheduler].from_config(pipe.scheduler.config)
    return pipe


def _output_paths(out: Path, count: int) -> list[Path]:
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{index}{out.suffix}") for index in range(1, count + 1)]


def run_generate(args: argparse.Namespace) -> int:
    """Run ``hrkernels generate``; returns the exit status (0, or 2 for a bad argument)."""
    import torch

    from hrkernels.samplers import SAMPLERS
    from hrkernels.samplers._core import base_latent_size, vae_scale_factor

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, DTYPES[args.dtype or ("fp16" if device.startswith("cuda") else "fp32")])
    view_batch_size: int | str = args.view_batch_size
    if view_batch_size != "auto":
        try:
            view_batch_size = int(view_batch_size)
        except ValueError:
            print(f'hrkernels generate: --view-batch-size must be "auto" or an int; got '
                  f"{args.view_batch_size!r}", file=sys.stderr)
            return 2
    try:
        pipe = load_pipeline(args.model, device, dtype, args.scheduler)
        base = base_latent_size(pipe) * vae_scale_factor(pipe)
        height, width = args.height or 2 * base, args.width or 2 * base
        sampler = SAMPLERS[args.method](pipe, view_batch_size=view_batch_size)
        generator = torch.Generator(device=device).manual_seed(args.seed)
        output = sampler(prompt=args.prompt, negative_prompt=args.negative_prompt, height=height,
                         width=width, num_inference_steps=args.steps,
                         guidance_scale=args.guidance, generator=generator, output_type="pil",
                         decode_stages=args.previews is not None, progress=True)
    except (TypeError, ValueError) as error:
        print(f"hrkernels generate: {error}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for image, path in zip(output.images, _output_paths(args.out, len(output.images)), strict=True):
        image.save(path)
        print(f"wrote {path} ({image.width}x{image.height})")
    if args.previews is not None:
        args.previews.mkdir(parents=True, exist_ok=True)
        for stage in output.stages:
            stem = f"stage_{stage.stage}_{stage.height}x{stage.width}"
            paths = _output_paths(args.previews / f"{stem}.png", len(stage.images))
            for path, image in zip(paths, stage.images, strict=True):
                image.save(path)
        print(f"wrote {len(output.stages)} stage previews to {args.previews}")
    return 0

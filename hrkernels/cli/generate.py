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
import inspect
import sys
from pathlib import Path
from typing import Any

from hrkernels.cli import DTYPES, default_device, resolve_dtype

NAME = "generate"
HELP = "generate a high-resolution image"
TINY_MODELS = {"tiny-sd15": "sd15", "tiny-sdxl": "sdxl"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``generate`` options to ``parser`` (the ``generate`` subcommand's parser)."""
    from hrkernels.samplers import SAMPLERS
    from hrkernels.samplers.schedulers import SCHEDULERS

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
    parser.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance scale (default: the method's, 7.5; "
                             "ScaleCrafter: 5.0 for SDXL)")
    parser.add_argument("--eta", type=float, default=None,
                        help="DDIM's eta (a stochastic DDIM step; the scheduler must take it)")
    parser.add_argument("--no-noise-damped", action="store_true",
                        help="scalecrafter: ordinary CFG instead of the preset's noise-damped "
                             "guidance")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--out", required=True, type=Path,
                        help="output image file (.png); several images get _1, _2, ... suffixes")
    parser.add_argument("--previews", type=Path, default=None,
                        help="directory for every stage's decoded preview (stage_<s>_<h>x<w>.png)")
    parser.add_argument("--scheduler", choices=sorted(SCHEDULERS), default=None,
                        help="sample with this scheduler class, built from the pipeline's "
                             "scheduler config (default: the method's choice)")
    parser.add_argument("--view-batch-size", default="auto",
                        help='views per UNet call, or "auto" (default)')
    parser.add_argument("--device", default=None,
                        help="cuda, cpu, ... (default: cuda when available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="model dtype (default: fp16 on a GPU, fp32 on a CPU)")


def load_pipeline(model: str, device: str, dtype: Any) -> Any:
    """The pipeline named by ``--model`` on ``device`` in ``dtype``."""
    from diffusers import DiffusionPipeline

    from hrkernels.samplers.pipelines import adapter_for

    if model in TINY_MODELS:
        from hrkernels.testing import tiny_pipeline

        return tiny_pipeline(TINY_MODELS[model], dtype=dtype, device=device)
    pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype)
    adapter_for(pipe, "hrkernels generate")
    return pipe.to(device)


def _output_paths(out: Path, count: int) -> list[Path]:
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{index}{out.suffix}") for index in range(1, count + 1)]


def _sampler_options(args: argparse.Namespace, sampler: type) -> dict[str, Any]:
    """The constructor options of the command line (raises ValueError for a bad one)."""
    from hrkernels.samplers.schedulers import SCHEDULERS

    options: dict[str, Any] = {"view_batch_size": args.view_batch_size}
    if args.view_batch_size != "auto":
        try:
            options["view_batch_size"] = int(args.view_batch_size)
        except ValueError:
            raise ValueError(f'--view-batch-size must be "auto" or an int; got '
                             f"{args.view_batch_size!r}") from None
    if args.no_noise_damped:
        if "noise_damped" not in inspect.signature(sampler).parameters:
            raise ValueError(f"--no-noise-damped: {args.method} has no noise-damped guidance")
        options["noise_damped"] = False
    if args.scheduler is not None:
        if "scheduler" not in inspect.signature(sampler).parameters:
            raise ValueError(f"--scheduler: {args.method} samples with its own scheduler "
                             f"({sampler.default_scheduler.__name__}); drop --scheduler")
        options["scheduler"] = SCHEDULERS[args.scheduler]
    return options


def run(args: argparse.Namespace) -> int:
    """Run ``hrkernels generate``; returns the exit status (0, or 2 for a bad argument)."""
    import torch

    from hrkernels.samplers import SAMPLERS

    device = default_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    sampler_class = SAMPLERS[args.method]
    try:
        options = _sampler_options(args, sampler_class)
        pipe = load_pipeline(args.model, device, dtype)
        sampler = sampler_class(pipe, **options)
        base = sampler.adapter.base_size
        height, width = args.height or 2 * base, args.width or 2 * base
        generator = torch.Generator(device=device).manual_seed(args.seed)
        output = sampler(prompt=args.prompt, negative_prompt=args.negative_prompt, height=height,
                         width=width, num_inference_steps=args.steps,
                         guidance_scale=args.guidance, eta=args.eta, generator=generator,
                         output_type="pil",
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

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
import os
import warnings
from pathlib import Path
from typing import Any

from hrkernels.cli import DTYPES, default_device, reports_usage_errors, resolve_dtype

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
    parser.add_argument("--fast-mode", action="store_true",
                        help="freescale: Scale Fusion's global branch within dilated sub-grids")
    parser.add_argument("--alpha", type=float, default=None,
                        help="freescale: the skip residual's exponent of c(t) (default 2)")
    parser.add_argument("--image", type=Path, default=None,
                        help="freescale: an existing image (file) that replaces the first "
                             "stage's result")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output image file (.png); several images get _1, _2, ... suffixes "
                             "(required unless --plan)")
    parser.add_argument("--previews", type=Path, default=None,
                        help="directory for every stage's decoded preview "
                             "(stage_<s>_<width>x<height>.png)")
    parser.add_argument("--scheduler", choices=sorted(SCHEDULERS), default=None,
                        help="sample with this scheduler class, built from the pipeline's "
                             "scheduler config (default: the method's choice)")
    parser.add_argument("--view-batch-size", default="auto",
                        help='views per UNet call, or "auto" (default)')
    parser.add_argument("--max-memory", type=float, default=None, metavar="GIB",
                        help="device memory the call may use in GiB, weights included (default: "
                             "on a GPU what is free, on a CPU no limit)")
    parser.add_argument("--plan", action="store_true",
                        help="print the memory plan (phases, estimates, choices) and exit "
                             "without sampling; exit status 2 if it does not fit")
    parser.add_argument("--device", default=None,
                        help="cuda, cpu, ... (default: cuda when available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="model dtype (default: fp16 on a GPU, fp32 on a CPU)")


def load_pipeline(model: str, device: str, dtype: Any) -> Any:
    """The pipeline named by ``--model`` on ``device`` in ``dtype``."""
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    from hrkernels.samplers.pipelines import adapter_for

    if model in TINY_MODELS:
        from hrkernels.testing import tiny_pipeline

        return tiny_pipeline(TINY_MODELS[model], dtype=dtype, device=device)
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # its retries and fallbacks; the failure is ours
    try:
        with warnings.catch_warnings():
            # diffusers 0.42 renames torch_dtype to dtype; older releases know only torch_dtype.
            warnings.filterwarnings("ignore", message=".*torch_dtype", category=FutureWarning)
            pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype)
    except (OSError, ValueError) as error:
        reason = " ".join(str(error).split())
        reason = reason if len(reason) <= 200 else reason[:197] + "..."
        raise ValueError(f"--model {model!r}: cannot load a diffusers pipeline ({reason}); pass a "
                         "folder with a model_index.json, a hub id that is reachable or cached, "
                         f"or one of {', '.join(TINY_MODELS)}") from None
    finally:
        diffusers_logging.set_verbosity(verbosity)
    adapter_for(pipe, "hrkernels generate")
    return pipe.to(device)


# Image file types --out may name (PIL writes them all).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def check_outputs(out: Path, previews: Path | None) -> None:
    """``--out`` names an image file in a folder that exists or can be created and is writable;
    ``--previews`` likewise a folder: checked before any work, so a bad path never costs a
    generation.

    Raises:
        ValueError: a file name without an image extension, a folder, or a place that cannot be
            written.
    """
    if out.suffix.lower() not in IMAGE_SUFFIXES:
        raise ValueError(f"--out {str(out)!r} must end in an image extension "
                         f"({', '.join(IMAGE_SUFFIXES)}); got {out.suffix or 'none'}")
    if out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a folder; name a file in it, e.g. "
                         f"{str(out / 'image.png')!r}")
    _check_writable_folder(out.parent, "--out", str(out))
    if previews is not None:
        if previews.exists() and not previews.is_dir():
            raise ValueError(f"--previews {str(previews)!r} is a file; name a folder")
        _check_writable_folder(previews, "--previews", str(previews))


def _check_writable_folder(folder: Path, option: str, given: str) -> None:
    """``folder`` exists and is writable, or its nearest existing ancestor is a writable folder
    (where it will be created)."""
    existing = folder.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{option} {given!r}: {str(existing)!r} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {given!r}: the folder {str(existing)!r} is not writable; "
                         "choose another place")


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
    for flag, option, value, given in (
            ("--no-noise-damped", "noise_damped", False, args.no_noise_damped),
            ("--fast-mode", "fast_mode", True, args.fast_mode),
            ("--alpha", "alpha", args.alpha, args.alpha is not None)):
        if given:
            if option not in inspect.signature(sampler).parameters:
                raise ValueError(f"{flag}: {args.method} takes no {option}")
            options[option] = value
    if args.scheduler is not None:
        if "scheduler" not in inspect.signature(sampler).parameters:
            raise ValueError(f"--scheduler: {args.method} samples with its own scheduler "
                             f"({sampler.default_scheduler.__name__}); drop --scheduler")
        options["scheduler"] = SCHEDULERS[args.scheduler]
    return options


def _call_options(args: argparse.Namespace, sampler: type) -> dict[str, Any]:
    """The method's call options of the command line (``--image``)."""
    if args.image is None:
        return {}
    if "image" not in inspect.signature(sampler.__call__).parameters:
        raise ValueError(f"--image: {args.method} takes no input image")
    from PIL import Image, UnidentifiedImageError

    try:
        return {"image": Image.open(args.image).convert("RGB")}
    except (OSError, UnidentifiedImageError) as error:
        raise ValueError(f"--image: cannot read {args.image}: {error}") from None


def _max_memory(gib: float | None) -> int | None:
    """``--max-memory`` (GiB) in bytes."""
    if gib is None:
        return None
    if not gib > 0 or gib == float("inf"):
        raise ValueError(f"--max-memory must be a positive number of GiB; got {gib}")
    return int(gib * 2**30)


@reports_usage_errors(NAME)
def run(args: argparse.Namespace) -> int:
    """Run ``hrkernels generate``; returns the exit status (0, or 2 for a bad argument, device,
    backend, model or output path, or a call whose memory plan does not fit: one line on stderr,
    before any model work where it can be known then). ``--plan`` prints the memory plan
    (:func:`hrkernels.plan`) and exits without sampling."""
    import torch

    from hrkernels.ops._backend import check_backend
    from hrkernels.samplers import SAMPLERS

    device = default_device(args.device)
    check_backend(torch.device(device))
    dtype = resolve_dtype(args.dtype, device)
    if args.out is None and not args.plan:
        raise ValueError("--out is required (an image file to write), unless --plan")
    if args.out is not None:
        check_outputs(args.out, args.previews)
    max_memory = _max_memory(args.max_memory)
    sampler_class = SAMPLERS[args.method]
    options = _sampler_options(args, sampler_class)
    pipe = load_pipeline(args.model, device, dtype)
    sampler = sampler_class(pipe, **options)
    base = sampler.adapter.base_size
    height, width = args.height or 2 * base, args.width or 2 * base
    call_options = _call_options(args, sampler_class)
    if args.plan:
        from hrkernels.planner import plan

        print(plan(sampler, height, width, 1, max_memory, num_inference_steps=args.steps,
                   guidance_scale=args.guidance, options=call_options))
        return 0
    generator = torch.Generator(device=device).manual_seed(args.seed)
    output = sampler(prompt=args.prompt, negative_prompt=args.negative_prompt, height=height,
                     width=width, num_inference_steps=args.steps,
                     guidance_scale=args.guidance, eta=args.eta, generator=generator,
                     output_type="pil",
                     decode_stages=args.previews is not None, progress=True,
                     max_memory=max_memory, **call_options)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for image, path in zip(output.images, _output_paths(args.out, len(output.images)), strict=True):
        image.save(path)
        print(f"wrote {path} ({image.width}x{image.height})")
    if args.previews is not None:
        args.previews.mkdir(parents=True, exist_ok=True)
        for stage in output.stages:
            stem = f"stage_{stage.stage}_{stage.width}x{stage.height}"  # W x H, as --out's
            paths = _output_paths(args.previews / f"{stem}.png", len(stage.images))
            for path, image in zip(paths, stage.images, strict=True):
                image.save(path)
        print(f"wrote {len(output.stages)} stage previews to {args.previews}")
    return 0

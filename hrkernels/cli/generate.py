"""``hrkernels generate``: run a registered sampler (:data:`hrkernels.samplers.SAMPLERS`) on a
diffusers pipeline and save the image (and, when asked, every stage's preview).

``--model tiny-sd15`` / ``tiny-sdxl`` / ``tiny-if`` / ``tiny-if-sr`` / ``tiny-sd3`` build
:func:`hrkernels.testing.tiny_pipeline` (random weights, nothing downloaded): the whole path runs
anywhere, and the images are noise by construction. Any other value is a local path or hub id
loaded with ``DiffusionPipeline.from_pretrained``; it must be a pipeline the method supports (SD
1.5/2.x, SDXL; MegaFusion also DeepFloyd IF stage I / II and SD3).

Several processes (``torchrun``; docs/DESIGN.md, "Distributed"): with ``--prompt`` every rank
works on the one image (``--parallel views`` or ``cfg``; rank 0 writes it); with ``--prompts FILE
--out-dir DIR`` the lines are dealt out over the ranks (:mod:`hrkernels.distributed.prompts`),
each rank writing its own images, and a rerun skips the images already written.

Example::

    hrkernels generate --model stabilityai/stable-diffusion-xl-base-1.0 --method demofusion \\
        --prompt "a castle on a hill" --height 2048 --width 2048 --out castle.png --previews stages/
    torchrun --nproc-per-node 4 -m hrkernels generate --model ... --method demofusion \\
        --prompt "a castle on a hill" --height 4096 --width 4096 --out castle.png
    torchrun --nproc-per-node 8 -m hrkernels generate --model ... --method apt \\
        --prompts prompts.txt --out-dir out/
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
TINY_MODELS = {"tiny-sd15": "sd15", "tiny-sdxl": "sdxl", "tiny-if": "if", "tiny-if-sr": "if-sr",
               "tiny-sd3": "sd3"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``generate`` options to ``parser`` (the ``generate`` subcommand's parser)."""
    from hrkernels.samplers import SAMPLERS
    from hrkernels.samplers.schedulers import SCHEDULERS

    parser.add_argument("--model", required=True,
                        help="a diffusers pipeline (path or hub id): SD 1.5/2.x or SDXL "
                             "(megafusion also DeepFloyd IF stage I / II and SD3), or tiny-sd15 / "
                             "tiny-sdxl / tiny-if / tiny-if-sr / tiny-sd3 (random tiny models: "
                             "noise images, no download)")
    parser.add_argument("--method", required=True, choices=sorted(SAMPLERS),
                        help="the high-resolution sampler")
    parser.add_argument("--prompt", default=None, help="text prompt (or --prompts)")
    parser.add_argument("--prompts", type=Path, default=None,
                        help="a file of prompts, one per line or a JSON object per line with "
                             "prompt, negative_prompt, seed, height, width: one image per line "
                             "into --out-dir (line<n>.png), dealt out over the ranks of a "
                             "torchrun job; images already there are skipped")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="with --prompts: the folder of the images")
    parser.add_argument("--negative-prompt", default=None, help="negative prompt")
    parser.add_argument("--height", type=int, default=None,
                        help="image height in pixels, a multiple of 8 (default: 2x the model's "
                             "base size)")
    parser.add_argument("--width", type=int, default=None,
                        help="image width in pixels, a multiple of 8 (default: 2x the model's base "
                             "size)")
    parser.add_argument("--steps", type=int, default=None,
                        help="steps per stage (default: 50); megafusion: the steps of the one "
                             "sequence its stages share (default: the sum of --stages, or the "
                             "model's: 50; IF stage I 100; SD3 28)")
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
                        help="an existing image (file) to upscale: it replaces the first stage's "
                             "result (scalecrafter: image-to-image at the target size; megafusion "
                             "on IF stage II: the low-resolution image it upscales); its aspect "
                             "ratio must be the target's (default size: 2x the base size at the "
                             "image's aspect ratio)")
    parser.add_argument("--fidelity", type=float, default=None,
                        help="with --image: how much of the image is kept, in [0, 1] (default: "
                             "the method's own behaviour; see each sampler's docstring)")
    parser.add_argument("--controlnet", default=None,
                        help="a diffusers ControlNetModel (path or hub id), or tiny (a random "
                             "tiny ControlNet for --model tiny-*); needs --control-image")
    parser.add_argument("--control-image", type=Path, default=None,
                        help="the ControlNet's control image (file), of the target's aspect "
                             "ratio")
    parser.add_argument("--stages", default=None,
                        help="megafusion: each stage's long side in pixels and its steps, "
                             "ascending, the last the target's long side, e.g. 1024:40,2048:10 "
                             "(default: the model's)")
    parser.add_argument("--mega-plus", action="store_true",
                        help="megafusion: MegaFusion++ (mid block dilated, noise re-scheduled "
                             "above the base size)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output image file (.png); several images get _1, _2, ... suffixes "
                             "(required with --prompt, unless --plan)")
    parser.add_argument("--parallel", choices=("views", "cfg"), default=None,
                        help="under torchrun with --prompt: share every step's views "
                             "(demofusion, apt; the default for them) or guidance branches "
                             "(every method; the default for the others) across the ranks")
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


def load_controlnet(name: str, model: str, pipe: Any, dtype: Any) -> Any:
    """The ControlNet named by ``--controlnet`` (``tiny``: :func:`hrkernels.testing.tiny_controlnet`
    of a tiny pipeline), and ``pipe`` as its ControlNet pipeline
    (:func:`hrkernels.samplers.inputs.with_controlnet`)."""
    from hrkernels.samplers.inputs import with_controlnet

    if name == "tiny":
        if model not in TINY_MODELS:
            raise ValueError(f"--controlnet tiny: only with --model {' / '.join(TINY_MODELS)}; "
                             "pass a ControlNet path or hub id for other models")
        from hrkernels.testing import tiny_controlnet

        controlnet = tiny_controlnet(pipe)
    else:
        from diffusers import ControlNetModel

        try:
            controlnet = ControlNetModel.from_pretrained(name, torch_dtype=dtype)
        except (OSError, ValueError) as error:
            reason = " ".join(str(error).split())[:200]
            raise ValueError(f"--controlnet {name!r}: cannot load a diffusers ControlNetModel "
                             f"({reason})") from None
        controlnet = controlnet.to(pipe.device)
    return with_controlnet(pipe, controlnet)


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
            ("--alpha", "alpha", args.alpha, args.alpha is not None),
            ("--stages", "stages", args.stages, args.stages is not None),
            ("--mega-plus", "mega_plus", True, args.mega_plus)):
        if given:
            if option not in inspect.signature(sampler).parameters:
                raise ValueError(f"{flag}: {args.method} takes no {option}")
            options[option] = parse_stages(value) if option == "stages" else value
    if args.scheduler is not None:
        if "scheduler" not in inspect.signature(sampler).parameters:
            raise ValueError(f"--scheduler: {args.method} samples with its own scheduler "
                             f"({sampler.default_scheduler.__name__}); drop --scheduler")
        options["scheduler"] = SCHEDULERS[args.scheduler]
    return options


def parse_stages(text: str) -> list[tuple[int, int]]:
    """``--stages 1024:40,2048:10`` -> ``[(1024, 40), (2048, 10)]`` (the sampler checks the
    values).

    Raises:
        ValueError: not comma-separated ``SIZE:STEPS`` pairs of integers.
    """
    stages = []
    for part in text.split(","):
        size, _, steps = part.strip().partition(":")
        try:
            stages.append((int(size), int(steps)))
        except ValueError:
            raise ValueError(f"--stages must be comma-separated SIZE:STEPS pairs of integers, "
                             f"e.g. 1024:40,2048:10; got {text!r}") from None
    return stages


def _read_image(path: Path, flag: str) -> Any:
    """The image file ``path`` as a PIL image (its alpha channel kept: the samplers composite
    it)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return image
    except (OSError, UnidentifiedImageError) as error:
        raise ValueError(f"{flag}: cannot read {path}: {error}") from None


def _call_options(args: argparse.Namespace) -> dict[str, Any]:
    """The input images of the command line (``--image``, ``--fidelity``, ``--control-image``),
    read before any model is loaded."""
    if (args.controlnet is None) != (args.control_image is None):
        raise ValueError("--controlnet and --control-image go together; pass both or neither")
    if args.fidelity is not None and args.image is None:
        raise ValueError("--fidelity applies to --image; pass an image")
    options: dict[str, Any] = {}
    if args.image is not None:
        options["image"] = _read_image(args.image, "--image")
        options["fidelity"] = args.fidelity
    if args.control_image is not None:
        options["control_image"] = _read_image(args.control_image, "--control-image")
    return options


def _default_size(base: int, image: Any) -> tuple[int, int]:
    """``(height, width)`` when the command line gives none: 2x the base size on the long side,
    at ``image``'s aspect ratio when there is one (multiples of 8)."""
    if image is None:
        return 2 * base, 2 * base
    width, height = image.size
    scale = 2 * base / max(width, height)
    return (max(8, round(height * scale / 8) * 8), max(8, round(width * scale / 8) * 8))


def _check_modes(args: argparse.Namespace, sampler: type) -> None:
    """One image (``--prompt``, ``--out``) or a prompt file (``--prompts``, ``--out-dir``)."""
    if (args.prompt is None) == (args.prompts is None):
        raise ValueError("pass exactly one of --prompt (one image, --out) and --prompts (a file "
                         "of prompts, --out-dir)")
    if args.prompt is not None:
        if args.out is None and not args.plan:
            raise ValueError("--prompt needs --out (the image file), unless --plan")
        if args.out_dir is not None:
            raise ValueError("--out-dir goes with --prompts; with --prompt name the file with "
                             "--out")
        if args.parallel is not None and args.parallel not in sampler.parallel_modes:
            raise ValueError(f"--parallel {args.parallel}: {args.method} shares "
                             f"{' or '.join(sampler.parallel_modes)} across ranks")
        return
    if args.plan:
        raise ValueError("--plan goes with --prompt (the plan of one image)")
    if args.out_dir is None:
        raise ValueError("--prompts needs --out-dir (the folder of the images)")
    for flag, given in (("--out", args.out is not None), ("--previews", args.previews is not None),
                        ("--parallel", args.parallel is not None),
                        ("--image", args.image is not None)):
        if given:
            raise ValueError(f"{flag} goes with --prompt, not --prompts (every line is its own "
                             "image, made by one rank)")
    if args.out_dir.exists() and not args.out_dir.is_dir():
        raise ValueError(f"--out-dir {str(args.out_dir)!r} is a file; name a folder")
    _check_writable_folder(args.out_dir, "--out-dir", str(args.out_dir))


def _rank_device(device: str) -> str:
    """``--device`` on this rank: a bare ``cuda`` is the rank's GPU (``LOCAL_RANK``) when
    ``torchrun`` started several processes."""
    from hrkernels import distributed

    if device == "cuda" and distributed.world_size() > 1:
        return f"cuda:{distributed.local_rank()}"
    return device


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
    before any model work where it can be known then; every rank of a ``torchrun`` job checks the
    same and fails the same). ``--plan`` prints the memory plan (:func:`hrkernels.plan`) and exits
    without sampling."""
    import torch

    from hrkernels import distributed
    from hrkernels.ops._backend import check_backend
    from hrkernels.samplers import SAMPLERS

    device = _rank_device(default_device(args.device))
    check_backend(torch.device(device))
    dtype = resolve_dtype(args.dtype, device)
    max_memory = _max_memory(args.max_memory)
    sampler_class = SAMPLERS[args.method]
    _check_modes(args, sampler_class)
    if args.prompts is not None:
        return _run_prompts(args, sampler_class, device, dtype)
    if args.out is not None:
        check_outputs(args.out, args.previews)
    options = _sampler_options(args, sampler_class)
    call_options = _call_options(args)
    if distributed.world_size() > 1:
        distributed.init("nccl" if device.startswith("cuda") else "gloo")
        options["parallel"] = args.parallel or sampler_class.parallel_modes[0]
    pipe = load_pipeline(args.model, device, dtype)
    if args.controlnet is not None:
        pipe = load_controlnet(args.controlnet, args.model, pipe, dtype)
    sampler = sampler_class(pipe, **options)
    default_height, default_width = _default_size(sampler.adapter.base_size,
                                                  call_options.get("image"))
    height, width = args.height or default_height, args.width or default_width
    if args.plan:
        from hrkernels.planner import plan

        print(plan(sampler, height, width, 1, max_memory,
                   num_inference_steps=args.steps or sampler.default_steps(),
                   guidance_scale=args.guidance, options=call_options))
        return 0
    generator = torch.Generator(device=device).manual_seed(args.seed)
    steps = {} if args.steps is None else {"num_inference_steps": args.steps}
    output = sampler(prompt=args.prompt, negative_prompt=args.negative_prompt, height=height,
                     width=width, **steps,
                     guidance_scale=args.guidance, eta=args.eta, generator=generator,
                     output_type="pil",
                     decode_stages=args.previews is not None, progress=True,
                     max_memory=max_memory, **call_options)
    if not distributed.is_main():
        return 0  # rank 0 writes the files
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


def _run_prompts(args: argparse.Namespace, sampler_class: type, device: str, dtype: Any) -> int:
    """``--prompts``: this rank's lines of the file (:mod:`hrkernels.distributed.prompts`), each
    image written once; lines whose image exists are skipped."""
    import torch

    from hrkernels import distributed
    from hrkernels.distributed.prompts import image_path, read_prompts, share, write_image

    jobs = read_prompts(args.prompts)
    rank, world = distributed.rank(), distributed.world_size()
    mine = share(jobs, rank, world)
    pending = [job for job in mine if not image_path(args.out_dir, job).exists()]
    label = f"rank {rank} of {world}: " if world > 1 else ""
    print(f"{label}{len(mine) - len(pending)} of {len(mine)} images already in {args.out_dir}, "
          f"{len(pending)} to make")
    if not pending:
        return 0
    options = _sampler_options(args, sampler_class)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(args.model, device, dtype)
    sampler = sampler_class(pipe, **options)
    base = sampler.adapter.base_size
    sizes = {job.line: (job.height or args.height or 2 * base, job.width or args.width or 2 * base)
             for job in jobs}
    for job in jobs:  # every size checked (closed form) before any image: every rank the same
        try:
            sampler.view_plan(*sizes[job.line], args.steps)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{args.prompts}:{job.line}: {error}") from None
    for job in pending:
        height, width = sizes[job.line]
        seed = args.seed if job.seed is None else job.seed
        output = sampler(prompt=job.prompt, negative_prompt=(job.negative_prompt
                                                             or args.negative_prompt),
                         height=height, width=width, num_inference_steps=args.steps,
                         guidance_scale=args.guidance, eta=args.eta,
                         generator=torch.Generator(device=device).manual_seed(seed),
                         output_type="pil", progress=distributed.is_main())
        path = image_path(args.out_dir, job)
        write_image(output.images[0], path)
        print(f"{label}wrote {path} ({width}x{height}, line {job.line})")
    return 0

"""End-to-end sampler benchmarks on the lent GPU: seconds, peak memory and the "UNet floor".

Each run builds (or reuses) ``hrkernels.testing.random_pipeline("sdxl", torch.float16, "cuda",
with_text_encoders=False)`` -- the real SDXL UNet and VAE with random weights -- and samples one
image from random ``prompt_embeds``/``pooled_prompt_embeds`` (SDXL's empty negative prompt is
zeros), decoding it to PIL as a user's call would.

* ``seconds``: wall time of the measured call (after a warm-up call at the same size of
  ``warmup_steps`` steps, 1 unless the method needs one per stage (MegaFusion), which compiles
  every UNet shape when ``compile`` is on), with ``torch.cuda.synchronize`` on both ends.
* ``peak_gib``: ``torch.cuda.max_memory_allocated`` during the measured call.
* ``unet_floor_s``: the time of the UNet evaluations alone at the same batch shapes and counts:
  for every distinct input shape the sampler reports (``SamplerOutput.unet_calls``), the median of
  ``repeats`` CUDA-event-timed UNet calls on random inputs of that shape, times the number of calls
  of that shape. ``overhead = seconds / unet_floor_s`` (the targets: <= 1.10).

Usage (on the GPU)::

    E2E=demofusion-2048,apt-2048 bench/gpu.sh e2e          # writes e2e.json and e2e.md
    python -m hrkernels.bench.e2e demofusion-4096 --out bench/results/gpu-latest

Each run prints one JSON object (the dict :func:`run_e2e` returns); :data:`CASES` lists the runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch


def build_pipeline(compile: bool | str = False) -> Any:
    """The benchmark pipeline: full-size SDXL, random weights, fp16, CUDA, no text encoders.

    ``compile``: False, True (``torch.compile`` default mode) or a mode name; the UNet is compiled
    in place with ``fullgraph=True, dynamic=False`` (one graph per input shape).
    """
    from hrkernels.testing import random_pipeline

    pipe = random_pipeline("sdxl", torch.float16, "cuda", with_text_encoders=False)
    if compile:
        mode = None if compile is True or compile == "default" else compile
        pipe.unet.compile(fullgraph=True, dynamic=False, mode=mode)
    return pipe


def _embeds(pipe: Any, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator("cuda").manual_seed(seed)
    dim = pipe.unet.config.cross_attention_dim
    pooled = pipe.unet.config.projection_class_embeddings_input_dim - 6 * \
        pipe.unet.config.addition_time_embed_dim
    dtype = pipe.unet.dtype
    return {
        "prompt_embeds": torch.randn(1, 77, dim, generator=generator, device="cuda", dtype=dtype),
        "pooled_prompt_embeds": torch.randn(1, pooled, generator=generator, device="cuda",
                                            dtype=dtype),
    }


def unet_floor(pipe: Any, unet_calls: dict[tuple[int, int, int], int],
               repeats: int = 5) -> tuple[float, dict[str, float]]:
    """Seconds the UNet alone takes for ``unet_calls`` (``{(rows, h, w): count}``), and the median
    milliseconds per call of each shape."""
    unet, dtype = pipe.unet, pipe.unet.dtype
    config = unet.config
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    total, per_call = 0.0, {}
    for (rows, height, width), count in sorted(unet_calls.items()):
        generator = torch.Generator("cuda").manual_seed(0)
        kwargs = {
            "encoder_hidden_states": torch.randn(rows, 77, config.cross_attention_dim,
                                                 generator=generator, device="cuda", dtype=dtype),
            "added_cond_kwargs": {
                "text_embeds": torch.randn(rows, pooled, generator=generator, device="cuda",
                                           dtype=dtype),
                "time_ids": torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]],
                                         device="cuda", dtype=dtype).repeat(rows, 1),
            },
            "return_dict": False,
        }
        sample = torch.randn(rows, config.in_channels, height, width, generator=generator,
                             device="cuda", dtype=dtype)
        timestep = torch.tensor(500.0, device="cuda")
        times = []
        with torch.no_grad():
            for _ in range(2):
                unet(sample, timestep, **kwargs)
            for _ in range(repeats):
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                unet(sample, timestep, **kwargs)
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
        milliseconds = statistics.median(times)
        per_call[f"{rows}x{height}x{width}"] = milliseconds
        total += milliseconds / 1000 * count
    return total, per_call


def run_e2e(method: str = "demofusion", size: int = 2048, steps: int = 50,
            view_batch_size: int | str = 16, compile: bool | str = False, pipe: Any = None,
            repeats: int = 5, warmup_steps: int = 1, **sampler_kwargs: Any) -> dict[str, Any]:
    """Time one ``size x size`` image with a registered sampler; see the module docstring.

    ``warmup_steps``: steps of the warm-up call (a method whose stages split one step sequence,
    MegaFusion, needs at least one per stage)."""
    import triton

    from hrkernels.samplers import SAMPLERS

    if not torch.cuda.is_available():
        raise RuntimeError("the end-to-end benchmarks need a CUDA GPU")
    pipe = pipe if pipe is not None else build_pipeline(compile)
    sampler = SAMPLERS[method](pipe, view_batch_size=view_batch_size, **sampler_kwargs)
    call = {**_embeds(pipe), "height": size, "width": size, "progress": False}
    sampler(**call, num_inference_steps=warmup_steps, output_type="latent",
            generator=torch.Generator("cuda").manual_seed(0))  # warm-up (and compilation)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out = sampler(**call, num_inference_steps=steps, output_type="pil",
                  generator=torch.Generator("cuda").manual_seed(0))
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30
    floor, per_call = unet_floor(pipe, out.unet_calls, repeats)
    return {
        "method": method,
        "size": size,
        "steps": steps,
        "view_batch_size": view_batch_size,
        "compile": compile,
        "sampler_kwargs": sampler_kwargs,
        "seconds": seconds,
        "peak_gib": peak,
        "unet_floor_s": floor,
        "overhead": seconds / floor,
        "unet_calls": {f"{r}x{h}x{w}": n for (r, h, w), n in sorted(out.unet_calls.items())},
        "unet_ms_per_call": per_call,
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
    }


def demofusion_e2e(size: int = 2048, steps: int = 50, view_batch_size: int | str = 16,
                   compile: bool | str = False, pipe: Any = None) -> dict[str, Any]:
    """DemoFusion, one ``size^2`` image (anchor at 2048^2 / 50 steps / 16 views: 48.0 s, 12.5 GiB,
    UNet work 30.3 s)."""
    return run_e2e("demofusion", size, steps, view_batch_size, compile, pipe)


def apt_e2e(size: int = 2048, steps: int = 50, view_batch_size: int | str = 16,
            compile: bool | str = False, pipe: Any = None,
            shortcut_steps: int | None = 30) -> dict[str, Any]:
    """APT with the ``shortcut_steps`` shortcut (APT samples with DDIM), one ``size^2`` image."""
    return run_e2e("apt", size, steps, view_batch_size, compile, pipe,
                   shortcut_steps=shortcut_steps)


# Named runs for ``bench/gpu.sh e2e`` (``E2E=name,name,...``; default: the eager 2048^2 ones).
CASES: dict[str, dict[str, Any]] = {
    "demofusion-2048": {"method": "demofusion", "size": 2048, "view_batch_size": 16},
    "demofusion-2048-auto": {"method": "demofusion", "size": 2048, "view_batch_size": "auto"},
    "apt-2048": {"method": "apt", "size": 2048, "view_batch_size": 16},
    "demofusion-4096": {"method": "demofusion", "size": 4096, "view_batch_size": 16},
    "demofusion-2048-compile": {"method": "demofusion", "size": 2048, "view_batch_size": 16,
                                "compile": "default"},
    "demofusion-2048-cudagraphs": {"method": "demofusion", "size": 2048, "view_batch_size": 16,
                                   "compile": "reduce-overhead"},
    "apt-2048-compile": {"method": "apt", "size": 2048, "view_batch_size": 16,
                         "compile": "default"},
    "scalecrafter-2048": {"method": "scalecrafter", "size": 2048, "view_batch_size": "auto"},
    "scalecrafter-2048-compile": {"method": "scalecrafter", "size": 2048,
                                  "view_batch_size": "auto", "compile": "default"},
    # FreeScale's later stages restart at t <= 700: a warm-up of 2 steps reaches every stage.
    "freescale-2048": {"method": "freescale", "size": 2048, "view_batch_size": "auto",
                       "warmup_steps": 2},
    "freescale-2048-compile": {"method": "freescale", "size": 2048, "view_batch_size": "auto",
                               "compile": "default", "warmup_steps": 2},
    "freescale-4096": {"method": "freescale", "size": 4096, "view_batch_size": "auto",
                       "warmup_steps": 2},
    "freescale-8192": {"method": "freescale", "size": 8192, "view_batch_size": "auto",
                       "warmup_steps": 2},
    # SDXL 1024 -> 2048, 40 + 10 of 50 steps (the default stages), MegaFusion++; one view per
    # image, so the view batch is 1.
    "megafusion-plus-2048": {"method": "megafusion", "size": 2048, "view_batch_size": 1,
                             "mega_plus": True, "warmup_steps": 2},
    "megafusion-plus-2048-compile": {"method": "megafusion", "size": 2048, "view_batch_size": 1,
                                     "mega_plus": True, "warmup_steps": 2, "compile": "default"},
}
DEFAULT_CASES = ("demofusion-2048", "demofusion-2048-auto", "apt-2048")
# The diffusers community DemoFusion pipeline on the same kind of machine (issue 5), and the
# authors' ScaleCrafter, FreeScale and MegaFusion++ (SDXL, 40 + 10 steps) code (issue 18).
ANCHORS = {
    ("demofusion", 2048): {"seconds": 48.0, "peak_gib": 12.5, "unet_floor_s": 30.3},
    ("demofusion", 4096): {"seconds": 362.0, "peak_gib": 13.0, "unet_floor_s": 218.0},
    ("scalecrafter", 2048): {"seconds": 16.9, "peak_gib": 10.1},
    ("freescale", 2048): {"seconds": 24.7, "peak_gib": 10.1},
    ("freescale", 4096): {"seconds": 196.1, "peak_gib": 12.1},
    ("megafusion", 2048): {"seconds": 7.3, "peak_gib": 14.6},
}


def _markdown(results: list[dict[str, Any]]) -> str:
    lines = ["| case | s | peak GiB | UNet floor s | overhead | anchor s / GiB |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]
    for result in results:
        anchor = ANCHORS.get((result["method"], result["size"]))
        anchor_text = f"{anchor['seconds']:.1f} / {anchor['peak_gib']:.1f}" if anchor else ""
        lines.append(f"| {result['case']} | {result['seconds']:.1f} | {result['peak_gib']:.2f} | "
                     f"{result['unet_floor_s']:.1f} | {result['overhead']:.3f}x | {anchor_text} |")
    if results:
        first = results[0]
        lines.append(f"\n{first['gpu']}, CUDA {first['cuda']}, torch {first['torch']}, "
                     f"triton {first['triton']}")
    return "\n".join(lines) + "\n"


def run_cases(names: list[str]) -> list[dict[str, Any]]:
    """Run the named :data:`CASES`, sharing one pipeline per compile setting."""
    unknown = [name for name in names if name not in CASES]
    if unknown:
        raise ValueError(f"unknown e2e cases {unknown}; known: {sorted(CASES)}")
    pipes: dict[Any, Any] = {}
    results = []
    for name in names:
        case = dict(CASES[name])
        compile_mode = case.pop("compile", False)
        if compile_mode not in pipes:
            pipes.clear()  # one full-size pipeline on the GPU at a time
            torch.cuda.empty_cache()
            pipes[compile_mode] = build_pipeline(compile_mode)
        result = run_e2e(compile=compile_mode, pipe=pipes[compile_mode], **case)
        result["case"] = name
        print(json.dumps(result), flush=True)
        results.append(result)
    return results


def main(out_dir: str | None = None) -> int:
    """``bench/gpu.sh e2e``: run ``$E2E`` (comma-separated :data:`CASES` names) and write
    ``e2e.json`` and ``e2e.md`` into ``out_dir``."""
    import os
    from pathlib import Path

    names = [n for n in os.environ.get("E2E", ",".join(DEFAULT_CASES)).split(",") if n]
    results = run_cases(names)
    if out_dir is not None:
        directory = Path(out_dir)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "e2e.json").write_text(json.dumps(results, indent=2))
        (directory / "e2e.md").write_text(_markdown(results))
    print(_markdown(results))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m hrkernels.bench.e2e",
                                     description="End-to-end sampler benchmarks (CUDA).")
    parser.add_argument("cases", nargs="*", default=list(DEFAULT_CASES), choices=sorted(CASES))
    parser.add_argument("--out", default=None, help="directory for e2e.json and e2e.md")
    arguments = parser.parse_args()
    os_environ_cases = ",".join(arguments.cases)
    import os

    os.environ["E2E"] = os_environ_cases
    raise SystemExit(main(arguments.out))

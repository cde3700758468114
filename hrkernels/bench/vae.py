"""The exact tiled VAE on the lent GPU: time, peak memory and exactness against the untiled decode
and diffusers' tiling (``bench/gpu.sh vae`` calls :func:`main`).

SDXL's VAE topology with random weights in fp16 (``force_upcast`` off, so every path runs in fp16),
one image per size. For each size (2048^2, 4096^2, 8192^2):

* ``untiled``: ``vae.decode`` (skipped when it does not fit: the out-of-memory error is recorded);
* ``diffusers-tiling``: ``vae.enable_tiling()`` then ``vae.decode`` (per-tile GroupNorm, blended
  seams: not exact);
* ``hrkernels``: :func:`hrkernels.vae.decode` with the default budget (what is free), and with a
  2 GiB budget.

``peak_gib`` is ``torch.cuda.max_memory_allocated`` during the call minus what was allocated
before it and minus the output (activations and workspace only, as ``max_memory`` counts them);
``relative_l2`` is against the untiled fp16 decode where that ran. One timed run after one
warm-up run at the same size (these calls take seconds). Writes ``vae.json`` and ``vae.md``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from hrkernels.bench.harness import write_document

__all__ = ["SIZES", "main", "measure"]

SIZES = (2048, 4096, 8192)
SMALL_BUDGET = 2 * 2**30


def _sdxl_vae() -> Any:
    from diffusers import AutoencoderKL

    from hrkernels.testing import random_pipeline

    config = random_pipeline("sdxl", device="meta", with_text_encoders=False).vae.config
    torch.manual_seed(0)
    vae = AutoencoderKL.from_config({**config, "force_upcast": False})
    return vae.to("cuda", torch.float16).eval()


def measure(function: Callable[[], torch.Tensor], warmup: bool = True
            ) -> tuple[torch.Tensor | None, dict[str, Any]]:
    """Run ``function`` (after one warm-up run): its output and ``{seconds, peak_gib}``, or
    ``{error}`` when it runs out of memory."""
    try:
        if warmup:
            function()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        with torch.inference_mode():
            out = function()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    except torch.cuda.OutOfMemoryError as error:
        torch.cuda.empty_cache()
        return None, {"error": "out of memory: " + str(error).splitlines()[0][:160]}
    peak = torch.cuda.max_memory_allocated() - base - out.numel() * out.element_size()
    return out, {"seconds": seconds, "peak_gib": peak / 2**30}


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


def bench_size(vae: Any, side: int) -> dict[str, Any]:
    """The four decodes of one ``side^2`` image."""
    from hrkernels import vae as tiled

    factor = tiled.scale_factor(vae)
    generator = torch.Generator("cuda").manual_seed(side)
    latents = torch.randn(1, vae.config.latent_channels, side // factor, side // factor,
                          device="cuda", dtype=torch.float16, generator=generator)
    scaled = latents / vae.config.scaling_factor
    warmup = side < 8192
    results: dict[str, Any] = {}
    vae.disable_tiling()
    reference, results["untiled"] = measure(lambda: vae.decode(scaled).sample, warmup)
    vae.enable_tiling()
    out, results["diffusers-tiling"] = measure(lambda: vae.decode(scaled).sample, warmup)
    vae.disable_tiling()
    if reference is not None and out is not None:
        results["diffusers-tiling"]["relative_l2"] = _relative(out, reference)
    del out
    for label, budget in (("hrkernels", None), ("hrkernels-2GiB", SMALL_BUDGET)):
        plan = tiled.plan_decode(vae, latents, max_memory=budget)
        out, results[label] = measure(lambda b=budget: tiled.decode(vae, latents, max_memory=b),
                                      warmup)
        results[label]["estimate_gib"] = plan.peak_bytes / 2**30
        results[label]["plan"] = plan.describe()
        if reference is not None and out is not None:
            results[label]["relative_l2"] = _relative(out, reference)
        del out
    del reference
    torch.cuda.empty_cache()
    return results


def _markdown(result: dict[str, Any]) -> str:
    lines = ["| SDXL VAE decode, fp16 | untiled s / GiB | diffusers tiling s / GiB (rel L2) | "
             "hrkernels s / GiB (est, rel L2) | hrkernels 2 GiB budget s / GiB (est, rel L2) |",
             "| --- | ---: | ---: | ---: | ---: |"]

    def cell(entry: dict[str, Any]) -> str:
        if "error" in entry:
            return "out of memory"
        text = f"{entry['seconds']:.2f} / {entry['peak_gib']:.2f}"
        extra = [f"est {entry['estimate_gib']:.2f}"] if "estimate_gib" in entry else []
        if "relative_l2" in entry:
            extra.append(f"{entry['relative_l2']:.1e}")
        return text + (f" ({', '.join(extra)})" if extra else "")

    for side, row in result["sizes"].items():
        lines.append(f"| {side}^2 | " + " | ".join(
            cell(row[k]) for k in ("untiled", "diffusers-tiling", "hrkernels", "hrkernels-2GiB"))
            + " |")
    lines.append(f"\n{result['gpu']}, CUDA {result['cuda']}, torch {result['torch']}")
    return "\n".join(lines) + "\n"


def main(out_dir: str | Path) -> int:
    """Run :func:`bench_size` for $VAE_SIZES (comma-separated, default :data:`SIZES`) into
    ``out_dir``."""
    import os

    if not torch.cuda.is_available():
        print("the VAE benchmark needs a CUDA GPU")
        return 1
    sizes = [int(s) for s in os.environ.get("VAE_SIZES", ",".join(map(str, SIZES))).split(",")]
    vae = _sdxl_vae()
    result: dict[str, Any] = {"gpu": torch.cuda.get_device_name(), "cuda": torch.version.cuda,
                              "torch": torch.__version__, "sizes": {}}
    for side in sizes:
        result["sizes"][side] = bench_size(vae, side)
        print(side, json.dumps(result["sizes"][side]), flush=True)
    write_document(out_dir, "vae", result, _markdown(result))
    return 0

"""Multi-GPU sampling benchmarks (``bench/gpu_multi.sh``; issue 19): one run per ``torchrun``
launch, every rank running this module.

* ``views`` / ``cfg`` runs: one image of ``--method`` at ``--size`` with ``parallel=`` the mode
  (``--parallel none`` on one process: the baseline). Reports the wall time of the measured call
  (after a 1-step warm-up at the same size; a barrier and ``torch.cuda.synchronize`` on both
  ends), the exchanges (:attr:`SamplerOutput.communication`: bytes and seconds, in total and per
  step), the peak memory of every rank, and the final latents' SHA-256; the baseline saves its
  latents (``--reference``) and a parallel run compares its own with them bit for bit
  (``bitwise_equal``, ``max_difference``).
* ``prompts`` runs: ``--prompts N`` images of ``--method`` at ``--size`` (random embeddings per
  prompt, seed = line), dealt out over the ranks as ``hrkernels generate --prompts`` does
  (:func:`hrkernels.distributed.prompts.share`); reports images per minute.

The pipeline is :func:`hrkernels.testing.random_pipeline` (SDXL, fp16, random weights, no text
encoders) on ``cuda:LOCAL_RANK``, or with ``--tiny`` the tiny SDXL pipeline on the CPU (gloo: the
dry run of the script). Rank 0 appends one JSON object per run to ``--out`` (JSON lines).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch

from hrkernels import distributed

__all__ = ["main", "run_image", "run_prompts"]


def _pipeline(tiny: bool) -> tuple[Any, str]:
    if tiny:
        from hrkernels.testing import tiny_pipeline

        return tiny_pipeline("sdxl"), "cpu"
    from hrkernels.testing import random_pipeline

    device = f"cuda:{distributed.local_rank()}"
    return random_pipeline("sdxl", torch.float16, device, with_text_encoders=False), device


def _embeds(pipe: Any, device: str, seed: int) -> dict[str, torch.Tensor]:
    """Random SDXL prompt embeddings (the pipeline has no text encoders); negative ones zero, as
    SDXL's empty negative prompt."""
    generator = torch.Generator().manual_seed(seed)
    config = pipe.unet.config
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    embeds = torch.randn(1, 77, config.cross_attention_dim, generator=generator)
    pooled_embeds = torch.randn(1, pooled, generator=generator)
    dtype = pipe.unet.dtype
    return {"prompt_embeds": embeds.to(device, dtype),
            "pooled_prompt_embeds": pooled_embeds.to(device, dtype),
            "negative_prompt_embeds": torch.zeros_like(embeds).to(device, dtype),
            "negative_pooled_prompt_embeds": torch.zeros_like(pooled_embeds).to(device, dtype)}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    if distributed.world_size() > 1:
        torch.distributed.barrier()


def _peaks(device: str) -> list[float]:
    """Every rank's peak allocated GiB (0 on the CPU)."""
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else 0.0
    if distributed.world_size() == 1:
        return [peak]
    peaks: list[Any] = [None] * distributed.world_size()
    torch.distributed.all_gather_object(peaks, peak)
    return peaks


def _sampler(method: str, pipe: Any, parallel: str | None, view_batch_size: int | str) -> Any:
    from hrkernels.samplers import SAMPLERS

    return SAMPLERS[method](pipe, view_batch_size=view_batch_size, parallel=parallel)


def run_image(method: str, size: int, steps: int, parallel: str | None,
              view_batch_size: int | str, tiny: bool, reference: Path) -> dict[str, Any]:
    """One image; see the module docstring."""
    pipe, device = _pipeline(tiny)
    sampler = _sampler(method, pipe, parallel, view_batch_size)
    call = {**_embeds(pipe, device, 0), "height": size, "width": size,
            "progress": distributed.is_main()}
    sampler(**call, num_inference_steps=1, output_type="latent",
            generator=torch.Generator(device).manual_seed(0))  # warm-up
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    start = time.perf_counter()
    out = sampler(**call, num_inference_steps=steps, output_type="pil",
                  generator=torch.Generator(device).manual_seed(0))
    _sync(device)
    seconds = time.perf_counter() - start
    latents = out.latents.cpu()
    total_steps = sum(sampler.view_plan(size, size, steps).steps)
    result: dict[str, Any] = {
        "method": method, "size": size, "steps": steps, "parallel": parallel or "none",
        "world_size": distributed.world_size(), "view_batch_size": view_batch_size,
        "seconds": seconds, "peak_gib_per_rank": _peaks(device),
        "unet_calls_rank0": {f"{r}x{h}x{w}": n for (r, h, w), n in sorted(out.unet_calls.items())},
        "latents_sha256": hashlib.sha256(latents.numpy().tobytes()).hexdigest(),
    }
    if out.communication is not None:
        stats = out.communication
        calls = stats["by_kind"].get("model calls", {})
        result["communication"] = stats
        result["per_step"] = {
            "sent_bytes": calls.get("sent_bytes", 0) / total_steps,
            "data_ms": 1e3 * calls.get("data_seconds", 0.0) / total_steps,
            "control_ms": 1e3 * calls.get("control_seconds", 0.0) / total_steps,
        }
    if parallel is None:
        if distributed.is_main():
            reference.parent.mkdir(parents=True, exist_ok=True)
            torch.save(latents, reference)
    elif reference.exists():
        expected = torch.load(reference)
        result["bitwise_equal"] = bool(torch.equal(latents, expected))
        result["max_difference"] = float((latents - expected).abs().max())
    return result


def run_prompts(method: str, size: int, steps: int, prompts: int, view_batch_size: int | str,
                tiny: bool) -> dict[str, Any]:
    """``prompts`` images dealt out over the ranks (no exchange between them)."""
    from hrkernels.distributed.prompts import PromptJob, share

    pipe, device = _pipeline(tiny)
    sampler = _sampler(method, pipe, None, view_batch_size)
    jobs = share([PromptJob(line, f"prompt {line}") for line in range(1, prompts + 1)],
                 distributed.rank(), distributed.world_size())
    sampler(**_embeds(pipe, device, 0), height=size, width=size, num_inference_steps=1,
            output_type="latent", progress=False)  # warm-up
    _sync(device)
    start = time.perf_counter()
    for job in jobs:
        sampler(**_embeds(pipe, device, job.line), height=size, width=size,
                num_inference_steps=steps, output_type="pil", progress=distributed.is_main(),
                generator=torch.Generator(device).manual_seed(job.line))
    _sync(device)
    seconds = time.perf_counter() - start
    return {"method": method, "size": size, "steps": steps, "parallel": "prompts",
            "world_size": distributed.world_size(), "prompts": prompts, "seconds": seconds,
            "images_per_minute": 60.0 * prompts / seconds, "peak_gib_per_rank": _peaks(device)}


def _environment() -> dict[str, Any]:
    info: dict[str, Any] = {"torch": torch.__version__}
    if torch.cuda.is_available():
        nccl = torch.cuda.nccl.version()  # a tuple; an int in old releases
        info.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda,
                    nccl=".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl))
    return info


def main(argv: list[str] | None = None) -> int:
    """Entry point (under ``torchrun``); see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m hrkernels.bench.multi_gpu",
                                     description="Multi-GPU sampling benchmark (one run).")
    parser.add_argument("mode", choices=("image", "prompts"))
    parser.add_argument("--method", required=True)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--parallel", choices=("none", "views", "cfg"), default="none")
    parser.add_argument("--view-batch-size", default="auto")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--tiny", action="store_true", help="tiny SDXL on the CPU (dry run)")
    parser.add_argument("--reference", type=Path, default=None,
                        help="latents of the one-process run (written by it, read by the others)")
    parser.add_argument("--out", type=Path, required=True, help="JSON lines file (rank 0)")
    args = parser.parse_args(argv)
    batch = args.view_batch_size if args.view_batch_size == "auto" else int(args.view_batch_size)
    distributed.init("gloo" if args.tiny else "nccl")
    if args.mode == "image":
        reference = args.reference or args.out.with_suffix(".reference.pt")
        result = run_image(args.method, args.size, args.steps,
                           None if args.parallel == "none" else args.parallel, batch, args.tiny,
                           reference)
    else:
        result = run_prompts(args.method, args.size, args.steps, args.prompts, batch, args.tiny)
    result.update(_environment())
    if distributed.is_main():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as file:
            file.write(json.dumps(result) + "\n")
        summary = {key: result[key] for key in ("method", "size", "parallel", "world_size",
                                                "seconds") if key in result}
        for key in ("bitwise_equal", "max_difference", "per_step", "images_per_minute"):
            if key in result:
                summary[key] = result[key]
        print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

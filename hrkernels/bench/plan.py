"""The memory planner against the GPU: each sampler's plan estimate vs the measured
``torch.cuda.max_memory_allocated`` (target: within 15% of the measured peak).

For every :data:`CASES` entry (DemoFusion, APT, ScaleCrafter, FreeScale at 2048^2 and 4096^2) on
:func:`hrkernels.bench.e2e.build_pipeline` (full SDXL topology, random weights, fp16), with
``view_batch_size="auto"`` and the default budget (what is free):

0. single UNet calls (:func:`unet_calls`): the measured peak over the planner's walk (what
   :data:`hrkernels.planner.UNET_WORKSPACE` calibrates);
1. the sampling (``output_type="latent"``; FreeScale's relays included) after
   ``torch.cuda.reset_peak_memory_stats``: measured peak against the plan's largest phase other
   than the final decode;
2. the final decode and post-processing (``adapter.to_images(..., "pil")`` with the plan's VAE
   budget): measured peak against the plan's ``VAE decode`` phase;
3. the call's peak: the larger of the two, against :attr:`MemoryPlan.peak`.

Few steps (``STEPS = 2``): memory does not depend on them. Writes ``plan.json`` and ``plan.md``
into ``out_dir`` (``bench/gpu.sh plan``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

CASES: tuple[tuple[str, int], ...] = tuple(
    (method, size) for size in (2048, 4096)
    for method in ("demofusion", "apt", "scalecrafter", "freescale"))
STEPS = 2
TARGET = 0.15  # |estimate / measured - 1|


def ratio_row(case: str, estimate: int, measured: int) -> dict[str, Any]:
    """One comparison: bytes, GiB and ``estimate / measured``, and whether it meets
    :data:`TARGET`."""
    ratio = estimate / measured if measured else float("inf")
    return {"case": case, "estimate_gib": estimate / 2**30, "measured_gib": measured / 2**30,
            "ratio": ratio, "within_target": abs(ratio - 1) <= TARGET}


def split_estimates(memory: Any) -> tuple[int, int]:
    """The plan's estimate of the sampling (every phase but the final decode) and of the final
    decode, in bytes."""
    sampling = max(p.bytes for p in memory.phases if p.name != "VAE decode")
    decode = max((p.bytes for p in memory.phases if p.name == "VAE decode"), default=0)
    return sampling, decode


def markdown(results: list[dict[str, Any]]) -> str:
    """The results as a Markdown table (one row per case and part)."""
    lines = ["# Memory plan vs measured peak (torch.cuda.max_memory_allocated)", "",
             f"SDXL topology, random weights, fp16, {STEPS} steps, view_batch_size auto, default "
             f"budget; target: within {TARGET:.0%}.", "",
             "| case | part | estimate GiB | measured GiB | estimate / measured | within "
             "target | choices |",
             "| --- | --- | ---: | ---: | ---: | --- | --- |"]
    for result in results:
        for part in ("sampling", "decode", "call"):
            row = result[part]
            lines.append(f"| {result['case']} | {part} | {row['estimate_gib']:.2f} | "
                         f"{row['measured_gib']:.2f} | {row['ratio']:.3f} | "
                         f"{'yes' if row['within_target'] else 'no'} | "
                         f"{result['choices'] if part == 'call' else ''} |")
    if results:
        first = results[0]
        lines += ["", f"{first.get('gpu', '')}, torch {first.get('torch', '')}"]
    return "\n".join(lines) + "\n"


def unet_markdown(calls: list[dict[str, Any]]) -> str:
    """The single UNet calls as a Markdown table."""
    lines = ["", "| UNet call (rows x h x w) | walk GiB | measured GiB | measured / walk |",
             "| --- | ---: | ---: | ---: |"]
    lines += [f"| {c['shape']} | {c['walk_gib']:.2f} | {c['measured_gib']:.2f} | "
              f"{c['measured_over_walk']:.3f} |" for c in calls]
    return "\n".join(lines) + "\n"


def run_case(pipe: Any, method: str, size: int) -> dict[str, Any]:
    """Plan, sample and decode one case; see the module docstring."""
    from hrkernels.bench.e2e import _embeds
    from hrkernels.planner import plan
    from hrkernels.samplers import SAMPLERS

    sampler = SAMPLERS[method](pipe, view_batch_size="auto")
    device = torch.device("cuda")
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    # The plan of the whole call as a user makes it (decode included); the call below samples
    # with output_type="latent" (its plan makes the same choices) and decodes after.
    memory = plan(sampler, size, size, num_inference_steps=STEPS, output_type="pil")
    torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    out = sampler(**_embeds(pipe), height=size, width=size, num_inference_steps=STEPS,
                  output_type="latent", progress=False,
                  generator=torch.Generator("cuda").manual_seed(0))
    torch.cuda.synchronize()
    sampling_peak = torch.cuda.max_memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    images = sampler.adapter.to_images(out.latents, "pil", memory.vae_max_memory)
    torch.cuda.synchronize()
    decode_peak = torch.cuda.max_memory_allocated(device)
    seconds = time.perf_counter() - start
    sampling, decode = split_estimates(memory)
    case = f"{method}-{size}"
    choices = f"view_batch_size={memory.view_batch_size}"
    if out.memory.view_batch_size != memory.view_batch_size:
        choices += f" (the sampling call's: {out.memory.view_batch_size})"
    if memory.window_chunk is not None:
        choices += f", window_chunk={memory.window_chunk}"
    return {
        "case": case, "method": method, "size": size, "seconds": seconds,
        "sampling": ratio_row(case, sampling, sampling_peak),
        "decode": ratio_row(case, decode, decode_peak),
        "call": ratio_row(case, memory.peak, max(sampling_peak, decode_peak)),
        "choices": choices,
        "budget_gib": None if memory.budget is None else memory.budget / 2**30,
        "phases": [{"name": p.name, "gib": p.bytes / 2**30, "detail": p.detail}
                   for p in memory.phases],
        "plan": str(memory),
        "images": len(images),
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
    }


UNET_SHAPES = ((2, 128, 128), (16, 128, 128), (2, 256, 256), (2, 512, 512))


def unet_calls(pipe: Any) -> list[dict[str, Any]]:
    """One UNet call per :data:`UNET_SHAPES` entry: the measured peak above what was allocated
    before, against :func:`hrkernels.planner.unet_call_bytes` (the walk, before the workspace
    factor): ``measured / walk`` is what :data:`hrkernels.planner.UNET_WORKSPACE` calibrates."""
    from hrkernels.bench.e2e import _embeds
    from hrkernels.planner import unet_call_bytes

    unet, device = pipe.unet, torch.device("cuda")
    config, dtype = unet.config, unet.dtype
    embeds = _embeds(pipe)
    rows_out = []
    for rows, height, width in UNET_SHAPES:
        sample = torch.randn(rows, config.in_channels, height, width, device=device, dtype=dtype)
        text = embeds["prompt_embeds"].expand(rows, -1, -1).contiguous()
        added = {"text_embeds": embeds["pooled_prompt_embeds"].expand(rows, -1).contiguous(),
                 "time_ids": torch.tensor([[1024.0, 1024.0, 0, 0, 1024.0, 1024.0]],
                                          device=device, dtype=dtype).expand(rows, -1)}
        timestep = torch.tensor(500.0, device=device)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        with torch.no_grad():
            out = unet(sample, timestep, encoder_hidden_states=text, added_cond_kwargs=added,
                       return_dict=False)[0]
        torch.cuda.synchronize()
        measured = torch.cuda.max_memory_allocated(device) - before
        walk = unet_call_bytes(config, rows, height, width, sample.element_size()).peak
        # The walk counts the sample (allocated before) and the output: compare like with like.
        measured += sample.numel() * sample.element_size()
        del out
        rows_out.append({"shape": f"{rows}x{height}x{width}", "walk_gib": walk / 2**30,
                         "measured_gib": measured / 2**30, "measured_over_walk": measured / walk})
    return rows_out


def main(out_dir: str | None = None) -> int:
    """``bench/gpu.sh plan``: every :data:`CASES` entry; writes ``plan.json`` and ``plan.md``
    into ``out_dir``. Returns 0 when every case ran (the ratios are results, not failures), 2
    without a CUDA GPU."""
    if not torch.cuda.is_available():
        print("hrkernels.bench.plan needs a CUDA GPU")
        return 2
    from hrkernels.bench.e2e import build_pipeline

    pipe = build_pipeline()
    calls = unet_calls(pipe)
    for row in calls:
        print(json.dumps(row), flush=True)
    results = []
    for method, size in CASES:
        result = run_case(pipe, method, size)
        print(json.dumps({k: result[k] for k in ("case", "seconds", "sampling", "decode",
                                                 "call", "choices")}), flush=True)
        results.append(result)
    text = markdown(results) + unet_markdown(calls)
    if out_dir is not None:
        directory = Path(out_dir)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "plan.json").write_text(json.dumps({"cases": results, "unet": calls},
                                                        indent=2))
        (directory / "plan.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1] if len(sys.argv) > 1 else None))

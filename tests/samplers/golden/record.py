"""Record (or check) the golden DemoFusion / APT latents on the tiny pipelines.

The golden files were recorded from main at 299c551, before the sampler framework refactor; the
refactored samplers must reproduce them bitwise (``tests/samplers/test_golden.py``). Each case runs
on the CPU in float32 with one intra-op thread (so the result does not depend on the number of
cores). Run ``python tests/samplers/golden/record.py`` to rewrite them (only when a change of the
algorithm is intended; say which in the commit).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent

# name -> (sampler, kind, scheduler, constructor options, call options)
CASES: dict[str, tuple[str, str, str | None, dict, dict]] = {
    "demofusion_sdxl_euler_2x": ("demofusion", "sdxl", None, {"view_batch_size": 16},
                                 {"height": 256, "width": 256, "num_inference_steps": 3}),
    "demofusion_sdxl_euler_2x_nonsquare": ("demofusion", "sdxl", None, {"view_batch_size": 5},
                                           {"height": 256, "width": 192,
                                            "num_inference_steps": 2}),
    "demofusion_sdxl_ddim_3x": ("demofusion", "sdxl", "ddim", {"view_batch_size": 16},
                                {"height": 384, "width": 384, "num_inference_steps": 2}),
    "demofusion_sdxl_dpm_2x": ("demofusion", "sdxl", "dpm", {"view_batch_size": 8},
                               {"height": 256, "width": 256, "num_inference_steps": 3}),
    "demofusion_sd15_euler_3x": ("demofusion", "sd15", "euler", {"view_batch_size": 16},
                                 {"height": 192, "width": 192, "num_inference_steps": 2}),
    "demofusion_sd15_ddim_2x_unguided_two_prompts": (
        "demofusion", "sd15", "ddim", {"view_batch_size": 4},
        {"height": 128, "width": 128, "num_inference_steps": 3, "guidance_scale": 1.0,
         "prompt": ["a photo of a cat", "a dog"]}),
    "demofusion_sd15_dpm_2x_two_images": ("demofusion", "sd15", "dpm", {"view_batch_size": 16},
                                          {"height": 128, "width": 128, "num_inference_steps": 2,
                                           "num_images_per_prompt": 2}),
    "apt_sdxl_2x_shortcut": ("apt", "sdxl", None, {"view_batch_size": 16, "shortcut_steps": 2},
                             {"height": 256, "width": 256, "num_inference_steps": 4}),
    "apt_sdxl_3x_per_channel": ("apt", "sdxl", None,
                                {"view_batch_size": 16, "shortcut_steps": None,
                                 "per_channel": True},
                                {"height": 384, "width": 384, "num_inference_steps": 2}),
    "apt_sd15_2x_eta": ("apt", "sd15", None,
                        {"view_batch_size": 16, "shortcut_steps": 3, "scale_aware_eta": 2.5},
                        {"height": 128, "width": 128, "num_inference_steps": 4}),
}


def run_case(name: str) -> list[torch.Tensor]:
    """The stage latents of golden case ``name`` (one thread, CPU, float32, seed 0)."""
    from hrkernels.samplers import SAMPLERS
    from hrkernels.testing import tiny_pipeline

    method, kind, scheduler, options, call = CASES[name]
    call = {"prompt": "a photo of a cat", **call}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pipe = tiny_pipeline(kind, scheduler=scheduler)
        out = SAMPLERS[method](pipe, **options)(
            **call, generator=torch.Generator().manual_seed(0), output_type="latent",
            progress=False)
    finally:
        torch.set_num_threads(threads)
    return [stage.latents for stage in out.stages]


def path(name: str) -> Path:
    return HERE / f"{name}.pt"


if __name__ == "__main__":
    for name in CASES:
        latents = run_case(name)
        if "--check" in sys.argv:
            golden = torch.load(path(name))
            same = len(golden) == len(latents) and all(
                torch.equal(a, b) for a, b in zip(golden, latents, strict=False))
            print(f"{name}: {'bitwise equal' if same else 'DIFFERENT'}")
        else:
            torch.save([z.clone() for z in latents], path(name))
            print(f"{name}: {[tuple(z.shape) for z in latents]}")

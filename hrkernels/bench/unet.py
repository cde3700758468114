"""End-to-end cost of patching: a re-dilated SDXL UNet forward vs the plain one at the same size.

:func:`patched_unet_overhead` times one UNet evaluation of the SDXL topology (random weights,
:func:`hrkernels.testing.random_pipeline`) at 2048^2 (latent ``[2, 4, 256, 256]``: a CFG batch of
2) unpatched, and patched with ScaleCrafter's SDXL 2048^2 plan (``mid_block`` + ``up_blocks.0`` at
factor 2, METHODS.md). ``patched / unpatched`` is the overhead of re-dilation: the re-dilated 3x3
convolutions cost what plain ones do when ``hrkernels.ops.dilated_conv2d`` is at parity with
cuDNN, so the ratio should be close to 1.

Run on the GPU with ``bench/gpu.sh unet`` (calls :func:`main`), or::

    python -c "import torch; from hrkernels.bench.unet import patched_unet_overhead; \
print(patched_unet_overhead('cuda', torch.float16))"
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hrkernels.bench.harness import write_document
from hrkernels.nn import ReDilatedConvForward
from hrkernels.patching import ReDilation, patched
from hrkernels.patching.registry import patch_state

__all__ = ["SDXL_2048_PLAN", "main", "patched_unet_overhead"]

# ScaleCrafter's SDXL 2048^2 plan (METHODS.md): the layers the official code dilated.
SDXL_2048_PLAN = ReDilation({"mid_block": 2, "up_blocks.0": 2}, until_step=30)


def _unet_inputs(
    unet: nn.Module, batch: int, latent_size: int, device: torch.device, dtype: torch.dtype
) -> dict[str, Any]:
    """Random UNet inputs of the CFG batch: latents, text embeddings, SDXL micro-conditioning."""
    generator = torch.Generator(device=device).manual_seed(0)
    config = unet.config

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, device=device, dtype=dtype)

    inputs: dict[str, Any] = {
        "sample": randn(batch, config.in_channels, latent_size, latent_size),
        "timestep": torch.full((batch,), 999, device=device),
        "encoder_hidden_states": randn(batch, 77, config.cross_attention_dim),
        "return_dict": False,
    }
    if config.addition_embed_type == "text_time":
        pixels = float(latent_size * 8)
        text_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        time_ids = torch.tensor([pixels, pixels, 0.0, 0.0, pixels, pixels], device=device)
        inputs["added_cond_kwargs"] = {
            "text_embeds": randn(batch, text_dim),
            "time_ids": time_ids.to(dtype).expand(batch, 6),
        }
    return inputs


def _median_ms(function: Callable[[], Any], device: torch.device, warmup_ms: float,
               rep_ms: float) -> float:
    """Median time of ``function`` in milliseconds: ``triton.testing.do_bench`` on CUDA; on other
    devices a host timer over at least 3 runs after at least 1 warm-up run."""
    if device.type == "cuda":
        import triton.testing

        return float(
            triton.testing.do_bench(function, warmup=warmup_ms, rep=rep_ms, return_mode="median")
        )
    times = []
    deadline = time.perf_counter() + warmup_ms / 1000
    function()
    while time.perf_counter() < deadline:
        function()
    deadline = time.perf_counter() + rep_ms / 1000
    while len(times) < 3 or time.perf_counter() < deadline:
        start = time.perf_counter()
        function()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def patched_unet_overhead(
    device: str | torch.device = "cuda",
    dtype: torch.dtype = torch.float16,
    *,
    unet: nn.Module | None = None,
    latent_size: int = 256,
    batch: int = 2,
    spec: ReDilation = SDXL_2048_PLAN,
    warmup_ms: float = 1000.0,
    rep_ms: float = 5000.0,
) -> dict[str, Any]:
    """Time an SDXL UNet forward unpatched and patched with ScaleCrafter's SDXL 2048^2 plan.

    Args:
        device: where to run (CUDA for real numbers: timed with ``triton.testing.do_bench``,
            median; other devices use a host timer, for smoke tests).
        dtype: dtype of the UNet and its inputs (fp16 for the recorded numbers).
        unet: the UNet to time; None builds ``random_pipeline("sdxl", dtype, device,
            with_text_encoders=False).unet`` (the full SDXL topology with random weights, 2.6 B
            parameters: 5.1 GB in fp16). A UNet passed in must not be patched; it is left
            unpatched.
        latent_size: latent side (256 for 2048^2 pixels).
        batch: batch of the evaluation (2: the CFG pair).
        spec: the patch to time (default: ``mid_block`` + ``up_blocks.0`` at 2).
        warmup_ms, rep_ms: ``do_bench``'s warm-up and measurement budgets. A 2048^2 SDXL forward
            takes hundreds of milliseconds, so the defaults give several measured runs.

    Returns:
        A dict: ``unpatched_ms``, ``patched_ms`` (medians), ``ratio`` (patched / unpatched),
        ``max_abs_difference`` (between the two outputs: proves the patch took effect),
        ``redilated_layers`` (how many convolutions the plan re-dilates), ``latent_shape``,
        ``dtype``, ``device_name``, ``torch``, ``triton`` (versions) and ``plan``.

    Raises:
        ValueError: ``unet`` is patched already.

    Example (on the lent H100)::

        >>> result = patched_unet_overhead("cuda", torch.float16)
        >>> result["ratio"]  # doctest: +SKIP
    """
    device = torch.device(device)
    if unet is None:
        from hrkernels.testing import random_pipeline

        unet = random_pipeline("sdxl", dtype, device, with_text_encoders=False).unet
    elif patch_state(unet) is not None:
        raise ValueError("unet is patched already; pass an unpatched UNet")
    unet.eval()
    inputs = _unet_inputs(unet, batch, latent_size, device, dtype)

    def forward() -> torch.Tensor:
        return unet(**inputs)[0]

    with torch.inference_mode():
        plain = forward()
        unpatched_ms = _median_ms(forward, device, warmup_ms, rep_ms)
        with patched(unet, spec):
            redilated = sum(
                isinstance(module.__dict__.get("forward"), ReDilatedConvForward)
                for module in unet.modules()
            )
            dilated = forward()
            patched_ms = _median_ms(forward, device, warmup_ms, rep_ms)
        difference = (dilated.float() - plain.float()).abs().max().item()

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    device_name = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    )
    return {
        "unpatched_ms": unpatched_ms,
        "patched_ms": patched_ms,
        "ratio": patched_ms / unpatched_ms,
        "max_abs_difference": difference,
        "redilated_layers": redilated,
        "latent_shape": [batch, unet.config.in_channels, latent_size, latent_size],
        "dtype": str(dtype).removeprefix("torch."),
        "device_name": device_name,
        "torch": torch.__version__,
        "triton": triton_version,
        "plan": {"layers": dict(spec.layers), "until_step": spec.until_step},
    }


def main(out_dir: str | Path) -> int:
    """``bench/gpu.sh unet``: run :func:`patched_unet_overhead` on CUDA in fp16 and write
    ``unet_overhead.json`` and ``unet_overhead.md`` under ``out_dir``; 0 on success."""
    if not torch.cuda.is_available():
        print("patched_unet_overhead needs a CUDA GPU")
        return 1
    result = patched_unet_overhead("cuda", torch.float16)
    plan = ", ".join(f"{name}: {factor}" for name, factor in result["plan"]["layers"].items())
    table = (
        "| SDXL UNet forward, latent 2x4x256x256 (2048^2, CFG batch), fp16 | ms (median) |\n"
        "| --- | --- |\n"
        f"| unpatched | {result['unpatched_ms']:.1f} |\n"
        f"| patched: {plan} ({result['redilated_layers']} convolutions) | "
        f"{result['patched_ms']:.1f} |\n"
        f"| overhead (patched / unpatched) | {result['ratio']:.3f} |\n\n"
        f"{result['device_name']}, torch {result['torch']}, triton {result['triton']}\n"
    )
    write_document(out_dir, "unet_overhead", result, table)
    return 0

"""The UNet's attention on the lent GPU: each SDPA backend, inside the SDXL UNet and alone.

Three measurements (``bench/gpu.sh attention`` calls :func:`main`):

* **UNet per backend.** One SDXL UNet forward (random weights, fp16) at latent 128^2 with batch 2
  (the CFG pair at 1024^2) and 26 (DemoFusion's view batch), and at latent 256^2 with batch 2
  (2048^2), with every SDPA backend PyTorch offers on the machine forced through
  ``torch.nn.attention.sdpa_kernel`` (flash, memory-efficient, cuDNN). Each output is compared with
  the flash one (relative L2; fp16 tolerance: the backends differ by fp16 rounding only).
* **Attention alone** at FreeScale's global-path token counts: SDXL's first transformer level
  (640 channels = 10 heads x 64) at 4096^2 (65536 tokens) and 8192^2 (262144 tokens), and the
  second level (1280 = 20 x 64) at 4096^2 (16384 tokens), batch 2 (the CFG pair). Reported as
  TFLOP/s (``4 * B * H * N^2 * d`` per call) beside the measured dense bf16/fp16 matmul rate.
* **The matmul ceiling**: an 8192^3 fp16 and bf16 ``torch.matmul``.

Times are medians of ``triton.testing.do_bench``. Writes ``attention.json`` and ``attention.md``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from hrkernels.bench.harness import write_document
from hrkernels.bench.unet import _median_ms, _unet_inputs

__all__ = ["attention_tflops", "available_backends", "main", "matmul_tflops", "per_backend",
           "unet_backends"]

# (name, SDPBackend member name); the math backend is left out: it materialises N x N scores.
BACKENDS = (("flash", "FLASH_ATTENTION"), ("efficient", "EFFICIENT_ATTENTION"),
            ("cudnn", "CUDNN_ATTENTION"))
UNET_CASES = ((128, 2), (128, 26), (256, 2))
# (label, tokens, heads) at head dim 64, batch 2.
ATTENTION_CASES = (("4096^2 level 1", 256 * 256, 10), ("4096^2 level 2", 128 * 128, 20),
                   ("8192^2 level 1", 512 * 512, 10))


def available_backends() -> list[tuple[str, Any]]:
    """The SDPA backends this torch names, as ``(name, SDPBackend member)``."""
    from torch.nn.attention import SDPBackend

    return [(name, getattr(SDPBackend, member)) for name, member in BACKENDS
            if hasattr(SDPBackend, member)]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def matmul_tflops(dtype: torch.dtype, size: int = 8192) -> float:
    """Measured dense matmul rate of ``size^3`` in ``dtype`` (TFLOP/s)."""
    a = torch.randn(size, size, device="cuda", dtype=dtype)
    b = torch.randn(size, size, device="cuda", dtype=dtype)
    milliseconds = _median_ms(lambda: a @ b, torch.device("cuda"), 200.0, 1000.0)
    return 2 * size**3 / (milliseconds / 1000) / 1e12


def per_backend(function: Callable[[], torch.Tensor], warmup_ms: float,
                rep_ms: float) -> dict[str, Any]:
    """``function`` with each SDPA backend forced: ``{name: {ms, relative_l2}}`` (the difference
    to the first backend that ran), or ``{name: {error}}`` where the backend cannot run it."""
    from torch.nn.attention import sdpa_kernel

    results: dict[str, Any] = {}
    reference = None
    for name, backend in available_backends():
        try:
            with sdpa_kernel(backend):
                out = function()
                milliseconds = _median_ms(function, torch.device("cuda"), warmup_ms, rep_ms)
        except RuntimeError as error:
            results[name] = {"error": str(error).splitlines()[0][:200]}
            continue
        if reference is None:
            reference = out
        results[name] = {"ms": milliseconds, "relative_l2": _relative(out, reference)}
    return results


def attention_tflops(tokens: int, heads: int, head_dim: int = 64, batch: int = 2,
                     dtype: torch.dtype = torch.float16) -> dict[str, Any]:
    """Self-attention of ``[batch, heads, tokens, head_dim]`` with each backend: ms, TFLOP/s and
    the relative L2 difference to the first backend that ran."""
    from torch.nn.functional import scaled_dot_product_attention

    generator = torch.Generator("cuda").manual_seed(0)
    q, k, v = (torch.randn(batch, heads, tokens, head_dim, device="cuda", dtype=dtype,
                           generator=generator) for _ in range(3))
    flops = 4 * batch * heads * tokens**2 * head_dim
    results = per_backend(lambda: scaled_dot_product_attention(q, k, v), 100.0, 600.0)
    for entry in results.values():
        if "ms" in entry:
            entry["tflops"] = flops / (entry["ms"] / 1000) / 1e12
    return results


def unet_backends(unet: torch.nn.Module, latent_size: int, batch: int) -> dict[str, Any]:
    """One UNet forward with each SDPA backend forced: ms, relative L2 to the first and the ratio
    to the default choice's time."""
    device = torch.device("cuda")
    inputs = _unet_inputs(unet, batch, latent_size, device, unet.dtype)
    with torch.inference_mode():
        default_ms = _median_ms(lambda: unet(**inputs)[0], device, 500.0, 2000.0)
        results = per_backend(lambda: unet(**inputs)[0], 500.0, 2000.0)
    for entry in results.values():
        if "ms" in entry:
            entry["vs_default"] = entry["ms"] / default_ms
    return {"default": {"ms": default_ms}, **results}


def _markdown(result: dict[str, Any]) -> str:
    names = [name for name, _ in available_backends()]
    lines = ["| SDXL UNet forward (fp16) | default ms | "
             + " | ".join(f"{n} ms (rel L2)" for n in names) + " |",
             "| --- | ---: | " + " | ".join("---:" for _ in names) + " |"]
    for label, row in result["unet"].items():
        cells = []
        for name in names:
            cell = row.get(name, {})
            cells.append("error" if "error" in cell else
                         f"{cell['ms']:.1f} ({cell['relative_l2']:.1e})")
        lines.append(f"| {label} | {row['default']['ms']:.1f} | " + " | ".join(cells) + " |")
    lines += ["", "| attention alone, B=2, d=64 (fp16) | "
              + " | ".join(f"{n} ms / TFLOP/s" for n in names) + " |",
              "| --- | " + " | ".join("---:" for _ in names) + " |"]
    for label, row in result["attention"].items():
        cells = []
        for name in names:
            cell = row.get(name, {})
            cells.append("error" if "error" in cell else
                         f"{cell['ms']:.2f} / {cell['tflops']:.0f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", f"Dense matmul 8192^3: fp16 {result['matmul_tflops']['float16']:.0f} TFLOP/s, "
              f"bf16 {result['matmul_tflops']['bfloat16']:.0f} TFLOP/s.",
              f"\n{result['gpu']}, CUDA {result['cuda']}, torch {result['torch']}"]
    return "\n".join(lines) + "\n"


def main(out_dir: str | Path) -> int:
    """``bench/gpu.sh attention``: the three measurements above into ``out_dir``."""
    if not torch.cuda.is_available():
        print("the attention benchmark needs a CUDA GPU")
        return 1
    from hrkernels.bench.e2e import build_pipeline

    result: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(), "cuda": torch.version.cuda, "torch": torch.__version__,
        "matmul_tflops": {str(d).removeprefix("torch."): matmul_tflops(d)
                          for d in (torch.float16, torch.bfloat16)},
        "attention": {}, "unet": {},
    }
    for label, tokens, heads in ATTENTION_CASES:
        result["attention"][f"{label} ({tokens} tokens, {heads} heads)"] = \
            attention_tflops(tokens, heads)
        print(label, json.dumps(result["attention"]), flush=True)
    unet = build_pipeline().unet
    for latent, batch in UNET_CASES:
        label = f"latent {latent}^2, B={batch}"
        result["unet"][label] = unet_backends(unet, latent, batch)
        print(label, json.dumps(result["unet"][label]), flush=True)
    write_document(out_dir, "attention", result, _markdown(result))
    return 0

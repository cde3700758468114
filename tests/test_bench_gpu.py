"""The GPU benchmark modules' CPU-testable parts: every end-to-end case builds its sampler, the
attention and VAE tables format what the GPU runs return, and each refuses to run without CUDA."""

from __future__ import annotations

import inspect

import pytest
import torch

from hrkernels.bench import attention, e2e, vae
from hrkernels.samplers import SAMPLERS
from hrkernels.testing import tiny_pipeline


@pytest.mark.parametrize("name", sorted(e2e.CASES))
def test_every_e2e_case_names_a_sampler_and_its_options(name):
    case = dict(e2e.CASES[name])
    assert case.pop("compile", False) in (False, "default", "reduce-overhead")
    run_options = set(inspect.signature(e2e.run_e2e).parameters) - {"pipe", "compile"}
    sampler_options = {k: v for k, v in case.items() if k not in run_options}
    sampler = SAMPLERS[case["method"]]
    # The case's sampler options construct the sampler (on the tiny SDXL pipeline).
    sampler(tiny_pipeline("sdxl"), view_batch_size=case["view_batch_size"], **sampler_options)
    anchor = e2e.ANCHORS.get((case["method"], case["size"]))
    assert anchor is None or {"seconds", "peak_gib"} <= set(anchor)


def test_attention_table():
    names = [name for name, _ in attention.available_backends()]
    assert names, "this torch names no SDPA backend"
    entry = {"ms": 2.0, "relative_l2": 1e-4, "tflops": 500.0}
    result = {"gpu": "GPU", "cuda": "13.0", "torch": torch.__version__,
              "matmul_tflops": {"float16": 700.0, "bfloat16": 710.0},
              "unet": {"latent 128^2, B=2": {"default": {"ms": 40.0},
                                             **{n: dict(entry) for n in names}}},
              "attention": {"4096^2 level 1": {names[0]: dict(entry),
                                               **{n: {"error": "no kernel"} for n in names[1:]}}}}
    table = attention._markdown(result)
    assert "| latent 128^2, B=2 | 40.0 | 2.0 (1.0e-04)" in table
    assert "| 4096^2 level 1 | 2.00 / 500" in table
    assert "fp16 700 TFLOP/s, bf16 710 TFLOP/s" in table


def test_vae_table():
    row = {"untiled": {"error": "out of memory: CUDA"},
           "diffusers-tiling": {"seconds": 1.5, "peak_gib": 2.25},
           "hrkernels": {"seconds": 2.0, "peak_gib": 1.5, "estimate_gib": 1.75,
                         "relative_l2": 2e-6, "plan": "..."},
           "hrkernels-2GiB": {"seconds": 2.5, "peak_gib": 1.0, "estimate_gib": 1.2, "plan": "..."}}
    table = vae._markdown({"gpu": "GPU", "cuda": "13.0", "torch": "2.11", "sizes": {8192: row}})
    assert ("| 8192^2 | out of memory | 1.50 / 2.25 | 2.00 / 1.50 (est 1.75, 2.0e-06) | "
            "2.50 / 1.00 (est 1.20) |") in table


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
@pytest.mark.parametrize("module", [attention, vae])
def test_needs_cuda(module, tmp_path, capsys):
    assert module.main(tmp_path) == 1
    assert "needs a CUDA GPU" in capsys.readouterr().out

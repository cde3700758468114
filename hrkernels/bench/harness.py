"""Time benchmark cases with three providers and write the results.

Providers (DESIGN.md, "Benchmarks"):

* ``torch``: the op's PyTorch reference, eager;
* ``torch.compile``: the same reference under ``torch.compile`` (default mode);
* ``hrkernels``: the public op (Triton on CUDA; on a CPU it is the reference again, and the results
  say so).

GPU times are the median of ``triton.testing.do_bench`` after warm-up; CPU times are the median of a
few wall-clock runs. Memory-bound cases report GB/s (the case's ``bytes_moved`` over the time) and
the fraction of the device-to-device copy bandwidth measured in the same run; compute-bound cases
report TFLOP/s.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from hrkernels.bench.registry import BenchCase, Inputs
from hrkernels.env import environment
from hrkernels.ops import select_backend

PROVIDERS = ("torch", "torch.compile", "hrkernels")


@dataclass
class Result:
    """One case timed by one provider."""

    op: str
    label: str
    provider: str
    backend: str
    ms: float
    gbps: float | None = None
    copy_fraction: float | None = None
    tflops: float | None = None
    speedup_vs_torch: float | None = None
    speedup_vs_compile: float | None = None
    max_abs_error: float | None = None


def time_ms(fn: Callable[[], Any], device: torch.device) -> float:
    """Median time of ``fn`` in milliseconds (after warm-up)."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()  # warm-up
    samples = []
    deadline = time.perf_counter() + 0.3
    while len(samples) < 3 or (time.perf_counter() < deadline and len(samples) < 20):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def gbps(nbytes: float, milliseconds: float) -> float:
    """Bytes moved in ``milliseconds``, in GB/s (10^9 bytes per second)."""
    return nbytes / (milliseconds * 1e-3) / 1e9


def copy_bandwidth_gbps(device: torch.device, megabytes: int = 512) -> float:
    """Measured device-to-device copy bandwidth, counting bytes read plus bytes written."""
    if device.type != "cuda":
        megabytes = 64
    source = torch.empty(megabytes * 2**20, dtype=torch.uint8, device=device).random_()
    target = torch.empty_like(source)
    milliseconds = time_ms(lambda: target.copy_(source), device)
    return gbps(2 * source.numel(), milliseconds)


def _first_tensor(value: Any) -> torch.Tensor:
    return value[0] if isinstance(value, (tuple, list)) else value


def run_cases(
    cases: Iterable[BenchCase],
    device: torch.device,
    dtype: torch.dtype = torch.float16,
    providers: Iterable[str] = PROVIDERS,
    log: Callable[[str], None] = print,
    on_case: Callable[[list[Result], float], None] | None = None,
) -> tuple[list[Result], float]:
    """Time every case with every provider; returns the results and the copy bandwidth (GB/s).

    ``on_case(results_so_far, bandwidth)`` runs after each case (e.g. to save partial results).
    """
    providers = tuple(providers)
    unknown = set(providers) - set(PROVIDERS)
    if unknown:
        raise ValueError(f"unknown providers {sorted(unknown)}; choose from {PROVIDERS}")
    bandwidth = copy_bandwidth_gbps(device)
    log(f"copy bandwidth on {device.type}: {bandwidth:.0f} GB/s")
    results: list[Result] = []
    for case in cases:
        # The cases of a family share their reference's code object: without a reset, dynamo's
        # recompile limit would make later cases' "torch.compile" rows silently run eager.
        torch._dynamo.reset()
        inputs = case.make(device, dtype)
        functions: dict[str, Callable[[Inputs], Any]] = {
            "torch": case.reference,
            "torch.compile": torch.compile(case.compiled_reference or case.reference),
            "hrkernels": case.run,
        }
        expected = _first_tensor(case.reference(inputs))
        rows: dict[str, Result] = {}
        for provider in providers:
            function = functions[provider]
            backend = select_backend(case.op, device) if provider == "hrkernels" else "torch"
            started = time.perf_counter()
            output = _first_tensor(function(inputs))  # also compiles / warms up
            error = (output.float() - expected.float()).abs().max().item()
            first_call = time.perf_counter() - started
            milliseconds = time_ms(lambda f=function, i=inputs: f(i), device)
            if first_call > 5:
                log(f"  ({case.op} {case.label} {provider}: first call took {first_call:.0f} s)")
            result = Result(case.op, case.label, provider, backend, milliseconds,
                            max_abs_error=error)
            if case.bytes_moved is not None:
                result.gbps = gbps(case.bytes_moved(inputs), milliseconds)
                result.copy_fraction = result.gbps / bandwidth
            if case.flops is not None:
                result.tflops = case.flops(inputs) / (milliseconds * 1e-3) / 1e12
            rows[provider] = result
        for result in rows.values():
            if "torch" in rows:
                result.speedup_vs_torch = rows["torch"].ms / result.ms
            if "torch.compile" in rows:
                result.speedup_vs_compile = rows["torch.compile"].ms / result.ms
        for result in rows.values():
            log(format_row(result))
        results.extend(rows.values())
        if on_case is not None:
            on_case(results, bandwidth)
        del inputs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results, bandwidth


def format_row(result: Result) -> str:
    """One result as a line of the Markdown table."""
    def number(value: float | None, pattern: str) -> str:
        return "" if value is None else pattern.format(value)

    return (f"| {result.op} | {result.label} | {result.provider} | {result.backend} "
            f"| {result.ms:.4f} | {number(result.gbps, '{:.0f}')} "
            f"| {number(result.copy_fraction, '{:.0%}')} | {number(result.tflops, '{:.1f}')} "
            f"| {number(result.speedup_vs_torch, '{:.2f}x')} "
            f"| {number(result.speedup_vs_compile, '{:.2f}x')} |")


TABLE_HEADER = (
    "| op | shape | provider | backend | ms | GB/s | % copy BW | TFLOP/s | vs torch "
    "| vs compile |\n"
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
)


def markdown(results: list[Result], env: dict[str, str], bandwidth: float, dtype: torch.dtype
             ) -> str:
    """The results as a Markdown document with the environment on top."""
    device = env["device"]
    lines = [f"# hrkernels op benchmarks on {device}", ""]
    if not torch.cuda.is_available():
        lines += ["**CPU run**: no GPU here, so the `hrkernels` provider runs the PyTorch "
                  "reference; these numbers say nothing about the Triton kernels.", ""]
    lines += [
        f"dtype {str(dtype).removeprefix('torch.')}; torch {env['torch']}, triton {env['triton']}, "
        f"CUDA {env['cuda']}; measured copy bandwidth {bandwidth:.0f} GB/s (read + write).",
        "Times are medians; GB/s counts each input read once and each output written once.",
        "",
        TABLE_HEADER,
    ]
    lines += [format_row(result) for result in results]
    return "\n".join(lines) + "\n"


def plot(results: list[Result], path: Path, title: str) -> bool:
    """A bar chart of each provider's speedup over the eager reference; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cases = list(dict.fromkeys((r.op, r.label) for r in results))
    providers = list(dict.fromkeys(r.provider for r in results))
    speedup = {(r.op, r.label, r.provider): r.speedup_vs_torch or 0.0 for r in results}
    figure, axes = plt.subplots(figsize=(max(6, 1.2 * len(cases)), 4.5))
    width = 0.8 / len(providers)
    for index, provider in enumerate(providers):
        heights = [speedup.get((op, label, provider), 0.0) for op, label in cases]
        axes.bar([c + index * width for c in range(len(cases))], heights, width, label=provider)
    axes.set_xticks([c + 0.4 - width / 2 for c in range(len(cases))])
    axes.set_xticklabels([f"{op}\n{label}" for op, label in cases], rotation=45, ha="right",
                         fontsize=7)
    axes.set_ylabel("speedup over eager reference")
    axes.set_yscale("log")
    axes.axhline(1.0, color="black", linewidth=0.5)
    axes.set_title(title, fontsize=9)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def device_tag(env: dict[str, str]) -> str:
    """A short file-name tag for the device (``h100``, ``cpu``...)."""
    name = env["device"].lower()
    for tag in ("h100", "h200", "a100", "l40", "4090"):
        if tag in name:
            return tag
    return "cpu" if name.startswith("cpu") else "".join(c if c.isalnum() else "-" for c in name)


def write_results(results: list[Result], bandwidth: float, dtype: torch.dtype, out_dir: Path,
                  prefix: str = "ops") -> list[Path]:
    """Write ``<prefix>_<device>.json``, ``.md`` and ``.png`` under ``out_dir``; returns the
    paths written."""
    env = environment()
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{prefix}_{device_tag(env)}"
    document = {"environment": env, "dtype": str(dtype), "copy_bandwidth_gbps": bandwidth,
                "results": [asdict(result) for result in results]}
    paths = [stem.with_suffix(".json"), stem.with_suffix(".md")]
    paths[0].write_text(json.dumps(document, indent=2) + "\n")
    paths[1].write_text(markdown(results, env, bandwidth, dtype))
    if plot(results, stem.with_suffix(".png"), f"{prefix} on {env['device']}"):
        paths.append(stem.with_suffix(".png"))
    return paths

"""Time benchmark cases with three providers and write the results.

Providers (DESIGN.md, "Benchmarks"):

* ``torch``: the op's PyTorch reference, eager;
* ``torch.compile``: the same reference under ``torch.compile`` (default mode);
* ``hrkernels``: the public op (Triton on CUDA; on a CPU it is the reference again, and the results
  say so).

GPU times come from ``triton.testing.do_bench`` after warm-up; CPU times from wall-clock runs of
batches of calls (each batch lasts at least :data:`CPU_SAMPLE_SECONDS`, so that a timer tick or a
preemption does not quantise a fast op). Every result reports the median and the spread (min and
max over the repeats); where the median is more than ``1 + MAX_SPREAD`` times the min (a busy
machine), the result cannot rank providers: its ratios are not computed, and the table says so.
Memory-bound cases report GB/s (the case's ``bytes_moved`` over the median time) and the fraction
of the device-to-device copy bandwidth measured in the same run; compute-bound cases report
TFLOP/s.
"""

from __future__ import annotations

import json
import math
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

# A result whose median exceeds its min by more than this fraction was timed on a busy machine (or
# with too coarse a timer): ratios to or from it are not computed.
MAX_SPREAD = 0.5
# Each CPU sample times enough calls to last at least this long.
CPU_SAMPLE_SECONDS = 0.02


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call over repeats: the median, min and max."""

    median: float
    minimum: float
    maximum: float

    @property
    def steady(self) -> bool:
        """Whether the median is within ``1 + MAX_SPREAD`` of the min (the runs agree)."""
        return self.median <= (1 + MAX_SPREAD) * self.minimum


@dataclass
class Result:
    """One case timed by one provider (``ms``: the median; ``ms_min``/``ms_max``: the spread;
    ``steady``: see :class:`Timing`; ratios are None where this result or the one it is compared
    with is not steady)."""

    op: str
    label: str
    provider: str
    backend: str
    ms: float
    ms_min: float | None = None
    ms_max: float | None = None
    steady: bool = True
    gbps: float | None = None
    copy_fraction: float | None = None
    tflops: float | None = None
    speedup_vs_torch: float | None = None
    speedup_vs_compile: float | None = None
    max_abs_error: float | None = None


def time_ms(fn: Callable[[], Any], device: torch.device) -> Timing:
    """Milliseconds per call of ``fn`` (after warm-up): median, min and max over repeats."""
    if device.type == "cuda":
        import triton.testing

        median, minimum, maximum = triton.testing.do_bench(fn, warmup=25, rep=100,
                                                           quantiles=[0.5, 0.0, 1.0])
        return Timing(float(median), float(minimum), float(maximum))
    start = time.perf_counter()
    fn()  # warm-up
    calls = max(1, math.ceil(CPU_SAMPLE_SECONDS / max(time.perf_counter() - start, 1e-9)))
    samples = []
    deadline = time.perf_counter() + 0.3
    while len(samples) < 5 or (time.perf_counter() < deadline and len(samples) < 20):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) * 1e3 / calls)
    return Timing(statistics.median(samples), min(samples), max(samples))


def gbps(nbytes: float, milliseconds: float) -> float:
    """Bytes moved in ``milliseconds``, in GB/s (10^9 bytes per second)."""
    return nbytes / (milliseconds * 1e-3) / 1e9


def copy_bandwidth_gbps(device: torch.device, megabytes: int = 512) -> float:
    """Measured device-to-device copy bandwidth, counting bytes read plus bytes written."""
    if device.type != "cuda":
        megabytes = 64
    source = torch.empty(megabytes * 2**20, dtype=torch.uint8, device=device).random_()
    target = torch.empty_like(source)
    milliseconds = time_ms(lambda: target.copy_(source), device).median
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
            timing = time_ms(lambda f=function, i=inputs: f(i), device)
            milliseconds = timing.median
            if first_call > 5:
                log(f"  ({case.op} {case.label} {provider}: first call took {first_call:.0f} s)")
            result = Result(case.op, case.label, provider, backend, milliseconds, timing.minimum,
                            timing.maximum, timing.steady, max_abs_error=error)
            if case.bytes_moved is not None:
                result.gbps = gbps(case.bytes_moved(inputs), milliseconds)
                result.copy_fraction = result.gbps / bandwidth
            if case.flops is not None:
                result.tflops = case.flops(inputs) / (milliseconds * 1e-3) / 1e12
            rows[provider] = result
        for result in rows.values():
            result.speedup_vs_torch = _ratio(rows.get("torch"), result)
            result.speedup_vs_compile = _ratio(rows.get("torch.compile"), result)
        for line in format_rows(list(rows.values())):
            log(line)
        results.extend(rows.values())
        if on_case is not None:
            on_case(results, bandwidth)
        del inputs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results, bandwidth


def _ratio(baseline: Result | None, result: Result) -> float | None:
    """``baseline.ms / result.ms``, or None without a baseline or when either is not steady."""
    if baseline is None or not (baseline.steady and result.steady):
        return None
    return baseline.ms / result.ms


# What the ratio columns show where a ratio was withheld because of the spread.
UNSTEADY = "spread too wide"


def format_row(result: Result, steady_baselines: dict[str, bool] | None = None) -> str:
    """One result as a line of the Markdown table (``steady_baselines``: provider -> whether its
    result on this case was steady, to say why a ratio is missing)."""
    def number(value: float | None, pattern: str) -> str:
        return "" if value is None else pattern.format(value)

    def ratio(value: float | None, baseline: str) -> str:
        steady = (steady_baselines or {}).get(baseline)
        if value is None and steady is not None and not (steady and result.steady):
            return UNSTEADY
        return number(value, "{:.2f}x")

    spread = ("" if result.ms_min is None else f"{result.ms_min:.4f}-{result.ms_max:.4f}"
              + ("" if result.steady else " (busy)"))
    return (f"| {result.op} | {result.label} | {result.provider} | {result.backend} "
            f"| {result.ms:.4f} | {spread} | {number(result.gbps, '{:.0f}')} "
            f"| {number(result.copy_fraction, '{:.0%}')} | {number(result.tflops, '{:.1f}')} "
            f"| {ratio(result.speedup_vs_torch, 'torch')} "
            f"| {ratio(result.speedup_vs_compile, 'torch.compile')} |")


def format_rows(results: list[Result]) -> list[str]:
    """The table lines of ``results`` (the ratio columns say where the spread withheld a ratio)."""
    steady = {(r.op, r.label, r.provider): r.steady for r in results}
    return [format_row(result, {provider: steady[(result.op, result.label, provider)]
                                for provider in PROVIDERS
                                if (result.op, result.label, provider) in steady})
            for result in results]


TABLE_HEADER = (
    "| op | shape | provider | backend | ms (median) | min-max ms | GB/s | % copy BW | TFLOP/s "
    "| vs torch | vs compile |\n"
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
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
        f"Times are medians over repeats, with their min-max; a result whose median is over "
        f"{1 + MAX_SPREAD:g}x its min (a busy machine) ranks no provider: its ratios read "
        f"\"{UNSTEADY}\". GB/s counts each input read once and each output written once.",
        "",
        TABLE_HEADER,
    ]
    lines += format_rows(results)
    return "\n".join(lines) + "\n"


def plot(results: list[Result], path: Path, title: str) -> str | None:
    """A bar chart of each provider's speedup over the eager reference (``"torch"``), bars only
    where a ratio exists; returns None when written, else why not (no matplotlib, no ratio)."""
    speedup = {(r.op, r.label, r.provider): r.speedup_vs_torch for r in results
               if r.speedup_vs_torch is not None}
    if not speedup:
        return ("no chart: it shows speed-ups over the 'torch' provider, and no result has one "
                "(the 'torch' provider did not run, or every spread was too wide)")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no chart: matplotlib is not installed (pip install -e \".[bench]\")"
    cases = list(dict.fromkeys((r.op, r.label) for r in results))
    providers = list(dict.fromkeys(provider for _, _, provider in speedup))
    figure, axes = plt.subplots(figsize=(max(6, 1.2 * len(cases)), 4.5))
    width = 0.8 / len(providers)
    for index, provider in enumerate(providers):
        bars = [(c, speedup[(op, label, provider)]) for c, (op, label) in enumerate(cases)
                if (op, label, provider) in speedup]
        axes.bar([c + index * width for c, _ in bars], [value for _, value in bars], width,
                 label=provider)
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
    return None


def device_tag(env: dict[str, str]) -> str:
    """A short file-name tag for the device (``h100``, ``cpu``...)."""
    name = env["device"].lower()
    for tag in ("h100", "h200", "a100", "l40", "4090"):
        if tag in name:
            return tag
    return "cpu" if name.startswith("cpu") else "".join(c if c.isalnum() else "-" for c in name)


def write_document(out_dir: str | Path, stem: str, document: Any, table: str) -> None:
    """``<stem>.json`` (``document``) and ``<stem>.md`` (``table``) under ``out_dir`` (made if
    missing), and ``table`` printed: how a GPU benchmark module's ``main`` records its result."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(document, indent=1) + "\n")
    (out / f"{stem}.md").write_text(table)
    print(table)


def write_results(results: list[Result], bandwidth: float, dtype: torch.dtype, out_dir: Path,
                  prefix: str = "ops", log: Callable[[str], None] | None = None) -> list[Path]:
    """Write ``<prefix>_<device>.json``, ``.md`` and ``.png`` under ``out_dir``; returns the
    paths written (``log`` hears why a chart was not drawn)."""
    env = environment()
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{prefix}_{device_tag(env)}"
    document = {"environment": env, "dtype": str(dtype), "copy_bandwidth_gbps": bandwidth,
                "results": [asdict(result) for result in results]}
    paths = [stem.with_suffix(".json"), stem.with_suffix(".md")]
    paths[0].write_text(json.dumps(document, indent=2) + "\n")
    paths[1].write_text(markdown(results, env, bandwidth, dtype))
    why_not = plot(results, stem.with_suffix(".png"), f"{prefix} on {env['device']}")
    if why_not is None:
        paths.append(stem.with_suffix(".png"))
    elif log is not None:
        log(why_not)
    return paths

"""Benchmarks of hrkernels: op microbenchmarks (``hrkernels bench``) and their harness.

Every op family describes its benchmark cases in ``hrkernels/bench/<family>.py`` (a list
``CASES`` of :class:`~hrkernels.bench.registry.BenchCase`); :mod:`hrkernels.bench.harness` times
them with three providers (the PyTorch reference in eager mode, the same reference under
``torch.compile``, and hrkernels) and writes JSON, Markdown and a PNG chart.
:mod:`hrkernels.bench.tuning` names the kernels' launch plans and runs a kernel under a given plan
(for the sweep scripts in the repository's top-level ``bench/``).
"""

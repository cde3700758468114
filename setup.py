"""Build script for hrkernels.

Today hrkernels is pure Python (its kernels are Triton, compiled at run time). This file is where
the optional CUDA extension (`csrc/`) will be built; it is built only when asked for with
``HRKERNELS_BUILD_CUDA=1``, so that a plain ``pip install`` never needs nvcc.
"""

import os

from setuptools import setup

if os.environ.get("HRKERNELS_BUILD_CUDA", "0") == "1":
    raise SystemExit(
        "HRKERNELS_BUILD_CUDA=1: hrkernels has no CUDA C++ extension yet; every op runs on Triton. "
        "Unset HRKERNELS_BUILD_CUDA to install."
    )

setup()

"""The ``views`` op family: window and dilated-lattice gather/scatter (see README.md)."""

from hrkernels.ops.views.op import (
    gather_dilated,
    gather_windows,
    scatter_dilated,
    scatter_windows_mean,
    window_count,
    window_grid,
)

__all__ = [
    "gather_dilated",
    "gather_windows",
    "scatter_dilated",
    "scatter_windows_mean",
    "window_count",
    "window_grid",
]

"""Public ops of hrkernels (``hrkernels.ops.<name>``).

Each op is a registered ``torch.library`` operator (``hrkernels::<name>``) with a fake
implementation, so ``torch.compile(fullgraph=True)`` traces through it, and an implementation
table by backend: ``"torch"``, the PyTorch reference (``reference.py`` of each family), and
``"triton"``, the Triton kernels. CUDA tensors run Triton kernels; other devices run the
reference. See ``_backend.py`` for the tables, ``HRKERNELS_BACKEND`` and :func:`use_backend`.
"""

from hrkernels.ops._backend import BackendUnavailableError, select_backend, use_backend
from hrkernels.ops.blur import frequency_fusion, gaussian_blur2d, gaussian_kernel1d
from hrkernels.ops.conv import dilated_conv2d, disperse_kernel, dispersion_matrix
from hrkernels.ops.norm import combine_group_stats, group_norm_silu, group_stats
from hrkernels.ops.stats import match_stats
from hrkernels.ops.views import (
    gather_dilated,
    gather_windows,
    scatter_dilated,
    scatter_windows_mean,
    window_count,
    window_grid,
)

__all__ = [
    "BackendUnavailableError",
    "combine_group_stats",
    "dilated_conv2d",
    "disperse_kernel",
    "dispersion_matrix",
    "frequency_fusion",
    "gather_dilated",
    "gather_windows",
    "gaussian_blur2d",
    "gaussian_kernel1d",
    "group_norm_silu",
    "group_stats",
    "match_stats",
    "scatter_dilated",
    "scatter_windows_mean",
    "select_backend",
    "use_backend",
    "window_count",
    "window_grid",
]

"""Modules and forwards that call :mod:`hrkernels.ops` (the ``nn`` layer of hrkernels).

* :class:`ReDilatedConvForward`: the forward a re-dilated ``nn.Conv2d`` runs (ScaleCrafter's
  re-dilation, fractional "stretch" and dispersed convolution), installed on the instance by
  :func:`hrkernels.patch`; one forward per layer holds a setting per named configuration of the
  model and runs the active one's.
* :class:`ScaleFusionAttention`: the self-attention processor FreeScale's Scale Fusion runs
  (global and windowed local attention fused in frequency), installed by
  :class:`hrkernels.ScaleFusion`.
"""

from hrkernels.nn.attention import ScaleFusionAttention
from hrkernels.nn.conv import ReDilatedConvForward, check_redilatable

__all__ = ["ReDilatedConvForward", "ScaleFusionAttention", "check_redilatable"]

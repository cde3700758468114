"""The ``norm`` op family: GroupNorm with statistics gathered over tiles (see README.md)."""

from hrkernels.ops.norm.op import combine_group_stats, group_norm_silu, group_stats

__all__ = ["combine_group_stats", "group_norm_silu", "group_stats"]

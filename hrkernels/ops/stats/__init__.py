"""The ``stats`` op family: statistical matching of dilated sub-lattices (see README.md)."""

from hrkernels.ops.stats.op import match_stats

__all__ = ["match_stats"]

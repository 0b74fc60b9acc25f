"""One-shot pruning criteria sharing one calibration driver."""

from semisparse.errors import UserError
from semisparse.masks import check_tie_order
from semisparse.prune.calibrate import PruneResult, PruningMethod, prune_model
from semisparse.prune.magnitude import Magnitude
from semisparse.prune.sparsegpt import SparseGPT
from semisparse.prune.wanda import Wanda

METHODS = {"magnitude": Magnitude, "wanda": Wanda, "sparsegpt": SparseGPT}
#: How calibration statistics are summed: float64 (ours: plain sums in float64, then one division), or reference
#: (the SparseGPT/Wanda codes' float32 running means, rescaled by n/(n+1) per calibration sample). The two differ
#: only in rounding, yet on a de-quantised model the masks they give can differ (BENCHMARKS.md, one-shot reference).
CALIB_STATS = ("float64", "reference")


def get_method(name: str, tie_order: str = "stable", calib_stats: str = "float64") -> PruningMethod:
    """The pruning criterion ``name``; ``tie_order`` (masks.TIE_ORDERS) orders equal scores within a group;
    ``calib_stats`` (CALIB_STATS) is how Wanda's and SparseGPT's statistics are summed."""
    if name not in METHODS:
        raise UserError(f"unknown pruning method {name!r} (choose from {', '.join(METHODS)})")
    if calib_stats not in CALIB_STATS:
        raise UserError(f"unknown --calib-stats {calib_stats!r} (choose from {', '.join(CALIB_STATS)})")
    method = METHODS[name]()
    method.tie_order = check_tie_order(tie_order)
    method.calib_stats = calib_stats
    return method


__all__ = ["CALIB_STATS", "METHODS", "PruneResult", "PruningMethod", "get_method", "prune_model"]

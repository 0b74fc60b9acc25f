"""One-shot pruning criteria sharing one calibration driver."""

from semisparse.errors import UserError
from semisparse.masks import check_tie_order
from semisparse.prune.calibrate import PruneResult, PruningMethod, prune_model
from semisparse.prune.magnitude import Magnitude
from semisparse.prune.sparsegpt import SparseGPT
from semisparse.prune.wanda import Wanda

METHODS = {"magnitude": Magnitude, "wanda": Wanda, "sparsegpt": SparseGPT}


def get_method(name: str, tie_order: str = "stable") -> PruningMethod:
    """The pruning criterion ``name``; ``tie_order`` (masks.TIE_ORDERS) orders equal scores within a group."""
    if name not in METHODS:
        raise UserError(f"unknown pruning method {name!r} (choose from {', '.join(METHODS)})")
    method = METHODS[name]()
    method.tie_order = check_tie_order(tie_order)
    return method


__all__ = ["METHODS", "PruneResult", "PruningMethod", "get_method", "prune_model"]

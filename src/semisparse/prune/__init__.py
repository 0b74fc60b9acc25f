"""One-shot pruning criteria sharing one calibration driver."""

from semisparse.errors import UserError
from semisparse.prune.calibrate import PruneResult, PruningMethod, prune_model
from semisparse.prune.magnitude import Magnitude
from semisparse.prune.sparsegpt import SparseGPT
from semisparse.prune.wanda import Wanda

METHODS = {"magnitude": Magnitude, "wanda": Wanda, "sparsegpt": SparseGPT}


def get_method(name: str) -> PruningMethod:
    if name not in METHODS:
        raise UserError(f"unknown pruning method {name!r} (choose from {', '.join(METHODS)})")
    return METHODS[name]()


__all__ = ["METHODS", "PruneResult", "PruningMethod", "get_method", "prune_model"]

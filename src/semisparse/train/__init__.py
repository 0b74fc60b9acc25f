"""Building blocks of the Adaptive Sparse Trainer (AST): sparse layers, masked SR-STE decay, distillation loss."""

from semisparse.train.distill import DistillOutput, distill_loss, final_hidden_states, lm_head, shift_labels
from semisparse.train.optim import MaskedAdamW, add_masked_decay_to_grad, decay_lambda, set_srste_lambda
from semisparse.train.sparse_linear import (
    SparseLinear,
    attach_slorb,
    densify,
    param_masks,
    slorb_parameter_count,
    sparse_layers,
    sparsify,
)

__all__ = [
    "DistillOutput",
    "MaskedAdamW",
    "SparseLinear",
    "add_masked_decay_to_grad",
    "attach_slorb",
    "decay_lambda",
    "densify",
    "distill_loss",
    "final_hidden_states",
    "lm_head",
    "param_masks",
    "set_srste_lambda",
    "shift_labels",
    "slorb_parameter_count",
    "sparse_layers",
    "sparsify",
]


def __getattr__(name: str):
    # The training loop imports data, pruning and evaluation code: loaded only when asked for.
    if name in ("train", "TrainResult"):
        from semisparse.train import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

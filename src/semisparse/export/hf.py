"""The ``hf`` format: a stock transformers folder in the export dtype (zeros stored densely).

A SLoRB branch cannot live in a stock model. It is folded into the dense weights only when asked: the layer computes
y = x (W⊙M)ᵀ + (x Xᵀ) Sᵀ (train/sparse_linear.py), so the merged weight is W' = W⊙M + S·X, which is dense:
the result is no longer N:M sparse.
"""

from __future__ import annotations

from pathlib import Path

import torch

from semisparse.errors import UserError
from semisparse.export.source import Source, quiet_transformers
from semisparse.layers import weight_matrix
from semisparse.rundir import SLORB_FILE
from semisparse.train.sparse_linear import SLORB_S, SLORB_X


def merge_slorb(source: Source) -> list[str]:
    """W ← W⊙M + S·X in place for every layer with a SLoRB branch (float64 product); returns the layers merged."""
    merged = []
    for name, module in source.modules.items():
        s, x = source.slorb.get(f"{name}.{SLORB_S}"), source.slorb.get(f"{name}.{SLORB_X}")
        if s is None and x is None:
            continue
        if s is None or x is None:
            raise UserError(f"{SLORB_FILE}: layer {name} needs both {SLORB_S} and {SLORB_X}")
        weight = weight_matrix(module)  # a view: writing it writes the layer, also for GPT-2's transposed Conv1D
        if s.shape[0] != weight.shape[0] or x.shape[1] != weight.shape[1] or s.shape[1] != x.shape[0]:
            raise UserError(f"{SLORB_FILE}: the SLoRB shapes of layer {name} do not fit its weight")
        masked = weight.double() * source.masks[name]
        weight.copy_((masked + s.double() @ x.double()).to(weight.dtype))
        merged.append(name)
    return merged


def write_hf(source: Source, folder: Path, dtype: torch.dtype) -> None:
    """save_pretrained of the (possibly merged) model in ``dtype`` + the tokenizer, into ``folder``."""
    model = source.model.to(dtype)
    with quiet_transformers():
        model.save_pretrained(folder)
    source.tokenizer.save_pretrained(folder)

"""N:M semi-structured masks: the one place where N:M is defined.

A mask is a bool tensor shaped like a linear weight viewed as [out_features, in_features]. In every output
row, each group of M consecutive input columns keeps exactly N entries (True = kept).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from semisparse.errors import UserError

_PATTERN_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class Pattern:
    """An N:M pattern: keep N of every M consecutive input weights."""

    n: int
    m: int

    def __post_init__(self) -> None:
        if not (0 < self.n < self.m):
            raise UserError(f"impossible N:M pattern {self.n}:{self.m}: need 0 < N < M")

    @classmethod
    def parse(cls, text: "str | Pattern") -> "Pattern":
        if isinstance(text, Pattern):
            return text
        match = _PATTERN_RE.match(str(text))
        if not match:
            raise UserError(f"malformed N:M pattern {text!r}: expected two integers like '2:4'")
        return cls(int(match.group(1)), int(match.group(2)))

    @property
    def density(self) -> float:
        return self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


#: How entries with equal scores are ordered. "stable": keep the N highest, ties to the lower index (the default:
#: a documented rule every process computes alike). "reference": prune the M-N lowest as torch.topk(largest=False)
#: returns them, which is what the SparseGPT and Wanda reference codes do (to reproduce their numbers exactly).
TIE_ORDERS = ("stable", "reference")


def check_tie_order(tie_order: str) -> str:
    if tie_order not in TIE_ORDERS:
        raise UserError(f"unknown tie order {tie_order!r} (choose from {', '.join(TIE_ORDERS)})")
    return tie_order


def nm_mask(scores: torch.Tensor, pattern: Pattern | str, tie_order: str = "stable") -> torch.Tensor:
    """Keep the N highest scores in every group of M consecutive entries of the last dimension.

    ``tie_order`` "stable" breaks ties towards the lower column index (a stable sort), so every process and every
    run computes the same mask from the same scores; "reference" marks the M-N entries ``torch.topk(group, M-N,
    largest=False)`` returns as pruned, as the SparseGPT/Wanda reference codes do.
    """
    pattern = Pattern.parse(pattern)
    n, m = pattern.n, pattern.m
    cols = scores.shape[-1]
    if cols % m:
        raise ValueError(f"last dimension {cols} is not a multiple of M={m}")
    if torch.isnan(scores).any():
        raise ValueError("mask scores contain NaN")
    groups = scores.reshape(*scores.shape[:-1], cols // m, m)
    if check_tie_order(tie_order) == "reference":
        pruned = torch.topk(groups, m - n, dim=-1, largest=False).indices
        mask = torch.ones_like(groups, dtype=torch.bool)
        mask.scatter_(-1, pruned, False)
        return mask.reshape(scores.shape)
    order = torch.argsort(groups, dim=-1, descending=True, stable=True)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(-1, order[..., :n], True)
    return mask.reshape(scores.shape)


def is_nm(mask: torch.Tensor, pattern: Pattern | str) -> bool:
    """True iff every group of M consecutive entries along the last dimension keeps exactly N."""
    pattern = Pattern.parse(pattern)
    if mask.dtype != torch.bool or mask.shape[-1] % pattern.m:
        return False
    kept = mask.reshape(*mask.shape[:-1], -1, pattern.m).sum(-1)
    return bool((kept == pattern.n).all())


def flip_count(new: torch.Tensor, old: torch.Tensor) -> int:
    """Entries whose kept/pruned state differs (a swap inside one group counts 2, as in AST.md §1)."""
    return int((new ^ old).sum())

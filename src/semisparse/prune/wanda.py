"""Wanda (Sun et al. 2023): score |W_ij| * ||X_j||_2, compared within each N:M group of a row."""

from __future__ import annotations

import torch

from semisparse.masks import Pattern, nm_mask


def wanda_scores(weight: torch.Tensor, input_sq_norms: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2 for a weight [out, in] and the per-input-column sum of squares [in]."""
    return weight.abs() * input_sq_norms.sqrt().to(weight.dtype).unsqueeze(0)


class Wanda:
    name = "wanda"
    needs_calibration = True
    tie_order = "stable"

    def new_stats(self, in_features: int, device: torch.device | None = None) -> torch.Tensor:
        return torch.zeros(in_features, dtype=torch.float64, device=device)  # on the inputs' device

    def observe(self, stats: torch.Tensor, x: torch.Tensor) -> None:
        stats += x.double().pow(2).sum(0).to(stats.device)

    def prune(self, weight: torch.Tensor, stats: torch.Tensor, pattern: Pattern) -> torch.Tensor:
        mask = nm_mask(wanda_scores(weight, stats.to(weight.device)), pattern, self.tie_order)
        weight.mul_(mask)
        return mask

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
    calib_stats = "float64"

    def new_stats(self, in_features: int, device: torch.device | None = None) -> dict:
        dtype = torch.float32 if self.calib_stats == "reference" else torch.float64
        return {"sq": torch.zeros(in_features, dtype=dtype, device=device), "n": 0}  # on the inputs' device

    def observe(self, stats: dict, x: torch.Tensor) -> None:
        """One calibration sample's inputs x [tokens, in] (the driver runs the samples one at a time)."""
        if self.calib_stats == "reference":
            # Wanda's layerwrapper: a float32 running mean over samples of each column's squared L2 norm.
            stats["sq"] *= stats["n"] / (stats["n"] + 1)
            stats["n"] += 1
            stats["sq"] += torch.norm(x.float().t(), p=2, dim=1).to(stats["sq"].device) ** 2 / stats["n"]
        else:
            stats["sq"] += x.double().pow(2).sum(0).to(stats["sq"].device)
            stats["n"] += 1

    def prune(self, weight: torch.Tensor, stats: dict, pattern: Pattern) -> torch.Tensor:
        # a per-column scale (the running mean's 1/n) changes no comparison within a row's group
        mask = nm_mask(wanda_scores(weight, stats["sq"].to(weight.device)), pattern, self.tie_order)
        weight.mul_(mask)
        return mask

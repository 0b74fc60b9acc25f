"""Magnitude pruning: keep the N largest |W| of every M consecutive inputs. Needs no calibration data."""

from __future__ import annotations

import torch

from semisparse.masks import Pattern, nm_mask


class Magnitude:
    name = "magnitude"
    needs_calibration = False
    tie_order = "stable"

    def new_stats(self, in_features: int, device=None) -> None:
        return None

    def observe(self, stats: None, x: torch.Tensor) -> None:  # pragma: no cover - never called
        raise AssertionError("magnitude pruning uses no calibration data")

    def prune(self, weight: torch.Tensor, stats: None, pattern: Pattern) -> torch.Tensor:
        mask = nm_mask(weight.abs(), pattern, self.tie_order)
        weight.mul_(mask)
        return mask

"""SparseGPT (Frantar & Alistarh 2023): OBS pruning with lazy block updates, N:M selection per row block.

The math follows the reference ``fasterprune``: H = 2/n Σ x xᵀ, dampened by 1% of its mean diagonal, the
upper Cholesky factor of H⁻¹ drives both the selection score w²/[H⁻¹]²_jj and the error compensation of the
not-yet-pruned columns. Masks are chosen with ``nm_mask`` so N:M lives in one place.
"""

from __future__ import annotations

import math

import torch

from semisparse.masks import Pattern, nm_mask


class SparseGPT:
    name = "sparsegpt"
    needs_calibration = True
    tie_order = "stable"
    calib_stats = "float64"

    def __init__(self, blocksize: int = 128, percdamp: float = 0.01):
        self.blocksize = blocksize
        self.percdamp = percdamp

    def new_stats(self, in_features: int, device: torch.device | None = None) -> dict:
        # Σ x xᵀ accumulated in float64 (each batch's product in float32) and the number of rows seen, on the
        # inputs' device: no host copy per calibration sample. calib_stats "reference": the reference code's
        # float32 running H and the number of samples.
        dtype = torch.float32 if self.calib_stats == "reference" else torch.float64
        return {"xtx": torch.zeros(in_features, in_features, dtype=dtype, device=device), "n": 0}

    def observe(self, stats: dict, x: torch.Tensor) -> None:
        """One calibration sample's inputs x [tokens, in] (the driver runs the samples one at a time)."""
        x = x.float()
        if self.calib_stats == "reference":
            # SparseGPT's add_batch: H ← H·n/(n+1) + (√(2/(n+1))·x)ᵀ(√(2/(n+1))·x), n counting samples, in float32
            stats["xtx"] *= stats["n"] / (stats["n"] + 1)
            stats["n"] += 1
            x = math.sqrt(2 / stats["n"]) * x
            stats["xtx"] += (x.t() @ x).to(stats["xtx"].device)
            return
        stats["xtx"] += (x.t() @ x).to(stats["xtx"].device, torch.float64)
        stats["n"] += x.shape[0]

    def hessian(self, stats: dict) -> torch.Tensor:
        if self.calib_stats == "reference":
            return stats["xtx"]  # already 2/n Σ x xᵀ, n in samples (a scale that changes no mask nor update)
        return 2.0 * stats["xtx"] / max(stats["n"], 1)

    def prune(self, weight: torch.Tensor, stats: dict, pattern: Pattern) -> torch.Tensor:
        pruned, mask = sparsegpt_prune(
            weight, self.hessian(stats).to(weight.device), pattern, self.blocksize, self.percdamp,
            tie_order=self.tie_order,
        )
        weight.copy_(pruned.to(weight.dtype))
        return mask


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    pattern: Pattern,
    blocksize: int = 128,
    percdamp: float = 0.01,
    dtype: torch.dtype = torch.float32,
    tie_order: str = "stable",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``weight`` [out, in] given H [in, in]; returns (pruned weight, bool mask). Inputs are not modified."""
    m = pattern.m
    W = weight.detach().to(dtype).clone()
    H = hessian.detach().to(dtype).clone()
    cols = W.shape[1]
    Hinv = dampened_inverse_cholesky(H, W, percdamp)

    # Groups must not straddle two lazy blocks: use the largest multiple of M not above blocksize.
    blocksize = max(m, blocksize - blocksize % m)
    mask = torch.zeros_like(W, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        for i in range(i2 - i1):
            if i % m == 0:  # choose this group's kept entries from the updated weights (OBS saliency)
                scores = W1[:, i : i + m] ** 2 / d[i : i + m].unsqueeze(0) ** 2
                mask[:, i1 + i : i1 + i + m] = nm_mask(scores, pattern, tie_order)
            w = W1[:, i]
            q = w * mask[:, i1 + i]
            err = (w - q) / d[i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W * mask, mask


def dampened_inverse_cholesky(H: torch.Tensor, W: torch.Tensor, percdamp: float) -> torch.Tensor:
    """The upper Cholesky factor of (H + λI)⁻¹, λ = ``percdamp`` × mean diag(H), as the SparseGPT and GPTQ references
    compute it. Modifies ``H`` and ``W`` (pass copies) in place: inputs that never fire carry no information, so
    their diagonal becomes 1 and their weights (columns of ``W`` [out, in]) are zeroed, as in the references."""
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

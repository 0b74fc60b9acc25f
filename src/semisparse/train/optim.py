"""Annealed SR-STE decay on the pruned weights (AST.md §2), in its two variants.

(a) ``MaskedAdamW``: the paper's AdamW, where the decay ``λ·(¬M ⊙ W)`` stays out of the first moment but feeds the
    second one (the GPT-2 reference code, minus its int-mask bug).
(b) ``add_masked_decay_to_grad``: ``g += λ·(¬M ⊙ W)`` before a stock AdamW (the reference LLaMA path).

Masks are bool tensors shaped like the weight (True = kept). Non-bool masks are rejected: in the reference code an
int32 mask made ``~M`` a bitwise NOT (~1 = -2, ~0 = -1), which turned the decay into growth of every weight.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch.optim import Optimizer

MaskMap = Mapping[torch.Tensor, torch.Tensor]


def decay_lambda(step: int, lambda_max: float, ramp_steps: int) -> float:
    """λ(t) = λ_max · min(t / T0, 1): linear ramp from 0, then constant (AST.md §2, Eq. 2). T0 = 0: constant."""
    if ramp_steps <= 0:
        return float(lambda_max)
    return float(lambda_max) * min(max(step, 0) / ramp_steps, 1.0)


def _check_mask(param: torch.Tensor, mask: torch.Tensor) -> None:
    if mask.dtype != torch.bool:
        raise TypeError(f"SR-STE mask must be a bool tensor (True = kept), got {mask.dtype}")
    if mask.shape != param.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != parameter shape {tuple(param.shape)}")


def _pruned_part(param: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """¬M ⊙ W, with the bool mask used as a selector (no arithmetic on the mask at all)."""
    return param.detach().masked_fill(mask, 0)


class MaskedAdamW(Optimizer):
    """AdamW with the decoupled-moment masked SR-STE decay of AST (AST.md §2), per step:

    ``p ← p(1 − lr·wd);  m ← β1 m + (1−β1) g;  u = m + λ(¬M⊙p);  v ← β2 v + (1−β2) u²;
    p ← p − lr/(1−β1^t) · u / (√v / √(1−β2^t) + ε)``

    Note v is the EMA of u² (u built from the *averaged* gradient m), not of g², for every masked parameter, even at
    λ = 0: that is the paper's and the reference code's update, so a masked parameter never follows stock AdamW.

    ``masks`` maps a parameter to its live bool mask; the mapping is read at every step, so masks updated in place
    (``SparseLinear.recompute_mask``) need no call here. Parameters without a mask get standard AdamW, op for op as
    ``torch.optim.AdamW`` (single-tensor path). λ is the group field ``srste_lambda``, set it each step (e.g. with
    ``set_srste_lambda``). Masks are not part of ``state_dict``: they live in the model.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        srste_lambda: float = 0.0,
        masks: MaskMap | None = None,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0 or srste_lambda < 0:
            raise ValueError("lr, eps, weight_decay and srste_lambda must be >= 0")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas {betas}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, srste_lambda=srste_lambda)
        super().__init__(params, defaults)
        self.masks: MaskMap = masks if masks is not None else {}
        own = {id(p) for group in self.param_groups for p in group["params"]}
        for param, mask in self.masks.items():
            if id(param) not in own:
                raise ValueError("a masked tensor is not among the optimizer's parameters")
            _check_mask(param, mask)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd, eps, lam = group["lr"], group["weight_decay"], group["eps"], group["srste_lambda"]
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("MaskedAdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                state["step"] += 1
                step = state["step"].item()

                if wd != 0:
                    p.mul_(1 - lr * wd)
                exp_avg.lerp_(p.grad, 1 - beta1)

                mask = self.masks.get(p)
                if mask is None:  # stock AdamW: 2nd moment of the gradient
                    update = exp_avg
                    exp_avg_sq.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                else:
                    _check_mask(p, mask)
                    # u = m + λ(¬M⊙p): the decay enters the update and the 2nd moment, never the 1st (p is post-wd).
                    # As in the paper and the reference code, the 2nd moment tracks u², not g², even when λ = 0.
                    update = exp_avg.add(_pruned_part(p, mask), alpha=lam) if lam != 0 else exp_avg
                    exp_avg_sq.mul_(beta2).addcmul_(update, update, value=1 - beta2)

                step_size = lr / (1 - beta1**step)
                bias_correction2_sqrt = (1 - beta2**step) ** 0.5
                denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
                p.addcdiv_(update, denom, value=-step_size)
        return loss


def set_srste_lambda(optimizer: Optimizer, lam: float) -> None:
    """Set λ for every parameter group (call once per optimizer step, before ``step``)."""
    for group in optimizer.param_groups:
        group["srste_lambda"] = float(lam)


@torch.no_grad()
def add_masked_decay_to_grad(
    params_and_masks: MaskMap | Iterable[tuple[torch.Tensor, torch.Tensor]], lam: float
) -> None:
    """``g += λ·(¬M ⊙ W)`` for each (param, bool mask): plain SR-STE before a stock optimizer (the LLaMA path).

    Call after backward (and after gradient clipping, so the decay is not clipped) and before ``optimizer.step()``.
    Parameters without a gradient are skipped, as the optimizer skips them.
    """
    pairs = params_and_masks.items() if isinstance(params_and_masks, Mapping) else params_and_masks
    for param, mask in pairs:
        _check_mask(param, mask)
        if lam == 0 or param.grad is None:
            continue
        param.grad.add_(_pruned_part(param, mask), alpha=lam)

"""Decay of the pruned weights during training: AST's annealed SR-STE decay (AST.md §2) in two variants, and
CAST's AdamS (CAST.md §2).

(a) ``MaskedAdamW``: the paper's AdamW, where the decay ``λ·(¬M ⊙ W)`` stays out of the first moment but feeds the
    second one (the GPT-2 reference code, minus its int-mask bug).
(b) ``add_masked_decay_to_grad``: ``g += λ·(¬M ⊙ W)`` before a stock AdamW (the reference LLaMA path).
(c) ``AdamS``: CAST's λ·sign(W) mixed into the pruned weights' first moment with a weight α ramping 0 → 1.

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


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (FSDP2 parameters, their gradients and optimizer state), else the tensor."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def local_rows(param: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The part of ``mask`` that lines up with this process's shard of ``param``: the local shard of a mask sharded
    with its weight, or the matching rows of a full one (the initial masks M0). FSDP2 shards dim 0 (output rows)
    and N:M groups run along the input dimension, so a shard's rows carry whole groups."""
    from torch.distributed.tensor import DTensor

    if isinstance(mask, DTensor):
        return mask.to_local()
    start, stop = local_row_range(param)
    return mask if (start, stop) == (0, mask.shape[0]) else mask[start:stop]


def local_row_range(param: torch.Tensor) -> tuple[int, int]:
    """[start, stop) of the output rows this process holds of ``param`` (all of them unless FSDP2 sharded it)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor):
        return 0, param.shape[0]
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return offset[0], offset[0] + shape[0]


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
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._step_group(group, params)
        return loss

    def _step_group(self, group: dict, params: list[torch.Tensor]) -> None:
        """One step for a group, as ``torch._foreach_*`` ops over all its tensors at once (a Python loop per
        parameter costs more than the update on a small model); the same operations, in the same order, as the
        formula in the class docstring."""
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        grads, exp_avgs, exp_avg_sqs, steps, masks = [], [], [], [], []
        for p in params:
            if p.grad.is_sparse:
                raise RuntimeError("MaskedAdamW does not support sparse gradients")
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            mask = self.masks.get(p)
            if mask is not None:
                _check_mask(p, mask)
                mask = local_rows(p, mask)
            grads.append(_local(p.grad))
            exp_avgs.append(_local(state["exp_avg"]))
            exp_avg_sqs.append(_local(state["exp_avg_sq"]))
            steps.append(state["step"])
            masks.append(mask)
        params = [_local(p) for p in params]  # views: in-place updates reach the (sharded) parameters
        torch._foreach_add_(steps, 1.0)
        counts = [s.item() for s in steps]

        if wd != 0:
            torch._foreach_mul_(params, 1 - lr * wd)
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        # u = m + λ(¬M⊙p) for masked tensors (p is post-wd), m for the others. The decay enters the update and the
        # 2nd moment, never the 1st; the 2nd moment of a masked tensor tracks u², not g², even when λ = 0 (the
        # paper's update); an unmasked one tracks g² (stock AdamW).
        masked = [i for i, mask in enumerate(masks) if mask is not None]
        updates = list(exp_avgs)
        if masked:
            new = self._masked_updates([params[i] for i in masked], [exp_avgs[i] for i in masked],
                                       [masks[i] for i in masked], group)
            for i, u in zip(masked, new):
                updates[i] = u
        second = [updates[i] if masks[i] is not None else grads[i] for i in range(len(params))]
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, second, second, value=1 - beta2)

        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, [(1 - beta2**c) ** 0.5 for c in counts])
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, updates, denom, [-lr / (1 - beta1**c) for c in counts])

    def _masked_updates(self, params: list, exp_avgs: list, masks: list, group: dict) -> list:
        """u = m + λ(¬M⊙p) for each masked tensor (new tensors; the first moments are left as they are)."""
        lam = group["srste_lambda"]
        if lam == 0:
            return exp_avgs
        # p·¬M in one foreach multiply (a bool factor): about 3x faster than a masked_fill on a copy per tensor
        pruned = torch._foreach_mul(params, [mask.logical_not() for mask in masks])
        return torch._foreach_add(exp_avgs, pruned, alpha=lam)


class AdamS(MaskedAdamW):
    """CAST's AdamS (CAST.md §2): an L1-like decay λ·sign(W) mixed into the first moment of the pruned weights with a
    weight α that ramps from 0 to 1, per step::

        m ← β1 m + (1−β1) g                                  (the raw gradient only: the stored moment)
        ũ = m on kept entries,  (1−α)·m + α·λ·sign(p) on pruned ones (sign(0) = 0)
        v ← β2 v + (1−β2) ũ²;   p ← p − lr/(1−β1^t) · ũ / (√v / √(1−β2^t) + ε)

    ũ is never written back into m. λ is the group field ``srste_lambda`` (constant in CAST), α the group field
    ``adams_alpha`` (set each step with ``set_adams_alpha``: t / T in the paper). Masked weights must be float32 or
    float64: a bf16 master copy rounds a decay of λ ≈ 1e-7 away entirely. Unmasked parameters (norms, embeddings, the
    weight scale) get stock AdamW.
    """

    def __init__(self, params: Iterable, *args, adams_alpha: float = 0.0, **kwargs) -> None:
        super().__init__(params, *args, **kwargs)
        for group in self.param_groups:
            group.setdefault("adams_alpha", float(adams_alpha))
        for param in self.masks:
            if param.dtype not in (torch.float32, torch.float64):
                raise TypeError(f"AdamS needs float32 master weights for the masked layers, got {param.dtype}: "
                                "the decay would vanish in rounding (use bf16 autocast, not bf16 weights)")

    def _masked_updates(self, params: list, exp_avgs: list, masks: list, group: dict) -> list:
        alpha, lam = group["adams_alpha"], group["srste_lambda"]
        if alpha == 0:
            return exp_avgs
        decayed = torch._foreach_mul(exp_avgs, 1 - alpha)
        if lam != 0:
            torch._foreach_add_(decayed, torch._foreach_sign(params), alpha=alpha * lam)
        return [torch.where(mask, m, d) for mask, m, d in zip(masks, exp_avgs, decayed)]


def set_srste_lambda(optimizer: Optimizer, lam: float) -> None:
    """Set λ for every parameter group (call once per optimizer step, before ``step``)."""
    for group in optimizer.param_groups:
        group["srste_lambda"] = float(lam)


def set_adams_alpha(optimizer: Optimizer, alpha: float) -> None:
    """Set AdamS's mixing weight α for every parameter group (once per step, before ``step``)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"the AdamS mixing weight must be in [0, 1], got {alpha}")
    for group in optimizer.param_groups:
        group["adams_alpha"] = float(alpha)


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

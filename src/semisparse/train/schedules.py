"""What changes with the step: the learning rate, the decay on pruned weights and when masks are recomputed.

Each is a small object the loop calls at fixed points (trainer.py): ``Decay.set(optimizer, step)`` before the step's
forward, ``MaskSchedule.before_forward(step)`` / ``after_step(step)`` around it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from semisparse.config import Recipe, resolve_steps
from semisparse.train.optim import add_masked_decay_to_grad, decay_lambda, set_adams_alpha, set_srste_lambda


def lr_at(step: int, total_steps: int, lr: float, warmup_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup to ``lr`` over ``warmup_steps``, then cosine down to ``min_lr_ratio·lr`` at the last step."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    span = max(total_steps - 1 - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    return lr * (min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def adams_reach(total_steps: int, lr: float, warmup_steps: int, min_lr_ratio: float, ramp_steps: int) -> float:
    """Σ_t lr(t)·α(t): about the farthest AdamS can move a pruned weight over the run. Its step is Adam-normalised,
    so once the decay dominates a pruned weight moves ≈ lr·α per step whatever λ is (CAST.md §2)."""
    return sum(lr_at(t, total_steps, lr, warmup_steps, min_lr_ratio) * decay_lambda(t, 1.0, ramp_steps)
               for t in range(total_steps))


def mask_update_steps(total_steps: int, every: int) -> list[int]:
    """The steps after which masks are recomputed: t % every == 0, and the last step (AST.md §1)."""
    steps = [t for t in range(total_steps) if t % every == 0]
    if total_steps and steps[-1] != total_steps - 1:
        steps.append(total_steps - 1)
    return steps


@dataclass(frozen=True)
class LrSchedule:
    lr: float
    total_steps: int
    warmup_steps: int
    min_lr_ratio: float

    @classmethod
    def from_recipe(cls, cfg: Recipe, total_steps: int) -> "LrSchedule":
        return cls(cfg.optim.lr, total_steps, resolve_steps(cfg.optim.warmup, total_steps), cfg.optim.min_lr_ratio)

    def set(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        lr = lr_at(step, self.total_steps, self.lr, self.warmup_steps, self.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr


@dataclass(frozen=True)
class Decay:
    """The decay on pruned weights. SR-STE (``adamw_decoupled``: inside MaskedAdamW; ``grad``: added to the clipped
    gradient): λ(t) = λ_max·min(t/T0, 1). AdamS: λ constant, its mixing weight α(t) = min(t/T0, 1) ramps."""

    variant: str
    lambda_max: float
    ramp_steps: int

    @classmethod
    def from_recipe(cls, cfg: Recipe, total_steps: int) -> "Decay":
        return cls(cfg.decay.variant, cfg.decay.lambda_max, resolve_steps(cfg.decay.ramp, total_steps))

    def set(self, optimizer: torch.optim.Optimizer, step: int) -> tuple[float, float | None]:
        """Set step ``step``'s λ (and AdamS's α) on the optimizer; returns (λ, α or None) for the log."""
        mix = None
        if self.variant == "adams":
            lam, mix = self.lambda_max, decay_lambda(step, 1.0, self.ramp_steps)
            set_adams_alpha(optimizer, mix)
        else:
            lam = decay_lambda(step, self.lambda_max, self.ramp_steps)
        if self.variant in ("adamw_decoupled", "adams"):
            set_srste_lambda(optimizer, lam)
        return lam, mix

    def before_optimizer_step(self, masked: dict, lam: float) -> None:
        if self.variant == "grad":
            add_masked_decay_to_grad(masked, lam)  # after clipping: the decay is not clipped


@dataclass(frozen=True)
class MaskSchedule:
    """When masks are recomputed from |W|: every Δt steps, after step t (AST's code) or before its forward (CAST's
    algorithm), and once more after the last step; never for a fixed mask."""

    update: bool
    every: int
    timing: str
    total_steps: int

    @classmethod
    def from_recipe(cls, cfg: Recipe, total_steps: int) -> "MaskSchedule":
        return cls(cfg.mask.update, cfg.mask.every, cfg.mask.timing, total_steps)

    def before_forward(self, step: int) -> bool:
        return self.update and self.timing == "before" and step % self.every == 0

    def after_step(self, step: int) -> bool:
        after = self.timing == "after" and step % self.every == 0
        return self.update and (after or step == self.total_steps - 1)

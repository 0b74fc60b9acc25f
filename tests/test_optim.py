"""Masked SR-STE decay: schedule, MaskedAdamW against torch AdamW and a float64 hand computation, the coupled
variant, and the int-mask bug of the reference code (AST.md §2)."""

from __future__ import annotations

import pytest
import torch

from semisparse.masks import nm_mask
from semisparse.train.optim import MaskedAdamW, add_masked_decay_to_grad, decay_lambda, set_srste_lambda


def test_decay_lambda_ramp():
    assert decay_lambda(0, 1e-4, 10_000) == 0.0
    assert decay_lambda(2_500, 1e-4, 10_000) == pytest.approx(2.5e-5, rel=1e-12)
    assert decay_lambda(10_000, 1e-4, 10_000) == pytest.approx(1e-4, rel=1e-12)
    assert decay_lambda(40_000, 1e-4, 10_000) == pytest.approx(1e-4, rel=1e-12)
    assert decay_lambda(0, 6e-5, 0) == 6e-5
    assert decay_lambda(3_000, 6e-5, 3_000) == pytest.approx(2e-8 * 3_000, rel=1e-12)  # the LLaMA schedule


def _weights(seed: int, shape=(6, 16), dtype=torch.float32) -> torch.Tensor:
    """Weights bounded away from 0 (|w| in [0.5, 1.5]) so a single decay step cannot overshoot through zero."""
    gen = torch.Generator().manual_seed(seed)
    sign = torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0)
    return (sign * (0.5 + torch.rand(shape, generator=gen))).to(dtype)


@pytest.mark.parametrize("lam", [0.0, 0.05])
@pytest.mark.parametrize("with_mask", [False, True])
def test_unmasked_params_get_exactly_torch_adamw(lam, with_mask):
    """Params without a mask get stock AdamW whatever λ is. A masked param does not, even at λ = 0: its second
    moment tracks u² = (m + λ¬M⊙p)², not g² (AST.md §2; checked exactly by the float64 test below)."""
    gen = torch.Generator().manual_seed(0)
    init = [_weights(1), torch.randn(16, generator=gen)]
    mine = [torch.nn.Parameter(t.clone()) for t in init]
    ref = [torch.nn.Parameter(t.clone()) for t in init]
    masks = {mine[0]: nm_mask(init[0].abs(), "2:4")} if with_mask else None
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    opt = MaskedAdamW(mine, srste_lambda=lam, masks=masks, **kw)
    ref_opt = torch.optim.AdamW(ref, foreach=False, **kw)
    for _ in range(5):
        grads = [torch.randn(t.shape, generator=gen) for t in init]
        for p, q, g in zip(mine, ref, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    assert torch.allclose(mine[1], ref[1], atol=1e-7, rtol=0)
    if with_mask:
        assert not torch.allclose(mine[0], ref[0], atol=1e-4)
    else:
        assert torch.allclose(mine[0], ref[0], atol=1e-7, rtol=0)


def test_masked_adamw_matches_float64_hand_computation():
    lr, (b1, b2), eps, wd = 3e-2, (0.9, 0.95), 1e-8, 0.1
    w0 = _weights(2, dtype=torch.float64)
    mask = nm_mask(w0.abs(), "2:4")
    p = torch.nn.Parameter(w0.clone())
    opt = MaskedAdamW([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, masks={p: mask})
    gen = torch.Generator().manual_seed(3)

    w, m, v = w0.clone(), torch.zeros_like(w0), torch.zeros_like(w0)
    pruned = (~mask).double()
    for t, lam in enumerate([0.5, 0.1, 0.0, 0.3], start=1):
        g = torch.randn(w0.shape, generator=gen, dtype=torch.float64)
        p.grad = g.clone()
        set_srste_lambda(opt, lam)
        opt.step()
        # Hand computation of AST.md §2, element by element in float64.
        w = w * (1 - lr * wd)
        m = b1 * m + (1 - b1) * g
        u = m + lam * pruned * w
        v = b2 * v + (1 - b2) * u * u
        w = w - lr / (1 - b1**t) * u / (torch.sqrt(v) / (1 - b2**t) ** 0.5 + eps)
        assert torch.allclose(p.detach(), w, atol=1e-12, rtol=0), f"step {t}"
    # The decay never enters the first moment.
    assert torch.allclose(opt.state[p]["exp_avg"], m, atol=1e-14, rtol=0)


def _decay_steps(variant: str, w0: torch.Tensor, mask: torch.Tensor, lam: float, steps: int) -> list[torch.Tensor]:
    p = torch.nn.Parameter(w0.clone())
    if variant == "masked_adamw":
        opt: torch.optim.Optimizer = MaskedAdamW([p], lr=1e-3, weight_decay=0.0, srste_lambda=lam, masks={p: mask})
    else:
        opt = torch.optim.AdamW([p], lr=1e-3, weight_decay=0.0, foreach=False)
    history = []
    for _ in range(steps):
        p.grad = torch.zeros_like(p)
        if variant == "grad":
            add_masked_decay_to_grad({p: mask}, lam)
        opt.step()
        history.append(p.detach().clone())
    return history


@pytest.mark.parametrize("variant", ["masked_adamw", "grad"])
def test_decay_shrinks_exactly_the_pruned_weights(variant):
    """Zero loss gradient, wd = 0: kept weights stay bit-identical, every pruned weight shrinks at every step.
    The reference int-mask bug (~1 = -2, ~0 = -1) would grow all weights, kept ones included: this fails then."""
    w0 = _weights(4)
    mask = nm_mask(w0.abs(), "2:4")
    previous = w0
    for w in _decay_steps(variant, w0, mask, lam=0.1, steps=5):
        assert torch.equal(w[mask], w0[mask])
        assert (w[~mask].abs() < previous[~mask].abs()).all()
        assert torch.equal(w[~mask].sign(), w0[~mask].sign())
        previous = w


@pytest.mark.parametrize("variant", ["masked_adamw", "grad"])
def test_int_masks_are_rejected(variant):
    p = torch.nn.Parameter(_weights(5))
    int_mask = nm_mask(p.detach().abs(), "2:4").int()
    p.grad = torch.zeros_like(p)
    with pytest.raises(TypeError, match="bool"):
        if variant == "masked_adamw":
            MaskedAdamW([p], masks={p: int_mask})
        else:
            add_masked_decay_to_grad([(p, int_mask)], 0.1)


def test_add_masked_decay_to_grad_values():
    w = _weights(6)
    mask = nm_mask(w.abs(), "2:4")
    p = torch.nn.Parameter(w.clone())
    g0 = torch.randn(w.shape, generator=torch.Generator().manual_seed(7))
    p.grad = g0.clone()
    add_masked_decay_to_grad([(p, mask)], 0.25)
    expected = g0 + 0.25 * torch.where(mask, torch.zeros_like(w), w)
    assert torch.allclose(p.grad, expected, atol=1e-7, rtol=0)
    assert torch.equal(p.grad[mask], g0[mask])  # kept weights' gradients untouched


def test_masked_adamw_reads_masks_live():
    """The trainer recomputes masks in place; the optimizer must decay the *new* pruned set without being told."""
    w0 = _weights(8)
    mask = nm_mask(w0.abs(), "2:4")
    p = torch.nn.Parameter(w0.clone())
    opt = MaskedAdamW([p], lr=1e-3, weight_decay=0.0, srste_lambda=0.1, masks={p: mask})
    mask.copy_(~mask)  # swap kept and pruned (still 2:4)
    p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.equal(p.detach()[mask], w0[mask])
    assert (p.detach()[~mask].abs() < w0[~mask].abs()).all()


def test_masked_adamw_rejects_foreign_mask():
    p, q = torch.nn.Parameter(torch.ones(4, 4)), torch.nn.Parameter(torch.ones(4, 4))
    with pytest.raises(ValueError, match="not among"):
        MaskedAdamW([p], masks={q: torch.ones(4, 4, dtype=torch.bool)})
    with pytest.raises(ValueError, match="shape"):
        MaskedAdamW([p], masks={p: torch.ones(4, 8, dtype=torch.bool)})

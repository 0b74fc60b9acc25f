"""Chunked distillation loss against a direct, non-chunked float64 computation written from AST.md §3."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from semisparse.train.distill import (
    distill_loss,
    final_hidden_states,
    lm_head,
    logits_fit,
    shift_labels,
)

B, S, H, V = 3, 11, 16, 50  # 33 positions: no chunk size below divides the kept-token count evenly by accident


def _data(seed: int = 0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    hs = torch.randn(B, S, H, generator=gen, dtype=dtype)
    ht = torch.randn(B, S, H, generator=gen, dtype=dtype)
    ws = torch.randn(V, H, generator=gen, dtype=dtype) / H**0.5
    wt = torch.randn(V, H, generator=gen, dtype=dtype) / H**0.5
    y = torch.randint(0, V, (B, S), generator=gen)
    y[0, 2] = y[1, -1] = y[2, 5] = y[2, 6] = -100  # ignored positions, not only at the end
    return hs, ht, ws, wt, y


def _reference(hs, ht, ws, wt, y, alpha, T):
    """Direct float64 formula: per kept token, CE = -log q(y), KL = Σ p_t (log p_t − log p_s) at temperature T."""
    keep = y != -100
    zs, zt = (hs @ ws.T)[keep], (ht @ wt.T)[keep]
    ce = -(zs - zs.logsumexp(-1, keepdim=True)).gather(1, y[keep].unsqueeze(1)).squeeze(1)
    log_ps = zs / T - (zs / T).logsumexp(-1, keepdim=True)
    log_pt = zt / T - (zt / T).logsumexp(-1, keepdim=True)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    ce_mean, kl_mean = ce.mean(), T**2 * kl.mean()
    return alpha * kl_mean + (1 - alpha) * ce_mean, ce_mean, kl_mean


@pytest.mark.parametrize("T", [2.0, 1.0, 0.7])  # the teacher's division moves to its hidden state; none at T = 1
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.67, 1.0])
@pytest.mark.parametrize("chunk, recompute", [(1, True), (7, True), (10, True), (1000, True), (7, False)])
def test_matches_direct_float64_values_and_gradients(alpha, chunk, recompute, T):
    hs, ht, ws, wt, y = _data()
    hs_ref, ws_ref = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    total_ref, ce_ref, kl_ref = _reference(hs_ref, ht, ws_ref, wt, y, alpha, T)
    total_ref.backward()

    hs_mine = hs.clone().requires_grad_()
    head = nn.Linear(H, V, bias=False).double()  # a head module: its weight must get the gradient too
    with torch.no_grad():
        head.weight.copy_(ws)
    out = distill_loss(hs_mine, y, head, ht, wt, alpha=alpha, temperature=T, chunk_size=chunk,
                       recompute=recompute)
    out.loss.backward()

    assert out.n_tokens == int((y != -100).sum()) == 29
    assert out.total == pytest.approx(total_ref.item(), abs=1e-12)
    assert out.ce == pytest.approx(ce_ref.item(), abs=1e-12)
    if alpha == 0:
        assert out.kl is None  # no teacher term computed
    else:
        assert out.kl == pytest.approx(kl_ref.item(), abs=1e-12)
    assert torch.allclose(hs_mine.grad, hs_ref.grad, atol=1e-12, rtol=0)
    assert torch.allclose(head.weight.grad, ws_ref.grad, atol=1e-12, rtol=0)
    assert (hs_mine.grad[y == -100] == 0).all()  # ignored positions get no gradient


def test_float32_chunked_close_to_float64_direct():
    hs, ht, ws, wt, y = _data(1)
    total_ref, _, _ = _reference(hs, ht, ws, wt, y, 0.67, 2.0)
    hs32 = hs.float().requires_grad_()
    out = distill_loss(hs32, y, ws.float(), ht.float(), wt.float(), alpha=0.67, chunk_size=4)
    out.loss.backward()
    hs_ref = hs.clone().requires_grad_()
    _reference(hs_ref, ht, ws, wt, y, 0.67, 2.0)[0].backward()
    assert out.total == pytest.approx(total_ref.item(), abs=1e-5)
    assert torch.allclose(hs32.grad.double(), hs_ref.grad, atol=1e-6, rtol=0)


def test_alpha_zero_is_plain_cross_entropy_without_teacher():
    hs, _, ws, _, y = _data(2)
    out = distill_loss(hs, y, ws, alpha=0.0, chunk_size=5)
    expected = F.cross_entropy((hs @ ws.T).reshape(-1, V), y.reshape(-1), ignore_index=-100)
    assert out.kl is None
    assert out.total == pytest.approx(expected.item(), abs=1e-12)
    with pytest.raises(ValueError, match="teacher"):
        distill_loss(hs, y, ws, alpha=0.5)


def test_only_one_chunk_of_logits_is_kept_for_backward():
    """Everything autograd saves for backward together is far smaller than the full [tokens, vocab] logits."""
    vocab = 2000
    gen = torch.Generator().manual_seed(3)
    hs = torch.randn(B, S, H, generator=gen).requires_grad_()
    ht = torch.randn(B, S, H, generator=gen)
    ws = torch.randn(vocab, H, generator=gen).requires_grad_()
    wt = torch.randn(vocab, H, generator=gen)
    y = torch.randint(0, vocab, (B, S), generator=gen)
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = distill_loss(hs, y, ws, ht, wt, alpha=0.5, chunk_size=8)
    out.loss.backward()  # and backward still works through the recomputation
    # The head weights are saved by reference (no copy); everything else must be token-sized, not vocab-sized.
    others = [t for t in saved if t.data_ptr() not in (ws.data_ptr(), wt.data_ptr())]
    assert all(vocab not in t.shape for t in others), [tuple(t.shape) for t in others]
    assert sum(t.numel() for t in others) < B * S * vocab / 20
    assert ws.grad is not None and hs.grad.abs().sum() > 0


def test_without_recompute_the_logits_are_kept_once():
    """recompute=False: one [tokens, vocab] pass, kept for backward (no second head product in backward)."""
    vocab = 2000
    gen = torch.Generator().manual_seed(4)
    hs = torch.randn(B, S, H, generator=gen).requires_grad_()
    ws = torch.randn(vocab, H, generator=gen).requires_grad_()
    y = torch.randint(0, vocab, (B, S), generator=gen)
    calls = []
    head = lambda h: calls.append(h.shape[0]) or F.linear(h, ws)  # noqa: E731 - counts head products
    distill_loss(hs, y, head, alpha=0.0, chunk_size=8, recompute=False).loss.backward()
    assert calls == [B * S]  # every counted token at once, never recomputed
    calls.clear()
    distill_loss(hs, y, head, alpha=0.0, chunk_size=8, recompute=True).loss.backward()
    assert sum(calls) == 2 * B * S and max(calls) == 8  # chunks of 8, each rebuilt in backward


def test_logits_fit_threshold():
    assert logits_fit(1024, 49152)  # SmolLM2 at batch 4 x 256: keep
    assert not logits_fit(8 * 1024, 50257)  # GPT-2 at the paper's 8 x 1024: recompute
    assert logits_fit(2**17, 2**10) and not logits_fit(2**17 + 1, 2**10)


def test_all_tokens_ignored_gives_zero_loss():
    hs, ht, ws, wt, _ = _data(4)
    hs = hs.requires_grad_()
    y = torch.full((B, S), -100)
    out = distill_loss(hs, y, ws, ht, wt, alpha=0.5)
    out.loss.backward()
    assert out.n_tokens == 0 and out.loss.item() == 0.0
    assert (hs.grad == 0).all()


def test_shift_labels():
    ids = torch.tensor([[5, 6, 7, 8], [1, 2, 0, 0]])
    attn = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    assert shift_labels(ids).tolist() == [[6, 7, 8, -100], [2, 0, 0, -100]]
    assert shift_labels(ids, attn).tolist() == [[6, 7, 8, -100], [2, -100, -100, -100]]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_hidden_states_and_head_reproduce_model_logits(family, request):
    model = request.getfixturevalue(family)
    ids = torch.tensor([[3, 14, 15, 92, 65, 35]])
    with torch.no_grad():
        via_head = lm_head(model)(final_hidden_states(model, ids))
        direct = model(ids).logits
    assert torch.allclose(via_head, direct, atol=1e-6, rtol=0)

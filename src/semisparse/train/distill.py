"""Distillation loss of AST (AST.md §3): α·T²·KL(p_teacher ‖ p_student) + (1−α)·CE, averaged per token.

The loss takes final hidden states and LM heads rather than logits, and builds the logits chunk by chunk under
activation checkpointing: at most one chunk's [chunk, vocab] tensors exist at a time, in forward and in backward,
instead of the full [batch, seq, vocab] (which dominates memory for large vocabularies).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100

Head = Callable[[torch.Tensor], torch.Tensor] | torch.Tensor  # an LM head module, or its [vocab, hidden] weight


@dataclass
class DistillOutput:
    """``loss`` is differentiable; the floats are detached, for logging. ``ce`` is the mean CE, ``kl`` the mean KL
    times T² (the term α weights; None when no teacher ran, i.e. α = 0), ``n_tokens`` the tokens averaged over."""

    loss: torch.Tensor
    total: float
    ce: float
    kl: float | None
    n_tokens: int


# Keep a micro-batch's logits for backward (no recompute) while [tokens, vocab] has at most this many entries: about
# five float32 copies stay alive (logits, CE's and KL's log-softmax, the teacher's, a gradient), 2.5 GiB at this cap.
KEEP_LOGITS_MAX_ELEMENTS = 2**27


def logits_fit(tokens: int, vocab: int) -> bool:
    """Whether a micro-batch's logits are small enough to keep for backward instead of recomputing them."""
    return tokens * vocab <= KEEP_LOGITS_MAX_ELEMENTS


def shift_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token targets aligned with the positions: ``targets[:, s] = input_ids[:, s+1]``, -100 at the last
    position and wherever the target token is padding."""
    targets = torch.full_like(input_ids, IGNORE_INDEX)
    targets[:, :-1] = input_ids[:, 1:]
    if attention_mask is not None:
        targets[:, :-1][attention_mask[:, 1:] == 0] = IGNORE_INDEX
    return targets


def final_hidden_states(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The hidden states a transformers causal LM feeds its LM head (after the final norm), without the logits."""
    return model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def lm_head(model: nn.Module) -> nn.Module:
    """The LM head of a transformers causal LM (logits = lm_head(final_hidden_states))."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (LM head)")
    return head


def _apply_head(head: Head, hidden: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, head) if isinstance(head, torch.Tensor) else head(hidden)
    # Softmax in at least float32 (bf16 logits lose the small probabilities); float64 stays float64.
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _chunk_sums(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor | None,
    targets: torch.Tensor,
    student_head: Head,
    teacher_head: Head | None,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ CE, Σ KL at temperature T) over one chunk of tokens; KL is 0 without a teacher."""
    logits = _apply_head(student_head, student_hidden)
    ce = F.cross_entropy(logits, targets, reduction="sum")
    if teacher_hidden is None:
        return ce, logits.new_zeros(())
    assert teacher_head is not None
    with torch.no_grad():  # the teacher is frozen: its logits never need a graph
        # z/T as (h/T)·Wᵀ: the division runs over the hidden size, not the vocabulary (exact for T = 2)
        scaled = teacher_hidden if temperature == 1 else teacher_hidden / temperature
        teacher_logp = F.log_softmax(_apply_head(teacher_head, scaled), dim=-1)
    if teacher_logp.shape != logits.shape:
        raise ValueError(f"teacher logits {tuple(teacher_logp.shape)} != student logits {tuple(logits.shape)}")
    # the student's logits also feed the CE at T = 1: divided here, and not at all when T = 1 (CAST's KL)
    student_logp = F.log_softmax(logits if temperature == 1 else logits / temperature, dim=-1)
    kl = F.kl_div(student_logp, teacher_logp.to(student_logp.dtype), log_target=True, reduction="sum")
    return ce, kl


def distill_loss(
    student_hidden: torch.Tensor,
    targets: torch.Tensor,
    student_head: Head,
    teacher_hidden: torch.Tensor | None = None,
    teacher_head: Head | None = None,
    *,
    alpha: float = 0.67,
    temperature: float = 2.0,
    chunk_size: int = 1024,
    recompute: bool = True,
) -> DistillOutput:
    """α·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)) + (1−α)·CE(z_s, y), both averaged over the tokens whose target
    is not -100 (padding and the last position never count, for either term).

    ``student_hidden``/``teacher_hidden``: final hidden states [..., H] (``final_hidden_states``); ``targets``: the
    next-token target of each position, same leading shape (``shift_labels``); heads: LM head modules or weights.
    α = 0 is plain CE retraining and needs no teacher. ``chunk_size`` tokens' logits are built at a time, and
    rebuilt in backward (``recompute``) so that one chunk's logits live at a time; ``recompute=False`` builds all
    logits at once and keeps them for backward (faster, memory ∝ tokens × vocab: ``logits_fit`` decides).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    if targets.shape != student_hidden.shape[:-1]:
        raise ValueError(
            f"targets shape {tuple(targets.shape)} != hidden leading shape {tuple(student_hidden.shape[:-1])}"
        )
    if alpha > 0 and (teacher_hidden is None or teacher_head is None):
        raise ValueError("alpha > 0 needs teacher_hidden and teacher_head")
    # α = 0 is plain CE: a teacher, even if given, is not run.
    teacher = teacher_hidden if alpha > 0 else None
    if teacher is not None and teacher.shape[:-1] != student_hidden.shape[:-1]:
        raise ValueError(
            f"teacher hidden {tuple(teacher.shape)} and student hidden {tuple(student_hidden.shape)} "
            "differ in their token dimensions"
        )
    use_teacher = teacher is not None

    # Only the counted tokens are ever projected to the vocabulary.
    flat_targets = targets.reshape(-1)
    keep = (flat_targets != IGNORE_INDEX).nonzero().squeeze(1)
    n_tokens = int(keep.numel())
    hs = student_hidden.reshape(-1, student_hidden.shape[-1]).index_select(0, keep)
    ht = None if teacher is None else teacher.reshape(-1, teacher.shape[-1]).index_select(0, keep).detach()
    ys = flat_targets.index_select(0, keep)

    ce_sum = student_hidden.new_zeros((), dtype=torch.promote_types(student_hidden.dtype, torch.float32))
    kl_sum = ce_sum
    chunk = chunk_size if recompute else max(n_tokens, 1)
    for start in range(0, n_tokens, chunk):
        sl = slice(start, start + chunk)
        args = (hs[sl], ht[sl] if ht is not None else None, ys[sl], student_head, teacher_head, temperature)
        if recompute and torch.is_grad_enabled():
            # Recompute the chunk's logits in backward instead of keeping them (one chunk alive at a time).
            ce, kl = checkpoint(_chunk_sums, *args, use_reentrant=False)
        else:
            ce, kl = _chunk_sums(*args)
        ce_sum = ce_sum + ce
        kl_sum = kl_sum + kl

    if n_tokens == 0:  # e.g. an all-padding micro-batch: a zero loss that still connects to the graph
        loss = student_hidden.sum() * 0.0
        return DistillOutput(loss, 0.0, 0.0, 0.0 if use_teacher else None, 0)
    ce_mean = ce_sum / n_tokens
    kl_mean = kl_sum * (temperature**2) / n_tokens
    loss = (1.0 - alpha) * ce_mean + alpha * kl_mean if use_teacher else ce_mean
    return DistillOutput(
        loss=loss,
        total=float(loss.detach()),
        ce=float(ce_mean.detach()),
        kl=float(kl_mean.detach()) if use_teacher else None,
        n_tokens=n_tokens,
    )

"""Perplexity, SparseGPT/Wanda protocol.

The documents are joined with "\\n\\n" and tokenized once; the token stream is cut into non-overlapping windows
of ``seqlen`` (the tail that does not fill a window is dropped); every window is scored independently and the
perplexity is exp of the mean negative log-likelihood over every predicted token (seqlen − 1 per window).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from semisparse.errors import UserError


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    data: str
    split: str
    seqlen: int
    stride: int
    windows: int
    tokens: int  # tokens scored (predicted)
    tokens_total: int  # tokens in the joined text

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def window_nll_sums(
    model: nn.Module, tokens: torch.Tensor, seqlen: int, batch_size: int = 1, device="cpu", progress: bool = True
) -> tuple[float, int, int]:
    """Sum of token NLLs over the non-overlapping windows: (nll_sum, tokens_predicted, windows)."""
    windows = tokens.numel() // seqlen
    if windows == 0:
        raise UserError(f"the evaluation text has {tokens.numel()} tokens, fewer than one window of {seqlen}")
    data = tokens[: windows * seqlen].view(windows, seqlen)
    total = 0.0
    bar = tqdm(total=windows, desc="perplexity", unit="win", disable=not progress)
    for start in range(0, windows, batch_size):
        batch = data[start : start + batch_size].to(device)
        logits = model(batch, use_cache=False).logits
        if logits.dtype in (torch.float16, torch.bfloat16):  # softmax in at least float32
            logits = logits.float()
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        # Float64 accumulation across windows: thousands of float32 partial sums would otherwise drift.
        total += float(nll.double())
        bar.update(batch.shape[0])
    bar.close()
    return total, windows * (seqlen - 1), windows


def perplexity(
    model: nn.Module,
    tokens: torch.Tensor,
    seqlen: int,
    data: str = "",
    split: str = "",
    batch_size: int = 1,
    device="cpu",
    max_windows: int | None = None,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of ``model`` on a 1-D token tensor (see the module docstring for the protocol)."""
    if seqlen < 2:
        raise UserError(f"seqlen must be at least 2 (got {seqlen})")
    if max_windows is not None:
        tokens = tokens[: max_windows * seqlen]
    was_training = model.training
    model.eval()
    try:
        nll_sum, count, windows = window_nll_sums(model, tokens, seqlen, batch_size, device, progress)
    finally:
        model.train(was_training)
    nll = nll_sum / count
    return PerplexityResult(
        ppl=math.exp(nll),
        nll=nll,
        data=data,
        split=split,
        seqlen=seqlen,
        stride=seqlen,
        windows=windows,
        tokens=count,
        tokens_total=int(tokens.numel()),
    )

import math

import pytest
import torch

from semisparse.errors import UserError
from semisparse.evaluate.perplexity import perplexity


def direct_ppl(model, tokens, seqlen):
    """Token by token: each prediction from its own prefix run, float64, no batching, no shared windows."""
    model = model.double()
    windows = tokens.numel() // seqlen
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in range(windows):
            win = tokens[w * seqlen : (w + 1) * seqlen]
            for t in range(1, seqlen):
                logits = model(win[:t].unsqueeze(0), use_cache=False).logits[0, -1]
                nll -= float(torch.log_softmax(logits, -1)[win[t]])
                count += 1
    return math.exp(nll / count), windows, count


@pytest.mark.parametrize("maker", ["llama", "gpt2"])
def test_perplexity_against_token_by_token(maker, request):
    model = request.getfixturevalue(maker)
    tokens = torch.randint(0, 370, (3 * 12 + 5,), generator=torch.Generator().manual_seed(0))
    got = perplexity(model.double(), tokens, seqlen=12, batch_size=2, progress=False)
    ref, windows, count = direct_ppl(model, tokens, 12)
    assert got.windows == windows == 3
    assert got.tokens == count == 33
    assert got.tokens_total == tokens.numel()
    assert got.stride == got.seqlen == 12
    assert got.ppl == pytest.approx(ref, rel=1e-9)


def test_batch_size_does_not_change_result(llama):
    tokens = torch.randint(0, 370, (100,), generator=torch.Generator().manual_seed(1))
    a = perplexity(llama, tokens, seqlen=16, batch_size=1, progress=False)
    b = perplexity(llama, tokens, seqlen=16, batch_size=4, progress=False)
    assert a.ppl == pytest.approx(b.ppl, rel=1e-5)
    c = perplexity(llama, tokens, seqlen=16, max_windows=2, progress=False)
    assert c.windows == 2


def test_uniform_model_has_vocab_perplexity(llama):
    # A model whose logits are all zero predicts uniformly: ppl equals the vocabulary size.
    with torch.no_grad():
        llama.lm_head.weight.zero_()
    tokens = torch.randint(0, 370, (40,))
    assert perplexity(llama, tokens, seqlen=8, progress=False).ppl == pytest.approx(llama.config.vocab_size, rel=1e-5)


def test_too_few_tokens(llama):
    with pytest.raises(UserError, match="fewer than one window"):
        perplexity(llama, torch.arange(5), seqlen=8, progress=False)

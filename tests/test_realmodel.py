"""The shipped default model end to end (SmolLM2-135M, CPU): small calibration, a few hundred evaluation tokens.

Runs in CI (about a minute; the first run on a machine also converts the GGUF once, ~30 s).
"""

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from semisparse import api, data
from semisparse.layers import select_layers, weight_matrix
from semisparse.masks import is_nm
from semisparse.models import load_model

pytestmark = pytest.mark.realmodel


@pytest.fixture(scope="module")
def heldout_tokens():
    dense = load_model("default")
    tokens = data.tokenize_joined(dense.tokenizer, data.load_text("default", split="eval").docs)[: 3 * 128]
    return dense, tokens


def _ppl(model, tokens):
    from semisparse.evaluate.perplexity import perplexity

    return perplexity(model, tokens, seqlen=128, progress=False).ppl


def test_default_model_loads_as_llama(heldout_tokens):
    dense, tokens = heldout_tokens
    assert type(dense.model).__name__ == "LlamaForCausalLM"
    assert dense.model.dtype == torch.float32
    assert len(select_layers(dense.model)) == 30 * 7
    ppl = _ppl(dense.model, tokens)
    # A broken de-quantisation or tokenizer gives perplexities in the thousands.
    assert 3 < ppl < 60, ppl


def test_sparsegpt_beats_magnitude_on_default_model(tmp_path, heldout_tokens):
    dense, tokens = heldout_tokens
    dense_ppl = _ppl(dense.model, tokens)
    results = {}
    for method in ("magnitude", "sparsegpt"):
        out = tmp_path / method
        api.prune("default", method, "2:4", "default", out=out, nsamples=8, seqlen=128, progress=False)
        model = AutoModelForCausalLM.from_pretrained(out)
        masks = load_file(str(out / "masks.safetensors"))
        for name, module in select_layers(model).items():
            assert is_nm(masks[name], "2:4") and (weight_matrix(module)[~masks[name]] == 0).all()
        meta = json.loads((out / "semisparse.json").read_text())
        assert meta["dense_model"] == "default" and len(meta["layers_pruned"]) == 210
        results[method] = _ppl(model, tokens)
    assert all(math.isfinite(v) for v in results.values())
    assert dense_ppl < results["sparsegpt"] < results["magnitude"], (dense_ppl, results)

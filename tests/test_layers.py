import torch

from semisparse.layers import LayerFilter, find_blocks, select_layers, weight_matrix


def test_default_filter_llama(llama):
    names = list(select_layers(llama))
    assert len(names) == 2 * 7
    assert all(n.startswith("model.layers.") for n in names)
    assert "lm_head" not in names


def test_default_filter_gpt2_conv1d(gpt2):
    layers = select_layers(gpt2)
    assert sorted(n.split(".", 3)[-1] for n in layers) == sorted(["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"] * 2)
    # Conv1D stores [in, out]; the view is [out, in] and shares storage.
    c_fc = layers["transformer.h.0.mlp.c_fc"]
    w = weight_matrix(c_fc)
    assert w.shape == (c_fc.nf, c_fc.weight.shape[0])
    w[0, 1] = 123.0
    assert c_fc.weight[1, 0] == 123.0


def test_include_exclude(llama):
    only_mlp = select_layers(llama, LayerFilter(include=[r"\.mlp\."]))
    assert len(only_mlp) == 6
    no_down = select_layers(llama, LayerFilter(exclude=[r"down_proj"]))
    assert len(no_down) == 12 and not any("down_proj" in n for n in no_down)


def test_find_blocks(llama, gpt2):
    assert find_blocks(llama)[0] == "model.layers"
    assert find_blocks(gpt2)[0] == "transformer.h"


def test_lm_head_never_selected_even_outside_blocks(llama):
    names = select_layers(llama, LayerFilter(blocks_only=False))
    assert "lm_head" not in names and len(names) == 14
    assert isinstance(llama.lm_head, torch.nn.Linear)

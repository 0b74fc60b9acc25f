import copy

import pytest
import torch

from semisparse.layers import select_layers, weight_matrix
from semisparse.masks import Pattern, is_nm, nm_mask
from semisparse.prune import get_method, prune_model
from semisparse.prune.sparsegpt import sparsegpt_prune
from semisparse.prune.wanda import wanda_scores


def obs_reference(W, H, pattern, percdamp=0.01):
    """Float64 SparseGPT without lazy batching or Cholesky tricks: after each column is quantised to its
    kept/pruned value, the remaining columns get the OBS correction computed from the explicit inverse of
    the Hessian restricted to the not-yet-processed columns."""
    W = W.double().clone()
    H = H.double().clone()
    cols = W.shape[1]
    H += percdamp * H.diag().mean() * torch.eye(cols, dtype=torch.float64)
    mask = torch.zeros_like(W, dtype=torch.bool)
    for j in range(cols):
        if j % pattern.m == 0:
            # Saliency w_c^2 / [(H_{c:,c:})^-1]_00 of each column of the group, with the weights as updated so far.
            d = torch.stack([torch.linalg.inv(H[c:, c:])[0, 0] for c in range(j, j + pattern.m)])
            mask[:, j : j + pattern.m] = nm_mask(W[:, j : j + pattern.m] ** 2 / d, pattern)
        Hinv = torch.linalg.inv(H[j:, j:])
        w = W[:, j].clone()
        q = w * mask[:, j]
        W[:, j:] -= ((w - q) / Hinv[0, 0]).unsqueeze(1) * Hinv[0].unsqueeze(0)
        W[:, j] = q
    return W, mask


def random_layer(out=24, inp=48, tokens=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inp, generator=g)
    # Correlated inputs with uneven column scales, as real activations are.
    X = torch.randn(tokens, inp, generator=g) @ (torch.eye(inp) + 0.3 * torch.randn(inp, inp, generator=g))
    X *= torch.rand(inp, generator=g) * 3 + 0.1
    H = 2 * X.T @ X / tokens
    return W, X, H


@pytest.mark.parametrize("pattern,blocksize", [(Pattern(2, 4), 16), (Pattern(2, 4), 128), (Pattern(1, 4), 8), (Pattern(2, 3), 8)])
def test_sparsegpt_matches_float64_obs_reference(pattern, blocksize):
    W, _, H = random_layer(inp=48)
    ref_w, ref_mask = obs_reference(W, H, pattern)
    w64, mask64 = sparsegpt_prune(W, H, pattern, blocksize=blocksize, dtype=torch.float64)
    assert torch.equal(mask64, ref_mask)
    assert torch.allclose(w64, ref_w, atol=1e-9, rtol=1e-9)
    w32, mask32 = sparsegpt_prune(W, H, pattern, blocksize=blocksize)
    assert torch.equal(mask32, ref_mask)
    assert torch.allclose(w32.double(), ref_w, atol=1e-4, rtol=1e-4)
    assert is_nm(mask32, pattern)
    assert (w32[~mask32] == 0).all()


def test_sparsegpt_beats_magnitude_and_wanda_on_reconstruction():
    for seed in range(3):
        W, X, H = random_layer(out=64, inp=128, tokens=1024, seed=seed)
        pattern = Pattern(2, 4)
        dense = X @ W.T
        w_sgpt, _ = sparsegpt_prune(W, H, pattern)
        w_mag = W * nm_mask(W.abs(), pattern)
        w_wanda = W * nm_mask(wanda_scores(W, (X.double() ** 2).sum(0)), pattern)
        err = {name: float((dense - X @ w.T).norm()) for name, w in
               [("sparsegpt", w_sgpt), ("magnitude", w_mag), ("wanda", w_wanda)]}
        assert err["sparsegpt"] < err["wanda"] < err["magnitude"], err


def test_wanda_scores_formula():
    W = torch.tensor([[1.0, -2.0, 3.0, -4.0]])
    X = torch.tensor([[1.0, 0.0, 2.0, 1.0], [2.0, 1.0, 0.0, 1.0]])
    sq = (X.double() ** 2).sum(0)
    expected = torch.tensor([[1 * 5 ** 0.5, 2 * 1.0, 3 * 2.0, 4 * 2 ** 0.5]])
    assert torch.allclose(wanda_scores(W, sq), expected)
    assert nm_mask(wanda_scores(W, sq), "2:4").tolist() == [[False, False, True, True]]


def _inputs_of(model, names, windows):
    seen = {n: [] for n in names}
    mods = dict(model.named_modules())
    handles = [mods[n].register_forward_hook(lambda m, i, o, n=n: seen[n].append(i[0].reshape(-1, i[0].shape[-1])))
               for n in names]
    with torch.no_grad():
        for w in windows:
            model(w.unsqueeze(0), use_cache=False)
    for h in handles:
        h.remove()
    return {n: torch.cat(v).double() for n, v in seen.items()}


@pytest.mark.parametrize("maker", ["llama", "gpt2"])
def test_wanda_driver_uses_pruned_outputs_of_previous_block(maker, request):
    model = request.getfixturevalue(maker)
    reference = copy.deepcopy(model)
    windows = torch.randint(0, 370, (6, 24), generator=torch.Generator().manual_seed(1))
    result = prune_model(model, get_method("wanda"), Pattern(2, 4), windows, progress=False)
    layers = select_layers(reference)
    names = list(layers)
    block0 = [n for n in names if ".0." in n]
    block1 = [n for n in names if ".1." in n]
    # Block 0 sees the dense embeddings.
    x0 = _inputs_of(reference, block0, windows)
    for n in block0:
        expected = nm_mask(wanda_scores(weight_matrix(layers[n]), (x0[n] ** 2).sum(0)), "2:4")
        assert torch.equal(result.masks[n], expected), n
    # Block 1 sees the outputs of the *pruned* block 0 (its own layers still dense when its statistics are taken).
    pruned_layers = select_layers(model)
    for n in block0:
        weight_matrix(layers[n]).copy_(weight_matrix(pruned_layers[n]))
    x1 = _inputs_of(reference, block1, windows)
    for n in block1:
        expected = nm_mask(wanda_scores(weight_matrix(layers[n]), (x1[n] ** 2).sum(0)), "2:4")
        assert torch.equal(result.masks[n], expected), n


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("maker", ["llama", "gpt2"])
def test_methods_leave_exact_nm_zeros(method, maker, request):
    model = request.getfixturevalue(maker)
    windows = torch.randint(0, 370, (4, 32), generator=torch.Generator().manual_seed(0))
    result = prune_model(model, get_method(method), Pattern(2, 4), windows, progress=False)
    layers = select_layers(model)
    assert set(result.masks) == set(layers)
    for name, module in layers.items():
        mask = result.masks[name]
        assert is_nm(mask, "2:4")
        w = weight_matrix(module)
        assert (w[~mask] == 0).all() and (w[mask] != 0).all()


def test_magnitude_keeps_largest(llama):
    before = {n: weight_matrix(m).clone() for n, m in select_layers(llama).items()}
    result = prune_model(llama, get_method("magnitude"), Pattern(2, 4), None, progress=False)
    for n, w in before.items():
        assert torch.equal(result.masks[n], nm_mask(w.abs(), "2:4"))


def test_indivisible_layer_error_and_skip():
    from semisparse.errors import UserError
    from tiny import make_llama

    model = make_llama(hidden=64)
    # Make the MLP width 130: down_proj's input is then not a multiple of 4.
    model = type(model)(type(model.config)(**{**model.config.to_dict(), "intermediate_size": 130})).eval()
    with pytest.raises(UserError, match=r"model\.layers\.0\.mlp\.down_proj.*130"):
        prune_model(model, get_method("magnitude"), Pattern(2, 4), None, progress=False)
    result = prune_model(model, get_method("magnitude"), Pattern(2, 4), None, skip_indivisible=True, progress=False)
    assert set(result.skipped) == {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}
    assert all("down_proj" not in n for n in result.masks)

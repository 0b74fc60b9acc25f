"""SparseLinear, sparsify/densify and SLoRB, checked against plain masked linear algebra."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM

from semisparse.layers import select_layers, weight_matrix
from semisparse.masks import is_nm, nm_mask
from semisparse.train.sparse_linear import (
    SparseLinear,
    attach_slorb,
    densify,
    param_masks,
    slorb_parameter_count,
    sparse_layers,
    sparsify,
)

IDS = torch.tensor([[5, 17, 99, 3, 250, 42, 7, 1, 300, 12, 64, 8]])


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def random_masks(model: nn.Module, seed: int = 1) -> dict[str, torch.Tensor]:
    """Valid 2:4 masks that are *not* the magnitude masks, so "which mask was used" is observable."""
    gen = torch.Generator().manual_seed(seed)
    return {
        name: nm_mask(torch.rand(weight_matrix(m).shape, generator=gen), "2:4")
        for name, m in select_layers(model).items()
    }


def masked_in_place(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """Reference: a copy of the stock model whose selected weights are multiplied by the mask in place."""
    ref = copy.deepcopy(model)
    for name, module in select_layers(ref).items():
        weight_matrix(module).mul_(masks[name])
    return ref


def magnitude_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: nm_mask(weight_matrix(m).abs(), "2:4") for name, m in select_layers(model).items()}


# ------------------------------------------------------------------------------------------------- one layer


def test_ste_gradient_is_the_masked_weight_gradient():
    torch.manual_seed(0)
    dense = nn.Linear(16, 8)
    layer = SparseLinear.from_dense(dense, "2:4")
    x = torch.randn(5, 16)
    r = torch.randn(5, 8)
    (layer(x) * r).sum().backward()

    masked = (dense.weight.detach() * layer.mask).requires_grad_()
    bias = dense.bias.detach().clone().requires_grad_()
    (F.linear(x, masked, bias) * r).sum().backward()

    assert torch.allclose(layer.weight.grad, masked.grad, atol=1e-6, rtol=0)
    assert torch.allclose(layer.bias.grad, bias.grad, atol=1e-6, rtol=0)
    # Straight-through: pruned weights get the dense gradient too, not zero.
    assert (layer.weight.grad[~layer.mask] != 0).all()


def _masked_linear_reference(layer: SparseLinear, x: torch.Tensor, upstream: torch.Tensor, dtype: torch.dtype):
    """Output and gradients (x, W, b) of plain autograd on ``F.linear(x, W ⊙ M, b)`` in ``dtype``, W ⊙ M a leaf:
    what the straight-through estimator hands to the dense W."""
    xr = x.detach().clone().requires_grad_()
    masked = (layer.weight.detach() * layer.mask).to(dtype).requires_grad_()
    bias = layer.bias.detach().to(dtype).requires_grad_()
    y = F.linear(xr.to(dtype), masked, bias)
    y.backward(upstream)
    return y.detach(), xr.grad, masked.grad, bias.grad


def test_masked_linear_matches_float64_autograd_for_every_input():
    gen = torch.Generator().manual_seed(3)
    dense = nn.Linear(16, 8, dtype=torch.float64)
    layer = SparseLinear.from_dense(dense, "2:4")
    x = torch.randn(2, 5, 16, dtype=torch.float64, generator=gen, requires_grad=True)
    upstream = torch.randn(2, 5, 8, dtype=torch.float64, generator=gen)
    y = layer(x)
    y.backward(upstream)
    ref_y, ref_x, ref_w, ref_b = _masked_linear_reference(layer, x, upstream, torch.float64)
    torch.testing.assert_close(y, ref_y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, ref_x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.weight.grad, ref_w, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.bias.grad, ref_b, rtol=1e-12, atol=1e-12)
    assert (layer.weight.grad[~layer.mask] != 0).all()


def test_masked_linear_under_autocast_matches_autocast_f_linear():
    gen = torch.Generator().manual_seed(4)
    layer = SparseLinear.from_dense(nn.Linear(32, 8), "2:4")
    x = torch.randn(3, 32, generator=gen, requires_grad=True)  # float32 in, as a norm's output under autocast
    upstream = torch.randn(3, 8, generator=gen).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.backward(upstream)
    ref_y, ref_x, ref_w, ref_b = _masked_linear_reference(layer, x, upstream, torch.bfloat16)
    assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.float32
    assert layer.weight.grad.dtype == torch.float32 and layer.bias.grad.dtype == torch.float32
    # The same bf16 GEMMs as autocast's F.linear: equal up to the summation order of one bf16 product.
    torch.testing.assert_close(y, ref_y, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(x.grad, ref_x.float(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(layer.weight.grad, ref_w.float(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(layer.bias.grad, ref_b.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("autocast", [False, True])
def test_masked_forward_keeps_no_copy_of_the_masked_weight_for_backward(autocast):
    """Autograd keeps W and M (a parameter and a buffer that exist anyway) and x, never W ⊙ M: over a model that
    product would be as large as the model in the compute dtype, alive from each layer's forward to its backward."""
    layer = SparseLinear.from_dense(nn.Linear(64, 32), "2:4")
    x = torch.randn(4, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = layer(x)
    own = {layer.weight.untyped_storage().data_ptr(), layer.mask.untyped_storage().data_ptr()}
    weight_sized = [t for t in saved if t.shape == layer.weight.shape]
    assert weight_sized and all(t.untyped_storage().data_ptr() in own for t in weight_sized), [
        (t.dtype, t.shape) for t in weight_sized]
    y.sum().backward()
    assert layer.weight.grad is not None and x.grad is not None


def _scaled_layer(dtype: torch.dtype, dense_forward: bool, seed: int) -> SparseLinear:
    """A 2:4 layer [8, 32] with a 2-block weight scale far from 1 (CAST's layer), in ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    layer = SparseLinear.from_dense(nn.Linear(32, 8, dtype=dtype), "2:4")
    layer.add_weight_scale(2)
    with torch.no_grad():
        layer.weight_scale.copy_(torch.rand(8, 2, generator=gen, dtype=dtype) + 0.5)
    layer.dense_forward = dense_forward
    return layer


def _scaled_reference(layer: SparseLinear, x: torch.Tensor, upstream: torch.Tensor, dtype: torch.dtype):
    """Plain autograd with W and A as leaves: W̃ = W·A[r, c // 16] by indexing, masked by a straight-through
    ``W̃ + (W̃ ⊙ M − W̃).detach()`` unless dense; returns y and the gradients of x, W, A, b."""
    xr = x.detach().clone().requires_grad_()
    w = layer.weight.detach().clone().requires_grad_()
    a = layer.weight_scale.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()
    columns = torch.arange(w.shape[1]) // (w.shape[1] // a.shape[1])
    scaled = w * a[:, columns]
    if not layer.dense_forward:
        scaled = scaled + (scaled * layer.mask - scaled).detach()
    y = F.linear(xr.to(dtype), scaled.to(dtype), b.to(dtype))
    y.backward(upstream)
    return y.detach(), xr.grad, w.grad, a.grad, b.grad


@pytest.mark.parametrize("dense_forward", [False, True], ids=["masked", "dense"])
def test_scaled_linear_matches_float64_autograd_for_every_input(dense_forward):
    layer = _scaled_layer(torch.float64, dense_forward, seed=6)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 5, 32, dtype=torch.float64, generator=gen, requires_grad=True)
    upstream = torch.randn(2, 5, 8, dtype=torch.float64, generator=gen)
    y = layer(x)
    y.backward(upstream)
    ref_y, ref_x, ref_w, ref_a, ref_b = _scaled_reference(layer, x, upstream, torch.float64)
    for got, ref in [(y, ref_y), (x.grad, ref_x), (layer.weight.grad, ref_w), (layer.weight_scale.grad, ref_a),
                     (layer.bias.grad, ref_b)]:
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    assert (layer.weight.grad[~layer.mask] != 0).all()  # straight-through (masked) or dense: pruned ones learn


@pytest.mark.parametrize("dense_forward", [False, True], ids=["masked", "dense"])
def test_scaled_linear_under_autocast_matches_autocast_f_linear(dense_forward):
    layer = _scaled_layer(torch.float32, dense_forward, seed=8)
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(3, 32, generator=gen, requires_grad=True)
    upstream = torch.randn(3, 8, generator=gen).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.backward(upstream)
    ref_y, ref_x, ref_w, ref_a, ref_b = _scaled_reference(layer, x, upstream, torch.bfloat16)
    assert y.dtype == torch.bfloat16 and layer.weight_scale.grad.dtype == torch.float32
    for got, ref in [(y, ref_y), (x.grad, ref_x), (layer.weight.grad, ref_w), (layer.weight_scale.grad, ref_a),
                     (layer.bias.grad, ref_b)]:
        torch.testing.assert_close(got, ref.to(got.dtype), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("dense_forward", [False, True], ids=["masked", "dense"])
def test_scaled_forward_keeps_no_copy_of_the_scaled_weight_for_backward(dense_forward, autocast):
    """CAST's layer (a weight scale, often the dense forward) keeps W, A and M, never W·A or a cast of it."""
    layer = _scaled_layer(torch.float32, dense_forward, seed=10)
    x = torch.randn(4, 32, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = layer(x)
    own = {t.untyped_storage().data_ptr() for t in (layer.weight, layer.mask, layer.weight_scale)}
    weight_sized = [t for t in saved if t.shape == layer.weight.shape]
    assert weight_sized and all(t.untyped_storage().data_ptr() in own for t in weight_sized), [
        (t.dtype, t.shape) for t in weight_sized]
    y.sum().backward()
    assert layer.weight.grad is not None and layer.weight_scale.grad is not None


def test_forward_uses_masked_weight_and_mask_is_magnitude_top_n():
    torch.manual_seed(1)
    dense = nn.Linear(32, 6)
    layer = SparseLinear.from_dense(dense, "2:4")
    w = dense.weight.detach()
    groups_abs = w.abs().reshape(6, 8, 4)
    groups_mask = layer.mask.reshape(6, 8, 4)
    # Every kept entry is at least as large as every pruned entry of its group, 2 kept per group.
    kept_min = groups_abs.masked_fill(~groups_mask, float("inf")).amin(-1)
    pruned_max = groups_abs.masked_fill(groups_mask, -1.0).amax(-1)
    assert (groups_mask.sum(-1) == 2).all() and (kept_min >= pruned_max).all()

    x = torch.randn(3, 32)
    expected = x @ torch.where(layer.mask, w, torch.zeros_like(w)).T + dense.bias.detach()
    assert torch.allclose(layer(x), expected, atol=1e-6)


def test_recompute_mask_tracks_weights_in_place():
    torch.manual_seed(2)
    layer = SparseLinear.from_dense(nn.Linear(8, 4), "2:4")
    buffer = layer.mask
    before = layer.mask.clone()
    with torch.no_grad():  # make every pruned weight dominate its group
        layer.weight.copy_(torch.where(before, 0.01, 10.0) * layer.weight.sign())
    new = layer.recompute_mask()
    assert layer.mask is buffer  # updated in place: optimizer references stay valid
    assert torch.equal(new, ~before) and torch.equal(layer.mask, ~before)
    assert is_nm(layer.mask, "2:4")
    assert param_masks(nn.Sequential(layer))[layer.weight] is buffer


def test_rejects_bad_masks():
    lin = nn.Linear(8, 4)
    with pytest.raises(TypeError, match="bool"):
        SparseLinear.from_dense(lin, "2:4", mask=nm_mask(torch.rand(4, 8), "2:4").int())
    with pytest.raises(ValueError, match="not 2:4"):
        SparseLinear.from_dense(lin, "2:4", mask=torch.ones(4, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="multiple of M=4"):
        SparseLinear.from_dense(nn.Linear(6, 4), "2:4")


# ------------------------------------------------------------------------------------------------------ SLoRB


@pytest.mark.parametrize("k", [4, 16])
def test_slorb_init_preserves_group_sums_and_output(k):
    torch.manual_seed(3)
    dense = nn.Linear(32, 5).double()
    layer = SparseLinear.from_dense(dense, "2:4")
    layer.add_slorb(k)
    w = dense.weight.detach()
    kept = torch.where(layer.mask, w, torch.zeros_like(w))
    s = layer.slorb_S.detach()
    assert s.shape == (5, 32 // k) and layer.slorb_X.shape == (32 // k, 32)
    for i in range(5):
        for j in range(32 // k):
            group = slice(j * k, (j + 1) * k)
            assert torch.isclose(kept[i, group].sum() + k * s[i, j], w[i, group].sum(), atol=1e-12)
    # X is the block indicator: row i sums input group i.
    for i in range(32 // k):
        assert torch.equal(layer.slorb_X[i], (torch.arange(32) // k == i).double())

    x = torch.randn(7, 32, dtype=torch.float64)
    expected = F.linear(x, kept + s.repeat_interleave(k, dim=1), dense.bias.detach())
    assert torch.allclose(layer(x), expected, atol=1e-12)


def test_slorb_bad_group_size():
    layer = SparseLinear.from_dense(nn.Linear(32, 4), "2:4")
    with pytest.raises(ValueError, match="k=5 .* in_features=32"):
        layer.add_slorb(5)


@pytest.mark.parametrize("train_x", [True, False])
def test_slorb_x_trainable_or_frozen(train_x):
    torch.manual_seed(4)
    layer = SparseLinear.from_dense(nn.Linear(16, 4), "2:4")
    layer.add_slorb(4, train_x=train_x)
    params = dict(layer.named_parameters())
    assert "slorb_S" in params
    assert ("slorb_X" in params) is train_x
    assert ("slorb_X" in dict(layer.named_buffers())) is (not train_x)
    layer(torch.randn(3, 16)).pow(2).sum().backward()
    assert layer.slorb_S.grad is not None and layer.slorb_S.grad.abs().sum() > 0
    assert (layer.slorb_X.grad is not None) is train_x
    # Frozen indicator X costs nothing at inference; a trainable one counts (AST.md §4).
    expected = 4 * 4 + (4 * 16 if train_x else 0)
    assert slorb_parameter_count(nn.Sequential(layer)) == expected


# ------------------------------------------------------------------------------------------------ whole models


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("given_masks", [False, True])
def test_sparsify_matches_weights_masked_in_place(family, given_masks, request):
    model = request.getfixturevalue(family)
    masks = random_masks(model) if given_masks else magnitude_masks(model)
    ref = masked_in_place(model, masks)
    dense_logits = logits(model)

    wrapped = sparsify(model, masks if given_masks else None, "2:4")

    assert list(wrapped) == list(masks)
    assert all(isinstance(model.get_submodule(n), SparseLinear) for n in masks)
    for name, layer in wrapped.items():
        assert torch.equal(layer.mask, masks[name])
    out = logits(model)
    assert torch.allclose(out, logits(ref), atol=1e-6, rtol=0)
    assert not torch.allclose(out, dense_logits, atol=1e-3)  # the masks really act


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_densify_gives_stock_model_with_same_logits(family, request, tmp_path):
    model = request.getfixturevalue(family)
    original = {name: (type(m), tuple(m.weight.shape)) for name, m in select_layers(model).items()}
    weights = {name: weight_matrix(m).clone() for name, m in select_layers(model).items()}
    masks_in = random_masks(model)
    sparsify(model, masks_in, "2:4")
    sparse_logits = logits(model)

    masks, slorb = densify(model)

    assert slorb == {} and sparse_layers(model) == {}
    assert set(masks) == set(original)
    for name, (cls, shape) in original.items():
        module = model.get_submodule(name)
        assert type(module) is cls and tuple(module.weight.shape) == shape
        assert torch.equal(masks[name], masks_in[name])
        assert torch.equal(weight_matrix(module), weights[name] * masks[name])  # exactly W ⊙ M, zeros stored
    assert torch.allclose(logits(model), sparse_logits, atol=1e-6, rtol=0)

    model.save_pretrained(tmp_path / "m")  # a stock model: saves and reloads as such
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert torch.allclose(logits(reloaded), sparse_logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_slorb_survives_densify_save_and_attach(family, request, tmp_path):
    model = request.getfixturevalue(family)
    wrapped = sparsify(model, None, "2:4", slorb_k=16, train_x=True)
    torch.manual_seed(5)
    with torch.no_grad():  # pretend training moved S and X away from their init
        for layer in wrapped.values():
            layer.slorb_S.add_(0.05 * torch.randn_like(layer.slorb_S))
            layer.slorb_X.add_(0.05 * torch.randn_like(layer.slorb_X))
    # S [out, in/16] plus a trainable X [in/16, in] per layer.
    expected_count = sum((m.out_features + m.in_features) * (m.in_features // 16) for m in wrapped.values())
    assert slorb_parameter_count(model) == expected_count
    boosted_logits = logits(model)
    saved = {f"{n}.{k}": t.clone() for n, l in wrapped.items() for k, t in l.slorb_tensors().items()}

    masks, slorb = densify(model)
    assert set(slorb) == set(saved) and all(torch.equal(slorb[k], saved[k]) for k in saved)
    assert not torch.allclose(logits(model), boosted_logits, atol=1e-4)  # the stock model lacks the branch

    model.save_pretrained(tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    attached = attach_slorb(reloaded, slorb, "2:4")
    assert set(attached) == set(masks)
    for name, layer in attached.items():
        assert torch.equal(layer.mask, masks[name])  # recovered from the stored zeros
    assert torch.allclose(logits(reloaded), boosted_logits, atol=1e-6, rtol=0)
    assert slorb_parameter_count(reloaded) == expected_count  # trained X is not an indicator: still counted


def test_attach_slorb_to_sparsified_model_and_dense_weights_rejected(llama):
    dense = copy.deepcopy(llama)
    donor = copy.deepcopy(llama)
    sparsify(donor, None, "2:4", slorb_k=16)
    _, slorb = densify(donor)
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        attach_slorb(dense, slorb, "2:4")

    sparsify(llama, None, "2:4")  # continuing training: attach onto SparseLinear layers, X trainable
    attach_slorb(llama, slorb, train_x=True)
    layer = next(iter(sparse_layers(llama).values()))
    assert isinstance(layer.slorb_X, nn.Parameter)
    with pytest.raises(ValueError, match="no such layer"):
        attach_slorb(llama, {"nope.slorb_S": torch.zeros(1, 1), "nope.slorb_X": torch.zeros(1, 4)})


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.ModuleDict({"ok": nn.Linear(8, 4), "bad": nn.Linear(6, 4)})])


def test_sparsify_errors_name_the_layer():
    toy = _Toy()
    with pytest.raises(ValueError, match=r"blocks\.0\.bad.*in_features=6"):
        sparsify(toy, None, "2:4")
    assert type(toy.blocks[0]["ok"]) is nn.Linear  # validated before anything was replaced


def test_sparsify_mask_checks(llama):
    masks = magnitude_masks(llama)
    first = next(iter(masks))
    with pytest.raises(ValueError, match="missing"):
        sparsify(copy.deepcopy(llama), {k: v for k, v in masks.items() if k != first}, "2:4")
    with pytest.raises(TypeError, match=first.replace(".", r"\.")):
        sparsify(copy.deepcopy(llama), {**masks, first: masks[first].int()}, "2:4")
    sparsify(llama, masks, "2:4")
    with pytest.raises(ValueError, match="already"):
        sparsify(llama, masks, "2:4")

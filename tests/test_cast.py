"""CAST (CAST.md): AdamS against a float64 hand computation, the weight scale's axis, the dense forward, the mask
timing, the final hard prune with the scale folded, resume with the live mask, and recipe errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from semisparse.config import load_recipe
from semisparse.errors import UserError
from semisparse.masks import is_nm, nm_mask
from semisparse.train import checkpoint as ckpt
from semisparse.train import setup as train_setup
from semisparse.train import trainer
from semisparse.train.optim import AdamS, decay_lambda, set_adams_alpha, set_srste_lambda
from semisparse.train.sparse_linear import SparseLinear, masked_forward, sparse_layers

SEQ, BATCH = 16, 2


def _weights(seed: int, shape=(6, 16), dtype=torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    sign = torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0)
    return (sign * (0.5 + torch.rand(shape, generator=gen))).to(dtype)


def test_alpha_ramp_is_t_over_T_from_zero():
    total = 8
    assert [decay_lambda(t, 1.0, total) for t in range(total)] == [t / total for t in range(total)]


def test_adams_matches_float64_hand_computation():
    """CAST.md §2 element by element: m from the raw gradient only, ũ mixed on pruned entries, v from ũ², sign(0) = 0;
    an unmasked tensor gets Adam; the stored first moment never holds the decay."""
    lr, (b1, b2), eps = 3e-2, (0.9, 0.999), 1e-8
    w0 = _weights(0)
    w0[0, 1] = 0.0  # sign(0) = 0: no decay push on an exact zero
    mask = nm_mask(w0.abs(), "2:4")
    assert not mask[0, 1]
    p = torch.nn.Parameter(w0.clone())
    other = torch.nn.Parameter(_weights(1, (5,)))
    opt = AdamS([p, other], lr=lr, betas=(b1, b2), eps=eps, weight_decay=0.0, masks={p: mask})
    gen = torch.Generator().manual_seed(2)
    w, m, v = w0.clone(), torch.zeros_like(w0), torch.zeros_like(w0)
    o, om, ov = other.detach().clone(), torch.zeros(5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)
    pruned = ~mask
    for t, (alpha, lam) in enumerate([(0.0, 0.2), (0.25, 0.2), (0.5, 0.0), (1.0, 0.3)], start=1):
        g, og = torch.randn(w0.shape, generator=gen, dtype=torch.float64), torch.randn(5, generator=gen,
                                                                                        dtype=torch.float64)
        p.grad, other.grad = g.clone(), og.clone()
        set_adams_alpha(opt, alpha)
        set_srste_lambda(opt, lam)
        opt.step()
        m = b1 * m + (1 - b1) * g
        u = torch.where(pruned, (1 - alpha) * m + alpha * lam * torch.sign(w), m)
        v = b2 * v + (1 - b2) * u * u
        w = w - lr / (1 - b1**t) * u / (torch.sqrt(v) / (1 - b2**t) ** 0.5 + eps)
        om = b1 * om + (1 - b1) * og
        ov = b2 * ov + (1 - b2) * og * og
        o = o - lr / (1 - b1**t) * om / (torch.sqrt(ov) / (1 - b2**t) ** 0.5 + eps)
        assert torch.allclose(p.detach(), w, atol=1e-12, rtol=0), f"step {t}"
        assert torch.allclose(other.detach(), o, atol=1e-12, rtol=0), f"step {t}"
        assert torch.allclose(opt.state[p]["exp_avg"], m, atol=1e-14, rtol=0)  # the decay is never stored


def test_adams_decay_touches_pruned_entries_only():
    w0 = _weights(3, dtype=torch.float32)
    mask = nm_mask(w0.abs(), "2:4")
    p = torch.nn.Parameter(w0.clone())
    opt = AdamS([p], lr=1e-3, weight_decay=0.0, srste_lambda=1e-2, masks={p: mask})
    set_adams_alpha(opt, 1.0)
    for _ in range(5):
        p.grad = torch.zeros_like(p)
        opt.step()
    assert torch.equal(p.detach()[mask], w0[mask])
    assert (p.detach()[~mask].abs() < w0[~mask].abs()).all()


def test_adams_refuses_low_precision_master_weights():
    p = torch.nn.Parameter(_weights(4, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="float32 master weights"):
        AdamS([p], masks={p: nm_mask(p.detach().float().abs(), "2:4")})
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        set_adams_alpha(AdamS([torch.nn.Parameter(torch.zeros(2))]), 1.5)


def test_weight_scale_axis_and_dense_forward():
    """Entry (r, c) is scaled by A[r, c // (in / n)] (contiguous input blocks), written out with loops here; the dense
    forward uses the scaled W, the masked forward (A ⊙ W) ⊙ M; to_dense folds A in and is exactly N:M."""
    gen = torch.Generator().manual_seed(5)
    out_f, in_f, n = 3, 16, 2
    layer = SparseLinear(torch.nn.Parameter(torch.randn(out_f, in_f, generator=gen)), None, "2:4")
    layer.add_weight_scale(n)
    with torch.no_grad():
        layer.weight_scale.copy_(torch.rand(out_f, n, generator=gen) + 0.5)
    expected = torch.empty(out_f, in_f)
    for r in range(out_f):
        for c in range(in_f):
            expected[r, c] = layer.weight[r, c] * layer.weight_scale[r, c // (in_f // n)]
    assert torch.allclose(layer.scaled_weight(), expected, atol=1e-7, rtol=0)
    x = torch.randn(4, in_f, generator=gen)
    assert torch.allclose(layer(x), F.linear(x, expected * layer.mask), atol=1e-6)
    layer.dense_forward = True
    assert torch.allclose(layer(x), F.linear(x, expected), atol=1e-6)
    with masked_forward({"l": layer}):
        assert torch.allclose(layer(x), F.linear(x, expected * layer.mask), atol=1e-6)
    assert layer.dense_forward  # restored
    # Both W and A are trained through the dense forward.
    layer(x).sum().backward()
    assert layer.weight.grad.abs().sum() > 0 and layer.weight_scale.grad.abs().sum() > 0
    dense = layer.to_dense()
    assert torch.allclose(dense.weight, expected * layer.mask, atol=1e-7, rtol=0)
    assert is_nm(layer.mask, "2:4")
    assert torch.equal(dense.weight != 0, layer.mask & (expected != 0))
    with pytest.raises(ValueError, match="multiple of n x M"):
        SparseLinear(torch.nn.Parameter(torch.randn(2, 12)), None, "2:4").add_weight_scale(2)


def test_adams_drives_pruned_weights_to_zero_in_a_dense_toy_run():
    """A dense-forward regression toward a dense target: with α ramping to 1 the pruned weights end near zero while
    the kept ones still fit the target (the mask refreshed every 10 steps, before the step)."""
    gen = torch.Generator().manual_seed(6)
    target = torch.randn(8, 16, generator=gen)
    layer = SparseLinear(torch.nn.Parameter(target + 0.1 * torch.randn(8, 16, generator=gen)), None, "2:4")
    layer.dense_forward = True
    opt = AdamS([layer.weight], lr=2e-2, betas=(0.9, 0.999), weight_decay=0.0, srste_lambda=1.0,
                masks={layer.weight: layer.mask})
    total = 400
    for t in range(total):
        if t % 10 == 0:
            layer.recompute_mask()
        x = torch.randn(32, 16, generator=gen)
        loss = (layer(x) - x @ target.t()).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        set_adams_alpha(opt, t / total)
        opt.step()
    w = layer.weight.detach()
    assert w[~layer.mask].abs().max() < 0.05 * target.abs().median()
    kept = w[layer.mask]
    assert torch.allclose(kept, target[layer.mask], atol=0.5)  # kept weights still serve the fit


# ------------------------------------------------------------------------------------------- trainer


def _train(tmp_path, tiny_dir, text, steps, name="cast", **fields):
    overrides = {
        "data.train": str(text), "train.tokens": steps * BATCH * SEQ, "train.seq_len": SEQ, "train.batch_size": BATCH,
        "train.precision": "fp32", "eval.windows": 1, "eval.every": 0, "eval.at_start": False, "eval.at_end": False,
        "checkpoint.every": 0, "log.plots": False, "log.tensorboard": False, "optim.lr": 1e-3,
        "decay.lambda_max": 1e-3, "mask.every": 3,
    }
    overrides.update({k.replace("__", "."): v for k, v in fields.items()})
    return trainer.train(str(tiny_dir), tmp_path / name, "cast", overrides, progress=False)


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_cast_run_refreshes_masks_before_the_forward_and_exports_exact_nm(tmp_path, tiny_dir, text, monkeypatch):
    events = []
    original_recompute, original_hidden = trainer.recompute_masks, trainer.final_hidden_states
    monkeypatch.setattr(trainer, "recompute_masks", lambda *a: events.append("masks") or original_recompute(*a))
    monkeypatch.setattr(trainer, "final_hidden_states", lambda *a: events.append("forward") or original_hidden(*a))
    result = _train(tmp_path, tiny_dir, text, steps=7)
    # Step t runs teacher + student forward; masks come first at t = 0, 3, 6, and once more after the last step.
    per_step = ["forward", "forward"]
    assert events == (["masks", *per_step] + per_step * 2 + ["masks", *per_step] + per_step * 2
                      + ["masks", *per_step, "masks"])
    records = _records(result.run_dir)
    flips = [r for r in records if "flip_rate" in r]
    assert [(r["step"], r["when"]) for r in flips] == [(0, "before"), (3, "before"), (6, "before"), (6, "after")]
    assert all(r["pruned_abs_max"] >= 0 for r in flips)
    mixes = [r["decay_mix"] for r in records if "decay_mix" in r]
    assert mixes == pytest.approx([t / 7 for t in range(7)])

    meta = json.loads((result.run_dir / "semisparse.json").read_text())
    assert meta["forward"] == "dense" and meta["weight_scale"] == {"blocks": 2, "folded": True}
    assert meta["adams_reach"]["reach"] == pytest.approx(1e-3 * sum(t / 7 for t in range(7)))
    assert meta["final"]["pruned_abs_max"] > 0  # a few steps do not reach zero, and the record says so
    # The export is an ordinary N:M model: stock transformers loads it, no scale tensors, zeros exactly where the
    # saved masks prune.
    stock = AutoModelForCausalLM.from_pretrained(result.run_dir)
    state = stock.state_dict()
    assert not any("weight_scale" in k for k in state)
    masks = load_file(str(result.run_dir / "masks.safetensors"))
    assert masks
    for name, mask in masks.items():
        weight = state[f"{name}.weight"]
        assert is_nm(mask, "2:4") and torch.all(weight[~mask] == 0)


def test_cast_scale_is_folded_exactly(tmp_path, tiny_dir, text, monkeypatch):
    """The exported weight equals (A ⊙ W) ⊙ M_T computed from the trained layers just before export."""
    captured = {}
    original = trainer.densify

    def capture(net):
        for name, layer in sparse_layers(net).items():
            captured[name] = (layer.weight.detach().clone(), layer.weight_scale.detach().clone(),
                              layer.mask.clone())
        return original(net)

    monkeypatch.setattr(trainer, "densify", capture)
    result = _train(tmp_path, tiny_dir, text, steps=4)
    state = AutoModelForCausalLM.from_pretrained(result.run_dir).state_dict()
    assert captured
    for name, (w, a, m) in captured.items():
        assert not torch.equal(a, torch.ones_like(a))  # the scale trained
        half = w.shape[1] // a.shape[1]
        folded = torch.cat([w[:, :half] * a[:, :1], w[:, half:] * a[:, 1:]], dim=1) * m
        assert torch.equal(state[f"{name}.weight"], folded), name


def test_cast_in_training_eval_measures_the_hard_pruned_model(tmp_path, tiny_dir, text, monkeypatch):
    seen = []
    original = trainer.perplexity

    def spy(net, *a, **k):
        seen.append([layer.dense_forward for layer in sparse_layers(net).values()])
        return original(net, *a, **k)

    monkeypatch.setattr(trainer, "perplexity", spy)
    result = _train(tmp_path, tiny_dir, text, steps=2, eval__at_start=True, eval__at_end=True)
    assert len(seen) == 2 and all(flags and not any(flags) for flags in seen)
    assert json.loads((result.run_dir / "semisparse.json").read_text())["forward"] == "dense"


def test_cast_resume_restores_the_live_mask(tmp_path, tiny_dir, text):
    """Masks refreshed every 3 steps are not a function of the weights at a step-4 checkpoint: a run resumed there
    ends exactly where the uninterrupted run does."""
    full = _train(tmp_path, tiny_dir, text, steps=8, name="full", checkpoint__every=4, checkpoint__keep=3)
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copy(full.run_dir / "run.json", resumed_dir / "run.json")
    shutil.copytree(full.run_dir / "checkpoints" / "step-000004", resumed_dir / "checkpoints" / "step-000004")
    shutil.copy(full.run_dir / "checkpoints" / ckpt.INITIAL_MASKS_FILE, resumed_dir / "checkpoints")  # M0, once a run
    resumed = trainer.train(str(tiny_dir), resumed_dir, None, {}, resume=True, progress=False)
    a, b = load_file(str(full.run_dir / "model.safetensors")), load_file(str(resumed.run_dir / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = load_file(str(full.run_dir / "masks.safetensors")), load_file(str(resumed.run_dir / "masks.safetensors"))
    assert all(torch.equal(ma[k], mb[k]) for k in ma)


def test_recipe_fields_that_cannot_work_together_are_one_line_errors(tmp_path, tiny_dir, text, monkeypatch):
    with pytest.raises(UserError, match="slorb.enabled and mask.forward: dense exclude each other"):
        load_recipe("cast", {"slorb.enabled": True})
    # The tiny model's layers are 64 and 128 wide: 3 blocks x M = 12 divides neither. Refused from the config's
    # shapes, before any weight loads.
    monkeypatch.setattr(train_setup, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(UserError, match=r"layer model\.layers\.0\..* has input width \d+, .*scale.blocks x M = 12"):
        _train(tmp_path, tiny_dir, text, steps=2, scale__blocks=3)
    assert not (tmp_path / "cast").exists()  # nothing written


def test_adams_reach_hand_sum():
    # constant lr: Σ lr·t/T = lr·(T − 1)/2
    assert trainer.adams_reach(10, 2e-3, 0, 1.0, 10) == pytest.approx(2e-3 * 4.5)

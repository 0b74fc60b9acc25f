"""Checkpoints: round trip of model/optimizer/RNG state, atomic writes, keep-last-N, and refusal of truncated or
modified checkpoints with one clear line (train/checkpoint.py). Across process counts: tests/test_distributed.py."""

from __future__ import annotations

import json
import random

import pytest
import torch
from torch import nn

from semisparse.errors import UserError
from semisparse.train import checkpoint as ckpt
from semisparse.train.optim import MaskedAdamW
from semisparse.train.sparse_linear import SparseLinear, param_masks


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 4))
    model[0] = SparseLinear.from_dense(model[0], "2:4")
    model[0].add_slorb(4, train_x=True)
    return model


def _trained(steps: int = 3):
    model = _model()
    opt = MaskedAdamW(model.parameters(), lr=1e-2, srste_lambda=0.1, masks=param_masks(model))
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(5, 8)).pow(2).mean().backward()
        opt.step()
    return model, opt


def _save(root, step, model, opt, keep=2):
    return ckpt.save_checkpoint(root, step, model, opt, {"tokens": 123, "data": {"position": 7}},
                                {"m0.layer": torch.ones(2, 4, dtype=torch.bool)}, keep=keep)


def test_round_trip_restores_model_optimizer_rng_and_state(tmp_path):
    model, opt = _trained()
    random.seed(5)
    torch.manual_seed(5)
    path = _save(tmp_path, 3, model, opt)
    assert path.name == "step-000003"
    expected_rand, expected_py = torch.rand(4), random.random()

    fresh = _model(seed=1)
    fresh_opt = MaskedAdamW(fresh.parameters(), lr=1e-2, masks=param_masks(fresh))
    torch.manual_seed(99)
    random.seed(99)
    state = ckpt.load_checkpoint(path, fresh, fresh_opt)
    assert state["step"] == 3 and state["tokens"] == 123 and state["data"] == {"position": 7}
    for (k, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), k
    for p, q in zip(opt.state.values(), fresh_opt.state.values()):
        for key in p:
            assert torch.equal(p[key], q[key]), key
    assert fresh_opt.param_groups[0]["srste_lambda"] == 0.1 and fresh_opt.param_groups[0]["betas"] == (0.9, 0.999)
    assert torch.equal(torch.rand(4), expected_rand) and random.random() == expected_py
    assert torch.equal(ckpt.read_extra(path)["m0.layer"], torch.ones(2, 4, dtype=torch.bool))
    # The in-place load keeps the optimizer's live mask mapping valid.
    assert param_masks(fresh)[fresh[0].weight] is fresh[0].mask


def test_files_are_dcp_shards_safetensors_and_json(tmp_path):
    """The model and optimizer go through torch.distributed.checkpoint (one shard file per process, here one),
    the rest is safetensors and JSON; the manifest hashes every file, the DCP ones included."""
    model, opt = _trained()
    path = _save(tmp_path, 1, model, opt)
    manifest = json.loads((path / ckpt.MANIFEST).read_text())
    assert manifest["format"] == ckpt.FORMAT == 2
    assert set(manifest["files"]) == {ckpt.DCP_METADATA, f"{ckpt.DCP_DIR}/__0_0.distcp", ckpt.RNG_FILE,
                                      ckpt.EXTRA_FILE, ckpt.STATE_FILE}
    on_disk = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()} - {ckpt.MANIFEST}
    assert on_disk == set(manifest["files"])
    for name, info in manifest["files"].items():
        assert len(info["sha256"]) == 64 and info["bytes"] == (path / name).stat().st_size


def test_format_1_checkpoint_is_refused_with_a_reason(tmp_path):
    model, opt = _trained()
    path = _save(tmp_path, 1, model, opt)
    manifest = json.loads((path / ckpt.MANIFEST).read_text())
    (path / ckpt.MANIFEST).write_text(json.dumps({**manifest, "format": 1}))
    with pytest.raises(UserError) as exc:
        ckpt.load_checkpoint(path, _model(), None)
    assert "older semisparse (format 1" in _one_line(exc) and "--overwrite" in str(exc.value)


def test_keep_last_n_and_leftovers_ignored(tmp_path):
    model, opt = _trained()
    (tmp_path / ".tmp-step-000009-1234").mkdir()  # a save killed half-way
    for step in (2, 4, 6):
        _save(tmp_path, step, model, opt, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000004", "step-000006"]
    assert ckpt.latest_checkpoint(tmp_path).name == "step-000006"
    ckpt.cleanup_leftovers(tmp_path)
    assert not (tmp_path / ".tmp-step-000009-1234").exists()


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


@pytest.mark.parametrize(
    "damage,message",
    [
        ("truncate", "truncated"),
        ("flip", "does not match its sha256"),
        ("no-manifest", "incomplete"),
        ("delete", "is missing"),
        ("bad-manifest", "unreadable manifest.json"),
    ],
)
def test_damaged_checkpoint_is_refused(tmp_path, damage, message):
    model, opt = _trained()
    path = _save(tmp_path, 2, model, opt)
    target = path / ckpt.DCP_DIR / "__0_0.distcp"
    data = target.read_bytes()
    if damage == "truncate":
        target.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        target.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    elif damage == "no-manifest":
        (path / ckpt.MANIFEST).unlink()
    elif damage == "delete":
        target.unlink()
    else:
        (path / ckpt.MANIFEST).write_text("{not json")
    with pytest.raises(UserError) as exc:
        ckpt.load_checkpoint(path, _model(), None)
    assert message in _one_line(exc) and str(path) in str(exc.value)
    # The newest checkpoint being the only one, there is nothing valid to resume from.
    with pytest.raises(UserError):
        ckpt.latest_checkpoint(tmp_path)


def test_latest_valid_checkpoint_skips_a_damaged_newer_one(tmp_path):
    model, opt = _trained()
    _save(tmp_path, 2, model, opt, keep=5)
    newest = _save(tmp_path, 4, model, opt, keep=5)
    blob = newest / ckpt.DCP_DIR / "__0_0.distcp"
    blob.write_bytes(blob.read_bytes()[:-10])
    warnings = []
    assert ckpt.latest_checkpoint(tmp_path, warn=warnings.append).name == "step-000002"
    assert len(warnings) == 1 and "step-000004" in warnings[0] and "truncated" in warnings[0]


def test_checkpoint_that_does_not_fit_the_model(tmp_path):
    model, opt = _trained()
    path = _save(tmp_path, 1, model, opt)
    other = nn.Sequential(nn.Linear(8, 16))
    with pytest.raises(UserError) as exc:
        ckpt.load_checkpoint(path, other, None)
    assert "does not fit the model" in _one_line(exc)

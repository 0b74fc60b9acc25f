"""The AST training loop on tiny models: mask schedule, flip rates, masked decay, distillation, SLoRB, the written
run directory, resume bit-identity after SIGKILL, NaN stop, and --init from a prune run directory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from semisparse import api, rundir
from semisparse.data import load_text, tokenize_joined
from semisparse.errors import UserError
from semisparse.evaluate.perplexity import perplexity
from semisparse.layers import select_layers, weight_matrix
from semisparse.masks import is_nm, nm_mask
from semisparse.models import load_model
from semisparse.train import checkpoint as ckpt
from semisparse.train import setup as train_setup
from semisparse.train import trainer
from semisparse.train.sparse_linear import SparseLinear, slorb_parameter_count, sparse_layers
from semisparse.train.stream import TokenBatches
from clirun import SLOW_STEPS_PRELUDE, kill_once_written
from tiny import make_llama, make_tokenizer

SEQ, BATCH = 16, 2


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Single-threaded: deterministic, and on a shared 2-core machine far faster than two spinning OMP threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(tmp_path, model_dir, data, steps, name="run", recipe="ast-naive", **fields):
    overrides = {
        "data.train": str(data), "train.tokens": steps * BATCH * SEQ, "train.seq_len": SEQ,
        "train.batch_size": BATCH, "eval.windows": 1, "eval.every": 0, "eval.at_start": False,
        "eval.at_end": False, "checkpoint.every": 0, "log.plots": False, "init.calib_samples": 4,
        "optim.lr": 1e-3,
    }
    overrides.update({k.replace("__", "."): v for k, v in fields.items()})
    return trainer.train(str(model_dir), tmp_path / name, recipe, overrides, progress=False)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


class _Recorder:
    """Wraps trainer.recompute_masks: snapshots masks around each call and the optimizer's view at each step."""

    def __init__(self, monkeypatch):
        self.calls: list[dict] = []
        original = trainer.recompute_masks

        def wrapped(layers, initial, *rest):
            before = {n: layer.mask.clone() for n, layer in layers.items()}
            result = original(layers, initial, *rest)
            after = {n: layer.mask.clone() for n, layer in layers.items()}
            self.calls.append({"before": before, "after": after, "initial": initial, "result": result})
            return result

        monkeypatch.setattr(trainer, "recompute_masks", wrapped)


# ------------------------------------------------------------------------------------------- pure pieces


def test_lr_schedule_and_mask_steps():
    lrs = [trainer.lr_at(t, 100, 1.0, 10, 0.1) for t in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert trainer.mask_update_steps(13, 5) == [0, 5, 10, 12]
    assert trainer.mask_update_steps(11, 5) == [0, 5, 10]


def test_flip_rate_hand_computation():
    """Two layers (4x8 and 2x8 = 48 dense weights); swapping the winners of one group flips 2 entries."""
    a = SparseLinear(torch.nn.Parameter(torch.arange(1.0, 33.0).reshape(4, 8)), None, "2:4")
    b = SparseLinear(torch.nn.Parameter(torch.arange(1.0, 17.0).reshape(2, 8)), None, "2:4")
    layers = {"a": a, "b": b}
    m0 = {n: layer.mask.clone() for n, layer in layers.items()}
    with torch.no_grad():
        a.weight[0, 0:4] = torch.tensor([9.0, 8.0, 1.0, 2.0])  # kept {2,3} -> {0,1}: 4 flips
    first = trainer.recompute_masks(layers, m0)
    assert (first["flips"], first["init_flips"]) == (4, 4)
    assert first["flip_rate"] == pytest.approx(4 / 48) and first["init_flip_rate"] == pytest.approx(4 / 48)
    with torch.no_grad():
        b.weight[1, 4:8] = torch.tensor([5.0, 1.0, 9.0, 0.5])  # kept {2,3} -> {0,2}: 2 flips
        a.weight[0, 0:4] = torch.tensor([1.0, 2.0, 8.0, 9.0])  # back to M0: 4 flips vs previous, 0 vs M0
    second = trainer.recompute_masks(layers, m0)
    assert (second["flips"], second["init_flips"]) == (6, 2)
    assert second["flip_rate"] == pytest.approx(6 / 48) and second["init_flip_rate"] == pytest.approx(2 / 48)


def test_token_batches_sharded_and_resumable():
    stream = torch.arange(200)
    full = TokenBatches(stream, 8, 3, seed=1)
    ranks = [TokenBatches(stream, 8, 3, seed=1, rank=r, world_size=2) for r in range(2)]
    seen = []
    for _ in range(5):
        xs = [tb.next_batch()[0] for tb in ranks]
        seen.append(torch.cat(xs))
        assert not set(xs[0][:, 0].tolist()) & set(xs[1][:, 0].tolist())  # disjoint samples
    # Two ranks read what one process would read in two micro-steps, and wrap into the next epoch in order.
    single = torch.cat([full.next_batch()[0] for _ in range(10)])
    assert torch.equal(torch.cat(seen), single)
    x, y = full.next_batch()
    assert torch.equal(x[:, 1:], y[:, :-1])
    resumed = TokenBatches(stream, 8, 3, seed=1)
    resumed.load_state_dict(full.state_dict())
    assert torch.equal(resumed.next_batch()[0], full.next_batch()[0])
    with pytest.raises(UserError, match="training data differ"):
        TokenBatches(torch.arange(201), 8, 3, seed=1).load_state_dict(full.state_dict())


# ------------------------------------------------------------------------------------------- training runs


def test_adaptive_masks_schedule_nm_and_logged_flip_rates(tmp_path, tiny_dir, text, monkeypatch):
    rec = _Recorder(monkeypatch)
    nm_each_step = []
    original_step = trainer.MaskedAdamW.step

    def step(self, closure=None):
        nm_each_step.append(all(is_nm(m, "2:4") for m in self.masks.values()))
        return original_step(self, closure)

    monkeypatch.setattr(trainer.MaskedAdamW, "step", step)
    result = run(tmp_path, tiny_dir, text, steps=13, mask__every=5, decay__ramp=0)
    out = result.run_dir
    records = metrics(out)
    mask_lines = [r for r in records if "flip_rate" in r]
    assert [r["step"] for r in mask_lines] == [0, 5, 10, 12] == trainer.mask_update_steps(13, 5)
    assert len(rec.calls) == 4 and len(nm_each_step) == 13 and all(nm_each_step)
    for call, line in zip(rec.calls, mask_lines):
        total = sum(m.numel() for m in call["after"].values())
        flips = sum(int((call["after"][n] != call["before"][n]).sum()) for n in call["after"])
        init = sum(int((call["after"][n] != call["initial"][n]).sum()) for n in call["after"])
        assert all(is_nm(m, "2:4") for m in call["after"].values())
        assert line["flips"] == flips and line["init_flips"] == init
        assert line["flip_rate"] == pytest.approx(flips / total)
        assert line["init_flip_rate"] == pytest.approx(init / total)
    assert sum(line["flips"] for line in mask_lines) > 0  # the masks do adapt
    step_lines = [r for r in records if "loss" in r]
    assert [r["step"] for r in step_lines] == list(range(13))
    assert set(step_lines[0]) >= {"step", "tokens", "loss", "ce", "kl", "lr", "lambda", "tokens_per_s", "teacher_s",
                                  "step_s"}
    assert step_lines[-1]["tokens"] == 13 * BATCH * SEQ and step_lines[3]["lambda"] == pytest.approx(1e-4)

    # The run dir is a stock transformers model: zeros exactly where masks.safetensors prunes, exactly 2:4,
    # and the masks are the final recomputed ones.
    stock = AutoModelForCausalLM.from_pretrained(out)
    masks = load_file(str(out / "masks.safetensors"))
    layers = select_layers(stock)
    assert set(masks) == set(layers)
    for name, module in layers.items():
        assert is_nm(masks[name], "2:4") and torch.equal(masks[name], rec.calls[-1]["after"][name].cpu())
        assert (weight_matrix(module)[~masks[name]] == 0).all()
    meta = json.loads((out / "semisparse.json").read_text())
    assert meta["stage"] == "train" and meta["pattern"] == "2:4" and meta["steps"] == 13
    assert meta["sparse_weights"]["density"] == 0.5 and meta["teacher"] == str(tiny_dir)


def test_frozen_mask_never_changes(tmp_path, tiny_dir, text, monkeypatch):
    rec = _Recorder(monkeypatch)
    seen = []
    from semisparse.train.optim import MaskedAdamW

    original_step = MaskedAdamW.step  # fixed-mask-kd uses the paper's AdamW, as AST does

    def step(self, *args, **kwargs):
        out = original_step(self, *args, **kwargs)
        seen.append([m.clone() for m in masks_ref])
        return out

    dense = {n: weight_matrix(m).clone() for n, m in select_layers(make_llama()).items()}
    masks_ref: list[torch.Tensor] = []
    original_sparsify = train_setup.sparsify

    def sparsify(*args, **kwargs):
        layers = original_sparsify(*args, **kwargs)
        masks_ref.extend(layer.mask for layer in layers.values())
        return layers

    monkeypatch.setattr(train_setup, "sparsify", sparsify)
    monkeypatch.setattr(MaskedAdamW, "step", step)
    result = run(tmp_path, tiny_dir, text, steps=12, recipe="fixed-mask-kd")
    m0 = [nm_mask(w.abs(), "2:4") for w in dense.values()]
    assert not rec.calls and len(seen) == 12
    assert all(torch.equal(a, b) for masks in seen for a, b in zip(masks, m0))
    assert not [r for r in metrics(result.run_dir) if "flip_rate" in r]
    saved = load_file(str(result.run_dir / "masks.safetensors"))
    assert all(torch.equal(saved[n], m) for n, m in zip(dense, m0))


def _dense_after(run_dir: Path, steps: int) -> tuple[dict, dict]:
    path = run_dir / "checkpoints" / ckpt.step_dir_name(steps)
    state = ckpt.read_model_state(path)
    m0 = load_file(str(run_dir / "checkpoints" / ckpt.INITIAL_MASKS_FILE))
    return {n: state[f"{n}.weight"] for n in m0}, m0


@pytest.mark.parametrize("variant", ["adamw_decoupled", "grad"])
def test_decay_shrinks_only_pruned_weights(tmp_path, tiny_dir, text, variant):
    common = dict(steps=1, mask__update=False, decay__variant=variant, decay__ramp=0, optim__warmup=0,
                  optim__lr=1e-4, distill__alpha=0.0)
    with_decay = run(tmp_path, tiny_dir, text, name="decay", decay__lambda_max=10.0, **common)
    without = run(tmp_path, tiny_dir, text, name="plain", decay__lambda_max=0.0, **common)
    w1, m0 = _dense_after(with_decay.run_dir, 1)
    w0, _ = _dense_after(without.run_dir, 1)
    shrunk = total = 0
    for name, mask in m0.items():
        assert torch.equal(w1[name][mask], w0[name][mask]), name  # kept weights: untouched by the decay
        shrunk += int((w1[name][~mask].abs() < w0[name][~mask].abs()).sum())
        total += int((~mask).sum())
        assert w1[name][~mask].abs().sum() < w0[name][~mask].abs().sum()
    assert shrunk / total > 0.95


def test_distillation_on_and_off(tmp_path, tiny_dir, text, monkeypatch):
    loads = []
    original = train_setup.load_model
    monkeypatch.setattr(train_setup, "load_model", lambda *a, **k: loads.append(a[0]) or original(*a, **k))
    kd = run(tmp_path, tiny_dir, text, steps=3, name="kd")
    for r in (r for r in metrics(kd.run_dir) if "loss" in r):
        assert r["kl"] is not None and r["teacher_s"] > 0
        assert r["loss"] == pytest.approx(0.67 * r["kl"] + 0.33 * r["ce"], rel=1e-5)
    ce = run(tmp_path, tiny_dir, text, steps=3, name="ce", recipe="naive-ce")
    for r in (r for r in metrics(ce.run_dir) if "loss" in r):
        assert r["kl"] is None and r["teacher_s"] == 0 and r["loss"] == pytest.approx(r["ce"], rel=1e-6)
    assert json.loads((ce.run_dir / "semisparse.json").read_text())["teacher"] is None
    assert loads == [str(tiny_dir), str(tiny_dir)]  # the student only: the teacher is a copy, or absent


def test_slorb_run_saves_reloads_and_reports_overhead(tmp_path, tiny_dir, text):
    result = run(tmp_path, tiny_dir, text, steps=4, recipe="ast-boosted", slorb__k=8, log__plots=True,
                 eval__at_end=True)
    out = result.run_dir
    assert (out / "slorb.safetensors").is_file()
    meta = json.loads((out / "semisparse.json").read_text())
    expected = slorb_parameter_count(result.model)
    kept = meta["sparse_weights"]["kept"]
    assert meta["slorb"]["params"] == expected == result.summary["slorb_params"] > 0
    assert meta["slorb"]["overhead_vs_kept"] == pytest.approx(expected / kept)
    assert meta["slorb"]["k"] == 8 and meta["slorb"]["train_x"] is True
    # load_model re-attaches SLoRB: same logits as the in-memory trained model.
    reloaded = load_model(str(out)).model
    assert len(sparse_layers(reloaded)) == len(sparse_layers(result.model)) > 0
    x = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        assert torch.allclose(reloaded(x).logits, result.model(x).logits, atol=1e-5, rtol=0)
    assert {p.name for p in (out / "plots").iterdir()} >= {"loss.png", "flip_rate.png", "lambda.png", "eval_ppl.png"}


_KILLED_SCRIPT = SLOW_STEPS_PRELUDE + """
import json
trainer.train(sys.argv[1], sys.argv[2], "ast-boosted", json.loads(sys.argv[3]), progress=False)
"""


def test_resume_after_sigkill_is_bit_identical(tmp_path, tiny_dir, text):
    steps = 16
    fields = {"data.train": str(text), "train.tokens": steps * BATCH * SEQ * 2, "train.seq_len": SEQ,
              "train.batch_size": BATCH, "train.grad_accum": 2, "eval.windows": 1, "eval.every": 0,
              "eval.at_start": False, "eval.at_end": False, "checkpoint.every": 2, "checkpoint.keep": 3,
              "log.plots": False, "mask.every": 3, "slorb.k": 8, "optim.lr": 1e-3, "decay.lambda_max": 1e-2}
    killed = tmp_path / "killed"
    marker = killed / "checkpoints" / "step-000004" / ckpt.MANIFEST
    code = kill_once_written(_KILLED_SCRIPT, [str(tiny_dir), str(killed), json.dumps(fields)], marker, 120,
                             "no checkpoint past step 4")
    assert code == -signal.SIGKILL
    assert not (killed / "semisparse.json").exists()

    assert torch.get_num_threads() == 1  # as in the killed process
    resumed = trainer.train(str(tiny_dir), killed, None, {}, resume=True, progress=False)
    trainer.train(str(tiny_dir), tmp_path / "reference", "ast-boosted", fields, progress=False)
    assert resumed.summary["resumed_from"] is not None
    assert int(Path(resumed.summary["resumed_from"]).name[len("step-"):]) >= 4

    final = ckpt.step_dir_name(steps)
    m0 = lambda p: load_file(str(p.parent / ckpt.INITIAL_MASKS_FILE))  # written once, at the start
    for read in (ckpt.read_tensors, lambda p: load_file(str(p / ckpt.RNG_FILE)), m0):
        a = read(killed / "checkpoints" / final)  # model, optimizer moments, RNG, M0
        b = read(tmp_path / "reference" / "checkpoints" / final)
        assert a.keys() == b.keys() and a
        for key in a:
            assert torch.equal(a[key], b[key]), key
    for name in ("model.safetensors", "masks.safetensors", "slorb.safetensors"):
        a, b = load_file(str(killed / name)), load_file(str(tmp_path / "reference" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    # The metrics log was cut back to the checkpoint and continued: the same records as the uninterrupted run.
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "teacher_s", "step_s")} for r in rs]
    assert strip(metrics(killed)) == strip(metrics(tmp_path / "reference"))


def _resume_error(model_dir, run_dir, monkeypatch, capsys) -> str:
    """`semisparse train MODEL --out RUN --resume` through the CLI: the one stderr line of an exit 2."""
    from semisparse import cli

    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["semisparse", "train", str(model_dir), "--out", str(run_dir), "--resume"])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1, err
    return err[0]


def test_resume_refuses_a_corrupted_checkpoint(tmp_path, tiny_dir, text, monkeypatch, capsys):
    result = run(tmp_path, tiny_dir, text, steps=2, checkpoint__every=2)
    blob = result.run_dir / "checkpoints" / "step-000002" / ckpt.DCP_DIR / "__0_0.distcp"
    blob.write_bytes(blob.read_bytes()[:-100])
    line = _resume_error(tiny_dir, result.run_dir, monkeypatch, capsys)
    assert "step-000002 is corrupted: dcp/__0_0.distcp has" in line and "truncated" in line


def test_initial_masks_are_written_once_and_checked_on_resume(tmp_path, tiny_dir, text, monkeypatch, capsys):
    """M0 is one file per run (run.json holds its sha256), not a copy in every checkpoint; it is the one-shot mask
    the run started from, and a damaged M0 file stops `--resume` with one line and exit 2."""
    result = run(tmp_path, tiny_dir, text, steps=4, checkpoint__every=2, checkpoint__keep=2, mask__every=1)
    root = result.run_dir / "checkpoints"
    record = json.loads((result.run_dir / "run.json").read_text())["initial_masks"]
    assert record["file"] == f"checkpoints/{ckpt.INITIAL_MASKS_FILE}" and record["bytes"] > 0
    dense = {n: weight_matrix(m) for n, m in select_layers(load_model(str(tiny_dir)).model).items()}
    m0 = load_file(str(root / ckpt.INITIAL_MASKS_FILE))
    assert m0.keys() == dense.keys()
    assert all(torch.equal(m0[n], nm_mask(w.abs(), "2:4")) for n, w in dense.items())  # magnitude init
    for step in ("step-000002", "step-000004"):
        assert ckpt.read_extra(root / step) == {}  # nothing repeated per checkpoint
    init_flips = [r["init_flips"] for r in metrics(result.run_dir) if "init_flips" in r]
    assert init_flips and init_flips[-1] > 0  # the masks moved away from the file's M0 ...
    final = load_file(str(result.run_dir / "masks.safetensors"))
    assert init_flips[-1] == sum(int((final[n] != m0[n]).sum()) for n in m0)  # ... by exactly this much

    (result.run_dir / "semisparse.json").unlink()  # as if stopped after its last checkpoint
    flipped = {n: m.clone() for n, m in m0.items()}
    name = next(iter(flipped))
    flipped[name][0, :4] = ~flipped[name][0, :4]  # still 2:4, so only the hash can tell
    from safetensors.torch import save_file

    save_file(flipped, str(root / ckpt.INITIAL_MASKS_FILE))
    assert "initial_masks.safetensors is truncated or modified" in _resume_error(tiny_dir, result.run_dir,
                                                                                  monkeypatch, capsys)


def test_a_checkpoint_from_before_the_initial_masks_file_resumes(tmp_path, tiny_dir, text):
    """Checkpoints written before 2026-12-08 carried M0 in extra.safetensors and run.json recorded no M0 file:
    such a run resumes, gets the file and the record, and ends where an uninterrupted run ends."""
    fields = dict(steps=4, checkpoint__every=2, mask__every=1)
    reference = run(tmp_path, tiny_dir, text, name="reference", **fields).run_dir
    old = run(tmp_path, tiny_dir, text, name="old", **fields).run_dir
    root = old / "checkpoints"
    m0 = load_file(str(root / ckpt.INITIAL_MASKS_FILE))
    step2 = root / "step-000002"
    import shutil

    shutil.rmtree(root / "step-000004")
    for name in ("semisparse.json", "model.safetensors", "masks.safetensors"):
        (old / name).unlink()
    (root / ckpt.INITIAL_MASKS_FILE).unlink()
    record = json.loads((old / "run.json").read_text())
    del record["initial_masks"]
    (old / "run.json").write_text(json.dumps(record))
    from safetensors.torch import save_file

    save_file({f"{ckpt.M0_PREFIX}{n}": m for n, m in m0.items()}, str(step2 / ckpt.EXTRA_FILE))
    manifest = json.loads((step2 / ckpt.MANIFEST).read_text())  # the old checkpoint's manifest covered its M0
    manifest["files"][ckpt.EXTRA_FILE] = {"sha256": rundir.sha256_file(step2 / ckpt.EXTRA_FILE),
                                          "bytes": (step2 / ckpt.EXTRA_FILE).stat().st_size}
    (step2 / ckpt.MANIFEST).write_text(json.dumps(manifest))

    resumed = trainer.train(str(tiny_dir), old, None, {}, resume=True, progress=False)
    assert Path(resumed.summary["resumed_from"]).name == "step-000002"
    assert json.loads((old / "run.json").read_text())["initial_masks"]["bytes"] > 0
    again = load_file(str(root / ckpt.INITIAL_MASKS_FILE))
    assert again.keys() == m0.keys() and all(torch.equal(again[n], m0[n]) for n in m0)
    for name in ("model.safetensors", "masks.safetensors"):
        a, b = load_file(str(old / name)), load_file(str(reference / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "teacher_s", "step_s")} for r in rs]
    assert strip(metrics(old)) == strip(metrics(reference))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_dir, text, monkeypatch):
    calls = {"n": 0}
    original = trainer.distill_loss

    def poisoned(*args, **kwargs):
        out = original(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 4:  # step 3
            out.loss = out.loss * float("nan")
            out.total = float("nan")
        return out

    monkeypatch.setattr(trainer, "distill_loss", poisoned)
    with pytest.raises(UserError) as exc:
        run(tmp_path, tiny_dir, text, steps=6, checkpoint__every=1, checkpoint__keep=2)
    message = str(exc.value)
    assert "training stopped: the loss became nan at step 3" in message and "step-000003" in message
    run_dir = tmp_path / "run"
    assert [p.name for p in ckpt.list_checkpoints(run_dir / "checkpoints")] == ["step-000002", "step-000003"]
    ckpt.verify_checkpoint(run_dir / "checkpoints" / "step-000003")
    assert not (run_dir / "semisparse.json").exists()


def test_huge_lr_stops_the_cli_with_exit_2(tmp_path, tiny_dir, text):
    cmd = [sys.executable, "-m", "semisparse.cli", "train", str(tiny_dir), "--out", str(tmp_path / "o"),
           "--data", str(text), "--tokens", str(6 * BATCH * SEQ), "--seqlen", str(SEQ), "--batch-size", str(BATCH),
           "--lr", "1e30", "--set", "optim.warmup=0", "--set", "checkpoint.every=1", "--set", "eval.at_start=false",
           "--set", "eval.at_end=false", "--no-progress", "--recipe", "naive-ce"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("semisparse: error: training stopped: the ") and "became" in last
    assert "last good checkpoint is" in last and "Traceback" not in r.stderr


def test_init_from_prune_run_dir(tmp_path, tiny_dir, text):
    pruned = tmp_path / "pruned"
    api.prune(str(tiny_dir), "sparsegpt", "2:4", str(text), pruned, nsamples=4, seqlen=SEQ, progress=False)
    pruned_masks = load_file(str(pruned / "masks.safetensors"))
    # MODEL is only a label here: the student comes from the run dir, the teacher from its dense_model.
    result = run(tmp_path, "somewhere/else", text, steps=2, init__source=str(pruned), mask__update=False,
                 eval__at_start=True)
    meta = json.loads((result.run_dir / "semisparse.json").read_text())
    assert meta["init"] == {"source": str(pruned), "method": "sparsegpt", "path": str(pruned)}
    assert meta["teacher"] == meta["dense_model"] == str(tiny_dir)
    saved = load_file(str(result.run_dir / "masks.safetensors"))
    assert saved.keys() == pruned_masks.keys() and all(torch.equal(saved[k], pruned_masks[k]) for k in saved)
    # Training started from the pruned weights: the logged perplexity before step 0 is the pruned model's.
    first = metrics(result.run_dir)[0]
    assert first["step"] == -1
    tokens = tokenize_joined(make_tokenizer(), load_text(str(text), "eval").docs)[:SEQ]
    expected = perplexity(load_model(str(pruned)).model, tokens, SEQ, progress=False).ppl
    assert first["eval_ppl"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("start", ["dense", "zero"])
def test_one_shot_init_pruned_weight_start(start):
    from semisparse.config import load_recipe
    from semisparse.layers import select_layers, weight_matrix

    net = make_llama()
    dense = {n: weight_matrix(m).clone() for n, m in select_layers(net).items()}
    cfg, _ = load_recipe("ast-naive", {"init.source": "sparsegpt", "init.pruned_weights": start, "train.tokens": 1,
                                       "init.calib_samples": 2})
    stream = torch.randint(0, 300, (400,), generator=torch.Generator().manual_seed(0))
    masks = train_setup.init_masks(net, cfg, stream, 32, "cpu", progress=False)
    for name, module in select_layers(net).items():
        w, mask = weight_matrix(module), masks[name]
        assert is_nm(mask, "2:4")
        assert not torch.equal(w[mask], dense[name][mask])  # SparseGPT updated the kept weights
        if start == "dense":
            assert torch.equal(w[~mask], dense[name][~mask])
        else:
            assert (w[~mask] == 0).all()


def test_compiled_blocks_train_like_eager(tmp_path, tiny_dir, text):
    """train.compile (torch.compile per decoder block, student and teacher): the same losses as eager within float
    rounding of fused kernels (1e-5 relative, fp32) across mask recomputes (masks change in place, no recompile
    needed), and the export is the same N:M model."""
    fields = dict(steps=6, train__precision="fp32", mask__every=2, decay__lambda_max=1e-2, decay__ramp=0)
    from torch._dynamo.utils import counters

    eager = run(tmp_path, tiny_dir, text, name="eager", **fields)
    counters.clear()
    compiled = run(tmp_path, tiny_dir, text, name="compiled", train__compile=True, **fields)
    assert counters["stats"]["unique_graphs"] > 0  # dynamo did compile (the teacher's and the student's blocks)
    losses = lambda r: [m["loss"] for m in metrics(r.run_dir) if "loss" in m]
    assert len(losses(eager)) == 6 and losses(compiled) == pytest.approx(losses(eager), rel=1e-5)
    a, b = load_file(str(eager.run_dir / "masks.safetensors")), load_file(str(compiled.run_dir / "masks.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

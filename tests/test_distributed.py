"""FSDP2 on CPU (torchrun, 2 processes, gloo): sparse layers, masks and the masked optimizers on sharded weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def torchrun(script: Path, *args: str, nproc: int = 2, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", str(script),
           *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def test_masked_optimizers_and_mask_recompute_on_fsdp2_shards_equal_one_process(tmp_path):
    """FSDP2 shards dim 0 (output rows) and N:M groups run along the input dimension: each rank updates its rows
    with its slice of the mask and recomputes its rows' masks without gathering weights; after 4 steps (two mask
    recomputes) the gathered weights and every rank's full masks equal a one-process run's."""
    out = tmp_path / "result.txt"
    proc = torchrun(HERE / "distributed" / "sharded_masks.py", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    status, count = out.read_text().split()
    assert status == "OK" and int(count) > 40


# ------------------------------------------------------------------------------------------- the trainer, 2 processes

import json  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from semisparse.train import checkpoint as ckpt  # noqa: E402
from semisparse.train import trainer  # noqa: E402

BATCH, SEQ, ACCUM = 2, 16, 2
SCRIPT = HERE / "distributed" / "train_script.py"


def _fields(text, steps: int, **extra) -> dict:
    """A tiny KD run with every moving part on: mask recomputes every 2 steps, a strong decay, in-training
    evaluation, checkpoints every 2 steps. fp32, so both sides compute the same micro-batches the same way."""
    fields = {
        "data.train": str(text), "train.tokens": steps * BATCH * ACCUM * SEQ, "train.seq_len": SEQ,
        "train.batch_size": BATCH, "train.grad_accum": ACCUM, "train.precision": "fp32", "eval.windows": 1,
        "eval.every": 3, "eval.at_start": True, "eval.at_end": True, "checkpoint.every": 2, "checkpoint.keep": 10,
        "log.plots": False, "log.tensorboard": False, "mask.every": 2, "optim.lr": 1e-3, "decay.lambda_max": 1e-2,
        "decay.ramp": 0, "init.calib_samples": 4,
    }
    return {**fields, **extra}


def _one_process(tiny_dir, out, recipe, fields):
    torch.set_num_threads(1)  # as the torchrun processes
    return trainer.train(str(tiny_dir), out, recipe, fields, progress=False)


def _script(*args, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    return torchrun(SCRIPT, *map(str, args), nproc=nproc, timeout=timeout)


def _metrics(run_dir: Path) -> list[dict]:
    skip = ("tokens_per_s", "teacher_s", "step_s")
    return [{k: v for k, v in json.loads(line).items() if k not in skip}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _assert_same_run(a: Path, b: Path, atol: float = 1e-5) -> None:
    """Two run directories hold the same model: weights within ``atol``, identical masks, the same metrics records
    (losses and perplexities within 1e-5 relative).

    Tolerance: FSDP2 reduce-scatters (and averages) the gradients of two micro-batches that one process sums one
    after the other: float32 additions in another order, ~1e-7 relative per step; Adam's normalisation can enlarge
    that for gradients near zero, so a few steps of lr 1e-3 stay well inside 1e-5."""
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.allclose(wa[key], wb[key], atol=atol, rtol=0), (key, (wa[key] - wb[key]).abs().max())
    ma, mb = load_file(str(a / "masks.safetensors")), load_file(str(b / "masks.safetensors"))
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)
    ra, rb = _metrics(a), _metrics(b)
    assert [sorted(r) for r in ra] == [sorted(r) for r in rb]
    for x, y in zip(ra, rb):
        for key, value in x.items():
            if isinstance(value, float):
                assert y[key] == pytest.approx(value, rel=1e-5, abs=1e-9), (x["step"], key)
            else:
                assert y[key] == value, (x["step"], key)


@pytest.mark.parametrize("recipe,sharded_only", [
    ("ast-naive", {}), ("cast", {}), ("ast-naive", {"fsdp.shard_teacher": True})])
def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path, tiny_dir, text, recipe, sharded_only):
    """`torchrun --nproc-per-node 2 -m semisparse train` (FSDP2, gloo): each process runs 1 of the 2 micro-batches
    of a step; the run directory equals a one-process run's with grad_accum 2 (masks exactly, weights within float
    rounding), and only rank 0 wrote files: the same file set, one metrics line per record. Also with the teacher
    sharded (``fsdp.shard_teacher``, which a single process ignores)."""
    fields = _fields(text, steps=6, **({"scale.blocks": 2} if recipe == "cast" else {}))
    one = _one_process(tiny_dir, tmp_path / "one", recipe, fields)
    fields = {**fields, **sharded_only}
    sets = [f"--set={k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in fields.items()]
    two = tmp_path / "two"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "semisparse",
         "train", str(tiny_dir), "--out", str(two), "--recipe", recipe, "--no-progress", *sets],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes (FSDP2)" in proc.stdout
    _assert_same_run(one.run_dir, two)
    files = lambda root: sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if "checkpoints" not in p.parts)
    assert files(two) == files(one.run_dir)
    meta = json.loads((two / "semisparse.json").read_text())
    assert meta["world_size"] == 2 and meta["tokens"] == one.summary["tokens"]
    # Each checkpoint holds one shard file per process.
    shards = sorted(p.name for p in (two / "checkpoints" / "step-000004" / ckpt.DCP_DIR).glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]


def test_a_skeleton_is_the_loaded_model_without_its_values(tmp_path, tiny_dir):
    """models.load_skeleton: the same parameter and buffer names, shapes, dtypes, tied weights and attention
    implementation as load_model, every tensor on the meta device; sources it cannot stand in for are refused."""
    from semisparse.models import load_model, load_skeleton, skeleton_loadable

    real, skeleton = load_model(str(tiny_dir)).model, load_skeleton(str(tiny_dir)).model
    a = dict(real.named_parameters()) | dict(real.named_buffers())
    b = dict(skeleton.named_parameters()) | dict(skeleton.named_buffers())
    assert a.keys() == b.keys() and a
    for name, tensor in a.items():
        assert b[name].is_meta and not tensor.is_meta, name
        assert (b[name].shape, b[name].dtype) == (tensor.shape, tensor.dtype), name
    tied = lambda m: m.get_output_embeddings().weight is m.get_input_embeddings().weight
    assert tied(real) and tied(skeleton)
    assert skeleton.config._attn_implementation == real.config._attn_implementation
    assert skeleton_loadable(str(tiny_dir))
    (tmp_path / "export.json").write_text("{}")
    (tmp_path / "slorb").mkdir()
    (tmp_path / "slorb" / "slorb.safetensors").write_bytes(b"")
    assert not skeleton_loadable(str(tmp_path)) and not skeleton_loadable(str(tmp_path / "slorb"))


@pytest.mark.parametrize("recipe,extra", [
    ("ast-boosted", {"slorb.k": 8}), ("cast", {"scale.blocks": 2, "fsdp.shard_teacher": True})])
def test_with_an_init_run_directory_only_rank_0_reads_the_weights(tmp_path, tiny_dir, text, recipe, extra):
    """`--init PRUNE_DIR` under torchrun: rank 0 alone reads the student and the teacher, the other process builds
    them on the meta device and receives rank 0's values after sharding (set_model_state_dict with
    broadcast_from_rank0, then the buffers outside the state dict: the rotary frequencies). SLoRB's S and X, CAST's
    weight scales, bool masks and a sharded or replicated teacher are among the values; the run equals the
    one-process run, which a process with wrong values (random, zeros, another rotary table) could not."""
    from semisparse import api

    pruned = tmp_path / "pruned"
    api.prune(str(tiny_dir), "sparsegpt", "2:4", str(text), pruned, nsamples=4, seqlen=SEQ, progress=False)
    fields = _fields(text, steps=4, **{"init.source": str(pruned), **extra})
    one = _one_process(tiny_dir, tmp_path / "one", recipe, fields)
    loads, logits = tmp_path / "loads.txt", tmp_path / "logits.pt"
    proc = _script(tiny_dir, tmp_path / "two", recipe, json.dumps(fields), "--record-loads", loads,
                   "--save-logits", logits)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0 reads the weights; the other 1 process(es) receive them from it" in proc.stdout
    _assert_same_run(one.run_dir, tmp_path / "two")
    # the model rank 0's `train` returns (built on the meta device, given the gathered tensors and the rotary
    # buffers) computes what the one-process model computes
    sys.path.insert(0, str(SCRIPT.parent))
    from train_script import fixed_logits

    assert torch.allclose(torch.load(logits), fixed_logits(one.model), atol=1e-4, rtol=0)
    calls = sorted(loads.read_text().splitlines())
    # the set-up's models: rank 0 reads the pruned student and its dense teacher, rank 1 only builds both
    assert calls == sorted([f"0 load {pruned}", f"0 load {tiny_dir}", f"1 skeleton {pruned}",
                            f"1 skeleton {tiny_dir}"]), calls


def test_fsdp_always_wraps_a_single_torchrun_process_and_changes_nothing(tmp_path, tiny_dir, text):
    """`torchrun --nproc-per-node 1` with fsdp.always (what the GPU suite times to show the wrapper's cost): FSDP2
    on one process trains exactly as the unwrapped run; without torchrun the option is refused in one line."""
    fields = _fields(text, steps=4)
    plain = _one_process(tiny_dir, tmp_path / "plain", "ast-naive", fields).run_dir
    proc = _script(tiny_dir, tmp_path / "wrapped", "ast-naive", json.dumps({**fields, "fsdp.always": True}), nproc=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 process (FSDP2)" in proc.stdout
    _assert_same_run(plain, tmp_path / "wrapped")
    from semisparse.errors import UserError

    with pytest.raises(UserError, match="fsdp.always wraps one process with FSDP2 under torchrun"):
        trainer.train(str(tiny_dir), tmp_path / "refused", "ast-naive", {**fields, "fsdp.always": True},
                      progress=False)
    assert not (tmp_path / "refused").exists()


def _drop_after(run_dir: Path, step: int) -> None:
    """Make a finished run look stopped at ``step``: later checkpoints and the run's results removed."""
    for path in ckpt.list_checkpoints(run_dir / ckpt.DIR_NAME):
        if int(path.name[len(ckpt.PREFIX):]) > step:
            import shutil

            shutil.rmtree(path)
    for name in ("semisparse.json", "model.safetensors", "masks.safetensors"):
        (run_dir / name).unlink()


def test_checkpoints_resume_at_another_process_count(tmp_path, tiny_dir, text):
    """A 2-process checkpoint continued by 1 process, and a 1-process checkpoint continued by 2, end where the
    uninterrupted run ends (SLoRB on: its S and X are sharded parameters too)."""
    fields = _fields(text, steps=6, **{"slorb.k": 8})
    reference = _one_process(tiny_dir, tmp_path / "reference", "ast-boosted", fields).run_dir

    two_then_one = tmp_path / "two-then-one"
    proc = _script(tiny_dir, two_then_one, "ast-boosted", json.dumps(fields))
    assert proc.returncode == 0, proc.stderr[-3000:]
    _drop_after(two_then_one, 2)
    resumed = trainer.train(str(tiny_dir), two_then_one, None, {}, resume=True, progress=False)
    assert Path(resumed.summary["resumed_from"]).name == "step-000002"
    _assert_same_run(reference, two_then_one)

    one_then_two = tmp_path / "one-then-two"
    _one_process(tiny_dir, one_then_two, "ast-boosted", fields)
    _drop_after(one_then_two, 4)
    proc = _script(tiny_dir, one_then_two, "ast-boosted", "{}", "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "written by 1 processes, continued by 2" in proc.stdout
    _assert_same_run(reference, one_then_two)


def test_a_killed_process_ends_the_job_and_the_run_resumes(tmp_path, tiny_dir, text):
    """Rank 1 SIGKILLs itself after step 2 (a checkpoint exists at step 2): the job ends non-zero well before the
    collective timeout, rank 0 wrote no run results; `--resume` under torchrun finishes the run as if uninterrupted."""
    fields = _fields(text, steps=6)
    out = tmp_path / "killed"
    start = time.perf_counter()
    proc = _script(tiny_dir, out, "ast-naive", json.dumps(fields), "--kill-rank", "1", "--kill-after", "2")
    elapsed = time.perf_counter() - start
    assert proc.returncode != 0
    assert f"exitcode  : -{int(signal.SIGKILL)}" in proc.stderr or "Signal 9" in proc.stderr, proc.stderr[-2000:]
    assert elapsed < 120  # torchrun ends the other process at once; the collective timeout is 600 s
    assert not (out / "semisparse.json").exists()
    assert ckpt.latest_checkpoint(out / ckpt.DIR_NAME).name == "step-000002"
    proc = _script(tiny_dir, out, "ast-naive", "{}", "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference = _one_process(tiny_dir, tmp_path / "reference", "ast-naive", fields).run_dir
    _assert_same_run(reference, out)

"""Part 1: training throughput of dense KD, fixed-mask KD, AST and CAST (tokens/s, peak memory, MFU), and the cost
of the FSDP2 wrapper on one device.

Fixed-mask KD, AST and CAST are timed as the product runs them: ``semisparse.train.trainer.train`` with a small token
budget, the figures read back from its metrics.jsonl (``step_s``, ``tokens_per_s``), warm-up steps and the last
step (which always recomputes the masks) left out. The trainer cannot train a dense student (it always makes the
layers N:M sparse), so the dense-KD step is built here from the trainer's own components and logged with its own
metrics writer, in the same record format. Last, the AST run is repeated as ``torchrun --nproc-per-node 1 -m
semisparse train`` with ``fsdp.always: true`` (FSDP2 on one process; NCCL on CUDA, gloo on the CPU), read the same
way: its step time over the in-process AST's is what the wrapper costs (``fsdp2_torchrun``).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from gpu_suite_parts.common import (
    FLOPS_FORMULA,
    ROOT,
    SKIP_CUDA,
    DeadlineReached,
    Suite,
    attention_dims,
    error_record,
    flops_per_token,
    free_memory,
    matmul_params,
    median,
    step_stats,
    time_calls,
    trainer_deadline,
)

VARIANTS = (
    ("dense_kd", None),  # the script's loop over the trainer's components
    ("fixed_mask_kd", "fixed-mask-kd"),
    ("ast", "ast-naive"),
    ("cast", "cast"),
)
# expected step time of a variant relative to the one measured before it (sizing only; the guard is the backstop)
STEP_FACTOR = {"fixed_mask_kd": 1.25, "ast": 1.1, "cast": 1.05}
FSDP1 = "fsdp2_torchrun"  # the last leg: ast under torchrun --nproc-per-node 1 with fsdp.always
FSDP1_STEP_FACTOR = 1.15  # its step time relative to the in-process ast (sizing only; the timeout is the backstop)
SPAWN_S = {True: 8.0, False: 15.0}  # torchrun + a fresh interpreter: imports, process group, CUDA (smoke, full)

DENSE_NOTE = (
    "semisparse.train.trainer.train cannot train a dense student: it always sparsifies the selected layers "
    "(SparseLinear, pattern N:M with N < M; no dense mode). The dense-KD step is therefore built in this script "
    "from the trainer's components: semisparse.train.distill.final_hidden_states + distill_loss (alpha, T, "
    "chunk_size of fixed-mask-kd), the trainer's _param_groups, lr_at, _autocast, TokenBatches and MetricsLog, "
    "torch.optim.AdamW (what the trainer uses for decay.variant=grad), grad clipping, the same step timing "
    "(perf_counter around the whole step, teacher synchronised on CUDA)."
)


def settings_for(suite: Suite) -> dict:
    args = suite.args
    if suite.smoke:
        base = {"seq_len": 32, "batch_size": 2, "warmup_steps": 1, "timed_steps": 2, "train_seconds": None}
    else:
        base = {"seq_len": args.seq_len, "batch_size": args.batch_size, "warmup_steps": 3, "timed_steps": None,
                "train_seconds": 30.0}
    if args.train_seconds is not None:  # a time target instead of smoke's fixed step count
        base.update(timed_steps=None, train_seconds=float(args.train_seconds))
    return {**base, "grad_accum": 1, "precision": "bf16 autocast" if suite.device == "cuda" else "fp32 (CPU)",
            "init": "magnitude (throughput only: the init does not change the step)", "data": suite.data,
            "model": suite.model_label, "device": suite.device}


def common_overrides(suite: Suite, st: dict, tokens: int, init: str) -> dict:
    return {
        "init.source": init, "train.tokens": int(tokens), "train.seq_len": st["seq_len"],
        "train.batch_size": st["batch_size"], "train.grad_accum": 1, "train.device": suite.device,
        # the precision settings_for records (and the dense-KD loop uses): bf16 on CUDA, fp32 on a CPU smoke run
        "train.precision": "bf16" if suite.device == "cuda" else "fp32",
        "data.train": suite.data, "eval.every": 0, "eval.at_start": False, "eval.at_end": False,
        "checkpoint.every": 0, "checkpoint.at_end": False, "log.tensorboard": False, "log.plots": False,
        "log.every": 1,
    }


def model_flops(suite: Suite, seq_len: int) -> dict:
    """N (matmul weights), layers and d_attn of the model, from a meta-device copy (no weights loaded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from semisparse.data import effective_seqlen

    config = AutoConfig.from_pretrained(suite.model)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    n = matmul_params(meta)
    layers, d_attn = attention_dims(config)
    s = effective_seqlen(meta, seq_len)
    return {"formula": FLOPS_FORMULA, "n_student": n, "n_teacher": n, "layers": layers, "d_attn": d_attn,
            "seq_len": s, "flops_per_token_kd": flops_per_token(n, n, layers, d_attn, s)}


def measure_peak(suite: Suite) -> dict:
    """Peak matmul FLOP/s in the training compute dtype: bf16 8192^3 on CUDA (best of 5), fp32 on the CPU."""
    import torch

    if suite.device == "cuda":
        n, dtype, warmup, reps = 8192, torch.bfloat16, 2, 5
    else:
        n, dtype, warmup, reps = (384 if suite.smoke else 2048), torch.float32, 1, 3
    a = torch.randn(n, n, device=suite.device, dtype=dtype)
    b = torch.randn(n, n, device=suite.device, dtype=dtype)
    times = time_calls(functools.partial(torch.mm, a, b), suite.device, warmup, reps)
    del a, b
    flop = 2.0 * n**3
    return {"m": n, "n": n, "k": n, "dtype": str(dtype).replace("torch.", ""), "warmup": warmup, "reps": reps,
            "times_s": times, "flops_per_s": flop / min(times), "flops_per_s_median": flop / median(times),
            "how": "torch.mm of two random square matrices, " + ("CUDA events" if suite.device == "cuda" else
                   "perf_counter") + " per call; peak = 2*n^3 / best time"}


# ------------------------------------------------------------------------------------------------ dense KD


def run_dense_kd(suite: Suite, st: dict, deadline: float, run_dir: Path) -> dict:
    import torch

    from semisparse import data as data_mod
    from semisparse.config import load_recipe, resolve_steps
    from semisparse.models import load_model
    from semisparse.train.distill import distill_loss, final_hidden_states, lm_head
    from semisparse.train.stream import TokenBatches
    from semisparse.train.trainer import MetricsLog, _autocast, _param_groups, lr_at

    started = time.perf_counter()
    cfg, _ = load_recipe("fixed-mask-kd", common_overrides(suite, st, 1, "magnitude"))
    device = torch.device(suite.device)
    precision = "bf16" if device.type == "cuda" else "fp32"
    loaded = load_model(suite.model, device=device)
    net = loaded.model
    seq_len = data_mod.effective_seqlen(net, st["seq_len"])
    stream = data_mod.token_stream(loaded.tokenizer, data_mod.load_text(suite.data, "train").docs)
    teacher = copy.deepcopy(net).eval().requires_grad_(False)
    teacher.config.use_cache = False
    if precision == "bf16":
        teacher.to(torch.bfloat16)  # as the trainer does: frozen, no fp32 master copy
    net.to(device).train()
    net.config.use_cache = False
    optimizer = torch.optim.AdamW(_param_groups(net, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                  betas=cfg.optim.betas, eps=cfg.optim.eps)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    batches = TokenBatches(stream, seq_len, st["batch_size"], cfg.train.seed)
    s_head, t_head = lm_head(net), lm_head(teacher)
    run_dir.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(run_dir, True, False)
    tokens_per_step = st["batch_size"] * seq_len
    warmup = st["warmup_steps"]
    fixed_total = warmup + st["timed_steps"] if st["timed_steps"] else None
    planned = fixed_total or 1000  # only shapes the lr schedule
    warm_lr = resolve_steps(cfg.optim.warmup, planned)
    setup_s = time.perf_counter() - started
    step, timed_s, last_step_s, cut = 0, 0.0, 0.0, False
    try:
        while True:
            if fixed_total is not None and step >= fixed_total:
                break
            if fixed_total is None and step > warmup and timed_s >= st["train_seconds"]:
                break
            if time.monotonic() + last_step_s > deadline:  # the clock, between steps
                cut = True
                break
            t0 = time.perf_counter()
            lr = lr_at(step, planned, cfg.optim.lr, warm_lr, cfg.optim.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            inputs, targets = (t.to(device, non_blocking=True) for t in batches.next_batch())
            with _autocast(device, precision):
                t1 = time.perf_counter()
                with torch.no_grad():
                    teacher_hidden = final_hidden_states(teacher, inputs)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                teacher_s = time.perf_counter() - t1
                out = distill_loss(final_hidden_states(net, inputs), targets, s_head, teacher_hidden, t_head,
                                   alpha=cfg.distill.alpha, temperature=cfg.distill.temperature,
                                   chunk_size=cfg.distill.chunk_size)
            if not math.isfinite(out.total):
                raise RuntimeError(f"dense KD: the loss became {out.total} at step {step}")
            out.loss.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip))
            optimizer.step()
            step_s = time.perf_counter() - t0
            log.write({"step": step, "tokens": (step + 1) * tokens_per_step, "loss": out.total, "ce": out.ce,
                       "kl": out.kl, "lr": lr, "lambda": 0.0, "grad_norm": grad_norm,
                       "tokens_per_s": tokens_per_step / step_s, "teacher_s": teacher_s, "step_s": step_s})
            if step >= warmup:
                timed_s += step_s
            last_step_s = step_s
            step += 1
    finally:
        log.close()
    del net, teacher, optimizer, params, loaded
    return {"steps_run": step, "cut": cut, "setup_s": setup_s, "tokens_per_step": tokens_per_step,
            "seq_len": seq_len, "wall_s": time.perf_counter() - started}


# ------------------------------------------------------------------------------------------------ FSDP2, 1 process


def _children(pid: int) -> list[int]:
    """The processes ``pid`` started, from /proc (Linux; elsewhere none are found)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])  # "pid (comm) state ppid ..."
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            kids.append(int(stat.parent.name))
    return kids


def _kill_launch(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun's worker and then torchrun: it starts each worker in a session of its own, so killing the
    launcher's process group alone would leave the worker training."""
    for pid in _children(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            if os.getpgid(pid) == pid:
                os.killpg(pid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _launch(suite: Suite, recipe: str, run_dir: Path, overrides: dict, timeout_s: float) -> dict:
    """``torchrun --nproc-per-node 1 -m semisparse train``, killed with its worker at the timeout or when the suite
    itself is stopped. returncode None: killed at the timeout. The output goes to a file, not a pipe, so that
    waiting never depends on which process still holds it."""
    import torch

    sets = [f"--set={k}={json.dumps(v)}" for k, v in overrides.items()]  # JSON is YAML: --set reads back the value
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1", "-m", "semisparse",
           "train", suite.model, "--out", str(run_dir), "--recipe", recipe, "--no-progress", "--overwrite", *sets]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()),  # the threads the in-process ast had
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    log_path = run_dir.parent / f"{run_dir.name}.log"
    returncode = None
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            returncode = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass  # the step records are flushed line by line: they survive the kill
        finally:
            if proc.poll() is None:
                _kill_launch(proc)
    return {"returncode": returncode, "output": log_path.read_text(encoding="utf-8", errors="replace"),
            "command": " ".join(cmd[:len(cmd) - len(sets)]) + " --set=FIELD=VALUE for each of overrides"}


def fsdp1_leg(suite: Suite, st: dict, part: dict, deadline: float) -> dict:
    """The ast variant again, as ``torchrun --nproc-per-node 1`` with fsdp.always: FSDP2 wraps the one process, so
    its step time over the in-process ast's is what the wrapper costs (its gathers and reductions, of one rank)."""
    recipe = dict(VARIANTS)["ast"]
    share = deadline - time.monotonic()
    entry: dict = {"recipe": recipe, "share_s": round(share, 2),
                   "how": "torchrun --standalone --nproc-per-node=1 -m semisparse train (fsdp.always: true; NCCL on "
                          "CUDA, gloo on the CPU), the ast variant's settings, figures from its metrics.jsonl"}
    ast = part["variants"].get("ast", {})
    if not ast.get("tokens_per_s"):  # no in-process figure to hold it against
        why = ast.get("reason") or ast.get("error") or "no figures"
        entry.update(status="skipped", reason=f"skipped: the in-process ast variant is {ast.get('status')} ({why})")
        return entry
    min_share = 1.0 if suite.smoke else 20.0
    if share < min_share:
        entry.update(status="skipped", reason=f"skipped: budget ({share:.1f} s share < {min_share:.0f} s)")
        suite.note_cut(f"1_train_throughput/{FSDP1}", entry["reason"])
        return entry
    suite.log(f"part 1: {FSDP1} (ast-naive under torchrun, 1 process, FSDP2), share {share:.1f} s")
    try:
        warmup, tokens_per_step = st["warmup_steps"], ast["tokens_per_step"]
        # a fresh interpreter and a process group on top of the in-process run's setup
        est, overhead = ast["median_step_s"] * FSDP1_STEP_FACTOR, ast["overhead_s"] * 1.5 + SPAWN_S[suite.smoke]
        n_timed = _timed_steps(suite, st, FSDP1, entry, share, deadline, est, overhead)
        if n_timed < 1:
            return entry
        total = warmup + n_timed + 1  # + the last step, dropped (it always recomputes masks)
        overrides = {**common_overrides(suite, st, total * tokens_per_step, "magnitude"), "fsdp.always": True}
        entry.update(overrides=overrides, steps_planned=total)
        run_dir = suite.work / f"part1-{FSDP1}"
        free_memory()  # the parent's cached CUDA blocks are of no use to the child
        started = time.perf_counter()
        res = _launch(suite, recipe, run_dir, overrides, max(1.0, deadline - time.monotonic()))
        entry["wall_s"] = time.perf_counter() - started
        entry["command"] = res["command"]
        cut = res["returncode"] is None
        recs = _records(run_dir)
        timed = [r for r in recs if r["step"] >= warmup and (cut or r["step"] < total - 1)]
        entry["steps_run"] = len(recs)
        entry["overhead_s"] = entry["wall_s"] - sum(r["step_s"] for r in recs)  # interpreter start included
        entry["wrapped"] = "1 process (FSDP2)" in res["output"]  # the trainer's own line: FSDP2 was applied
        entry["metrics_file"] = suite.keep_metrics(run_dir, f"part1-{FSDP1}")
        entry["tokens_per_step"] = tokens_per_step
        entry["warmup_steps"] = warmup
        entry.update(step_stats(timed, tokens_per_step))
        entry["peak_mem_bytes"] = None
        entry["peak_mem"] = ("not measured: the run is another process (this script reads its own CUDA peak)"
                             if suite.device == "cuda" else SKIP_CUDA)
        if entry["tokens_per_s"] is not None:
            _add_mfu(part, entry)
            entry["over_ast"] = _pair(entry, ast)  # > 1 step time: the wrapper's overhead
        if cut:
            entry["status"] = "cut"
            entry["reason"] = (f"cut: killed at its deadline ({share:.1f} s share) after {entry['steps_run']} "
                               "steps; the figures are from the steps recorded")
            suite.note_cut(f"1_train_throughput/{FSDP1}", entry["reason"])
        elif res["returncode"] != 0 or not entry["wrapped"] or not timed:
            problem = (f"torchrun exited {res['returncode']}" if res["returncode"] != 0 else
                       "the run did not report '1 process (FSDP2)'" if not entry["wrapped"] else
                       "no timed step recorded")
            entry.update(status="error", error=problem, output_tail=res["output"][-3000:])
        else:
            entry["status"] = "ok"
    except Exception as exc:  # noqa: BLE001 - the leg's failure must not end the suite
        entry.update(error_record(exc))
    finally:
        free_memory()
    suite.log(f"part 1: {FSDP1}: {entry.get('status')}, tokens/s {entry.get('tokens_per_s')}")
    return entry


# ------------------------------------------------------------------------------------------------ the part


def _records(run_dir: Path) -> list[dict]:
    from semisparse.rundir import read_metrics

    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "step_s" in r]


def _timed_steps(suite: Suite, st: dict, where: str, entry: dict, share: float, deadline: float, est: float,
                 overhead: float) -> int:
    """Timed steps of a trainer run that fit before ``deadline`` (est s a step, overhead s of setup); below 1 the
    entry says skipped. Cuts and shortenings are noted under 1_train_throughput/``where``."""
    fit = math.floor((deadline - time.monotonic() - overhead - (st["warmup_steps"] + 1) * est) / est)
    want = st["timed_steps"] or max(2, math.floor(st["train_seconds"] / est))
    n_timed = min(want, fit)
    entry.update(estimated_step_s=est, estimated_overhead_s=overhead, limited_by="budget" if fit < want else "target")
    if n_timed < 1:
        entry.update(status="skipped", reason=f"skipped: budget (no timed step fits {share:.1f} s)")
        suite.note_cut(f"1_train_throughput/{where}", entry["reason"])
    elif fit < want:
        suite.note_cut(f"1_train_throughput/{where}",
                       f"shortened: {n_timed} timed steps fit its {share:.1f} s share, {want} wanted")
    return n_timed


def _add_mfu(part: dict, entry: dict) -> None:
    fl = part["flops"]
    entry["flops_per_token"] = flops_per_token(fl["n_student"], fl["n_teacher"], fl["layers"], fl["d_attn"],
                                               fl["seq_len"])
    entry["mfu"] = entry["flops_per_token"] * entry["tokens_per_s"] / part["peak"]["flops_per_s"]


def run(suite: Suite, part: dict, deadline: float) -> None:
    import torch

    st = settings_for(suite)
    part["settings"] = st
    part["flops"] = model_flops(suite, st["seq_len"])
    suite.log(f"part 1: measuring peak matmul FLOP/s on {suite.device}")
    part["peak"] = measure_peak(suite)
    suite.log(f"part 1: peak {part['peak']['flops_per_s'] / 1e12:.2f} TFLOP/s ({part['peak']['dtype']})")
    part["variants"] = {}
    suite.save()
    cuda = suite.device == "cuda"
    prev = None  # the last measured variant: its median step time and overhead size the next one
    for index, (key, recipe) in enumerate(VARIANTS):
        share = (deadline - time.monotonic()) / (len(VARIANTS) + 1 - index)  # + 1: the torchrun leg's share
        v_deadline = time.monotonic() + share
        entry: dict = {"recipe": recipe, "share_s": round(share, 2)}
        part["variants"][key] = entry
        min_share = 1.0 if suite.smoke else 20.0
        if share < min_share:
            entry.update(status="skipped", reason=f"skipped: budget ({share:.1f} s share < {min_share:.0f} s)")
            suite.note_cut(f"1_train_throughput/{key}", entry["reason"])
            continue
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        run_dir = suite.work / f"part1-{key}"
        suite.log(f"part 1: {key} ({recipe or 'script loop'}), share {share:.1f} s")
        try:
            if recipe is None:
                entry["how"] = "script loop from the trainer's components (see dense_kd_note)"
                info = run_dense_kd(suite, st, v_deadline, run_dir)
                tokens_per_step, cut = info["tokens_per_step"], info["cut"]
                timed = [r for r in _records(run_dir) if r["step"] >= st["warmup_steps"]]
                entry.update({k: info[k] for k in ("steps_run", "setup_s", "wall_s", "seq_len")})
                entry["overhead_s"] = info["setup_s"]
                entry["limited_by"] = "budget" if cut else "target"
            else:
                entry["how"] = f"semisparse.train.trainer.train(recipe={recipe!r}), figures from its metrics.jsonl"
                warmup = st["warmup_steps"]
                seq_len = part["flops"]["seq_len"]
                tokens_per_step = st["batch_size"] * seq_len
                if prev is not None:
                    est, overhead = prev["median_step_s"] * STEP_FACTOR[key], prev["overhead_s"] * 1.5 + 1.0
                else:
                    est, overhead = (0.2, 3.0) if suite.smoke else (1.0, 30.0)
                n_timed = _timed_steps(suite, st, key, entry, share, v_deadline, est, overhead)
                if n_timed < 1:
                    continue
                total = warmup + n_timed + 1  # + the last step, dropped (it always recomputes masks)
                overrides = common_overrides(suite, st, total * tokens_per_step, "magnitude")
                entry.update(overrides=overrides, steps_planned=total)
                from semisparse.train.trainer import train

                started, cut = time.perf_counter(), False
                try:
                    with trainer_deadline(v_deadline):
                        res = train(suite.model, run_dir, recipe=recipe, overrides=overrides, overwrite=True,
                                    progress=False)
                    del res
                except DeadlineReached:
                    cut = True
                recs = _records(run_dir)
                timed = [r for r in recs if r["step"] >= warmup and (cut or r["step"] < total - 1)]
                entry["wall_s"] = time.perf_counter() - started
                entry["steps_run"] = len(recs)
                entry["overhead_s"] = entry["wall_s"] - sum(r["step_s"] for r in recs)
            entry["metrics_file"] = suite.keep_metrics(run_dir, f"part1-{key}")
            entry["tokens_per_step"] = tokens_per_step
            entry["warmup_steps"] = st["warmup_steps"]
            entry.update(step_stats(timed, tokens_per_step))
            if cuda:
                entry["peak_mem_bytes"] = torch.cuda.max_memory_allocated()
                entry["peak_mem_gib"] = round(entry["peak_mem_bytes"] / 2**30, 3)
                entry["peak_mem_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
            else:
                entry["peak_mem_bytes"] = None
                entry["peak_mem"] = SKIP_CUDA
            if entry["tokens_per_s"] is not None:
                _add_mfu(part, entry)
                prev = {"median_step_s": entry["median_step_s"], "overhead_s": entry["overhead_s"]}
            if cut:
                entry["status"] = "cut"
                entry["reason"] = (f"cut: stopped at its deadline ({share:.1f} s share) after {entry['steps_run']} "
                                   "steps; the figures are from the steps recorded")
                suite.note_cut(f"1_train_throughput/{key}", entry["reason"])
            else:
                entry["status"] = "ok" if timed else "error"
                if not timed:
                    entry["error"] = "no timed step recorded"
        except Exception as exc:  # noqa: BLE001 - one variant's failure must not end the suite
            entry.update(error_record(exc))
            suite.log(f"part 1: {key} failed: {entry['error']}")
        finally:
            free_memory()
        suite.log(f"part 1: {key}: {entry.get('status')}, tokens/s {entry.get('tokens_per_s')}")
        suite.save()
    part[FSDP1] = fsdp1_leg(suite, st, part, deadline)
    suite.save()
    part["dense_kd_note"] = DENSE_NOTE
    part["ratios"] = ratios(part["variants"], part[FSDP1])
    suite.shared["train"] = {"settings": st, "seq_len": part["flops"]["seq_len"], "variants": {
        k: {f: v.get(f) for f in ("tokens_per_s", "tokens_per_s_amortized", "median_step_s", "overhead_s")}
        for k, v in part["variants"].items() if v.get("tokens_per_s")}}
    legs = {**part["variants"], FSDP1: part[FSDP1]}
    states = [v.get("status") for v in legs.values()]
    part["status"] = "error" if "error" in states else ("cut" if {"cut", "skipped"} & set(states) else "ok")
    if part["status"] != "ok":
        part["reason"] = f"{part['status']}: " + ", ".join(f"{k} {v.get('status')}" for k, v in legs.items())


def _pair(va: dict, vb: dict) -> dict | None:
    """A over B (two measured records)."""
    if not (va.get("tokens_per_s") and vb.get("tokens_per_s")):
        return None
    return {"step_time_median": va["median_step_s"] / vb["median_step_s"],
            "step_time_amortized": vb["tokens_per_s_amortized"] / va["tokens_per_s_amortized"],
            "tokens_per_s_median": va["tokens_per_s"] / vb["tokens_per_s"]}


def ratios(variants: dict, fsdp1: dict | None = None) -> dict:
    def pair(a: str, b: str) -> dict | None:
        return _pair(variants.get(a, {}), variants.get(b, {}))

    return {"note": "step_time_*: A's step time / B's (> 1: A is slower); amortized = total time of the timed steps "
                    "(AST's mask recomputes included), median = the typical step",
            "ast_over_dense_kd": pair("ast", "dense_kd"),
            "fixed_mask_kd_over_dense_kd": pair("fixed_mask_kd", "dense_kd"),
            "ast_over_fixed_mask_kd": pair("ast", "fixed_mask_kd"),
            "cast_over_fixed_mask_kd": pair("cast", "fixed_mask_kd"),
            "fsdp1_over_ast": _pair(fsdp1 or {}, variants.get("ast", {}))}

"""Part 1: training throughput of dense KD, fixed-mask KD and AST (tokens/s, peak memory, MFU).

Fixed-mask KD and AST are timed as the product runs them: ``semisparse.train.trainer.train`` with a small token
budget, the figures read back from its metrics.jsonl (``step_s``, ``tokens_per_s``), warm-up steps and the last
step (which always recomputes the masks) left out. The trainer cannot train a dense student (it always makes the
layers N:M sparse), so the dense-KD step is built here from the trainer's own components and logged with its own
metrics writer, in the same record format.
"""

from __future__ import annotations

import copy
import functools
import inspect
import math
import time
from pathlib import Path

from gpu_suite_parts.common import (
    FLOPS_FORMULA,
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


def fsdp2_entry() -> dict:
    from semisparse.train import trainer

    source = inspect.getsource(trainer)
    if "fully_shard" in source:
        why = "FSDP2 appears in the trainer, but this suite runs one process: add a torchrun leg to measure it"
    else:
        why = ("torchrun + FSDP2 does not exist yet: semisparse.train.trainer.train refuses WORLD_SIZE > 1 "
               "('distributed training is not supported yet') and nothing calls fully_shard")
    return {"status": "skipped", "reason": f"skipped: {why}"}


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


# ------------------------------------------------------------------------------------------------ the part


def _records(run_dir: Path) -> list[dict]:
    from semisparse.rundir import read_metrics

    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "step_s" in r]


def run(suite: Suite, part: dict, deadline: float) -> None:
    import torch

    st = settings_for(suite)
    part["settings"] = st
    part["fsdp2_torchrun"] = fsdp2_entry()
    part["flops"] = model_flops(suite, st["seq_len"])
    suite.log(f"part 1: measuring peak matmul FLOP/s on {suite.device}")
    part["peak"] = measure_peak(suite)
    suite.log(f"part 1: peak {part['peak']['flops_per_s'] / 1e12:.2f} TFLOP/s ({part['peak']['dtype']})")
    part["variants"] = {}
    suite.save()
    cuda = suite.device == "cuda"
    prev = None  # the last measured variant: its median step time and overhead size the next one
    for index, (key, recipe) in enumerate(VARIANTS):
        share = (deadline - time.monotonic()) / (len(VARIANTS) - index)
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
                fit = math.floor((v_deadline - time.monotonic() - overhead - (warmup + 1) * est) / est)
                want = st["timed_steps"] or max(2, math.floor(st["train_seconds"] / est))
                n_timed = min(want, fit)
                entry.update(estimated_step_s=est, estimated_overhead_s=overhead,
                             limited_by="budget" if fit < want else "target")
                if n_timed < 1:
                    entry.update(status="skipped", reason=f"skipped: budget (no timed step fits {share:.1f} s)")
                    suite.note_cut(f"1_train_throughput/{key}", entry["reason"])
                    continue
                if fit < want:
                    suite.note_cut(f"1_train_throughput/{key}",
                                   f"shortened: {n_timed} timed steps fit its {share:.1f} s share, {want} wanted")
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
                fl = part["flops"]
                entry["flops_per_token"] = flops_per_token(fl["n_student"], fl["n_teacher"], fl["layers"],
                                                           fl["d_attn"], fl["seq_len"])
                entry["mfu"] = entry["flops_per_token"] * entry["tokens_per_s"] / part["peak"]["flops_per_s"]
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
    part["dense_kd_note"] = DENSE_NOTE
    part["ratios"] = ratios(part["variants"])
    suite.shared["train"] = {"settings": st, "seq_len": part["flops"]["seq_len"], "variants": {
        k: {f: v.get(f) for f in ("tokens_per_s", "tokens_per_s_amortized", "median_step_s", "overhead_s")}
        for k, v in part["variants"].items() if v.get("tokens_per_s")}}
    states = [v.get("status") for v in part["variants"].values()]
    part["status"] = "error" if "error" in states else ("cut" if {"cut", "skipped"} & set(states) else "ok")
    if part["status"] != "ok":
        part["reason"] = f"{part['status']}: " + ", ".join(f"{k} {v.get('status')}" for k, v in part["variants"].items())


def ratios(variants: dict) -> dict:
    def pair(a: str, b: str) -> dict | None:
        va, vb = variants.get(a, {}), variants.get(b, {})
        if not (va.get("tokens_per_s") and vb.get("tokens_per_s")):
            return None
        return {"step_time_median": va["median_step_s"] / vb["median_step_s"],
                "step_time_amortized": vb["tokens_per_s_amortized"] / va["tokens_per_s_amortized"],
                "tokens_per_s_median": va["tokens_per_s"] / vb["tokens_per_s"]}

    return {"note": "step_time_*: A's step time / B's (> 1: A is slower); amortized = total time of the timed steps "
                    "(AST's mask recomputes included), median = the typical step",
            "ast_over_dense_kd": pair("ast", "dense_kd"),
            "fixed_mask_kd_over_dense_kd": pair("fixed_mask_kd", "dense_kd"),
            "ast_over_fixed_mask_kd": pair("ast", "fixed_mask_kd"),
            "cast_over_fixed_mask_kd": pair("cast", "fixed_mask_kd")}

"""Part 3: quality with the time left: fixed-mask KD vs AST from one SparseGPT init, equal token budgets.

1. ``semisparse.api.prune`` (SparseGPT, 2:4, calibration 128 x 2048 on the training data; smoke: 4 x 32) once.
2. WikiText-2 validation perplexity (full set, seqlen 2048, ``semisparse.evaluate.perplexity.perplexity``, the
   models in fp32 as ``semisparse eval`` runs them) of the dense model and of the SparseGPT init.
3. The token budget: the time left (minus the evaluations and the trainer's fixed costs measured in part 1),
   halved, times the slower of the two measured amortized throughputs (part 1; a short probe run if part 1 did not
   run), x 0.9; the same budget for both runs.
4. ``trainer.train`` with fixed-mask-kd, then ast-naive, both ``init.source`` = the SparseGPT run directory (so
   both start from its stored W*M and masks), then the perplexity of each; loss and flip-rate curves copied from
   each run's metrics.jsonl.
"""

from __future__ import annotations

import math
import time

from gpu_suite_parts.common import DeadlineReached, Suite, error_record, free_memory, trainer_deadline
from gpu_suite_parts.train_part import common_overrides

RUNS = (("fixed_mask_kd", "fixed-mask-kd"), ("ast", "ast-naive"))


def settings_for(suite: Suite) -> dict:
    args = suite.args
    if suite.smoke:
        return {"calib_samples": 4, "calib_seqlen": 32, "seq_len": 32, "batch_size": 2, "eval_seqlen": 32,
                "max_steps": 6, "min_steps": 2}
    return {"calib_samples": 128, "calib_seqlen": 2048, "seq_len": args.seq_len, "batch_size": args.batch_size,
            "eval_seqlen": 2048, "max_steps": None, "min_steps": 10}


def curves(records: list[dict]) -> dict:
    loss = [r for r in records if "step_s" in r]
    flips = [r for r in records if "flip_rate" in r]
    return {
        "loss": {k: [r.get(k) for r in loss] for k in ("step", "tokens", "loss", "ce", "kl", "lr", "lambda")},
        "flip_rate": {k: [r.get(k) for r in flips] for k in ("step", "flip_rate", "init_flip_rate", "flips")},
    }


def _ppl(model, tokens, seqlen: int, suite: Suite, label: str) -> dict:
    from semisparse.data import effective_seqlen
    from semisparse.evaluate.perplexity import perplexity

    t = time.perf_counter()
    res = perplexity(model, tokens, effective_seqlen(model, seqlen), data=suite.eval_data, split="file",
                     device=suite.device, progress=False).to_dict()
    res["eval_s"] = time.perf_counter() - t
    res["precision"] = str(next(model.parameters()).dtype).replace("torch.", "")
    suite.log(f"part 3: perplexity {label}: {res['ppl']:.3f} ({res['windows']} windows, {res['eval_s']:.1f} s)")
    return res


def run(suite: Suite, part: dict, deadline: float) -> None:
    from semisparse import api
    from semisparse import data as data_mod
    from semisparse.models import load_model
    from semisparse.rundir import read_metrics
    from semisparse.train.trainer import train

    st = settings_for(suite)
    part["settings"] = {**st, "init": "sparsegpt 2:4 via semisparse.api.prune (once, shared by both runs)",
                        "train_data": suite.data, "eval_data": suite.eval_data, "model": suite.model_label,
                        "device": suite.device}
    part["status"] = "ok"
    # 1. prune once
    init_dir = suite.work / "part3-sparsegpt"
    t = time.perf_counter()
    meta = api.prune(model=suite.model, method="sparsegpt", pattern="2:4", calib=suite.data, out=init_dir,
                     nsamples=st["calib_samples"], seqlen=st["calib_seqlen"], device=suite.device, overwrite=True,
                     progress=False)
    part["init"] = {"run_dir_stage": "prune", "method": "sparsegpt", "prune_s": time.perf_counter() - t,
                    "calibration": meta.get("calibration"), "sparse_weights": meta.get("sparse_weights")}
    suite.log(f"part 3: SparseGPT init in {part['init']['prune_s']:.1f} s")
    suite.save()
    # 2. reference perplexities
    ppl: dict = {}
    part["perplexity"] = ppl
    eval_src = data_mod.load_text(suite.eval_data, "eval")
    eval_s = 0.0
    for label, path in (("dense", suite.model), ("sparsegpt_init", str(init_dir))):
        if time.monotonic() > deadline:
            break
        loaded = load_model(path, device=suite.device)
        tokens = data_mod.tokenize_joined(loaded.tokenizer, eval_src.docs)
        ppl[label] = _ppl(loaded.model, tokens, st["eval_seqlen"], suite, label)
        eval_s = max(eval_s, ppl[label]["eval_s"])
        del loaded
        free_memory()
        suite.save()
    # 3. the token budget
    seq_len = suite.shared.get("train", {}).get("seq_len") or st["seq_len"]
    tokens_per_step = st["batch_size"] * seq_len
    measured = suite.shared.get("train", {}).get("variants", {})
    budget: dict = {"tokens_per_step": tokens_per_step}
    part["budget"] = budget
    if all(measured.get(k, {}).get("tokens_per_s_amortized") for k, _ in RUNS):
        tps = min(measured[k]["tokens_per_s_amortized"] for k, _ in RUNS)
        overhead = max(measured[k]["overhead_s"] for k, _ in RUNS)
        budget["sized_from"] = "part 1: the slower amortized tokens/s of fixed_mask_kd and ast, their overhead_s"
    else:
        tps, overhead = probe(suite, st, init_dir, deadline, budget)
    reserve = 2 * (1.5 * eval_s + 1.0)  # both final evaluations and their model hand-over
    per_run = (deadline - time.monotonic() - reserve) / 2 - 1.3 * overhead - (1 if suite.smoke else 5)
    steps = math.floor(max(per_run, 0) * tps * 0.9 / tokens_per_step) if tps else 0
    budget.update(tokens_per_s_used=tps, overhead_s_per_run=overhead, eval_reserve_s=reserve,
                  train_s_per_run=per_run, steps_fit=steps, max_steps=st["max_steps"])
    if st["max_steps"] is not None:
        steps = min(steps, st["max_steps"])
    if suite.args.quality_max_tokens:
        steps = min(steps, suite.args.quality_max_tokens // tokens_per_step)
    budget.update(steps=steps, tokens=steps * tokens_per_step)
    part["runs"] = {}
    if steps < st["min_steps"]:
        reason = f"skipped: budget ({steps} steps fit the time left, fewer than {st['min_steps']})"
        for key, _ in RUNS:
            part["runs"][key] = {"status": "skipped", "reason": reason}
        part["status"], part["reason"] = "cut", reason
        suite.note_cut("3_quality/runs", reason)
        suite.save()
        return
    suite.log(f"part 3: {steps} steps x {tokens_per_step} tokens for each run (~{per_run:.0f} s each)")
    suite.save()
    # 4. the two runs, then their perplexity
    for index, (key, recipe) in enumerate(RUNS):
        entry: dict = {"recipe": recipe}
        part["runs"][key] = entry
        # the first run may not eat into the second: its guard leaves the second run and both evals their time
        stop_at = deadline - 1.5 * eval_s - (per_run + 1.3 * overhead + 1.5 * eval_s if index == 0 else 0)
        run_dir = suite.work / f"part3-{key}"
        overrides = common_overrides(suite, {"seq_len": st["seq_len"], "batch_size": st["batch_size"]},
                                     steps * tokens_per_step, str(init_dir))
        entry["overrides"] = overrides
        t = time.perf_counter()
        try:
            with trainer_deadline(stop_at):
                res = train(suite.model, run_dir, recipe=recipe, overrides=overrides, overwrite=True,
                            progress=False)
            entry.update(status="ok", train_s=time.perf_counter() - t, steps=res.summary["steps"],
                         tokens=res.summary["tokens"], final_loss=res.summary["final_loss"])
            model = res.model
            del res
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(run_dir)
            tokens = data_mod.tokenize_joined(tok, eval_src.docs)
            entry["perplexity"] = _ppl(model, tokens, st["eval_seqlen"], suite, key)
            ppl[key] = entry["perplexity"]
            del model
        except DeadlineReached:
            entry.update(status="cut", train_s=time.perf_counter() - t,
                         reason="cut: training stopped at its deadline; no model, no perplexity")
            suite.note_cut(f"3_quality/{key}", entry["reason"])
            part["status"] = "cut"
        except Exception as exc:  # noqa: BLE001
            entry.update(error_record(exc))
            part["status"] = "error"
        finally:
            free_memory()
        records = read_metrics(run_dir / "metrics.jsonl")
        entry["curves"] = curves(records)
        entry["metrics_file"] = suite.keep_metrics(run_dir, f"part3-{key}")
        suite.save()
    if ppl.get("fixed_mask_kd") and ppl.get("ast"):
        part["ast_minus_fixed_mask_ppl"] = ppl["ast"]["ppl"] - ppl["fixed_mask_kd"]["ppl"]


def probe(suite: Suite, st: dict, init_dir, deadline: float, budget: dict) -> tuple[float | None, float]:
    """Without part 1: a short AST run from the init (4 warm-up + 6 steps) measures tokens/s and overhead."""
    from semisparse.rundir import read_metrics
    from semisparse.train.trainer import train

    seq_len = st["seq_len"]
    tokens_per_step = st["batch_size"] * seq_len
    steps = 4 if suite.smoke else 10
    run_dir = suite.work / "part3-probe"
    t = time.perf_counter()
    try:
        with trainer_deadline(deadline):
            train(suite.model, run_dir, recipe="ast-naive", progress=False, overwrite=True,
                  overrides=common_overrides(suite, st, steps * tokens_per_step, str(init_dir)))
    except DeadlineReached:
        pass
    wall = time.perf_counter() - t
    recs = [r for r in read_metrics(run_dir / "metrics.jsonl") if "step_s" in r]
    timed = [r for r in recs if r["step"] >= min(2, len(recs) - 1)]
    tps = tokens_per_step * len(timed) / sum(r["step_s"] for r in timed) if timed else None
    budget.update(sized_from=f"probe: ast-naive, {len(recs)} steps (part 1 did not run)", probe_wall_s=wall)
    return tps, wall - sum(r["step_s"] for r in recs)

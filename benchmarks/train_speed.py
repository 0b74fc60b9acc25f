"""Training step speed on this machine: AST vs a fixed mask vs a plain transformers step, per precision.

Variants, all on the same model, data, batch and precision, in one process:
  plain       stock transformers causal-LM step: forward with labels (CE), backward, torch.optim.AdamW as a new
              user would write it (no teacher, no masks): the speed ceiling of the framework on this machine.
  fixed-mask  `semisparse train --recipe fixed-mask-kd` (frozen mask, KD from the dense teacher, the paper's AdamW).
  ast         `semisparse train --recipe ast-naive` (masks recomputed every 10 steps, SR-STE decay, KD).
Step times of the trained variants come from the run's metrics.jsonl (step_s), after --warmup untimed steps; the
variants alternate in rounds (A B C, C B A, ...) to cancel drift. Goals (issue 18): ast ≥ 0.7 × plain tokens/s and
ast / fixed-mask step time ≤ 1.05, at each precision.

--cast adds CAST (`--recipe cast`: dense forward, AdamS, weight scale, KD at eta = 1/3), timed like the others, with
its step time against the fixed mask's.

--compile adds a fourth variant, ast-compiled (`train.compile: true`: torch.compile per decoder block of the student
and the teacher), whose ratio to ast decides whether the recipe switch pays on this machine (compilation happens in
the warm-up steps, which are not timed; its cost is printed separately).

--profile runs one more AST run under torch.profiler (after warm-up) and prints the loop's phases (the trainer labels
them) and the top operators by self CPU time.

    .venv/bin/python benchmarks/train_speed.py [--precisions fp32,bf16] [--steps 12] [--warmup 3] [--rounds 2]
        [--seq-len 256] [--batch-size 4] [--cast] [--compile] [--profile] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SEMISPARSE_DATA", ROOT.parent / "shared" / "data"))
C4 = DATA / "c4" / "c4_train_shard0_first1000.jsonl"
RECIPES = {"fixed-mask": "fixed-mask-kd", "ast": "ast-naive", "ast-compiled": "ast-naive", "cast": "cast"}


def common_overrides(args, precision: str, steps: int) -> dict:
    return {
        "init.source": args.init, "train.tokens": steps * args.batch_size * args.seq_len,
        "train.seq_len": args.seq_len, "train.batch_size": args.batch_size, "train.precision": precision,
        "train.device": "cpu", "optim.lr": 1e-4, "data.train": args.data,
        "eval.every": 0, "eval.at_start": False, "eval.at_end": False,
        "checkpoint.every": 0, "checkpoint.at_end": False, "log.tensorboard": False, "log.plots": False,
    }


def run_trainer(args, variant: str, precision: str, steps: int, folder: Path, on_step=None) -> list[float]:
    from semisparse.train.trainer import read_metrics, train

    run_dir = folder / f"{variant}-{precision}"
    overrides = {**common_overrides(args, precision, steps), "train.compile": variant == "ast-compiled"}
    train(args.model, run_dir, recipe=RECIPES[variant], overrides=overrides, overwrite=True, progress=False,
          on_step=on_step)
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if "step_s" in r]
    if variant == "ast-compiled":
        print(f"[train_speed] ast-compiled: first step (compiles) {records[0]['step_s']:.1f} s", flush=True)
    return [r["step_s"] for r in records if args.warmup <= r["step"] < steps - 1]  # the last step always recomputes


def run_plain(args, precision: str, steps: int) -> list[float]:
    """The stock step: model(input_ids, labels) -> loss.backward() -> AdamW.step(), no semisparse code on the path."""
    import contextlib

    import torch

    from semisparse import data as data_mod
    from semisparse.models import load_model
    from semisparse.train.stream import TokenBatches

    loaded = load_model(args.model, device="cpu")
    model, tok = loaded.model.train(), loaded.tokenizer
    model.config.use_cache = False
    stream = data_mod.token_stream(tok, data_mod.load_text(args.data, "train").docs)
    batches = TokenBatches(stream, args.seq_len, args.batch_size, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext())
    times = []
    for step in range(steps):
        inputs, _ = batches.next_batch()
        t0 = time.perf_counter()
        with autocast:
            loss = model(input_ids=inputs, labels=inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if args.warmup <= step < steps - 1:
            times.append(time.perf_counter() - t0)
    return times


def profile_ast(args, precision: str, folder: Path) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    active = max(args.steps // args.rounds, 3)
    sched = schedule(wait=0, warmup=args.warmup, active=active, repeat=1)
    with profile(activities=[ProfilerActivity.CPU], schedule=sched) as prof:
        run_trainer(args, "ast", precision, args.warmup + active + 2, folder, on_step=lambda _s: prof.step())
    events = prof.key_averages()
    phases = {e.key.removeprefix("semisparse."): e.cpu_time_total / 1e6 for e in events
              if e.key.startswith("semisparse.")}
    ops = sorted((e for e in events if not e.key.startswith(("semisparse.", "ProfilerStep"))),
                 key=lambda e: e.self_cpu_time_total, reverse=True)
    total_self = sum(e.self_cpu_time_total for e in events) or 1.0
    top = [{"op": e.key, "self_s": e.self_cpu_time_total / 1e6, "share": e.self_cpu_time_total / total_self,
            "calls": e.count} for e in ops[: args.top]]
    del torch
    return {"precision": precision, "steps": active, "phase_s": phases, "top_ops": top}


def gemm_rates(n: int = 1024, reps: int = 3) -> dict:
    """GFLOP/s of an n³ matmul in fp32 and bf16 on this CPU (best of ``reps``): whether bf16 pays here at all, the
    question ``precision: auto`` answers from the CPU's capability report."""
    import torch

    from semisparse.devices import matmul_seconds

    rates = {name: 2 * n**3 / matmul_seconds(n, dtype, reps) / 1e9
             for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    return {"n": n, "gflops": rates, "bf16_vs_fp32": rates["bf16"] / rates["fp32"]}


def summarize(times: dict, args) -> dict:
    """Median step time and tokens/s per variant, and the two ratios, for every precision measured so far."""
    tokens_per_step = args.batch_size * args.seq_len
    results = {}
    for precision, by_variant in times.items():
        if not all(by_variant.values()):
            continue
        row = {}
        for variant, ts in by_variant.items():
            med = statistics.median(ts)
            row[variant] = {"n": len(ts), "median_step_s": med, "tokens_per_s": tokens_per_step / med, "step_s": ts}
        row["ast_vs_plain"] = row["ast"]["tokens_per_s"] / row["plain"]["tokens_per_s"]
        row["ast_vs_fixed_step_time"] = row["ast"]["median_step_s"] / row["fixed-mask"]["median_step_s"]
        if "cast" in row:
            row["cast_vs_fixed_step_time"] = row["cast"]["median_step_s"] / row["fixed-mask"]["median_step_s"]
        if "ast-compiled" in row:
            row["compiled_vs_ast"] = row["ast-compiled"]["tokens_per_s"] / row["ast"]["tokens_per_s"]
        results[precision] = row
    return results


def write_results(args, info: dict, settings: dict, results: dict, profiles: list, gemm: dict) -> None:
    from semisparse.models import package_versions
    from semisparse.rundir import atomic_write_json

    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {"machine": info, "versions": package_versions(), "settings": settings, "gemm": gemm, "results": results,
              "profiles": profiles}
    atomic_write_json(args.out, record, indent=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--precisions", default=None, help="comma list (default: fp32, plus bf16 where native)")
    p.add_argument("--steps", type=int, default=12, help="timed steps per variant and precision, over all rounds")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--init", default="magnitude")
    p.add_argument("--data", default=str(C4))
    p.add_argument("--cast", action="store_true", help="also time the cast recipe")
    p.add_argument("--compile", action="store_true", help="also time ast with train.compile (torch.compile)")
    p.add_argument("--profile", action="store_true", help="also profile one AST run per precision")
    p.add_argument("--top", type=int, default=15, help="operators listed by --profile")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "train_speed.json")
    args = p.parse_args()

    from semisparse.devices import native_bf16_cpu

    info = machine.describe()
    print(f"[train_speed] machine: {machine.line(info)}", flush=True)
    gemm = gemm_rates()
    print(f"[train_speed] GEMM {gemm['n']}³: fp32 {gemm['gflops']['fp32']:.0f} GFLOP/s, bf16 "
          f"{gemm['gflops']['bf16']:.0f} GFLOP/s (bf16 / fp32 {gemm['bf16_vs_fp32']:.2f}); precision auto: "
          f"{'bf16' if native_bf16_cpu() else 'fp32'}", flush=True)
    precisions = (args.precisions.split(",") if args.precisions
                  else ["fp32"] + (["bf16"] if native_bf16_cpu() else []))
    per_round = math.ceil(args.steps / args.rounds)
    steps = args.warmup + per_round + 1
    variants = (["plain", "fixed-mask", "ast"] + (["cast"] if args.cast else [])
                + (["ast-compiled"] if args.compile else []))
    times: dict[str, dict[str, list[float]]] = {pr: {v: [] for v in variants} for pr in precisions}
    profiles = []
    settings = {"model": args.model, "seq_len": args.seq_len, "batch_size": args.batch_size, "init": args.init,
                "data": Path(args.data).name, "warmup": args.warmup, "rounds": args.rounds,
                "timed_steps_per_variant": per_round * args.rounds}
    with tempfile.TemporaryDirectory(prefix="train_speed_") as tmp:
        for precision in precisions:
            for rnd in range(args.rounds):
                for variant in variants if rnd % 2 == 0 else variants[::-1]:
                    print(f"[train_speed] {precision} round {rnd + 1}/{args.rounds}: {variant}", flush=True)
                    got = (run_plain(args, precision, steps) if variant == "plain"
                           else run_trainer(args, variant, precision, steps, Path(tmp)))
                    times[precision][variant].extend(got)
            if args.profile:
                print(f"[train_speed] {precision}: profiling ast", flush=True)
                profiles.append(profile_ast(args, precision, Path(tmp)))
            write_results(args, info, settings, summarize(times, args), profiles, gemm)  # kept if a later part fails

    results = summarize(times, args)
    print(f"\nmachine: {machine.line(info)}\nsettings: {json.dumps(settings)}\n")
    print("| precision | plain tok/s | fixed-mask tok/s | AST tok/s | AST / plain (goal ≥ 0.7) | "
          "AST / fixed step time (goal ≤ 1.05) |")
    print("|---|---|---|---|---|---|")
    for precision, row in results.items():
        print(f"| {precision} | {row['plain']['tokens_per_s']:.0f} | {row['fixed-mask']['tokens_per_s']:.0f} | "
              f"{row['ast']['tokens_per_s']:.0f} | {row['ast_vs_plain']:.2f} | {row['ast_vs_fixed_step_time']:.3f} |")
    for precision, row in results.items():
        if "cast" in row:
            print(f"{precision}: cast {row['cast']['tokens_per_s']:.0f} tok/s, step time "
                  f"{row['cast_vs_fixed_step_time']:.3f}x fixed-mask")
        if "compiled_vs_ast" in row:
            print(f"{precision}: ast-compiled {row['ast-compiled']['tokens_per_s']:.0f} tok/s, "
                  f"{row['compiled_vs_ast']:.2f}x ast")
    if len(results) == 2 and "fp32" in results and "bf16" in results:
        ratio = results["bf16"]["ast"]["tokens_per_s"] / results["fp32"]["ast"]["tokens_per_s"]
        print(f"\nAST bf16 / fp32 tokens/s: {ratio:.2f}")
    for prof in profiles:
        total = sum(v for k, v in prof["phase_s"].items())
        print(f"\nAST {prof['precision']} profile, {prof['steps']} steps: phases (s, share of labelled time)")
        for name, sec in sorted(prof["phase_s"].items(), key=lambda kv: -kv[1]):
            print(f"  {name:18s} {sec:8.2f}  {100 * sec / total:5.1f}%")
        print("  top operators by self CPU time:")
        for op in prof["top_ops"]:
            print(f"  {op['op'][:48]:48s} {op['self_s']:8.2f} s {100 * op['share']:5.1f}%  ({op['calls']} calls)")
    write_results(args, info, settings, results, profiles, gemm)


if __name__ == "__main__":
    main()

"""Every GPU figure the product needs, from ONE script run inside one short GPU window (proven on CPU by --smoke).

    python benchmarks/gpu_suite.py --out DIR [--budget-s 480] [--model default] [--data PATH] [--parts 1,2,3]
        [--smoke] [--device auto|cpu|cuda] [--dry-run]

Parts, in this order (each skipped with its reason when the capability is missing):
  1 train_throughput  dense KD, fixed-mask KD, AST: tokens/s, peak memory, MFU (peak FLOP/s measured here)
  2 kernels           torch 2:4 semi-structured (CUTLASS, cuSPARSELt) vs dense matmuls, SmolLM2 / LLaMA-2-7B
                      shapes, prefill and decode, fp16/bf16/int8/fp8; the exported model end to end if it exists
  3 quality           fixed-mask KD vs AST from one SparseGPT init, equal token budgets sized to the time left,
                      WikiText-2 validation perplexity, loss and flip-rate curves
Budget: each part gets a share of what is left when it starts (part 3: all of it), checks the clock between steps
and stops on time. DIR/gpu_suite.json is rewritten (atomically) after every part and most sub-steps, so a kill
keeps what was measured; DIR/gpu_suite.log has everything printed. --smoke: a tiny random Llama on the CPU, every
part in well under a minute, CUDA-only paths recorded as "skipped: needs CUDA". Never imports matplotlib/lm-eval.
"""

from __future__ import annotations

import time

T0 = time.monotonic()  # the budget counts from here, imports included

import argparse  # noqa: E402
import datetime as _dt  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_suite_parts
sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "src"))  # semisparse, when not installed

PARTS = {  # number: (key, weight of the budget share, what)
    1: ("1_train_throughput", 0.40, "dense-KD / fixed-mask-kd / ast-naive / cast steps, and ast under torchrun + FSDP2: tokens/s, peak memory, MFU"),
    2: ("2_kernels", 0.20, "2:4 semi-structured vs dense matmuls (+ exported model end to end)"),
    3: ("3_quality", 0.40, "SparseGPT init, fixed-mask-kd vs ast-naive at equal tokens, WikiText-2 perplexity"),
}
MIN_PART_S = {True: {1: 1.0, 2: 1.0, 3: 1.0}, False: {1: 30.0, 2: 10.0, 3: 60.0}}  # below: skipped (smoke, full)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="folder for gpu_suite.json, gpu_suite.log, metrics/")
    p.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget of the whole script")
    p.add_argument("--model", default="default", help="model spec (default: the shipped SmolLM2-135M-Instruct)")
    p.add_argument("--data", default=None, help="training/calibration text (default: the C4 train sample if "
                   "present, else 'default'; smoke: a tiny generated text)")
    p.add_argument("--eval-data", default=None, help="perplexity text (default: WikiText-2 validation)")
    p.add_argument("--parts", default="1,2,3", help="comma-separated subset of 1,2,3")
    p.add_argument("--smoke", action="store_true", help="tiny random Llama on the CPU, every part, < 1 min")
    p.add_argument("--device", default=None, help="auto | cpu | cuda (default: cpu with --smoke, else auto)")
    p.add_argument("--seq-len", type=int, default=2048, help="training sequence length (parts 1 and 3)")
    p.add_argument("--batch-size", type=int, default=8, help="training micro-batch (parts 1 and 3)")
    p.add_argument("--train-seconds", type=float, default=None,
                   help="part 1: timed seconds per variant after warm-up (default 30; smoke: 2 steps instead)")
    p.add_argument("--quality-max-tokens", type=int, default=None, help="part 3: cap on each run's tokens")
    p.add_argument("--work", type=Path, default=None, help="scratch folder for run dirs (default: a temp dir)")
    p.add_argument("--keep-work", action="store_true", help="keep the scratch folder")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    args = p.parse_args(argv)
    try:
        args.part_list = sorted({int(x) for x in args.parts.split(",") if x.strip()})
    except ValueError:
        p.error(f"--parts {args.parts!r}: expected numbers from 1,2,3 separated by commas")
    if not args.part_list or any(n not in PARTS for n in args.part_list):
        p.error(f"--parts {args.parts!r}: choose from 1,2,3")
    if args.budget_s <= 0:
        p.error("--budget-s must be positive")
    return args


def plan(args, left_s: float) -> list[dict]:
    weights = {n: PARTS[n][1] for n in args.part_list}
    rows, remaining = [], left_s
    for i, n in enumerate(args.part_list):
        last = i == len(args.part_list) - 1
        share = remaining if last else remaining * weights[n] / sum(weights[m] for m in args.part_list[i:])
        rows.append({"part": n, "key": PARTS[n][0], "weight": weights[n], "share_s_if_on_time": round(share, 1),
                     "rule": "all that is left" if last else "weight / remaining weights x time left",
                     "what": PARTS[n][2]})
        remaining -= share
    return rows


def print_plan(rows: list[dict], args, left_s: float) -> None:
    print(f"gpu_suite plan: budget {args.budget_s:.0f} s, {left_s:.0f} s left for the parts"
          f"{' (smoke)' if args.smoke else ''}")
    for r in rows:
        print(f"  part {r['part']} {r['key']:<20} ~{r['share_s_if_on_time']:6.1f} s  ({r['rule']}): {r['what']}")
    sys.stdout.flush()


def resolve_inputs(args, work: Path) -> tuple[str, str, str, str]:
    """(model dir, model label, training data, evaluation data)."""
    from gpu_suite_parts.common import C4_TRAIN, WIKI_VALID, build_smoke_model, find_data, write_smoke_texts
    from semisparse.models import resolve_model

    if args.smoke:
        model = str(build_smoke_model(work / "smoke-llama"))
        label = "tiny random Llama (2 layers, hidden 64, vocab 384; smoke)"
        train_txt, eval_txt = write_smoke_texts(work / "smoke-text")
        return model, label, args.data or str(train_txt), args.eval_data or str(eval_txt)
    c4, wiki = find_data(C4_TRAIN), find_data(WIKI_VALID)
    data = args.data or (str(c4) if c4 else "default")
    eval_data = args.eval_data or (str(wiki) if wiki else None)
    if eval_data is None:
        raise SystemExit(f"no WikiText-2 validation file ({WIKI_VALID}) found: give --eval-data")
    label = "SmolLM2-135M-Instruct (shipped GGUF Q4_1, de-quantised to fp32)" if args.model == "default" else args.model
    return resolve_model(args.model), label, data, eval_data


def final_table(results: dict) -> str:
    from gpu_suite_parts.common import fmt

    lines = ["", "| part | item | status | figures |", "|---|---|---|---|"]
    parts = results["parts"]
    p1 = parts.get("1_train_throughput", {})
    for key, v in (p1.get("variants") or {}).items():
        lines.append(f"| 1 | {key} | {v.get('status')} | tokens/s {fmt(v.get('tokens_per_s'))} (amortized "
                     f"{fmt(v.get('tokens_per_s_amortized'))}), step {fmt(v.get('median_step_s'), '.4f')} s, "
                     f"peak mem {fmt(v.get('peak_mem_gib'), '.2f')} GiB, MFU {fmt(v.get('mfu'), '.3f')} |")
    r = (p1.get("ratios") or {}).get("ast_over_dense_kd")
    if r:
        lines.append(f"| 1 | AST / dense KD | - | step time x{r['step_time_median']:.3f} (median), "
                     f"x{r['step_time_amortized']:.3f} (amortized) |")
    leg = p1.get("fsdp2_torchrun") or {}
    if leg:
        over = leg.get("over_ast") or {}
        what = (f"step time x{over['step_time_median']:.3f} of in-process ast" if over
                else leg.get("reason", ""))
        lines.append(f"| 1 | ast, torchrun 1 process + FSDP2 | {leg.get('status')} | tokens/s "
                     f"{fmt(leg.get('tokens_per_s'))}, {what} |")
    p2 = parts.get("2_kernels", {})
    summary: dict = {}  # (model, shape, impl) -> ["tokens: sparse/dense", ...], bf16 only
    for row in p2.get("rows") or []:
        if row["dtype"] == "bf16" and row["impl"] != "dense" and row.get("ratio_vs_dense"):
            where = (row["model"], f"{row['out']}x{row['in']}", row["impl"])
            tokens = "x".join(str(n) for n in row["input_shape"][:-1])
            summary.setdefault(where, []).append(f"{tokens}: {row['ratio_vs_dense']:.2f}")
    for (model, shape, impl), ratios in summary.items():
        lines.append(f"| 2 | {model} {shape} bf16 {impl} | ok | sparse/dense latency by tokens: {', '.join(ratios)} |")
    if p2.get("counts"):
        lines.append(f"| 2 | all rows | {p2.get('status')} | {p2['counts']} (not run: {p2.get('rows_not_run')}); "
                     f"export e2e: {(p2.get('export_e2e') or {}).get('status')} |")
    p3 = parts.get("3_quality", {})
    for key, v in (p3.get("perplexity") or {}).items():
        lines.append(f"| 3 | {key} | ok | ppl {v['ppl']:.3f} on {Path(v['data']).name} (seqlen {v['seqlen']}, "
                     f"{v['windows']} windows) |")
    if p3.get("budget", {}).get("tokens"):
        lines.append(f"| 3 | token budget | - | {p3['budget']['tokens']:,} tokens per run |")
    for key, part in parts.items():
        if part.get("status") in ("skipped", "error", "cut"):
            lines.append(f"| {key[0]} | {key} | {part['status']} | {part.get('reason') or part.get('error', '')} |")
    return "\n".join(lines)


def _on_sigterm(signum, frame) -> None:
    raise SystemExit(143)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        print_plan(plan(args, args.budget_s - (time.monotonic() - T0)), args, args.budget_s)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    log_fh = open(args.out / "gpu_suite.log", "a", encoding="utf-8")
    from gpu_suite_parts.common import Clock, Suite, Tee, environment, error_record, free_memory, restore_stdio

    saved_stdio = (sys.stdout, sys.stderr)
    sys.stdout, sys.stderr = Tee(sys.stdout, log_fh), Tee(sys.stderr, log_fh)
    signal.signal(signal.SIGTERM, _on_sigterm)  # a kill still writes the JSON (finally below)
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu_suite_"))
    work.mkdir(parents=True, exist_ok=True)
    clock = Clock(args.budget_s, T0, reserve_s=1.0 if args.smoke else 5.0)
    results: dict = {
        "suite": "semisparse benchmarks/gpu_suite.py", "schema": 1, "command": " ".join(sys.argv),
        "started_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "smoke": args.smoke,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "budget": {"budget_s": args.budget_s, "reserve_s": clock.reserve_s, "cut": []}, "parts": {},
    }
    rc = 0
    try:
        import torch
        from transformers.utils import logging as hf_logging

        from semisparse.devices import resolve_device

        hf_logging.disable_progress_bar()  # no "Loading weights" bars in the log

        device = str(resolve_device(args.device or ("cpu" if args.smoke else "auto")).type)
        if device == "cpu" and not args.smoke:
            print("gpu_suite: warning: no CUDA device; running the full suite on the CPU", flush=True)
        torch.manual_seed(0)
        results["environment"] = environment(device)
        t = time.monotonic()
        model, label, data, eval_data = resolve_inputs(args, work)
        results["inputs"] = {"model": model, "model_label": label, "data": data, "eval_data": eval_data,
                             "resolve_s": round(time.monotonic() - t, 2), "work": str(work)}
        suite = Suite(args=args, out=args.out, work=work, clock=clock, device=device, smoke=args.smoke, model=model,
                      model_label=label, data=data, eval_data=eval_data, results=results)
        results["budget"]["startup_s"] = round(clock.elapsed(), 2)
        rows = plan(args, clock.left())
        results["budget"]["plan"] = rows
        print_plan(rows, args, clock.left())
        for n in PARTS:
            key = PARTS[n][0]
            if n not in args.part_list:
                results["parts"][key] = {"status": "skipped", "reason": f"skipped: not in --parts {args.parts}"}
                continue
            todo = [m for m in args.part_list if m >= n]
            left = clock.left()
            share = left if len(todo) == 1 else left * PARTS[n][1] / sum(PARTS[m][1] for m in todo)
            part = {"status": "running", "share_s": round(share, 2), "started_s": round(clock.elapsed(), 2)}
            results["parts"][key] = part
            minimum = MIN_PART_S[args.smoke][n]
            if share < minimum:
                part.update(status="skipped", reason=f"skipped: budget ({max(left, 0):.1f} s left, share "
                                                      f"{share:.1f} s < the part's minimum {minimum:.0f} s)")
                suite.note_cut(key, part["reason"])
                suite.save()
                continue
            suite.log(f"part {n} ({key}): share {share:.1f} s")
            suite.save()
            try:
                if n == 1:
                    from gpu_suite_parts import train_part as mod
                elif n == 2:
                    from gpu_suite_parts import kernels as mod
                else:
                    from gpu_suite_parts import quality as mod
                mod.run(suite, part, time.monotonic() + share)
            except Exception as exc:  # noqa: BLE001 - the next part still runs
                part.update(error_record(exc))
                suite.log(f"part {n} failed: {part['error']}")
            free_memory()  # e.g. after a CUDA OOM, before the next part
            part["elapsed_s"] = round(clock.elapsed() - part["started_s"], 2)
            suite.log(f"part {n} ({key}): {part['status']} in {part['elapsed_s']:.1f} s")
            suite.save()
        rc = 1 if any(p.get("status") == "error" for p in results["parts"].values()) else 0
    except SystemExit as exc:
        results["interrupted"] = f"SystemExit({exc.code})"
        for key, part in results["parts"].items():  # the part that was running when the signal came
            if part.get("status") != "skipped" and "elapsed_s" not in part:
                part.update(status="cut", reason=f"cut: interrupted (SystemExit {exc.code}) while running; "
                                                 "the figures are those written before")
                results["budget"]["cut"].append({"where": key, "why": part["reason"]})
        rc = exc.code if isinstance(exc.code, int) else 1
    except BaseException as exc:  # noqa: BLE001 - whatever happens, the JSON keeps what was measured
        results["fatal"] = error_record(exc)
        rc = 1
    finally:
        results["budget"]["elapsed_s"] = round(clock.elapsed(), 2)
        results["finished_utc"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        from semisparse.rundir import atomic_write_json

        atomic_write_json(args.out / "gpu_suite.json", results, indent=1)
        try:
            print(final_table(results))
        except Exception as exc:  # noqa: BLE001 - the table is a convenience
            print(f"(no table: {exc})")
        print(f"\ngpu_suite: {results['budget']['elapsed_s']:.1f} s of {args.budget_s:.0f} s; "
              f"results {args.out / 'gpu_suite.json'}; log {args.out / 'gpu_suite.log'}", flush=True)
        if args.work is None and not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
        restore_stdio(saved_stdio)
        log_fh.close()
    return rc


if __name__ == "__main__":
    sys.exit(main())

"""Zero-shot accuracy of SmolLM2-135M: dense vs SparseGPT 2:4 vs magnitude 2:4, on every task in ../shared/data.

Prunes the shipped model (SparseGPT calibrated on 128 x 512 tokens of the C4 sample, seed 0), evaluates the three
models with lm-evaluation-harness on the local task files with a document limit, and writes the comparison report
to benchmarks/results/zeroshot-report/ (the run directories themselves go to runs/, which git ignores).

    .venv/bin/python benchmarks/zeroshot.py [--limit 100] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
C4 = SHARED / "c4" / "c4_train_shard0_first1000.jsonl"
TASKS = ["boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa", "piqa",
         "lambada_openai", "copa"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--ppl-windows", type=int, default=16, help="WikiText-2 validation windows of 2048 (0: none)")
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench-zeroshot")
    p.add_argument("--report", type=Path, default=ROOT / "benchmarks" / "results" / "zeroshot-report")
    args = p.parse_args()

    import torch

    from semisparse import api
    from semisparse.evaluate.report import write_report
    from semisparse.models import load_model, package_versions

    args.runs.mkdir(parents=True, exist_ok=True)
    dense_dir = args.runs / "dense"
    if not (dense_dir / "config.json").is_file():
        loaded = load_model("default")
        loaded.model.save_pretrained(dense_dir)
        loaded.tokenizer.save_pretrained(dense_dir)
    for method in ("sparsegpt", "magnitude"):
        if not (args.runs / method / "semisparse.json").is_file():
            api.prune("default", method, "2:4", str(C4), out=args.runs / method, nsamples=128, seqlen=512,
                      overwrite=True, progress=False)

    rows = {}
    for name in ("dense", "sparsegpt", "magnitude"):
        start = time.perf_counter()
        ppl = [str(SHARED / "wikitext2" / "wiki.valid.raw")] if args.ppl_windows else None
        record = api.evaluate(str(args.runs / name), ppl=ppl, ppl_max_windows=args.ppl_windows or None,
                              tasks=TASKS,
                              task_data=str(SHARED), limit=args.limit, batch_size=args.batch_size, progress=False)
        rows[name] = (record["zeroshot"], time.perf_counter() - start)

    print(json.dumps({
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads",
        "python": platform.python_version(),
        "versions": package_versions(),
        "settings": {"model": "SmolLM2-135M-Instruct", "pattern": "2:4", "limit": args.limit,
                     "ppl": f"WikiText-2 valid, seqlen 2048, first {args.ppl_windows} windows",
                     "sparsegpt calibration": "C4 sample, 128 x 512 tokens, seed 0", "num_fewshot": 0},
    }, indent=1))
    print("\n| task | dense acc | SparseGPT 2:4 acc | magnitude 2:4 acc | docs |")
    print("|---|---|---|---|---|")
    dense = rows["dense"][0]
    for task in TASKS:
        if task in dense["missing"]:
            print(f"| {task} | missing | missing | missing | 0 |")
            continue
        cells = []
        for name in ("dense", "sparsegpt", "magnitude"):
            t = rows[name][0]["tasks"][task]
            cells.append(f"{100 * t['acc']:.1f} ± {100 * t['acc_stderr']:.1f}")
        print(f"| {task} | {' | '.join(cells)} | {dense['tasks'][task]['n_docs']} |")
    means = " | ".join(f"{100 * rows[n][0]['mean_acc']:.2f}" for n in ("dense", "sparsegpt", "magnitude"))
    print(f"| **mean** ({len(dense['mean_acc_over'])} tasks) | {means} | |")
    print("\nevaluation wall time (s): " + ", ".join(f"{n} {rows[n][1]:.0f}" for n in rows))
    path = write_report([args.runs / n for n in ("dense", "sparsegpt", "magnitude")], args.report,
                        ["dense", "sparsegpt-2:4", "magnitude-2:4"])
    print(f"report: {path}")


if __name__ == "__main__":
    main()

"""Which text to retrain on (issue 11): the C4 sample vs text the dense model wrote vs a 50/50 mixture, equal budget.

ast-naive from one SparseGPT init (128 x 512 tokens of the C4 sample, seed 0; pruned weights at its zeros) with the
AST table's CPU settings (benchmarks/ast_quality.py: --tokens 100000, 4 x 256 tokens a step, lr 1e-4, seed 0, the C4
validation sample for the in-training held-out), trained on
  c4         the C4 train sample (the AST table's data);
  generated  --generated-tokens tokens the dense model samples with `semisparse generate` (temperature 1, top-p 1,
             --max-new-tokens 256 new tokens a sample, seed 0), prompted by the BOS token alone: no text at all (data-free, as in
             LLM-QAT), or with --prompts c4 by the first 8 tokens of the C4 sample's documents;
  mixture    the two, weights 0.5 / 0.5 (data.sources; the mixture is deterministic for the seed).
The dense model, the init and each run are scored on WikiText-2 validation (seqlen 2048, the first --ppl-windows
windows: the AST table's protocol). Each stage resumes: generation and training continue a killed run, finished
runs and their scores (eval-wikitext2.json beside each run) are kept.

    .venv/bin/python benchmarks/data_quality.py [--tokens 100000] [--generated-tokens 110000] [--prompts bos|c4]
        [--ppl-windows 16] [--rows c4,generated,mixture] [--workdir runs/data-quality]

Tiny settings for a smoke run: --tokens 2048 --generated-tokens 3000 --ppl-windows 1 (and a small --model).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402
from ast_quality import run_state  # noqa: E402
from recipe_comparison import C4, C4_VAL, ROOT, WIKI  # noqa: E402  (the shared data files, defined once)

ROWS = ("c4", "generated", "mixture")


def data_for(row: str, generated: Path) -> dict:
    if row == "c4":
        return {"data.train": str(C4)}
    if row == "generated":
        return {"data.train": str(generated)}
    return {"data.sources": [{"path": str(C4), "weight": 0.5}, {"path": str(generated), "weight": 0.5}]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=100_000, help="training tokens per row")
    p.add_argument("--generated-tokens", type=int, default=110_000,
                   help="tokens to generate (more than --tokens: no row repeats its data)")
    p.add_argument("--prompts", choices=["bos", "c4"], default="bos")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens a generated sample")
    p.add_argument("--ppl-windows", type=int, default=16)
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--workdir", type=Path, default=ROOT / "runs" / "data-quality")
    p.add_argument("--model", default="default")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "data_quality.json")
    args = p.parse_args()
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        p.error(f"unknown --rows {', '.join(unknown)} (choose from {', '.join(ROWS)})")

    from semisparse import api
    from semisparse.models import package_versions
    from semisparse.rundir import atomic_write_json
    from semisparse.train.trainer import read_metrics, train

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    info = machine.describe()
    print(machine.line(info), flush=True)

    def wiki_ppl(name: str, spec: str) -> dict:
        """WikiText-2 perplexity of a model, measured once (kept beside a run directory, or in the workdir)."""
        out = (Path(spec) if Path(spec).is_dir() else work / name) / f"eval-wikitext2-{args.ppl_windows}.json"
        if not out.is_file():
            print(f"[data_quality] WikiText-2 perplexity of {name}", flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            api.evaluate(spec, ppl=[str(WIKI)], ppl_seqlen=2048, ppl_max_windows=args.ppl_windows, out=out,
                         progress=False)
        return json.loads(out.read_text())["perplexity"][str(WIKI)]

    init_dir = work / "sparsegpt"
    if not (init_dir / "semisparse.json").is_file():
        print(f"[data_quality] pruning {args.model} with SparseGPT -> {init_dir}", flush=True)
        api.prune(model=args.model, method="sparsegpt", pattern="2:4", calib=str(C4), out=init_dir, nsamples=128,
                  seqlen=512, seed=0, overwrite=True, progress=False)

    generated = work / f"generated-{args.prompts}"
    gen_s = None
    if any(r != "c4" for r in rows):
        start = time.perf_counter()
        index = api.generate(args.model, generated, tokens=args.generated_tokens,
                             prompts=str(C4) if args.prompts == "c4" else None,
                             prompt_tokens=8 if args.prompts == "c4" else None, max_new_tokens=args.max_new_tokens,
                             seed=0, progress=True)
        gen_s = None if index.get("unchanged") else time.perf_counter() - start

    common = {"init.source": str(init_dir.resolve()), "init.pruned_weights": "dense", "train.tokens": args.tokens,
              "train.seq_len": 256, "train.batch_size": 4, "train.grad_accum": 1, "optim.lr": 1e-4,
              "train.seed": 0, "data.eval": str(C4_VAL), "eval.windows": 4, "eval.every": 0,
              "checkpoint.every": 25, "log.tensorboard": False}
    results = []
    for row in rows:
        run_dir = work / (f"ast-{row}" if row == "c4" else f"ast-{row}-{args.prompts}")  # generated text per prompt
        state = run_state(run_dir)
        if state != "done":
            print(f"[data_quality] {row}: training ({state}) -> {run_dir}", flush=True)
            train(args.model, run_dir, recipe=None if state == "resume" else "ast-naive",
                  overrides=None if state == "resume" else {**common, **data_for(row, generated)},
                  resume=state == "resume", overwrite=state == "fresh", progress=True)
        meta = json.loads((run_dir / "semisparse.json").read_text())
        steps = [m for m in read_metrics(run_dir / "metrics.jsonl") if "step_s" in m]
        results.append({"row": row, "run_dir": str(run_dir), "wikitext2": wiki_ppl(row, str(run_dir)),
                        "c4_val_ppl": {"before": meta["final"].get("initial_eval_ppl"),
                                       "after": meta["final"].get("eval_ppl")},
                        "tokens": meta.get("tokens"), "steps": meta.get("steps"),
                        "tokens_per_s": statistics.median(m["tokens_per_s"] for m in steps) if steps else None,
                        "precision": (meta.get("precision") or {}).get("used"), "data": meta.get("data")})
    dense, init = wiki_ppl("dense", args.model), wiki_ppl("sparsegpt", str(init_dir))
    for r in results:
        r["gap_closed"] = (init["ppl"] - r["wikitext2"]["ppl"]) / (init["ppl"] - dense["ppl"])
    record = {"machine": info, "versions": package_versions(),
              "generated": str(generated) if generated.is_dir() else None, "generate_seconds": gen_s,
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "dense": dense, "init": init, "rows": results}
    atomic_write_json(args.out, record, indent=1)
    print(f"\nWikiText-2 validation, first {args.ppl_windows} windows of 2048: dense {dense['ppl']:.3f}, SparseGPT "
          f"init {init['ppl']:.3f}")
    print("| trained on | WikiText-2 ppl | gap closed | C4 val ppl (4 x 256) | tok/s |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['row']} | {r['wikitext2']['ppl']:.3f} | {r['gap_closed']:.3f} | "
              f"{r['c4_val_ppl']['before']:.2f} -> {r['c4_val_ppl']['after']:.2f} | {r['tokens_per_s'] or 0:.0f} |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""AST retraining quality on SmolLM2-135M, 2:4: perplexity recovered over the SparseGPT one-shot init, per recipe.

The model is pruned once with SparseGPT (C4 sample, 128 x 512) into WORKDIR/sparsegpt (kept if it exists); then each
recipe (naive-ce, fixed-mask-kd, ast-naive, ast-boosted) retrains that run directory (``init.source``) on the same C4
text with the same token budget and CPU-sized settings. ``--init magnitude`` is the paper's setting instead: each run
prunes by |W| in memory and the pruned weights keep their dense values. WikiText-2 validation perplexity (seqlen 2048,
first --ppl-windows windows) is measured for the dense model, the one-shot init and every trained model; the gap
closed is (ppl_init - ppl) / (ppl_init - ppl_dense). Mask flip-rate curves (vs the initial mask and
the previous one) and training-loss curves go to one PNG.

Resumable: a recipe whose run dir has semisparse.json is not retrained; one with checkpoints is resumed (checkpoints
every --ckpt-every steps); perplexities already measured with the same settings are cached in WORKDIR/ppl_cache.json.

    .venv/bin/python benchmarks/ast_quality.py [--tokens 100000] [--seq-len 256] [--batch-size 4] [--grad-accum 1]
        [--lr 1e-4] [--init sparsegpt|magnitude] [--eval-windows 4] [--ckpt-every 50] [--ppl-windows 16]
        [--recipes naive-ce,...] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
WIKI = SHARED / "wikitext2" / "wiki.valid.raw"
C4 = SHARED / "c4" / "c4_train_shard0_first1000.jsonl"
C4_VAL = SHARED / "c4" / "c4_validation_2k.jsonl"
RECIPES = ["naive-ce", "fixed-mask-kd", "ast-naive", "ast-boosted"]
RESULTS = ROOT / "benchmarks" / "results"


def run_state(run_dir: Path) -> str:
    """done | resume | fresh"""
    from semisparse.models import RUN_META
    from semisparse.train import checkpoint as ckpt

    if (run_dir / RUN_META).is_file():
        return "done"
    if (run_dir / "run.json").is_file() and ckpt.latest_checkpoint(run_dir / ckpt.DIR_NAME) is not None:
        return "resume"
    return "fresh"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=100_000, help="training tokens per recipe (default 100000)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--init", choices=["sparsegpt", "magnitude"], default="sparsegpt",
                   help="sparsegpt: every recipe starts from one SparseGPT run dir (pruned weights at its zeros); "
                        "magnitude: the paper's setting, each run prunes by |W| in memory and the pruned weights "
                        "keep their dense values (the one-shot magnitude model is saved once for its perplexity)")
    p.add_argument("--eval-windows", type=int, default=4, help="in-training held-out (C4 validation) windows")
    p.add_argument("--ckpt-every", type=int, default=50, help="checkpoint every N steps (for resuming)")
    p.add_argument("--ppl-windows", type=int, default=16, help="WikiText-2 windows of 2048 tokens")
    p.add_argument("--recipes", default=",".join(RECIPES),
                   help="comma-separated recipe names; RECIPE+field=value[+field=value] adds an ablation of a recipe "
                        "(e.g. ast-naive+decay.variant=grad), trained into a run dir of that name")
    p.add_argument("--workdir", type=Path, default=ROOT / "runs" / "bench-ast")
    p.add_argument("--out", type=Path, default=RESULTS / "ast_quality.json")
    p.add_argument("--plot", type=Path, default=RESULTS / "ast_quality_flip_rate.png")
    # hidden: smoke tests on a tiny model / small data
    p.add_argument("--model", default="default", help=argparse.SUPPRESS)
    p.add_argument("--data", default=str(C4), help=argparse.SUPPRESS)
    p.add_argument("--eval-data", default=str(C4_VAL), help=argparse.SUPPRESS)
    p.add_argument("--wiki", default=str(WIKI), help=argparse.SUPPRESS)
    p.add_argument("--calib-samples", type=int, default=128, help=argparse.SUPPRESS)
    p.add_argument("--calib-seqlen", type=int, default=512, help=argparse.SUPPRESS)
    args = p.parse_args()
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    for item in recipes:
        if any("=" not in part for part in item.split("+")[1:]):
            p.error(f"--recipes item {item!r}: ablation fields are written RECIPE+field=value")

    import torch

    from semisparse import api
    from semisparse.config import parse_set
    from semisparse.models import package_versions
    from semisparse.train.trainer import read_metrics, train

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    cache_path = work / "ppl_cache.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}

    def ppl_of(name: str, spec: str) -> dict:
        meta = Path(spec) / "semisparse.json"  # a re-made run dir has a new "created": not the cached result
        created = json.loads(meta.read_text()).get("created") if meta.is_file() else ""
        key = f"{name}|{spec}|{created}|{args.wiki}|2048|{args.ppl_windows}"
        if key not in cache:
            print(f"[ast_quality] perplexity of {name} ...", file=sys.stderr, flush=True)
            rec = api.evaluate(spec, ppl=[args.wiki], ppl_seqlen=2048, ppl_max_windows=args.ppl_windows,
                               out=work / f"eval-{name}.json", progress=False)
            cache[key] = rec["perplexity"][args.wiki]
            cache_path.write_text(json.dumps(cache, indent=1) + "\n")
        return cache[key]

    # 1. one-shot init (once)
    prune_s = None
    init_dir = work / args.init
    if not (init_dir / "semisparse.json").is_file():
        print(f"[ast_quality] pruning {args.model} with {args.init} -> {init_dir}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        api.prune(model=args.model, method=args.init, pattern="2:4", calib=args.data, out=init_dir,
                  nsamples=args.calib_samples, seqlen=args.calib_seqlen, seed=0, overwrite=True, progress=False)
        prune_s = time.perf_counter() - start

    dense = ppl_of("dense", args.model)
    before = ppl_of(args.init, str(init_dir))  # the one-shot "before" perplexity

    # 2. retrain per recipe
    overrides = {
        # magnitude is deterministic: pruning in memory gives init_dir's mask, with the pruned weights kept dense
        "init.source": str(init_dir.resolve()) if args.init == "sparsegpt" else "magnitude",
        "init.pruned_weights": "dense", "train.tokens": args.tokens, "train.seq_len": args.seq_len,
        "train.batch_size": args.batch_size, "train.grad_accum": args.grad_accum, "optim.lr": args.lr,
        "data.train": args.data, "data.eval": args.eval_data, "eval.windows": args.eval_windows, "eval.every": 0,
        "checkpoint.every": args.ckpt_every, "log.tensorboard": False,
    }
    rows = []
    for name in recipes:
        recipe, *extra = name.split("+")
        run_dir = work / name
        state = run_state(run_dir)
        train_s = None
        if state != "done":
            print(f"[ast_quality] training {name} ({state}) -> {run_dir}", file=sys.stderr, flush=True)
            start = time.perf_counter()
            train(args.model, run_dir, recipe=recipe, overrides={**overrides, **parse_set(extra)},
                  resume=state == "resume", overwrite=state == "fresh", progress=True)
            train_s = time.perf_counter() - start
        meta = json.loads((run_dir / "semisparse.json").read_text())
        metrics = read_metrics(run_dir / "metrics.jsonl")
        steps = [m for m in metrics if "step_s" in m]
        masks = [m for m in metrics if "init_flip_rate" in m]
        res = ppl_of(name, str(run_dir))
        rows.append({
            "recipe": name, "run_dir": str(run_dir), "ppl": res["ppl"], "ppl_windows": res["windows"],
            "gap_closed": (before["ppl"] - res["ppl"]) / (before["ppl"] - dense["ppl"]) if before["ppl"] != dense["ppl"]
            else float("nan"),
            "final_init_flip_rate": masks[-1]["init_flip_rate"] if masks else 0.0,
            "final_flip_rate": masks[-1]["flip_rate"] if masks else 0.0,
            "mask_updates": len(masks),
            "tokens_per_s": statistics.median(m["tokens_per_s"] for m in steps) if steps else None,
            "steps": meta.get("steps"), "tokens": meta.get("tokens"),
            "c4_eval_ppl": {"before": meta["final"].get("initial_eval_ppl"), "after": meta["final"].get("eval_ppl")},
            "train_seconds_meta": meta.get("train_seconds"), "train_seconds_this_call": train_s,
            "flip_curve": [(m["step"], m["init_flip_rate"], m["flip_rate"]) for m in masks],
            "loss_curve": [(m["step"], m["loss"]) for m in steps],
        })

    # 3. flip-rate and loss curves
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    for r in rows:
        curve = r["flip_curve"] or [(0, 0.0, 0.0), (max((r["steps"] or 1) - 1, 0), 0.0, 0.0)]
        xs = [c[0] for c in curve]
        axes[0].plot(xs, [c[1] for c in curve], label=r["recipe"], marker="." if len(xs) < 50 else None)
        axes[1].plot(xs, [c[2] for c in curve], label=r["recipe"], marker="." if len(xs) < 50 else None)
        axes[2].plot([c[0] for c in r["loss_curve"]], [c[1] for c in r["loss_curve"]], label=r["recipe"], lw=1)
    axes[0].set_title(f"mask flips vs initial ({args.init}) mask")
    axes[1].set_title("mask flips vs previous mask")
    axes[2].set_title("training loss (each recipe's own: KD or CE)")
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("fraction of sparse weights" if ax is not axes[2] else "loss")
        ax.grid(alpha=0.3)
        if rows:
            ax.legend()
    for ax in axes[:2]:  # flip rates span 1e-6 .. 1e-1 across settings; frozen masks stay at 0
        ax.set_yscale("symlog", linthresh=1e-6)
    fig.tight_layout()
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=120)
    plt.close(fig)

    header = {
        "machine": f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads".strip(),
        "python": platform.python_version(),
        "versions": package_versions(),
        "settings": {
            "model": args.model if args.model != "default" else
            "SmolLM2-135M-Instruct (shipped GGUF Q4_1, de-quantised to fp32)",
            "pattern": "2:4",
            "init": f"SparseGPT one-shot run dir, {args.calib_samples} x {args.calib_seqlen} tokens of "
                    f"{Path(args.data).name}, pruned weights at its zeros" if args.init == "sparsegpt" else
                    "magnitude 2:4 in memory, pruned weights keep their dense values (the paper's setting)",
            "train": f"{args.tokens} tokens of {Path(args.data).name}, seq_len {args.seq_len}, batch {args.batch_size}"
                     f" x accum {args.grad_accum}, lr {args.lr}, other fields as each shipped recipe",
            "ppl": f"{Path(args.wiki).name}, seqlen 2048, stride 2048, first {args.ppl_windows} windows",
        },
        "prune_seconds_this_call": prune_s,
    }
    print("\n" + json.dumps(header, indent=1))
    print(f"\ndense ppl {dense['ppl']:.3f}, {args.init} init ppl {before['ppl']:.3f} "
          f"({dense['windows']} windows, {dense['tokens']} tokens)")
    print(f"\n| recipe | ppl before ({args.init}) | ppl after | gap closed | final init_flip_rate | tokens/s | steps |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        tps = f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "-"
        print(f"| {r['recipe']} | {before['ppl']:.2f} | {r['ppl']:.2f} | {100 * r['gap_closed']:.1f}% | "
              f"{r['final_init_flip_rate']:.4f} | {tps} | {r['steps']} |")
    print(f"\nflip-rate and loss curves: {args.plot}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"header": header, "dense": dense, args.init: before, "rows": rows}, indent=1)
                        + "\n")
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()

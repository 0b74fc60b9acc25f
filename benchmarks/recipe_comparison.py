"""Which retraining recipe recovers the most per token: fixed mask vs AST vs CAST on SmolLM2-135M, 2:4 (issue 18).

Rows share everything but the recipe (and its stated, budget-scaled settings, ROW_SETTINGS): the model, the data
mixture, the token budget, seq_len x batch, the seed set and the evaluation. Two blocks:
  sparsegpt  every row starts from one SparseGPT run directory (128 x 512 C4 calibration, seed 0; pruned weights at
             its zeros), two seeds per trained row, naive-ce once;
  magnitude  the papers' setting: each run prunes by |W| in memory and the pruned weights keep their dense values.

Stages, each resumable and safe to stop at any moment (train checkpoints every --ckpt-every steps and continues with
the trainer's own --resume; each evaluation is written atomically beside its run):
  train     train (or resume) the selected rows;
  eval      WikiText-2 validation perplexity (first 32 windows of 2048, the one-shot table's protocol), C4 validation
            perplexity (first 32 windows of 2048), and with --zeroshot the zero-shot mean at --limit 150;
  report    one JSON (benchmarks/results/recipe_comparison.json), a markdown table and the loss / flip-rate figure.

Run directories (runs/, not committed) do not outlive a session here, so a row is trained, evaluated and summarised
in one go, and its summary lands in benchmarks/results/recipe_comparison/ (committed; ROW@INIT_KEY.json for a
SparseGPT row, ROW.json for a magnitude row): the report joins rows that different sessions (or machines: each
summary names its own) produced. Every row runs in bf16 autocast whatever the CPU by default, so a row's numbers
do not depend on which machine ran it (only its tokens/s does); on a CPU without native bf16 a bf16 matmul takes
2.7x (an AVX-512 Xeon) to ~90x (an AVX2-only EPYC) as long as fp32, so --precision fp32 exists for such machines,
and the report compares rows only within one precision and one init (the SparseGPT init is re-pruned on each
machine and differs between CPUs: each row records its init's masks hash, init_key).

Quality runs may share the machine: start two processes with --threads 1 and disjoint --rows.

    .venv/bin/python benchmarks/recipe_comparison.py --stage train --rows ast-s1,fixed-s1 --threads 1
    .venv/bin/python benchmarks/recipe_comparison.py --stage eval
    .venv/bin/python benchmarks/recipe_comparison.py --stage report
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402
from ast_quality import run_state  # noqa: E402  (done | resume | fresh, one definition for both)
from semisparse.rundir import MASKS_FILE, atomic_write_json, sha256_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SEMISPARSE_DATA", ROOT.parent / "shared" / "data"))
WIKI = DATA / "wikitext2" / "wiki.valid.raw"
C4 = DATA / "c4" / "c4_train_shard0_first1000.jsonl"
C4_VAL = DATA / "c4" / "c4_validation_2k.jsonl"
RESULTS = ROOT / "benchmarks" / "results"
ROW_RESULTS = RESULTS / "recipe_comparison"
ZEROSHOT_TASKS = ["boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa", "piqa",
                  "lambada_openai", "copa"]

# Settings every row shares (scaled to a CPU budget: 4 x 256 tokens a step, ~490 steps for 500k tokens).
COMMON = {
    "train.seq_len": 256, "train.batch_size": 4, "train.grad_accum": 1,
    "data.eval": str(C4_VAL), "eval.windows": 4, "eval.every": 50, "log.tensorboard": False,
    "train.precision": "bf16",
}
MIXTURE = [{"path": str(C4), "weight": 0.5}, {"path": "default", "weight": 0.5}]

# Per-recipe settings for this budget, and why (BENCHMARKS.md, "Recipe comparison"):
# - fixed-mask-kd, naive-ce, ast-naive share lr 1e-4 (cosine to 10%): the best of the 99k-token table's lrs for both
#   the frozen and the adaptive mask (lr 5e-4 let AST's masks move, 3.2e-3 of the weights, and hurt both by ~12 ppl),
#   so AST differs from the fixed mask by its mask updates and decay alone.
# - cast keeps a constant lr (the paper's schedule); lambda = 1e-4, a few times a typical per-weight first moment
#   (the clipped gradient norm spread over 1.35e8 weights is ~1e-4 RMS, its running mean smaller), so the decay wins
#   once alpha = t/T passes ~0.2 (the paper's 4e-7 is scaled to 7.5k steps of 1M-token batches).
#   From the SparseGPT run directory the pruned weights start at its zeros: nothing to carry to zero but what the
#   dense forward's gradients add, so cast gets the lr the other rows peak at, 1e-4.
#   From the magnitude init the pruned weights start at their dense values and must reach 0 before the final hard
#   prune: an Adam-normalised step moves a pruned weight by at most lr once the decay dominates its first moment, so
#   the reach is sum(lr * t/T) = lr * T / 2 = 3e-4 * 488 / 2 = 0.073, 1.3x the median pruned |w| of the magnitude
#   init (0.056, measured at 99k tokens).
ROW_SETTINGS = {
    ("fixed-mask-kd", "any"): {"optim.lr": 1e-4},
    ("naive-ce", "any"): {"optim.lr": 1e-4},
    ("ast-naive", "any"): {"optim.lr": 1e-4},
    ("cast", "sparsegpt"): {"optim.lr": 1e-4, "decay.lambda_max": 1e-4},
    ("cast", "magnitude"): {"optim.lr": 3e-4, "decay.lambda_max": 1e-4},
}


def settings_for(row: dict) -> dict:
    base = ROW_SETTINGS.get((row["recipe"], row["init"])) or ROW_SETTINGS[(row["recipe"], "any")]
    return {**base, **row.get("ablation", {})}


ROWS = {}
for seed in (1, 2):
    for short, recipe in (("fixed", "fixed-mask-kd"), ("ast", "ast-naive"), ("cast", "cast")):
        ROWS[f"{short}-s{seed}"] = {"recipe": recipe, "init": "sparsegpt", "seed": seed}
ROWS["naive-ce-s1"] = {"recipe": "naive-ce", "init": "sparsegpt", "seed": 1}
for short, recipe in (("fixed", "fixed-mask-kd"), ("ast", "ast-naive"), ("cast", "cast")):
    ROWS[f"mag-{short}-s1"] = {"recipe": recipe, "init": "magnitude", "seed": 1}
# the magnitude block's second seeds for the pair the reading compares (fixed vs AST): is AST's 2.5% a lean or noise?
for short, recipe in (("fixed", "fixed-mask-kd"), ("ast", "ast-naive")):
    ROWS[f"mag-{short}-s2"] = {"recipe": recipe, "init": "magnitude", "seed": 2}
# CAST ablations from the SparseGPT init, one field group of the other rows' each, to find what costs cast-s1 its
# deficit: the schedule (5% warm-up, cosine to 10% instead of a constant lr), the loss (KL weight 0.67 at T = 2).
ROWS["cast-sched-s1"] = {"recipe": "cast", "init": "sparsegpt", "seed": 1,
                         "ablation": {"optim.warmup": 0.05, "optim.min_lr_ratio": 0.1}}
ROWS["cast-kd-s1"] = {"recipe": "cast", "init": "sparsegpt", "seed": 1,
                      "ablation": {"distill.alpha": 0.67, "distill.temperature": 2.0}}


def sparsegpt_init(args) -> Path:
    from semisparse import api

    init_dir = args.workdir / "sparsegpt"
    if not (init_dir / "semisparse.json").is_file():
        print(f"[compare] pruning {args.model} with SparseGPT -> {init_dir}", flush=True)
        api.prune(model=args.model, method="sparsegpt", pattern="2:4", calib=str(C4), out=init_dir, nsamples=128,
                  seqlen=512, seed=0, overwrite=True, progress=False)
    return init_dir


def row_overrides(args, row: dict) -> dict:
    init = str(sparsegpt_init(args).resolve()) if row["init"] == "sparsegpt" else "magnitude"
    return {**COMMON, "train.precision": args.precision, "init.source": init, "init.pruned_weights": "dense",
            "train.tokens": args.tokens, "train.seed": row["seed"], "data.sources": MIXTURE,
            "checkpoint.every": args.ckpt_every, **settings_for(row)}


def train_rows(args, names: list[str]) -> None:
    from semisparse.train.trainer import train

    for name in names:
        row, run_dir = ROWS[name], args.workdir / name
        state = run_state(run_dir)
        if state == "done":
            print(f"[compare] {name}: trained", flush=True)
            continue
        print(f"[compare] {name}: training ({state}) -> {run_dir}", flush=True)
        overrides = None if state == "resume" else row_overrides(args, row)
        train(args.model, run_dir, recipe=None if state == "resume" else row["recipe"], overrides=overrides,
              resume=state == "resume", overwrite=state == "fresh", progress=True)
        if args.stage == "train":
            finish_row(args, name)


def finish_row(args, name: str) -> None:
    """Evaluate one trained row and keep its summary where the next session finds it (ROW_RESULTS)."""
    evaluate(args, name, str(args.workdir / name), args.workdir / name / "compare-eval.json")
    summary = summarize(args, name)
    if summary is not None:
        summary["machine"] = machine.describe()
        path = summary_path(name, summary["init_key"])
        atomic_write_json(path, summary, indent=1)
        print(f"[compare] {name}: wiki {summary['wiki_ppl']:.2f}, c4 {summary['c4_ppl']:.2f} -> {path}", flush=True)


def summary_path(name: str, key: str) -> Path:
    """Where a row's summary is kept: SparseGPT rows by their init's key too, so that the same row trained from
    another machine's init (another group) never overwrites this one."""
    return ROW_RESULTS / (f"{name}.json" if key == ROWS[name]["init"] else f"{name}@{key}.json")


def kept_summaries() -> list[dict]:
    """Every row summary kept, in ROWS order; rows written before summaries carried their init's key in the
    file name are plain ROW.json."""
    paths = []
    for name in ROWS:
        plain = ROW_RESULTS / f"{name}.json"
        if plain.is_file():
            paths.append(plain)
        paths += sorted(ROW_RESULTS.glob(f"{name}@*.json"))
    return [json.loads(p.read_text()) for p in paths]


def evaluate(args, name: str, spec: str, out: Path) -> dict:
    """WikiText-2 and C4 validation perplexity (and zero-shot) of one model, cached in ``out``."""
    from semisparse import api

    meta = Path(spec) / "semisparse.json"
    created = json.loads(meta.read_text()).get("created") if meta.is_file() else "dense"
    key = {"created": created, "wiki_windows": 32, "c4_windows": 32,
           "zeroshot_limit": args.limit if args.zeroshot else None}
    if out.is_file():
        cached = json.loads(out.read_text())
        got = cached.get("key") or {}
        same_model = {**got, "zeroshot_limit": None} == {**key, "zeroshot_limit": None}
        # an evaluation with zero-shot also answers a request without it (rather than being redone and losing it)
        if same_model and key["zeroshot_limit"] in (None, got.get("zeroshot_limit")):
            return cached
    print(f"[compare] evaluating {name}", flush=True)
    start = time.perf_counter()
    raw = out.with_name(out.stem + "-raw.json")
    rec = api.evaluate(spec, ppl=[str(WIKI), str(C4_VAL)], ppl_seqlen=2048, ppl_max_windows=32, progress=False,
                       out=raw)
    result = {"key": key, "wiki_ppl": rec["perplexity"][str(WIKI)]["ppl"],
              "c4_ppl": rec["perplexity"][str(C4_VAL)]["ppl"], "eval_seconds": None}
    if args.zeroshot:
        zs = api.evaluate(spec, tasks=ZEROSHOT_TASKS, task_data=str(DATA), limit=args.limit, progress=False,
                          out=raw)
        result["zeroshot_mean"] = zs["zeroshot"]["mean_acc"]
        result["zeroshot_tasks"] = zs["zeroshot"]["mean_acc_over"]
    result["eval_seconds"] = round(time.perf_counter() - start, 1)
    atomic_write_json(out, result, indent=1)
    return result


def init_key(args, row: dict) -> str:
    """Which init a row started from: the SparseGPT run's masks differ between CPUs, so they are named by a hash."""
    if row["init"] != "sparsegpt":
        return row["init"]  # magnitude pruning is exact on every machine
    return "sparsegpt-" + sha256_file(sparsegpt_init(args) / MASKS_FILE)[:12]


def eval_references(args, names: list[str]) -> None:
    """The dense model's numbers and, when a SparseGPT row is evaluated, this machine's SparseGPT init's, kept
    beside the rows' summaries."""
    want_zeroshot = args.limit if args.zeroshot else None
    refs = [("dense", "dense", args.model)]
    if any(ROWS[n]["init"] == "sparsegpt" for n in names):
        refs.append(("sparsegpt", init_key(args, {"init": "sparsegpt"}), str(sparsegpt_init(args))))
    for name, kept_as, spec in refs:
        kept = ROW_RESULTS / f"{kept_as}.json"
        have = json.loads(kept.read_text())["key"]["zeroshot_limit"] if kept.is_file() else "none yet"
        if have == "none yet" or (want_zeroshot is not None and have != want_zeroshot):  # add zero-shot later
            result = evaluate(args, name, spec, args.workdir / f"{name}-eval.json")
            atomic_write_json(kept, {**result, "machine": machine.describe()}, indent=1)


def eval_rows(args, names: list[str]) -> None:
    eval_references(args, names)
    for name in names:
        if run_state(args.workdir / name) != "done":
            print(f"[compare] {name}: not trained yet, skipped", flush=True)
            continue
        finish_row(args, name)


def summarize(args, name: str) -> dict | None:
    from semisparse.rundir import read_metrics

    run_dir = args.workdir / name
    out = run_dir / "compare-eval.json"
    if run_state(run_dir) != "done" or not out.is_file():
        return None
    meta = json.loads((run_dir / "semisparse.json").read_text())
    recipe = json.loads((run_dir / "run.json").read_text())["recipe"]
    ev = json.loads(out.read_text())
    metrics = read_metrics(run_dir / "metrics.jsonl")
    steps = [m for m in metrics if "step_s" in m]
    masks = [m for m in metrics if "init_flip_rate" in m]
    return {
        "row": name, **ROWS[name], "init_key": init_key(args, ROWS[name]), "settings": settings_for(ROWS[name]),
        "wiki_ppl": ev["wiki_ppl"],
        "c4_ppl": ev["c4_ppl"], "zeroshot_mean": ev.get("zeroshot_mean"),
        "final_init_flip_rate": masks[-1]["init_flip_rate"] if masks else 0.0,
        "forward": recipe["mask"]["forward"], "pruned_abs_max": meta["final"].get("pruned_abs_max"),
        "tokens_per_s": statistics.median(m["tokens_per_s"] for m in steps) if steps else None,
        "train_seconds": meta.get("train_seconds"), "tokens": meta.get("tokens"), "steps": meta.get("steps"),
        "data": meta.get("data"), "precision": meta.get("precision"),
        "loss_curve": [(m["step"], m["loss"]) for m in steps],
        "flip_curve": [(m["step"], m["init_flip_rate"], m["flip_rate"]) for m in masks],
        "eval_curve": [(m["tokens"], m["eval_ppl"]) for m in metrics if "eval_ppl" in m],
    }


def group_rows(rows: list[dict]) -> dict[tuple, list[dict]]:
    """Rows comparable with each other: one init (by its key, or for rows written before keys existed, by the
    held-out perplexity before training, which a keyed row of the same init maps back) and one precision."""
    by_heldout = {round(r["eval_curve"][0][1], 3): r["init_key"] for r in rows if r.get("init_key") and r["eval_curve"]}
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        heldout = round(r["eval_curve"][0][1], 3) if r["eval_curve"] else None
        key = (r.get("init_key") or (r["init"] if r["init"] != "sparsegpt" else None) or by_heldout.get(heldout)
               or f"{r['init']} (held-out {heldout} before training)")
        r["init_key"] = key
        groups.setdefault((key, (r.get("precision") or {}).get("used")), []).append(r)
    return groups


def report(args) -> None:
    dense = json.loads((ROW_RESULTS / "dense.json").read_text())
    rows = kept_summaries()
    groups = group_rows(rows)
    print(f"\nmachine: {machine.line()}")
    print(f"dense wiki {dense['wiki_ppl']:.2f}; rows are compared within one init and one training precision\n")
    inits = {}
    for (key, precision), members in groups.items():
        ref_path = ROW_RESULTS / f"{key}.json"
        init = json.loads(ref_path.read_text()) if ref_path.is_file() else None
        inits[key] = init
        where = sorted({r["machine"]["cpu"] for r in members if r.get("machine")})
        print(f"### init {key}, {precision} ({', '.join(where)}): "
              + (f"init wiki {init['wiki_ppl']:.2f}" if init else "no evaluation of this init kept"))
        print("| row | recipe | seed | WikiText-2 ppl | gap closed | C4 ppl | zero-shot | final flip vs init | "
              "pruned max before prune | tok/s | wall |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in members:
            if init is not None:
                r["gap_closed"] = (init["wiki_ppl"] - r["wiki_ppl"]) / (init["wiki_ppl"] - dense["wiki_ppl"])
            gap = f"{100 * r['gap_closed']:.1f}%" if "gap_closed" in r else "-"
            zs = f"{r['zeroshot_mean']:.3f}" if r.get("zeroshot_mean") is not None else "-"
            # only a dense forward's final prune cuts anything: a masked forward's pruned weights never took part
            # (summaries written before they recorded their forward: cast is the one recipe with a dense forward)
            forward = r.get("forward") or ("dense" if r["recipe"] == "cast" else "masked")
            cut = r.get("pruned_abs_max") if forward == "dense" else None
            pam = f"{cut:.2e}" if cut is not None else "-"
            tps = f"{r['tokens_per_s']:.0f}" if r["tokens_per_s"] else "-"
            print(f"| {r['row']} | {r['recipe']} | {r['seed']} | {r['wiki_ppl']:.2f} | {gap} | {r['c4_ppl']:.2f} | "
                  f"{zs} | {r['final_init_flip_rate']:.2e} | {pam} | {tps} | {(r['train_seconds'] or 0) / 60:.0f} min |")
        print()
    plot(rows, RESULTS / "recipe_comparison.png")
    atomic_write_json(RESULTS / "recipe_comparison.json", indent=1, data={
        "machine": machine.describe(), "common": COMMON, "mixture": MIXTURE, "tokens": args.tokens,
        "row_settings": {f"{r}/{i}": v for (r, i), v in ROW_SETTINGS.items()}, "dense": dense, "inits": inits,
        "rows": rows})
    print(f"results: {RESULTS / 'recipe_comparison.json'}")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    for i, r in enumerate(rows):
        style = {"label": r["row"], "color": f"C{i % 10}"}  # one colour per row in every panel
        axes[0].plot(*zip(*r["loss_curve"]), lw=0.8, **style)
        if r["flip_curve"]:
            steps, init_flips, _ = zip(*r["flip_curve"])
            axes[1].plot(steps, init_flips, **style)
        if r["eval_curve"]:
            axes[2].plot(*zip(*r["eval_curve"]), marker=".", **style)
    axes[0].set(title="training loss (each recipe's own)", xlabel="optimizer step")
    axes[1].set(title="mask flips vs the initial mask", xlabel="optimizer step", yscale="symlog")
    axes[1].set_yscale("symlog", linthresh=1e-6)
    axes[2].set(title="held-out C4 ppl through the masks (4 x 256)", xlabel="training tokens", yscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stage", choices=["train", "eval", "report", "all"], default="all")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma list of: {', '.join(ROWS)}")
    p.add_argument("--tokens", type=int, default=500_000, help="training tokens per row")
    p.add_argument("--ckpt-every", type=int, default=25)
    p.add_argument("--zeroshot", action="store_true", help="also the zero-shot mean (--limit per task)")
    p.add_argument("--limit", type=int, default=150)
    p.add_argument("--threads", type=int, default=None, help="torch threads for this process")
    p.add_argument("--workdir", type=Path, default=ROOT / "runs" / "compare")
    p.add_argument("--model", default="default")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16",
                   help="training precision of the rows trained now (bf16 unless the CPU lacks native bf16)")
    args = p.parse_args()
    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; rows: {', '.join(ROWS)}")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"[compare] machine: {machine.line()}", flush=True)
    if args.stage in ("train", "all"):
        train_rows(args, names)
    if args.stage in ("eval", "all"):
        eval_rows(args, names)
    if args.stage in ("report", "all"):
        report(args)


if __name__ == "__main__":
    main()

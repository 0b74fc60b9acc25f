"""One-shot 2:4 pruning of SmolLM2-135M: perplexity, wall time and peak memory per method.

Each (method, calibration) cell runs in its own subprocess so that its peak RSS is its own. The dense model is
measured in the same run as the baseline; times are reported as ratios to magnitude pruning (the cheapest).

    .venv/bin/python benchmarks/oneshot_ppl.py [--nsamples 128] [--seqlen 512] [--windows 32] [--out FILE.json]
        [--calib-sampler random|reference] [--tie-order stable|reference] [--calib-stats float64|reference]
        [--cells dense,magnitude,...] [--wikitext-only]

`--calib-sampler reference --tie-order reference --calib-stats reference --cells dense,magnitude,wanda,sparsegpt
--wikitext-only` is the reference-code comparison (the SparseGPT/Wanda repositories' calibration draw, tie rule and
float32 running-mean statistics, C4 calibration).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
WIKI = SHARED / "wikitext2" / "wiki.valid.raw"
C4 = SHARED / "c4" / "c4_train_shard0_first1000.jsonl"


def worker(args) -> None:
    import torch

    from semisparse import data
    from semisparse.api import ppl_eval
    from semisparse.masks import Pattern
    from semisparse.models import load_model
    from semisparse.prune import get_method, prune_model

    torch.manual_seed(0)
    loaded = load_model("default")
    model, tok = loaded.model, loaded.tokenizer
    prune_s = 0.0
    if args.method != "dense":
        method = get_method(args.method, args.tie_order, args.calib_stats)
        windows = None
        if method.needs_calibration:
            source = data.load_text(args.calib, split="train")
            if args.calib_sampler == "reference":
                windows = data.reference_calibration_windows(tok, source.docs, args.nsamples, args.seqlen, seed=0)
            else:
                stream = data.token_stream(tok, source.docs)
                windows = data.calibration_windows(stream, args.nsamples, args.seqlen, seed=0)
        start = time.perf_counter()
        prune_model(model, method, Pattern(2, 4), windows, progress=False)
        prune_s = time.perf_counter() - start
    ppl = {}
    sets = (("wikitext2-valid", str(WIKI)),) if args.wikitext_only else (("wikitext2-valid", str(WIKI)),
                                                                         ("default-heldout", "default"))
    for name, spec in sets:
        source = data.load_text(spec, split="eval")
        res = ppl_eval(model, tok, source, seqlen=2048, max_windows=args.windows, progress=False)
        ppl[name] = {"ppl": res.ppl, "windows": res.windows, "tokens": res.tokens}
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"prune_s": prune_s, "peak_rss_mib": peak_mib, "ppl": ppl}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--windows", type=int, default=32, help="2048-token perplexity windows per data set")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "oneshot_ppl.json")
    p.add_argument("--calib-sampler", default="random", choices=["random", "reference"])
    p.add_argument("--tie-order", default="stable", choices=["stable", "reference"])
    p.add_argument("--calib-stats", default="float64", choices=["float64", "reference"])
    p.add_argument("--cells", default="dense,magnitude,wanda:c4,sparsegpt:c4,wanda:default,sparsegpt:default",
                   help="comma-separated METHOD[:c4|default] cells to run")
    p.add_argument("--wikitext-only", action="store_true", help="skip the held-out default perplexity")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", default="dense", help=argparse.SUPPRESS)
    p.add_argument("--calib", default=str(C4), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    import torch

    from semisparse.models import package_versions

    cells = []
    for cell in args.cells.split(","):
        method, _, calib = cell.partition(":")
        cells.append((method, {"c4": str(C4), "default": "default", "": "-"}[calib]))
    rows = []
    for method, calib in cells:
        cmd = [sys.executable, __file__, "--worker", "--method", method, "--calib", calib if calib != "-" else str(C4),
               "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--windows", str(args.windows),
               "--calib-sampler", args.calib_sampler, "--tie-order", args.tie_order, "--calib-stats", args.calib_stats]
        if args.wikitext_only:
            cmd.append("--wikitext-only")
        start = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        result.update(method=method, calib="C4 sample" if calib == str(C4) else calib, total_s=time.perf_counter() - start)
        rows.append(result)
        print(f"done {method} {calib}: {result['ppl']}", file=sys.stderr, flush=True)

    base_time = next((r["prune_s"] for r in rows if r["method"] == "magnitude"), None)
    header = {
        "machine": machine.describe(),  # CPU model and flags: SparseGPT's result depends on the CPU's arithmetic
        "python": platform.python_version(),
        "versions": package_versions(),
        "settings": {"model": "SmolLM2-135M-Instruct (shipped GGUF Q4_1, de-quantised to fp32)", "pattern": "2:4",
                     "calibration": f"{args.nsamples} x {args.seqlen} tokens, seed 0, sampler {args.calib_sampler}",
                     "tie_order": args.tie_order, "calib_stats": args.calib_stats,
                     "ppl": f"seqlen 2048, stride 2048, first {args.windows} windows"},
    }
    print("\n" + json.dumps(header, indent=1))
    print("\n| method | calibration | WikiText-2 valid ppl | held-out default ppl | prune time (s) | time / magnitude | peak RSS (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = r["prune_s"] / base_time if r["method"] != "dense" and base_time else float("nan")
        held = r["ppl"].get("default-heldout", {}).get("ppl", float("nan"))
        print(f"| {r['method']} | {r['calib']} | {r['ppl']['wikitext2-valid']['ppl']:.4f} | "
              f"{held:.2f} | {r['prune_s']:.1f} | {ratio:.1f} | {r['peak_rss_mib']:.0f} |")
    w = rows[0]["ppl"]
    print(f"\nwindows: WikiText-2 {w['wikitext2-valid']['windows']} ({w['wikitext2-valid']['tokens']} tokens)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"header": header, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Compact checkpoints on CPU: bytes, load time and perplexity of each export of one 2:4 run directory.

Exports RUN_DIR as hf fp16, packed fp16, packed + int8, packed + int4 (RTN and GPTQ, calibrated on the shipped
text with `semisparse export`'s defaults, 128 × 2048) and measures, for each and for the
dense model and the run directory itself: bytes of the weight file (model total, and the sparse layers' share from
the export manifest), load time (semisparse.load / load_model, median of 3), and WikiText-2 validation perplexity
(SparseGPT/Wanda protocol, seqlen 2048, the first --windows windows) computed in float32 after loading (so the
numbers show what fp16 storage and quantization cost, not fp16 arithmetic).

    .venv/bin/python benchmarks/export_sizes.py RUN_DIR [--windows 32] [--out benchmarks/results/export_sizes.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WIKI = ROOT.parent / "shared" / "data" / "wikitext2" / "wiki.valid.raw"
EXPORTS = [("hf fp16", "hf", "fp16", "none"), ("packed fp16", "packed", "fp16", "none"),
           ("packed fp16 + int8", "packed", "fp16", "int8"), ("packed fp16 + int4 rtn", "packed", "fp16", "int4"),
           ("packed fp16 + int4 gptq", "packed", "fp16", "int4", "gptq")]


def weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors") if p.name != "masks.safetensors")


def timed_load(fn, repeats: int = 3):
    times, loaded = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        loaded = fn()
        times.append(time.perf_counter() - t0)
    return loaded, statistics.median(times)


def main() -> None:
    import torch

    from semisparse import api, data
    from semisparse.api import ppl_eval
    from semisparse.export.load import load_export
    from semisparse.models import load_model, package_versions
    from semisparse.pipeline.show import machine

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "export_sizes.json")
    args = p.parse_args()
    meta = json.loads((args.run_dir / "semisparse.json").read_text())
    text = data.load_text(str(WIKI), split="eval")
    header = {"machine": machine(), "python": platform.python_version(), "versions": package_versions(),
              "run_dir": str(args.run_dir), "dense_model": meta.get("dense_model"), "method": meta.get("method"),
              "pattern": meta.get("pattern"), "calibration": meta.get("calibration"),
              "ppl": f"WikiText-2 validation, seqlen 2048, first {args.windows} windows, float32 compute"}
    print(json.dumps(header, indent=1), flush=True)
    rows = []

    def measure(name, loader, folder, manifest=None):
        (model, tok), load_s = timed_load(loader)
        res = ppl_eval(model.float(), tok, text, seqlen=2048, max_windows=args.windows, progress=False)
        sizes = (manifest or {}).get("sizes") or {}
        rows.append({"model": name, "weight_bytes": weight_bytes(folder), "load_s": load_s, "ppl": res.ppl,
                     "windows": res.windows, "sparse_layer_bytes": (sizes.get("sparse_layers") or {}).get("bytes"),
                     "sizes": sizes or None})
        print(f"{name}: {rows[-1]}", flush=True)

    dense = load_model(meta["dense_model"])
    measure("dense (fp32 file)", lambda: (lambda m: (m.model, m.tokenizer))(load_model(meta["dense_model"])),
            Path(dense.path))
    del dense
    measure("2:4 run directory (fp32, zeros dense)",
            lambda: (lambda m: (m.model, m.tokenizer))(load_model(str(args.run_dir))), args.run_dir)
    with tempfile.TemporaryDirectory(prefix="export-sizes-") as tmp:
        for name, fmt, dtype, quant, *method in EXPORTS:
            out = Path(tmp) / name.replace(" ", "_").replace("+", "")
            manifest = api.export(args.run_dir, out, format=fmt, dtype=dtype, quant=quant,
                                  quant_method=method[0] if method else "rtn")
            measure(name, lambda out=out: load_export(out, dtype=torch.float32)[:2], out, manifest)

    print("\n| model | weight file | sparse layers | load (s) | WikiText-2 ppl |")
    print("|---|---|---|---|---|")
    for r in rows:
        sl = f"{r['sparse_layer_bytes'] / 2**20:.1f} MiB" if r["sparse_layer_bytes"] else ""
        print(f"| {r['model']} | {r['weight_bytes'] / 2**20:.1f} MiB | {sl} | {r['load_s']:.2f} | {r['ppl']:.3f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"header": header, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()

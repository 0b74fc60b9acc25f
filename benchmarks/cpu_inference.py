"""CPU inference: a 2:4 run directory's int8 and int4 exports through the cpu backend against dense fp32 and bf16.

Exports RUN_DIR (fp16, --quant int8 and int4, RTN) into a temporary folder and runs `semisparse bench` on each
(prefill tokens/s at 1 x --prefill-tokens, decode tokens/s with the KV cache at each --batch, --new-tokens greedy
tokens, peak RSS, bytes on disk, the cpu backend's per-layer choice), then times single layers of --shapes
(IN x OUT, default SmolLM2's MLP and LLaMA-2-7B's attention and MLP) at 1 and 16 tokens: a dense fp32 and bf16
matmul, and the int8 and int4 weight-only kernels on the same 2:4 weights, so the kernel regime is visible beyond a
135M model. Prints the machine, versions, a table and the export/dense ratios; writes one JSON.

    .venv/bin/python benchmarks/cpu_inference.py RUN_DIR [--quant int8 --quant int4] [--prefill-tokens 512]
        [--new-tokens 128] [--batch 1 --batch 8] [--repeats 3] [--shapes 576x1536,4096x4096,4096x11008]
        [--lm-head float|int8] [--out benchmarks/results/cpu_inference.json]

Tiny settings for a smoke run: --prefill-tokens 16 --new-tokens 4 --batch 1 --repeats 1 --shapes 64x128.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = "576x1536,4096x4096,4096x11008"
LAYER_TOKENS = (1, 16)


def layer_timings(shapes: list[tuple[int, int]], budget_s: float) -> list[dict]:
    """Median µs of one layer [out, in] (given as IN x OUT) per path and token count, random 2:4 weights."""
    import torch

    from semisparse.export.cpu_backend import QuantizedLayer, kernel_layer, median_seconds, unsupported
    from semisparse.export.pack import pack_layer
    from semisparse.export.quant import default_group_size, quantize
    from semisparse.masks import Pattern, nm_mask

    pattern = Pattern.parse("2:4")
    rows = []
    for in_f, out_f in shapes:
        gen = torch.Generator().manual_seed(0)
        weight = torch.randn(out_f, in_f, generator=gen)
        mask = nm_mask(weight.abs(), pattern)
        weight = weight * mask
        packed = pack_layer(weight, mask, pattern)
        width = packed.values.shape[1]
        paths = {"fp32": torch.nn.Linear(in_f, out_f, bias=False), "bf16": torch.nn.Linear(in_f, out_f, bias=False)}
        with torch.no_grad():
            paths["fp32"].weight.copy_(weight)
            paths["bf16"] = paths["bf16"].to(torch.bfloat16)
            paths["bf16"].weight.copy_(weight)
        for scheme in ("int8", "int4"):
            q = quantize(packed.values, scheme, default_group_size(width), torch.float16)
            layer = QuantizedLayer(q.codes, q.scales, packed.positions, (out_f, in_f), width, q.group_size)
            for dtype, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
                if unsupported(scheme, layer, pattern, dtype) is None:
                    paths[f"{scheme} ({tag} activations)"] = kernel_layer(scheme, layer, pattern, dtype, None)
        for tokens in LAYER_TOKENS:
            x = torch.randn(tokens, in_f, generator=gen)
            row = {"in": in_f, "out": out_f, "tokens": tokens}
            with torch.inference_mode():
                for name, module in paths.items():
                    xd = x.to(torch.bfloat16 if "bf16" in name else torch.float32)
                    row[name] = median_seconds(name, (out_f, in_f), tokens, lambda: module(xd), budget_s=budget_s) * 1e6
            rows.append(row)
            print(" | ".join(f"{k} {v:.1f} µs" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
                  flush=True)
    return rows


def main() -> None:
    from semisparse import api
    from semisparse.rundir import atomic_write_json

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--quant", action="append", choices=["int8", "int4"])
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batch", type=int, action="append")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--shapes", default=SHAPES, help="IN x OUT layer shapes, comma-separated ('' for none)")
    p.add_argument("--layer-budget-s", type=float, default=0.2, help="time per layer measurement")
    p.add_argument("--lm-head", choices=["float", "int8"], default="float",
                   help="the exports' LM head: as exported, or int8 through the kernel (quantized at load)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cpu_inference.json")
    args = p.parse_args()
    quants = args.quant or ["int8", "int4"]
    batches = tuple(args.batch or (1, 8))
    results: dict = {"run_dir": str(args.run_dir), "lm_head": args.lm_head, "exports": {}}
    with tempfile.TemporaryDirectory(prefix="cpu-inference-") as tmp:
        for quant in quants:
            out = Path(tmp) / quant
            api.export(args.run_dir, out, dtype="fp16", quant=quant)
            print(f"\n=== packed fp16 + {quant}, LM head {args.lm_head} ===", flush=True)
            record = api.bench(out, json=Path(tmp) / f"{quant}.json", prefill_tokens=args.prefill_tokens,
                               new_tokens=args.new_tokens, batches=batches, repeats=args.repeats,
                               lm_head=args.lm_head)
            results["exports"][quant] = record
    first = next(iter(results["exports"].values()))
    results["machine"], results["versions"] = first["machine"], first["versions"]
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",") if s.strip()]
    results["layers"] = layer_timings(shapes, args.layer_budget_s) if shapes else []

    print(f"\nmachine: {json.dumps(results['machine'])}\nversions: {json.dumps(results['versions'])}")
    cols = [f"decode b{b}" for b in batches]
    print("\n| model | prefill tok/s | " + " | ".join(f"{c} tok/s" for c in cols) + " | peak RSS MiB | bytes |")
    print("|---" * (4 + len(cols)) + "|")
    for quant, record in results["exports"].items():
        for name, m in record["models"].items():
            if name.startswith("dense") and quant != quants[0]:
                continue  # the dense rows are the same for every export
            label = f"export {quant} ({record['backend']} backend)" if name == "export" else name
            decode = " | ".join(f"{m['decode_tokens_per_s'][str(b)]:.1f}" for b in batches)
            print(f"| {label} | {m['prefill_tokens_per_s']:.0f} | {decode} | {m['peak_rss_bytes'] / 2**20:.0f} | "
                  f"{m['bytes_on_disk']:,} |")
    for quant, record in results["exports"].items():
        for base, ratio in record["ratios"].items():
            print(f"{quant} {base}: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratio.items()))
    atomic_write_json(args.out, results, indent=1)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()

"""`semisparse tokenize` throughput and peak memory, against the in-memory path the trainer uses for text.

For each source (the shipped text, the C4 train sample), two child processes each, so each peak RSS is its own:
  shards     semisparse.api.tokenize(SOURCE, OUT) (streamed, written to uint16 shards)
  in-memory  data.load_text + data.token_stream (what `train --data TEXT` does before training)
Both use the shipped SmolLM2 tokenizer; reported: tokens, seconds, tokens/s, the peak RSS of the child, and the
ratios shards / in-memory. Time it alone on the machine.

    .venv/bin/python benchmarks/tokenize_speed.py [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SEMISPARSE_DATA", ROOT.parent / "shared" / "data"))
SOURCES = {"shipped text (default)": "default", "C4 train sample": str(DATA / "c4" / "c4_train_shard0_first1000.jsonl")}

CHILD = r"""
import json, resource, sys, time
mode, source, out = sys.argv[1:4]
from semisparse.shards.writer import load_tokenizer
tok = load_tokenizer("default")  # loaded before the clock starts in both modes
start = time.perf_counter()
if mode == "shards":
    from semisparse import api
    index = api.tokenize(source, out, overwrite=True, progress=False)
    tokens = index["tokens"]
else:
    from semisparse import data
    tokens = int(data.token_stream(tok, data.load_text(source, "train").docs).numel())
seconds = time.perf_counter() - start
print(json.dumps({"tokens": tokens, "seconds": seconds,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def child(mode: str, source: str, out: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, mode, source, str(out)], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} on {source} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "tokenize_speed.json")
    args = p.parse_args()
    info = machine.describe()
    print(f"machine: {machine.line(info)}")
    rows = {}
    with tempfile.TemporaryDirectory(prefix="tokenize_speed_") as tmp:
        for name, source in SOURCES.items():
            rows[name] = {mode: child(mode, source, Path(tmp) / "shards") for mode in ("in-memory", "shards")}
    print("\n| source | tokens | in-memory tok/s | shards tok/s | shards / in-memory speed | in-memory peak RSS | "
          "shards peak RSS |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        mem, sh = r["in-memory"], r["shards"]
        for rec in (mem, sh):
            rec["tokens_per_s"] = rec["tokens"] / rec["seconds"]
        print(f"| {name} | {sh['tokens']:,} | {mem['tokens_per_s']:,.0f} | {sh['tokens_per_s']:,.0f} | "
              f"{sh['tokens_per_s'] / mem['tokens_per_s']:.2f} | {mem['peak_rss_mib']:.0f} MiB | "
              f"{sh['peak_rss_mib']:.0f} MiB |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from semisparse.rundir import atomic_write_json

    atomic_write_json(args.out, {"machine": info, "rows": rows}, indent=1)
    print(f"\nresults: {args.out}")


if __name__ == "__main__":
    main()

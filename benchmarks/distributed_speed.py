"""Two CPU processes (torchrun, gloo, FSDP2) vs one process: tokens/s of the same AST run (issue 12).

Both train the same model with the same global batch (batch_size x grad_accum sequences a step): one process with
all the machine's threads runs grad_accum micro-batches; under `torchrun --nproc-per-node 2` each process runs half
of them on 1 thread and FSDP2 all-gathers weights and reduce-scatters gradients over gloo. Correctness is the
point of the CPU path (tests/test_distributed.py: the same weights); this records what the wrapper costs on CPU.
Step times come from each run's metrics.jsonl (step_s), after --warmup steps. Run it alone on the machine.

    .venv/bin/python benchmarks/distributed_speed.py [--model default] [--steps 10] [--warmup 2] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def overrides(args) -> dict:
    return {
        "train.tokens": args.steps * args.batch_size * args.grad_accum * args.seq_len, "train.seq_len": args.seq_len,
        "train.batch_size": args.batch_size, "train.grad_accum": args.grad_accum, "train.device": "cpu",
        "optim.lr": 1e-4, "eval.every": 0, "eval.at_start": False, "eval.at_end": False, "checkpoint.every": 0,
        "checkpoint.at_end": False, "log.tensorboard": False, "log.plots": False,
    }


def step_times(run_dir: Path, warmup: int, steps: int) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step_s"] for r in records if "step_s" in r and warmup <= r["step"] < steps - 1]


def launch(args, run_dir: Path, nproc: int) -> list[float]:
    cmd = ["-m", "semisparse", "train", args.model, "--out", str(run_dir), "--recipe", "ast-naive", "--no-progress",
           "--overwrite"]
    sets = [f"--set={k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in overrides(args).items()]
    threads = os.cpu_count() if nproc == 1 else max(1, os.cpu_count() // nproc)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if nproc == 1:
        full = [sys.executable, *cmd, *sets]
    else:
        full = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *cmd, *sets]
    proc = subprocess.run(full, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{nproc}-process run failed:\n{proc.stderr[-3000:]}")
    return step_times(run_dir, args.warmup, args.steps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "distributed_speed.json")
    args = p.parse_args()
    info = machine.describe()
    print(f"machine: {machine.line(info)}")
    tokens_per_step = args.batch_size * args.grad_accum * args.seq_len
    print(f"model {args.model}, ast-naive, {args.batch_size} x {args.grad_accum} x {args.seq_len} = {tokens_per_step} "
          f"tokens a step, {args.steps} steps (median after {args.warmup})")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for nproc in (1, 2):
            times = launch(args, Path(tmp) / f"p{nproc}", nproc)
            median = statistics.median(times)
            rows[nproc] = {"processes": nproc, "step_s_median": median, "tokens_per_s": tokens_per_step / median,
                           "step_s": times}
            print(f"{nproc} process(es): {median:.2f} s/step, {tokens_per_step / median:.0f} tok/s")
    ratio = rows[2]["tokens_per_s"] / rows[1]["tokens_per_s"]
    print(f"2 processes / 1 process tokens/s: {ratio:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from semisparse.rundir import atomic_write_json

    atomic_write_json(args.out, {"machine": info, "settings": vars(args) | {"out": str(args.out)},
                                 "rows": list(rows.values()), "ratio_2_over_1": ratio}, indent=1)
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()

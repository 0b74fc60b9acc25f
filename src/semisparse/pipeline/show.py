"""What `semisparse run` prints: the plan (--dry-run) and the closing summary table."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass

from rich.markup import escape
from rich.table import Table

from semisparse.pipeline.config import PipelineConfig


@dataclass
class DryRun:
    cfg: PipelineConfig
    plan: list[dict]  # runner.plan()
    estimate: object  # estimate.Estimate


def machine() -> str:
    """CPU model, cores and torch threads (or the GPU): the estimates hold for this machine only."""
    import torch

    if torch.cuda.is_available():
        return f"GPU {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"CPU {cpu}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _bytes(n: float | None) -> str:
    if n is None:
        return ""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def print_plan(console, dry: DryRun) -> None:
    est = dry.estimate
    table = Table(title=escape(f"plan for {dry.cfg.out}"))
    for col in ("stage", "status", "what", "estimated time"):
        table.add_column(col, justify="right" if col == "estimated time" else "left")
    for row in dry.plan:
        name = row["stage"]
        status = {"done": "complete: skipped", "resume": "interrupted: resumes", "todo": "runs"}[row["status"]]
        note = est.notes.get(name)
        what = row["does"] + (f" ({note})" if note else "")
        table.add_row(name, status, escape(what), _duration(est.seconds.get(name)))
    table.add_section()
    table.add_row("total", "", "", _duration(sum(est.seconds.values())), style="bold")
    console.print(table)
    if est.train:
        t = est.train
        console.print(f"token budget: {dry.cfg.train.tokens:,} tokens = {t['steps']} optimizer steps of "
                      f"{t['tokens_per_step']:,} tokens ({t['batch_size']} x {t['grad_accum']} x {t['seq_len']})")
    if est.peak_bytes is not None:
        console.print(f"peak memory: about {_bytes(est.peak_bytes)} ({est.peak_what})")
    console.print(f"measured on: {machine()} (random weights of the same shapes; nothing was loaded or written)",
                  markup=False)


def print_summary(console, result) -> None:
    """The closing table: one row per model (dense, one-shot, retrained), then where the report is."""
    specs = sorted({spec for row in result.rows for spec in row["ppl"]})
    table = Table(title=escape(f"semisparse run -> {result.out}"))
    table.add_column("model")
    for spec in specs:
        table.add_column(escape(f"ppl {spec}"), justify="right")
    if any(row.get("mean_acc") is not None for row in result.rows):
        table.add_column("zero-shot mean acc", justify="right")
    for col in ("kept weights (sparse layers)", "model file", "fp16, N:M packed (estimate)"):
        table.add_column(col, justify="right")
    has_zs = any(row.get("mean_acc") is not None for row in result.rows)
    for row in result.rows:
        cells = [escape(row["model"])]
        cells += [f"{row['ppl'][s]:.2f}" if row["ppl"].get(s) is not None else "" for s in specs]
        if has_zs:
            cells.append(f"{100 * row['mean_acc']:.2f}" if row.get("mean_acc") is not None else "")
        kept, total = row.get("kept"), row.get("sparse_total")
        cells.append(f"{kept:,} / {total:,} ({100 * kept / total:.0f}%)" if kept is not None and total else "all")
        cells += [_bytes(row.get("bytes_on_disk")), _bytes(row.get("bytes_fp16_nm"))]
        table.add_row(*cells)
    console.print(table)
    if result.skipped:
        console.print(f"skipped (already complete): {', '.join(result.skipped)}")
    if result.report is not None:
        console.print(f"report: {result.report} (plots beside it)", markup=False)

"""What a run logs while it trains: metrics.jsonl (+ TensorBoard when installed) and its plots, rank 0 only."""

from __future__ import annotations

import json
from pathlib import Path

from semisparse.rundir import METRICS_FILE, PLOTS_DIR, TB_DIR, read_metrics


class MetricsLog:
    """metrics.jsonl (+ TensorBoard when installed), written by rank 0 only."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool) -> None:
        self.enabled = enabled
        self.fh = open(run_dir / METRICS_FILE, "a", encoding="utf-8") if enabled else None
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                SummaryWriter = None
            if SummaryWriter is not None:
                self.tb = SummaryWriter(str(run_dir / TB_DIR))

    def write(self, record: dict) -> None:
        if self.fh is None:
            return
        self.fh.write(json.dumps(record) + "\n")
        self.fh.flush()
        if self.tb is not None:
            x = max(int(record.get("step", 0)), 0)
            for key, value in record.items():
                if key not in ("step",) and isinstance(value, (int, float)) and value is not None:
                    self.tb.add_scalar(key, value, x)

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def write_plots(run_dir: Path) -> list[Path]:
    """PNG plots of loss, flip rates, λ (and lr) and perplexity from metrics.jsonl (matplotlib, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_metrics(run_dir / METRICS_FILE)
    out = run_dir / PLOTS_DIR
    out.mkdir(exist_ok=True)
    panels = [
        ("loss.png", "training loss", "step", ["loss", "ce", "kl"]),
        ("flip_rate.png", "mask flip rate", "step", ["flip_rate", "init_flip_rate"]),
        ("lambda.png", "masked decay \u03bb and learning rate", "step", ["lambda", "lr"]),
        ("eval_ppl.png", "held-out perplexity", "tokens", ["eval_ppl"]),
    ]
    written = []
    for filename, title, xkey, keys in panels:
        series = {k: [(r[xkey], r[k]) for r in records if r.get(k) is not None and xkey in r] for k in keys}
        if not any(series.values()):
            continue
        fig = Figure(figsize=(6, 4))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(111)
        for key, points in series.items():
            if not points:
                continue
            xs, ys = zip(*points)
            if filename == "lambda.png" and key == "lr":
                twin = ax.twinx()
                twin.plot(xs, ys, color="tab:orange", label="lr")
                twin.set_ylabel("lr")
                twin.legend(loc="lower right")
            else:
                ax.plot(xs, ys, marker="." if len(xs) < 50 else None, label=key)
        ax.set_title(title)
        ax.set_xlabel("training tokens" if xkey == "tokens" else "optimizer step")
        ax.legend(loc="upper right")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / filename, dpi=100)
        written.append(out / filename)
    return written

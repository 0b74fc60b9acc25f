"""The report's PNG plots (matplotlib, object-oriented, Agg canvas: no pyplot state, no display needed)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from semisparse.report.markdown import finite
from semisparse.report.perplexity import PROTOCOL_FIELDS
from semisparse.report.runs import RunInfo, metric_series
from semisparse.report.zeroshot import zs_result, zs_tasks, zs_value

#: (metrics.jsonl key, x key, title, y label, log y when the range spans > 10x)
TRAIN_PLOTS: tuple[tuple[str, str, str, str, bool], ...] = (
    ("loss", "tokens", "training loss (total)", "loss", False),
    ("ce", "tokens", "cross-entropy loss", "CE (nats/token)", False),
    ("kl", "tokens", "distillation KL loss", "KL", False),
    ("eval_ppl", "tokens", "evaluation perplexity during training", "perplexity", True),
    ("lambda", "step", "masked-decay strength \u03bb", "\u03bb", False),
    ("flip_rate", "step", "mask flip rate (vs previous mask)", "flip rate", False),
    ("init_flip_rate", "step", "mask flip rate (vs initial mask)", "flip rate", False),
)


def _figure(width: float = 7.0, height: float = 4.2):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> None:
    fig.savefig(path, format="png", bbox_inches="tight")


def _maybe_log(ax, values: list[float]) -> None:
    pos = [v for v in values if v is not None and v > 0 and math.isfinite(v)]
    if pos and max(pos) / min(pos) > 10:
        ax.set_yscale("log")


def plot_train(runs: list[RunInfo], out_dir: Path) -> list[tuple[str, str]]:
    made = []
    for key, xkey, title, ylabel, logy in TRAIN_PLOTS:
        series = [(r.name, *metric_series(r.metrics, key, xkey)) for r in runs if r.metrics]
        series = [s for s in series if s[1]]
        if not series:
            continue
        fig = _figure()
        ax = fig.add_subplot()
        for name, xs, ys in series:
            ax.plot(xs, ys, label=name, linewidth=1.4, marker="o" if len(xs) <= 20 else None, markersize=3)
        ax.set_title(title)
        ax.set_xlabel("training tokens" if xkey == "tokens" else "step")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if logy:
            _maybe_log(ax, [v for _, _, ys in series for v in ys])
        ax.legend(fontsize=8)
        png = f"train_{key}.png"
        _save(fig, out_dir / png)
        made.append((title, png))
    return made


def _colors(labels: list[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(labels) <= 10 else "tab20"]
    return {lab: cmap(i % cmap.N) for i, lab in enumerate(labels)}


def _bar_label(ax, bar, text: str, rotate: bool, color: str = "black") -> None:
    ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=7,
                rotation=90 if rotate else 0, xytext=(0, 2), textcoords="offset points", color=color)


def _legend(ax, colors: dict[str, Any]) -> None:
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=c, label=lab) for lab, c in colors.items()]
    ax.legend(handles=handles, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16),
              ncol=min(3, len(handles)), frameon=False)


def plot_ppl(groups, out_dir: Path) -> str | None:
    """One group of bars per (data, protocol); a group only holds the models measured that way."""
    if not groups:
        return None
    columns: list[tuple[str, list[tuple[str, float]]]] = []
    for spec, by_proto in groups.items():
        for i, (proto, rows) in enumerate(by_proto.items(), 1):
            short = spec if len(spec) <= 28 else "\u2026" + spec[-27:]
            seqlen = proto[PROTOCOL_FIELDS.index("seqlen")]
            label = f"{short}\nseqlen {seqlen}" + (f" (protocol {i})" if len(by_proto) > 1 else "")
            bars = [(r.label, finite(r.rec.get("ppl"))) for r in rows]
            columns.append((label, [(lab, v) for lab, v in bars if v is not None]))
    labels: list[str] = []
    for _, bars in columns:
        labels += [lab for lab, _ in bars if lab not in labels]
    colors = _colors(labels)
    n_bars = sum(len(b) for _, b in columns)
    fig = _figure(max(6.0, 1.5 + 0.55 * n_bars + 0.4 * len(columns)), 4.8)
    ax = fig.add_subplot()
    x, ticks = 0.0, []
    values = []
    for label, bars in columns:
        start = x
        for lab, v in bars:
            (bar,) = ax.bar(x, v, 0.9, color=colors[lab])
            _bar_label(ax, bar, f"{v:.2f}", rotate=len(f"{v:.2f}") > 5)
            values.append(v)
            x += 1
        ticks.append(((start + x - 1) / 2, label))
        x += 0.8  # gap between groups
    ax.set_xticks([t for t, _ in ticks])
    ax.set_xticklabels([lab for _, lab in ticks], fontsize=8)
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title("Perplexity (bars in one group share a protocol)")
    _maybe_log(ax, values)
    ax.margins(y=0.12)
    ax.grid(True, axis="y", alpha=0.3)
    _legend(ax, colors)
    _save(fig, out_dir / "perplexity.png")
    return "perplexity.png"


def plot_zeroshot(runs: list[RunInfo], out_dir: Path) -> str | None:
    """acc per task and the mean, one bar per evaluated model (fixed slots; a missing score is labelled)."""
    tasks = zs_tasks(runs)
    evaluated = [r for r in runs if zs_result(r) is not None]
    if not tasks or not evaluated:
        return None
    colors = _colors([r.name for r in evaluated])
    n = len(evaluated)
    width = 0.8 / n
    fig = _figure(max(6.0, 1.5 + 0.3 * (len(tasks) + 1) * n), 4.8)
    ax = fig.add_subplot()
    for i, r in enumerate(evaluated):
        cells = [zs_value(r, t, "acc") for t in tasks]
        mean = finite(zs_result(r).get("mean_acc"))
        if mean is None:
            got = [v for v, _ in cells if v is not None]
            mean = sum(got) / len(got) if got else None
        cells.append((mean, ""))
        for j, (v, text) in enumerate(cells):
            pos = j - 0.4 + width * (i + 0.5)
            (bar,) = ax.bar(pos, 100 * v if v is not None else 0.0, width, color=colors[r.name])
            if v is None:
                _bar_label(ax, bar, text or "n/a", rotate=True, color="gray")
            else:
                _bar_label(ax, bar, f"{100 * v:.1f}", rotate=n > 3)
    ax.set_xticks(range(len(tasks) + 1))
    ax.set_xticklabels([*tasks, "mean"], fontsize=8, rotation=20 if len(tasks) > 4 else 0,
                       ha="right" if len(tasks) > 4 else "center")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title("Zero-shot accuracy (acc)")
    ax.grid(True, axis="y", alpha=0.3)
    _legend(ax, colors)
    _save(fig, out_dir / "zeroshot.png")
    return "zeroshot.png"

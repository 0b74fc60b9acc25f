"""A Markdown report with plots comparing run directories (dense, one-shot, retrained).

``write_report`` only *reads* run directories (see ARCHITECTURE.md): ``eval.json`` for perplexity and
zero-shot scores, ``semisparse.json`` for provenance, ``masks.safetensors`` / ``slorb.safetensors`` /
``model.safetensors`` for parameter counts (shapes come from the safetensors headers; only the masks are
read, one tensor at a time, to count their kept entries) and ``metrics.jsonl`` for training curves. It
never loads a model and never computes a score.

Layout of ``out_dir``::

    report.md          runs, perplexity (one table per evaluation data and protocol), zero-shot
                       (tasks x models), parameters and size, training summary, links to the plots
    perplexity.png     bar chart, one group of bars per (data, protocol)
    zeroshot.png       bar chart of acc per task (+ mean), one bar per model
    train_<q>.png      one plot per training quantity (loss, ce, kl, lambda, flip_rate, init_flip_rate,
                       eval_ppl), one line per run that logged it

Perplexity numbers are only put side by side when they were measured with the same protocol (data, split,
seqlen, stride, windows, tokens); a data spec measured under several protocols gets one table per protocol
and a warning.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from semisparse.errors import UserError

__all__ = ["PROTOCOL_FIELDS", "TRAIN_PLOTS", "RunInfo", "compressed_bytes_estimate", "read_run", "write_report"]

RUN_META = "semisparse.json"
EVAL_FILE = "eval.json"
METRICS_FILE = "metrics.jsonl"
MASKS_FILE = "masks.safetensors"
SLORB_FILE = "slorb.safetensors"

#: The fields of a perplexity record that define its protocol: two numbers are comparable only if these match.
PROTOCOL_FIELDS = ("data", "split", "seqlen", "stride", "windows", "tokens")

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

NOT_EVALUATED = "not evaluated"
MISSING = "missing"
NOT_RUN = "\u2014"  # em dash: the model was evaluated, but not on this data / task

_PPL_PREFIXES = {"dense": "dense", "pruned": "pruned"}


# --------------------------------------------------------------------------------------------
# Reading a run directory
# --------------------------------------------------------------------------------------------


@dataclass
class RunInfo:
    """Everything the report needs from one run directory."""

    name: str
    path: Path
    meta: dict | None  # semisparse.json (None for a plain model directory, e.g. the dense baseline)
    eval: dict | None  # eval.json (None: not evaluated)
    metrics: list[dict] = field(default_factory=list)  # metrics.jsonl records
    metrics_bad_lines: int = 0
    params_total: int | None = None  # tensor entries stored in model*.safetensors
    model_bytes: int | None = None  # size of model*.safetensors on disk
    weight_dtypes: dict[str, int] = field(default_factory=dict)  # safetensors dtype -> entries
    sparse_layers: int | None = None
    sparse_total: int | None = None  # entries of the sparse layers' weights (mask entries)
    kept: int | None = None  # non-zeros kept by the masks
    kept_source: str | None = None  # "masks.safetensors" | "semisparse.json"
    kept_meta: int | None = None  # semisparse.json sparse_weights.kept, when present
    slorb_S: int | None = None
    slorb_X: int | None = None
    slorb_layers: int | None = None
    slorb_params: int | None = None  # counted extra parameters (S, plus X unless X is a frozen indicator)
    slorb_params_meta: int | None = None

    @property
    def stage(self) -> str:
        if self.meta is None:
            return "model"
        return str(self.meta.get("stage") or "?")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"cannot read {path}: expected a JSON object")
    return data


def _read_metrics(path: Path) -> tuple[list[dict], int]:
    """Records of metrics.jsonl; lines that are not JSON objects (e.g. a line cut by a killed job) are counted, not fatal."""
    records, bad = [], 0
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(rec, dict):
            records.append(rec)
        else:
            bad += 1
    return records, bad


def _safe_open(path: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt")
    except Exception as exc:  # safetensors raises its own error types on corrupt files
        raise UserError(f"cannot read {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def _shapes(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """{tensor name: (shape, safetensors dtype)} from the file header, without reading the tensors."""
    with _safe_open(path) as f:
        out = {}
        for key in f.keys():
            sl = f.get_slice(key)
            out[key] = (tuple(int(d) for d in sl.get_shape()), str(sl.get_dtype()))
        return out


def _numel(shape: Sequence[int]) -> int:
    return math.prod(shape) if shape else 1


def _model_files(run_dir: Path) -> list[Path]:
    single = run_dir / "model.safetensors"
    if single.is_file():
        return [single]
    return sorted(p for p in run_dir.glob("model-*.safetensors") if p.is_file())  # sharded checkpoints


def _count_params(info: RunInfo) -> None:
    files = _model_files(info.path)
    if not files:
        return
    total, size, dtypes = 0, 0, {}
    for path in files:
        size += path.stat().st_size
        for shape, dtype in _shapes(path).values():
            n = _numel(shape)
            total += n
            dtypes[dtype] = dtypes.get(dtype, 0) + n
    info.params_total, info.model_bytes, info.weight_dtypes = total, size, dtypes


def _count_masks(info: RunInfo) -> None:
    sw = (info.meta or {}).get("sparse_weights") or {}
    if isinstance(sw.get("kept"), int):
        info.kept_meta = sw["kept"]
    path = info.path / MASKS_FILE
    if path.is_file():
        kept = total = 0
        with _safe_open(path) as f:
            keys = list(f.keys())
            for key in keys:
                mask = f.get_tensor(key)
                kept += int(mask.count_nonzero())
                total += mask.numel()
        info.sparse_layers, info.sparse_total, info.kept, info.kept_source = len(keys), total, kept, MASKS_FILE
    elif isinstance(sw.get("kept"), int):
        info.kept = sw["kept"]
        info.sparse_total = sw.get("total") if isinstance(sw.get("total"), int) else None
        layers = (info.meta or {}).get("layers_pruned")
        info.sparse_layers = len(layers) if isinstance(layers, list) else None
        info.kept_source = RUN_META


def _count_slorb(info: RunInfo) -> None:
    slorb_meta = (info.meta or {}).get("slorb")
    if isinstance(slorb_meta, dict) and isinstance(slorb_meta.get("params"), int):
        info.slorb_params_meta = slorb_meta["params"]
    path = info.path / SLORB_FILE
    if not path.is_file():
        return
    s = x = 0
    layers = set()
    for key, (shape, _dtype) in _shapes(path).items():
        layer, _, kind = key.rpartition(".")
        if kind == "slorb_S":
            s += _numel(shape)
            layers.add(layer)
        elif kind == "slorb_X":
            x += _numel(shape)
            layers.add(layer)
    train_x = not (isinstance(slorb_meta, dict) and slorb_meta.get("train_x") is False)
    info.slorb_S, info.slorb_X, info.slorb_layers = s, x, len(layers)
    # A frozen X is the block indicator: at inference a plain group sum with no weights (AST.md §4).
    info.slorb_params = s + (x if train_x else 0)


def read_run(run_dir: Path, name: str | None = None) -> RunInfo:
    """Read one run directory (or a plain model directory). Raises UserError if it is not one."""
    path = Path(run_dir)
    if not path.is_dir():
        raise UserError(f"{path} is not a run directory (no such directory)")
    if not (path / "config.json").is_file():
        raise UserError(f"{path} is not a run directory (no config.json)")
    meta = _read_json(path / RUN_META) if (path / RUN_META).is_file() else None
    ev = _read_json(path / EVAL_FILE) if (path / EVAL_FILE).is_file() else None
    info = RunInfo(name=name or path.resolve().name, path=path, meta=meta, eval=ev)
    if (path / METRICS_FILE).is_file():
        info.metrics, info.metrics_bad_lines = _read_metrics(path / METRICS_FILE)
    _count_params(info)
    _count_masks(info)
    _count_slorb(info)
    return info


def _default_names(paths: Sequence[Path]) -> list[str]:
    """Directory names; where two are equal, parent folders are prepended until they differ (then a counter)."""
    resolved = [p.resolve() for p in paths]
    names = [p.name or str(p) for p in resolved]
    depth = 1
    while len(set(names)) < len(names) and depth < 4:
        depth += 1
        dup = {n for n in names if names.count(n) > 1}
        names = ["/".join(p.parts[-depth:]) if n in dup else n for n, p in zip(names, resolved)]
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n} ({seen[n]})")
    return out


# --------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    """A Markdown table cell: pipes escaped, newlines flattened."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def _row(cells: Iterable[Any]) -> str:
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def _table(header: Sequence[Any], rows: Iterable[Sequence[Any]], align: Sequence[str] | None = None) -> list[str]:
    align = align or ["l"] + ["r"] * (len(header) - 1)
    sep = "| " + " | ".join("---:" if a == "r" else "---" for a in align) + " |"
    return [_row(header), sep, *(_row(r) for r in rows)]


def _int(n: int | None) -> str:
    return NOT_RUN if n is None else f"{n:,}"


def _bytes(n: float | None) -> str:
    if n is None:
        return NOT_RUN
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit} ({int(round(n)):,} B)"
    return f"{int(round(n)):,} B"


def _pct(v: float | None) -> str:
    return NOT_RUN if v is None else f"{100 * v:.2f}"


def _num(v: Any) -> float | None:
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    return None


def _ppl(v: Any) -> str:
    x = _num(v)
    return NOT_RUN if x is None else f"{x:.2f}"


def _short(value: Any, width: int = 60) -> str:
    if value is None:
        return NOT_RUN
    if isinstance(value, dict):
        for key in ("name", "path", "recipe", "model", "source"):
            if isinstance(value.get(key), str):
                return _short(value[key], width)
        value = json.dumps(value, sort_keys=True)
    s = str(value)
    return s if len(s) <= width else s[: width - 1] + "\u2026"


# --------------------------------------------------------------------------------------------
# Perplexity
# --------------------------------------------------------------------------------------------


def _protocol(rec: dict) -> tuple:
    return tuple(rec.get(k) for k in PROTOCOL_FIELDS)


def _protocol_text(proto: tuple) -> str:
    def value(k: str, v: Any) -> str:
        if k == "data":
            return f"`{v}`"
        if k in ("tokens", "windows") and isinstance(v, int):
            return f"{v:,}"
        return NOT_RUN if v is None else str(v)

    return ", ".join(f"{k}={value(k, v)}" for k, v in zip(PROTOCOL_FIELDS, proto))


@dataclass
class _PplRow:
    label: str
    run: str  # the run this row was read from
    rec: dict


def _ppl_groups(runs: list[RunInfo]) -> dict[str, dict[tuple, list[_PplRow]]]:
    """{data spec: {protocol: rows}} in first-seen order; dense rows of several runs deduplicated."""
    groups: dict[str, dict[tuple, list[_PplRow]]] = {}
    seen_dense: set = set()
    for run in runs:
        records = (run.eval or {}).get("perplexity") or {}
        if not isinstance(records, dict):
            continue
        for key, rec in records.items():
            if not isinstance(rec, dict):
                continue
            prefix, sep, spec = str(key).partition(":")
            if not sep or prefix not in _PPL_PREFIXES:
                prefix, spec = "", str(key)  # a plain DATA spec (which may itself contain ':')
            proto = _protocol(rec)
            if prefix == "dense":
                dense = (run.meta or {}).get("dense_model") or (run.meta or {}).get("source_model")
                label = f"dense: {dense}" if dense else f"{run.name} (dense source)"
                ident = (label, spec, proto, rec.get("ppl"))
                if ident in seen_dense:
                    continue
                seen_dense.add(ident)
            elif prefix == "pruned":
                label = f"{run.name} (right after pruning)"
            else:
                label = run.name
            groups.setdefault(spec, {}).setdefault(proto, []).append(_PplRow(label, run.name, rec))
    return groups


def _ppl_section(runs: list[RunInfo], groups, plot: str | None) -> list[str]:
    out = ["## Perplexity", ""]
    out.append(
        "Lower is better. Non-overlapping windows of `seqlen` tokens (the SparseGPT/Wanda protocol); "
        "`tokens` is the number of predicted tokens. Numbers are only put in the same table when they were "
        "measured with the same protocol (data, split, seqlen, stride, windows, tokens)."
    )
    out.append("")
    unevaluated = [r.name for r in runs if r.eval is None]
    if not groups:
        out += ["No perplexity results.", ""]
    for spec, by_proto in groups.items():
        out += [f"### `{spec}`", ""]
        if len(by_proto) > 1:
            out += [
                f"> **Warning: protocols differ** \u2014 `{spec}` was measured with {len(by_proto)} different protocols; "
                "the tables below are not comparable with each other.",
                "",
            ]
        for i, (proto, rows) in enumerate(by_proto.items(), 1):
            tag = f" ({i} of {len(by_proto)})" if len(by_proto) > 1 else ""
            out += [f"Protocol{tag}: {_protocol_text(proto)}", ""]
            out += _table(["model", "ppl", "nll (nats/token)"],
                          [[r.label, _ppl(r.rec.get("ppl")),
                            NOT_RUN if _num(r.rec.get("nll")) is None else f"{r.rec['nll']:.4f}"] for r in rows])
            out.append("")
        measured = {r.run for rows in by_proto.values() for r in rows if not r.label.startswith("dense: ")}
        others = [r.name for r in runs if r.name not in measured and r.eval is not None]
        if others:
            out += [f"Not evaluated on `{spec}`: {', '.join(others)}.", ""]
    if unevaluated:
        out += [f"{NOT_EVALUATED.capitalize()} (no {EVAL_FILE}): {', '.join(unevaluated)}.", ""]
    if plot:
        out += [f"![perplexity]({plot})", ""]
    return out


# --------------------------------------------------------------------------------------------
# Zero-shot
# --------------------------------------------------------------------------------------------


def _zs(run: RunInfo) -> dict | None:
    zs = (run.eval or {}).get("zeroshot")
    return zs if isinstance(zs, dict) else None


def _zs_tasks(runs: list[RunInfo]) -> list[str]:
    names: list[str] = []
    for run in runs:
        zs = _zs(run)
        if zs is None:
            continue
        for t in list((zs.get("tasks") or {})) + list(zs.get("missing") or []):
            if t not in names:
                names.append(t)
    return names


def _zs_value(run: RunInfo, task: str, metric: str) -> tuple[float | None, str]:
    """(value, cell text) of one task metric of one run."""
    zs = _zs(run)
    if zs is None:
        return None, NOT_EVALUATED
    entry = (zs.get("tasks") or {}).get(task)
    if entry is None:
        return None, MISSING if task in (zs.get("missing") or []) else NOT_RUN
    v = _num(entry.get(metric))
    if v is None:
        return None, NOT_RUN
    err = _num(entry.get(f"{metric}_stderr"))
    return v, _pct(v) + (f" \u00b1 {100 * err:.2f}" if err is not None else "")


def _zs_section(runs: list[RunInfo], plot: str | None) -> list[str]:
    out = ["## Zero-shot", ""]
    tasks = _zs_tasks(runs)
    if not tasks:
        out += ["No zero-shot results." if any(r.eval for r in runs) else "No run has been evaluated.", ""]
        return out
    out += [
        "Accuracy in % \u00b1 standard error (lm-evaluation-harness, 0-shot). "
        f"`{MISSING}`: the task's data files were missing; `{NOT_RUN}`: the task was not run for that model; "
        f"`{NOT_EVALUATED}`: the model has no zero-shot results.",
        "",
    ]
    evaluated = [r for r in runs if _zs(r) is not None]
    # Protocol: documents scored per task and the document limit must agree to compare a row.
    limits = {r.name: _zs(r).get("limit") for r in evaluated}
    if len(set(map(str, limits.values()))) > 1:
        out += ["> **Warning: document limits differ** \u2014 " +
                ", ".join(f"{n}: {'all' if v is None else v}" for n, v in limits.items()) + ".", ""]
    modes = {r.name: _zs(r).get("mode") for r in evaluated}
    if len(set(map(str, modes.values()))) > 1:
        out += ["> **Warning: data sources differ** (offline local files vs hub) \u2014 " +
                ", ".join(f"{n}: {v}" for n, v in modes.items()) + ".", ""]

    names = [r.name for r in runs]
    for metric in ("acc", "acc_norm"):
        has = [t for t in tasks if any(_zs_value(r, t, metric)[0] is not None for r in runs)]
        if not has:
            continue
        rows, mismatched = [], []
        per_run_vals: dict[str, dict[str, float]] = {r.name: {} for r in runs}
        for t in has:
            ndocs = {}
            cells = []
            for r in runs:
                v, text = _zs_value(r, t, metric)
                cells.append(text)
                if v is not None:
                    per_run_vals[r.name][t] = v
                    entry = (_zs(r).get("tasks") or {}).get(t) or {}
                    ndocs[r.name] = entry.get("n_docs")
            distinct = {n for n in ndocs.values() if n is not None}
            if len(distinct) > 1:
                mismatched.append(t)
            n_text = _int(distinct.pop()) if len(distinct) == 1 else ("differs" if distinct else NOT_RUN)
            rows.append([t, n_text, *cells])
        # mean rows
        mean_cells = []
        for r in runs:
            vals = per_run_vals[r.name]
            zs = _zs(r)
            if zs is None:
                mean_cells.append(NOT_EVALUATED)
            elif metric == "acc" and _num(zs.get("mean_acc")) is not None:
                mean_cells.append(f"{_pct(zs['mean_acc'])} ({len(zs.get('mean_acc_over') or vals)})")
            elif vals:
                mean_cells.append(f"{_pct(sum(vals.values()) / len(vals))} ({len(vals)})")
            else:
                mean_cells.append(NOT_RUN)
        rows.append(["**mean** (number of tasks)", "", *mean_cells])
        task_sets = {frozenset(per_run_vals[r.name]) for r in evaluated}
        common = [t for t in has if all(t in per_run_vals[r.name] for r in evaluated)]
        if len(task_sets) > 1 and common:
            rows.append([f"**mean over common tasks** ({len(common)})", "",
                         *(_pct(sum(per_run_vals[r.name][t] for t in common) / len(common)) if _zs(r) else NOT_EVALUATED
                           for r in runs)])
        out += [f"### {metric}" + (" (length-normalised)" if metric == "acc_norm" else ""), ""]
        out += _table(["task", "n docs", *names], rows)
        out.append("")
        if len(task_sets) > 1:
            out += ["> Models were scored on different task sets: compare the *mean over common tasks* row"
                    + (f" ({', '.join(common)})." if common else " \u2014 there is no task common to all models."), ""]
        if mismatched:
            detail = "; ".join(
                f"{t}: " + ", ".join(f"{r.name}={((_zs(r).get('tasks') or {}).get(t) or {}).get('n_docs')}" for r in evaluated)
                for t in mismatched)
            out += [f"> **Warning: different numbers of documents scored** \u2014 {detail}.", ""]
    notes = {}
    for r in evaluated:
        for t, e in (_zs(r).get("tasks") or {}).items():
            if isinstance(e, dict) and e.get("note"):
                notes[t] = e["note"]
    if notes:
        out += ["Known differences of the local task files: " + "; ".join(f"{t}: {n}" for t, n in notes.items()) + ".", ""]
    if plot:
        out += [f"![zero-shot accuracy]({plot})", ""]
    return out


# --------------------------------------------------------------------------------------------
# Parameters and size
# --------------------------------------------------------------------------------------------

FP16_BYTES = 2
META_BITS_PER_KEPT = 2


def compressed_bytes_estimate(params_total: int, sparse_total: int, kept: int, slorb_params: int = 0) -> float:
    """Bytes of an fp16 2:4 compressed model: dense weights in fp16, each kept value of a sparse layer in fp16
    plus 2 bits of position metadata (its index within its group of 4), SLoRB parameters in fp16.

        bytes = 2 * (P_total - P_sparse) + 2 * K + K * 2 / 8 + 2 * P_slorb
    """
    return (FP16_BYTES * (params_total - sparse_total) + FP16_BYTES * kept + kept * META_BITS_PER_KEPT / 8
            + FP16_BYTES * slorb_params)


def _params_section(runs: list[RunInfo]) -> list[str]:
    out = ["## Parameters and size", ""]
    header = ["", *(r.name for r in runs)]

    def row(label, fn):
        return [label, *(fn(r) for r in runs)]

    def density(r):
        return NOT_RUN if not r.sparse_total or r.kept is None else f"{100 * r.kept / r.sparse_total:.2f} %"

    def nonzero(r):
        if r.params_total is None:
            return NOT_RUN
        if r.kept is None or r.sparse_total is None:
            return _int(r.params_total)
        return _int(r.params_total - r.sparse_total + r.kept)

    def dense_fp16(r):
        return NOT_RUN if r.params_total is None else _bytes(FP16_BYTES * r.params_total)

    def compressed(r):
        if r.params_total is None:
            return NOT_RUN
        return _bytes(compressed_bytes_estimate(r.params_total, r.sparse_total or 0,
                                                r.kept if r.kept is not None else 0, r.slorb_params or 0)
                      if r.kept is not None and r.sparse_total is not None
                      else FP16_BYTES * (r.params_total + (r.slorb_params or 0)))

    def kept_cell(r):
        if r.kept is None:
            return NOT_RUN
        text = _int(r.kept)
        if r.kept_source == RUN_META:
            text += f" (from {RUN_META})"
        elif r.kept_meta is not None and r.kept_meta != r.kept:
            text += f" ({RUN_META} says {r.kept_meta:,})"
        return text

    def slorb_cell(r):
        if r.slorb_params is None:
            return NOT_RUN if r.slorb_params_meta is None else f"{r.slorb_params_meta:,} (from {RUN_META})"
        text = _int(r.slorb_params)
        if r.slorb_params_meta is not None and r.slorb_params_meta != r.slorb_params:
            text += f" ({RUN_META} says {r.slorb_params_meta:,})"
        return text

    def slorb_pct(r):
        if r.slorb_params is None or not r.params_total:
            return NOT_RUN
        return f"{100 * r.slorb_params / r.params_total:.3f} %"

    rows = [
        row("sparse layers", lambda r: _int(r.sparse_layers)),
        row("sparse-layer weights", lambda r: _int(r.sparse_total)),
        row("kept non-zeros (sparse layers)", kept_cell),
        row("density of sparse layers", density),
        row("total parameters (model.safetensors)", lambda r: _int(r.params_total)),
        row("non-zero parameters (total \u2212 pruned)", nonzero),
        row("SLoRB S entries", lambda r: _int(r.slorb_S)),
        row("SLoRB X entries", lambda r: _int(r.slorb_X)),
        row("SLoRB extra parameters", slorb_cell),
        row("SLoRB extra / total", slorb_pct),
        row("model.safetensors on disk", lambda r: _bytes(r.model_bytes)),
        row("stored dtypes", lambda r: ", ".join(f"{k}" for k in r.weight_dtypes) or NOT_RUN),
        row("dense fp16 size (estimate)", dense_fp16),
        row("compressed 2:4 fp16 size (estimate)", compressed),
    ]
    out += _table(header, rows)
    out += [
        "",
        "*Kept non-zeros* count the `True` entries of `masks.safetensors` (or `sparse_weights.kept` of "
        "`semisparse.json` when there is no mask file). *Total parameters* are the entries of the tensors stored "
        "in `model.safetensors` (read from its header; a tied output embedding is stored once). The pruned zeros "
        "are stored densely, so the file is as large as the dense model's. *SLoRB extra parameters* are the entries "
        "of `slorb_S` ([out, in/k]) plus `slorb_X` ([in/k, in]) from `slorb.safetensors` shapes; a frozen X "
        "(`train_x: false`, the block indicator) is a weight-free group sum at inference and is not counted.",
        "",
        "Compressed size estimate (fp16 values, 2-bit position metadata per kept value of a 2:4 layer):",
        "",
        "    bytes = 2 \u00b7 (P_total \u2212 P_sparse) + 2 \u00b7 K + 2/8 \u00b7 K + 2 \u00b7 P_slorb",
        "",
        "with P_total the total parameters, P_sparse the sparse-layer weights, K the kept non-zeros and P_slorb the "
        "SLoRB extra parameters. For exact 2:4 (K = P_sparse / 2) the sparse layers shrink to 1.125 of 2 bytes per "
        "weight (56.25 %). Dense models: 2 \u00b7 P_total.",
        "",
    ]
    return out


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _series(records: list[dict], y: str, x: str) -> tuple[list[float], list[float]]:
    """(xs, ys) of the records holding both keys; a later record for the same x (a resumed run) wins."""
    points: dict[float, float] = {}
    for rec in records:
        xv, yv = rec.get(x), rec.get(y)
        if isinstance(xv, (int, float)) and not isinstance(xv, bool) and isinstance(yv, (int, float)) \
                and not isinstance(yv, bool):
            points[float(xv)] = float(yv)
    xs = sorted(points)
    return xs, [points[v] for v in xs]


def _last(records: list[dict], key: str) -> Any:
    for rec in reversed(records):
        if key in rec and rec[key] is not None:
            return rec[key]
    return None


def _train_section(runs: list[RunInfo], plots: list[tuple[str, str]]) -> list[str]:
    trained = [r for r in runs if r.metrics or r.metrics_bad_lines]
    if not trained:
        return []
    out = ["## Training", ""]
    rows = []
    for r in trained:
        m = r.metrics
        steps = [v for v in (rec.get("step") for rec in m) if isinstance(v, (int, float))]
        eval_ppls = [v for v in (_num(rec.get("eval_ppl")) for rec in m) if v is not None]

        def fmt(v, spec=".4f"):
            v = _num(v)
            return NOT_RUN if v is None else format(v, spec)

        rows.append([
            r.name,
            _int(int(max(steps))) if steps else NOT_RUN,
            _int(_last(m, "tokens")) if isinstance(_last(m, "tokens"), int) else NOT_RUN,
            fmt(_last(m, "loss")), fmt(_last(m, "ce")), fmt(_last(m, "kl")),
            fmt(_last(m, "eval_ppl"), ".2f"), fmt(min(eval_ppls) if eval_ppls else None, ".2f"),
            fmt(_last(m, "flip_rate"), ".4g"),
            fmt(_last(m, "tokens_per_s"), ",.0f"),
        ])
    out += _table(["run", "last step", "tokens", "loss", "ce", "kl", "last eval ppl", "best eval ppl",
                   "last flip rate", "tokens/s"], rows)
    out.append("")
    bad = [f"{r.name}: {r.metrics_bad_lines}" for r in trained if r.metrics_bad_lines]
    if bad:
        out += [f"Unreadable lines skipped in {METRICS_FILE}: {', '.join(bad)}.", ""]
    for title, png in plots:
        out += [f"![{title}]({png})", ""]
    return out


# --------------------------------------------------------------------------------------------
# Plots (matplotlib, object-oriented, Agg canvas: no pyplot state, no display needed)
# --------------------------------------------------------------------------------------------


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


def _plot_train(runs: list[RunInfo], out_dir: Path) -> list[tuple[str, str]]:
    made = []
    for key, xkey, title, ylabel, logy in TRAIN_PLOTS:
        series = [(r.name, *_series(r.metrics, key, xkey)) for r in runs if r.metrics]
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


def _plot_ppl(groups, out_dir: Path) -> str | None:
    """One group of bars per (data, protocol); a group only holds the models measured that way."""
    if not groups:
        return None
    columns: list[tuple[str, list[tuple[str, float]]]] = []
    for spec, by_proto in groups.items():
        for i, (proto, rows) in enumerate(by_proto.items(), 1):
            short = spec if len(spec) <= 28 else "\u2026" + spec[-27:]
            seqlen = proto[PROTOCOL_FIELDS.index("seqlen")]
            label = f"{short}\nseqlen {seqlen}" + (f" (protocol {i})" if len(by_proto) > 1 else "")
            bars = [(r.label, _num(r.rec.get("ppl"))) for r in rows]
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


def _plot_zeroshot(runs: list[RunInfo], out_dir: Path) -> str | None:
    """acc per task and the mean, one bar per evaluated model (fixed slots; a missing score is labelled)."""
    tasks = _zs_tasks(runs)
    evaluated = [r for r in runs if _zs(r) is not None]
    if not tasks or not evaluated:
        return None
    colors = _colors([r.name for r in evaluated])
    n = len(evaluated)
    width = 0.8 / n
    fig = _figure(max(6.0, 1.5 + 0.3 * (len(tasks) + 1) * n), 4.8)
    ax = fig.add_subplot()
    for i, r in enumerate(evaluated):
        cells = [_zs_value(r, t, "acc") for t in tasks]
        mean = _num(_zs(r).get("mean_acc"))
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


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


def _runs_section(runs: list[RunInfo]) -> list[str]:
    rows = []
    for r in runs:
        m = r.meta or {}
        slorb = m.get("slorb")
        slorb_text = (f"k={slorb.get('k')}, train_x={slorb.get('train_x')}" if isinstance(slorb, dict)
                      else ("yes" if r.slorb_params is not None else NOT_RUN))
        rows.append([
            r.name, f"`{r.path}`", r.stage, m.get("method") or NOT_RUN, m.get("pattern") or NOT_RUN,
            _short(m.get("source_model")), _short(m.get("dense_model")), _short(m.get("init")),
            _short(m.get("recipe")), slorb_text,
            "yes" if r.eval is not None else NOT_EVALUATED,
        ])
    return ["## Runs", "", *_table(["name", "path", "stage", "method", "pattern", "source model", "dense model",
                                    "init", "recipe", "SLoRB", EVAL_FILE], rows, ["l"] * 11), ""]


def write_report(run_dirs: list[Path], out_dir: Path, names: list[str] | None = None) -> Path:
    """Write ``out_dir/report.md`` and its PNG plots comparing ``run_dirs``; returns the report's path.

    Args:
        run_dirs: run directories (or plain model directories, e.g. the dense baseline), in display order.
        out_dir: created if needed; existing plots of the same names are overwritten.
        names: display names, one per run directory; default: the directory names (made unique).

    Raises:
        UserError: no run directory, a directory without config.json, unreadable JSON/safetensors,
            names of the wrong length or not unique.
    """
    run_dirs = [Path(p) for p in run_dirs]
    if not run_dirs:
        raise UserError("no run directories to report on")
    if names is not None:
        names = [str(n) for n in names]
        if len(names) != len(run_dirs):
            raise UserError(f"{len(names)} names given for {len(run_dirs)} run directories")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise UserError(f"report names must be unique; repeated: {', '.join(dup)}")
    else:
        for p in run_dirs:
            if not p.is_dir():
                raise UserError(f"{p} is not a run directory (no such directory)")
        names = _default_names(run_dirs)
    runs = [read_run(p, n) for p, n in zip(run_dirs, names)]

    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create report folder {out_dir}: {exc.strerror or exc}") from None

    groups = _ppl_groups(runs)
    ppl_png = _plot_ppl(groups, out_dir)
    zs_png = _plot_zeroshot(runs, out_dir)
    train_pngs = _plot_train(runs, out_dir)

    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    lines = [
        "# semisparse report",
        "",
        f"Generated {now} from {len(runs)} run director{'y' if len(runs) == 1 else 'ies'}: "
        + ", ".join(r.name for r in runs) + ".",
        "",
    ]
    lines += _runs_section(runs)
    lines += _ppl_section(runs, groups, ppl_png)
    lines += _zs_section(runs, zs_png)
    lines += _params_section(runs)
    lines += _train_section(runs, train_pngs)
    report = out_dir / "report.md"
    report.write_text("\n".join(lines).rstrip("\n") + "\n", encoding="utf-8")
    return report

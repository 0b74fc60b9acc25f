"""The zero-shot section: tasks x models, acc and acc_norm with standard errors, means and protocol warnings."""

from __future__ import annotations

from semisparse.report.markdown import MISSING, NOT_EVALUATED, NOT_RUN, finite, fmt_int, fmt_pct, table
from semisparse.report.runs import RunInfo


def zs_result(run: RunInfo) -> dict | None:
    zs = (run.eval or {}).get("zeroshot")
    return zs if isinstance(zs, dict) else None


def zs_tasks(runs: list[RunInfo]) -> list[str]:
    names: list[str] = []
    for run in runs:
        zs = zs_result(run)
        if zs is None:
            continue
        for t in list((zs.get("tasks") or {})) + list(zs.get("missing") or []):
            if t not in names:
                names.append(t)
    return names


def zs_value(run: RunInfo, task: str, metric: str) -> tuple[float | None, str]:
    """(value, cell text) of one task metric of one run."""
    zs = zs_result(run)
    if zs is None:
        return None, NOT_EVALUATED
    entry = (zs.get("tasks") or {}).get(task)
    if entry is None:
        return None, MISSING if task in (zs.get("missing") or []) else NOT_RUN
    v = finite(entry.get(metric))
    if v is None:
        return None, NOT_RUN
    err = finite(entry.get(f"{metric}_stderr"))
    return v, fmt_pct(v) + (f" \u00b1 {100 * err:.2f}" if err is not None else "")


def zs_section(runs: list[RunInfo], plot: str | None) -> list[str]:
    out = ["## Zero-shot", ""]
    tasks = zs_tasks(runs)
    if not tasks:
        out += ["No zero-shot results." if any(r.eval for r in runs) else "No run has been evaluated.", ""]
        return out
    out += [
        "Accuracy in % \u00b1 standard error (lm-evaluation-harness, 0-shot). "
        f"`{MISSING}`: the task's data files were missing; `{NOT_RUN}`: the task was not run for that model; "
        f"`{NOT_EVALUATED}`: the model has no zero-shot results.",
        "",
    ]
    evaluated = [r for r in runs if zs_result(r) is not None]
    # Protocol: documents scored per task and the document limit must agree to compare a row.
    limits = {r.name: zs_result(r).get("limit") for r in evaluated}
    if len(set(map(str, limits.values()))) > 1:
        out += ["> **Warning: document limits differ** \u2014 " +
                ", ".join(f"{n}: {'all' if v is None else v}" for n, v in limits.items()) + ".", ""]
    modes = {r.name: zs_result(r).get("mode") for r in evaluated}
    if len(set(map(str, modes.values()))) > 1:
        out += ["> **Warning: data sources differ** (offline local files vs hub) \u2014 " +
                ", ".join(f"{n}: {v}" for n, v in modes.items()) + ".", ""]

    names = [r.name for r in runs]
    for metric in ("acc", "acc_norm"):
        has = [t for t in tasks if any(zs_value(r, t, metric)[0] is not None for r in runs)]
        if not has:
            continue
        rows, mismatched = [], []
        per_run_vals: dict[str, dict[str, float]] = {r.name: {} for r in runs}
        for t in has:
            ndocs = {}
            cells = []
            for r in runs:
                v, text = zs_value(r, t, metric)
                cells.append(text)
                if v is not None:
                    per_run_vals[r.name][t] = v
                    entry = (zs_result(r).get("tasks") or {}).get(t) or {}
                    ndocs[r.name] = entry.get("n_docs")
            distinct = {n for n in ndocs.values() if n is not None}
            if len(distinct) > 1:
                mismatched.append(t)
            n_text = fmt_int(distinct.pop()) if len(distinct) == 1 else ("differs" if distinct else NOT_RUN)
            rows.append([t, n_text, *cells])
        # mean rows
        mean_cells = []
        for r in runs:
            vals = per_run_vals[r.name]
            zs = zs_result(r)
            if zs is None:
                mean_cells.append(NOT_EVALUATED)
            elif metric == "acc" and finite(zs.get("mean_acc")) is not None:
                mean_cells.append(f"{fmt_pct(zs['mean_acc'])} ({len(zs.get('mean_acc_over') or vals)})")
            elif vals:
                mean_cells.append(f"{fmt_pct(sum(vals.values()) / len(vals))} ({len(vals)})")
            else:
                mean_cells.append(NOT_RUN)
        rows.append(["**mean** (number of tasks)", "", *mean_cells])
        task_sets = {frozenset(per_run_vals[r.name]) for r in evaluated}
        common = [t for t in has if all(t in per_run_vals[r.name] for r in evaluated)]
        if len(task_sets) > 1 and common:
            rows.append([f"**mean over common tasks** ({len(common)})", "",
                         *(fmt_pct(sum(per_run_vals[r.name][t] for t in common) / len(common)) if zs_result(r) else NOT_EVALUATED
                           for r in runs)])
        out += [f"### {metric}" + (" (length-normalised)" if metric == "acc_norm" else ""), ""]
        out += table(["task", "n docs", *names], rows)
        out.append("")
        if len(task_sets) > 1:
            out += ["> Models were scored on different task sets: compare the *mean over common tasks* row"
                    + (f" ({', '.join(common)})." if common else " \u2014 there is no task common to all models."), ""]
        if mismatched:
            detail = "; ".join(
                f"{t}: " + ", ".join(f"{r.name}={((zs_result(r).get('tasks') or {}).get(t) or {}).get('n_docs')}" for r in evaluated)
                for t in mismatched)
            out += [f"> **Warning: different numbers of documents scored** \u2014 {detail}.", ""]
    notes = {}
    for r in evaluated:
        for t, e in (zs_result(r).get("tasks") or {}).items():
            if isinstance(e, dict) and e.get("note"):
                notes[t] = e["note"]
    if notes:
        out += ["Known differences of the local task files: " + "; ".join(f"{t}: {n}" for t, n in notes.items()) + ".", ""]
    if plot:
        out += [f"![zero-shot accuracy]({plot})", ""]
    return out

"""A console table of a ``run_zeroshot`` result (rich, imported when the table is made)."""

from __future__ import annotations

from semisparse.evaluate.zeroshot.harness import finite_number


def zeroshot_table(result: dict) -> "rich.table.Table":  # noqa: F821 (rich imported lazily)
    """A rich table of a ``run_zeroshot`` result: task, acc ± stderr, acc_norm ± stderr, documents scored.

    Values are percentages; tasks without ``acc_norm`` get an empty cell. Tasks whose local files are
    missing get a ``missing`` row; the last row is the mean ``acc`` over the tasks that ran.
    """
    from rich.table import Table

    def pct(entry: dict, metric: str) -> str:
        value = finite_number(entry.get(metric))
        if value is None:
            return ""
        err = finite_number(entry.get(f"{metric}_stderr"))
        return f"{100 * value:.2f}" + (f" ± {100 * err:.2f}" if err is not None else "")

    limit = result.get("limit")
    title = f"zero-shot ({result.get('mode', '?')}" + (f", limit {limit}" if limit is not None else "") + ")"
    table = Table(title=title)
    table.add_column("task")
    table.add_column("acc (%)", justify="right")
    table.add_column("acc_norm (%)", justify="right")
    table.add_column("n docs", justify="right")
    for name, entry in (result.get("tasks") or {}).items():
        n, total = entry.get("n_docs"), entry.get("n_docs_total")
        docs = "" if n is None else (f"{n}/{total}" if total is not None and total != n else f"{n}")
        table.add_row(name, pct(entry, "acc"), pct(entry, "acc_norm"), docs)
    for name in result.get("missing") or []:
        table.add_row(name, "missing", "missing", "", style="dim")
    mean = finite_number(result.get("mean_acc"))
    over = result.get("mean_acc_over") or []
    table.add_section()
    table.add_row(f"mean ({len(over)} tasks)", "" if mean is None else f"{100 * mean:.2f}", "", "", style="bold")
    return table

"""``write_report``: read the run directories, draw the plots, put the sections together into report.md."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

from semisparse.errors import UserError
from semisparse.report.perplexity import ppl_groups, ppl_section
from semisparse.report.plots import plot_ppl, plot_train, plot_zeroshot
from semisparse.report.runs import default_names, read_run
from semisparse.report.sections import params_section, runs_section, train_section
from semisparse.report.zeroshot import zs_section
from semisparse.rundir import atomic_write_text

REPORT_FILE = "report.md"


def write_report(
    run_dirs: list[Path],
    out_dir: Path,
    names: list[str] | None = None,
    eval_files: list[Path | None] | None = None,
) -> Path:
    """Write ``out_dir/report.md`` and its PNG plots comparing ``run_dirs``; returns the report's path.

    Args:
        run_dirs: run directories (or plain model directories, e.g. the dense baseline), in display order.
        out_dir: created if needed; existing plots of the same names are overwritten.
        names: display names, one per run directory; default: the directory names (made unique).
        eval_files: one entry per run directory: a results file read instead of that run's ``eval.json``
            (e.g. the dense model's results kept outside its cache folder), or None for ``eval.json``.

    Raises:
        UserError: no run directory, a directory without config.json, unreadable JSON/safetensors,
            names of the wrong length or not unique, eval_files of the wrong length or naming a missing file.
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
        names = default_names(run_dirs)
    if eval_files is None:
        eval_files = [None] * len(run_dirs)
    elif len(eval_files) != len(run_dirs):
        raise UserError(f"{len(eval_files)} eval files given for {len(run_dirs)} run directories")
    runs = [read_run(p, n, e) for p, n, e in zip(run_dirs, names, eval_files)]

    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create report folder {out_dir}: {exc.strerror or exc}") from None

    groups = ppl_groups(runs)
    ppl_png = plot_ppl(groups, out_dir)
    zs_png = plot_zeroshot(runs, out_dir)
    train_pngs = plot_train(runs, out_dir)

    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    lines = [
        "# semisparse report",
        "",
        f"Generated {now} from {len(runs)} run director{'y' if len(runs) == 1 else 'ies'}: "
        + ", ".join(r.name for r in runs) + ".",
        "",
    ]
    lines += runs_section(runs)
    lines += ppl_section(runs, groups, ppl_png)
    lines += zs_section(runs, zs_png)
    lines += params_section(runs)
    lines += train_section(runs, train_pngs)
    return atomic_write_text(out_dir / REPORT_FILE, "\n".join(lines).rstrip("\n") + "\n")

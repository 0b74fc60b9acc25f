"""``semisparse run``: prune -> train -> eval -> report into one folder, one sub-directory per stage.

    OUT/
      pipeline.json      the resolved config the folder was made with (a re-run compares against it)
      prune/             a `semisparse prune` run directory (the initial mask)
      train/             a `semisparse train` run directory (checkpoints/ while it runs)
      eval/              dense.json, prune.json, train.json: perplexity and zero-shot results per model
      export/            only with --export (or export in stages): a `semisparse export` folder of train/
      report/            report.md + PNG plots

Re-running the same command skips every stage whose output is complete, resumes an interrupted training from its
newest valid checkpoint and redoes the rest, so a killed job finishes where it stopped. A changed config is refused
(it would mix runs) unless only the eval/report settings changed: those stages are redone, nothing else is lost.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from semisparse.errors import UserError
from semisparse.pipeline.config import PipelineConfig
from semisparse.pipeline.stages import DONE, RESUME, STAGES, Context

PIPELINE_FILE = "pipeline.json"
#: Config fields that may change between runs of one folder without touching the model stages' outputs.
_FREE = ("out", "device", "description")
_DERIVED = ("eval", "export", "report")


@dataclass
class PipelineResult:
    out: Path
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # wall time of each stage that ran
    report: Path | None = None
    rows: list[dict] = field(default_factory=list)  # the summary table (see summary_rows)


def _flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and key != "set":
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def config_changes(saved: dict, cfg: PipelineConfig) -> list[tuple[str, object, object]]:
    """(field, value in the folder, value asked) for every field that differs, except those free to change."""
    old, new = _flatten(saved), _flatten(cfg.to_dict())
    return [(k, old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
            if k.split(".")[0] not in _FREE and old.get(k) != new.get(k)]


def _export_toggled(change: tuple[str, object, object]) -> bool:
    """Adding or dropping only the export stage: it reads the other stages' outputs, they stay valid."""
    key, old, new = change
    if key != "stages" or not isinstance(old, list) or not isinstance(new, list):
        return False
    return set(old) ^ set(new) == {"export"}


def check_folder(cfg: PipelineConfig, out: Path, overwrite: bool) -> list[str]:
    """Validate OUT against the config; returns the derived stages whose settings changed (to redo)."""
    record = out / PIPELINE_FILE
    if overwrite or not out.exists():
        return []
    if not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    if not record.is_file():
        if any(out.iterdir()):
            raise UserError(f"{out} exists and is not a pipeline folder (no {PIPELINE_FILE}): "
                            "choose another --out, or pass --overwrite to replace it")
        return []
    try:
        saved = json.loads(record.read_text(encoding="utf-8"))["config"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{record} is unreadable ({exc}): pass --overwrite to start over") from None
    changes = config_changes(saved, cfg)
    blocking = [c for c in changes if c[0].split(".")[0] not in _DERIVED and not _export_toggled(c)]
    if blocking:
        text = ", ".join(f"{k} ({a!r} in the folder, {b!r} asked)" for k, a, b in blocking[:6])
        more = f" and {len(blocking) - 6} more" if len(blocking) > 6 else ""
        raise UserError(f"{out} was made with another config: {text}{more}; use another --out, or pass --overwrite "
                        "to start over")
    return sorted({c[0].split(".")[0] for c in changes})


def _write_record(out: Path, cfg: PipelineConfig) -> None:
    from semisparse.models import package_versions
    from semisparse.rundir import atomic_write_json

    record = {"config": cfg.to_dict(), "versions": package_versions()}
    path = out / PIPELINE_FILE
    try:
        if json.loads(path.read_text(encoding="utf-8")) == record:
            return  # unchanged: keep its time stamp (the report stage compares against it)
    except (OSError, ValueError):
        pass
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, record)


def plan(ctx: Context) -> list[dict]:
    """Per stage: name, status (done/resume/todo) and what it does. Reads files only."""
    return [{"stage": name, "status": STAGES[name]().status(ctx), "does": STAGES[name]().describe(ctx)}
            for name in ctx.cfg.stages]


def run_pipeline(
    cfg: PipelineConfig, overwrite: bool = False, progress: bool = True, say: Callable[[str], None] = print
) -> PipelineResult:
    """Run every stage of ``cfg`` into ``cfg.out``, skipping complete ones; see the module docstring."""
    out = Path(cfg.out).expanduser()
    redo = check_folder(cfg, out, overwrite)
    if overwrite and out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    ctx = Context(cfg, out, progress)
    for stage in redo:  # eval/report settings changed: their outputs are derived data, made again
        if stage in cfg.stages and ctx.dir(stage).exists():
            say(f"{stage}: settings changed, redoing it")
            shutil.rmtree(ctx.dir(stage))
    _write_record(out, cfg)
    result = PipelineResult(out)
    for name in cfg.stages:
        stage = STAGES[name]()
        status = stage.status(ctx)
        if status == DONE:
            say(f"{name}: complete, skipped ({ctx.dir(name)})")
            result.skipped.append(name)
            continue
        say(f"{name}: {'resuming' if status == RESUME else 'running'}: {stage.describe(ctx)}")
        started = time.perf_counter()
        try:
            stage.run(ctx, resume=status == RESUME)
        except UserError as exc:
            raise UserError(f"stage {name} failed: {exc} (fix this and re-run the same command: "
                            "completed stages are kept)") from exc
        result.seconds[name] = time.perf_counter() - started
        say(f"{name}: done in {result.seconds[name]:.0f} s")
        result.ran.append(name)
    if "report" in cfg.stages:
        result.report = ctx.dir("report") / "report.md"
    result.rows = summary_rows(ctx)
    return result


def summary_rows(ctx: Context) -> list[dict]:
    """One row per model: held-out perplexity per eval.ppl data, kept weights, bytes on disk and at 2:4 fp16."""
    from semisparse.pipeline.stages import local_model_dir
    from semisparse.report import compressed_bytes_estimate, read_run

    rows = []
    for m in ctx.models():
        folder = Path(m.spec) if m.key != "dense" else local_model_dir(m.spec)
        row: dict = {"model": m.label, "path": str(folder) if folder else m.spec, "ppl": {}}
        try:
            record = json.loads(ctx.eval_file(m.key).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            record = {}
        for spec in ctx.cfg.eval.ppl if "eval" in ctx.cfg.stages else []:
            row["ppl"][spec] = ((record.get("perplexity") or {}).get(spec) or {}).get("ppl")
        zs = record.get("zeroshot") or {}
        row["mean_acc"] = zs.get("mean_acc")
        info = read_run(folder, m.label) if folder is not None and (folder / "config.json").is_file() else None
        if info is not None and info.params_total is not None:
            sparse_total, kept = info.sparse_total or 0, info.kept if info.kept is not None else 0
            row["kept"], row["sparse_total"] = (kept, sparse_total) if info.kept is not None else (None, None)
            row["params"] = info.params_total
            row["bytes_on_disk"] = info.model_bytes
            row["bytes_fp16_nm"] = compressed_bytes_estimate(info.params_total, sparse_total, kept,
                                                             info.slorb_params or 0) \
                if info.kept is not None else 2 * info.params_total
        rows.append(row)
    return rows

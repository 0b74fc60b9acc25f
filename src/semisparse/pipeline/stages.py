"""The pipeline's stages. Each reads and writes its own sub-directory of the output folder and knows whether its
output is already complete (skip), interrupted (resume) or absent (run).

A stage is a small object with four methods; a later stage (export) plugs in by adding a class to ``STAGES`` at its
place in ``STAGE_ORDER``, without changing the others::

    name                      the sub-directory and the config section
    status(ctx) -> str        DONE | RESUME | TODO
    describe(ctx) -> str      one line for the plan (--dry-run)
    run(ctx, resume) -> None  produce the output (resume: continue an interrupted run)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from semisparse.errors import UserError
from semisparse.pipeline.config import PipelineConfig, recipe_overrides
from semisparse.rundir import MODEL_CONFIG, RUN_FILE, RUN_META

DONE, RESUME, TODO = "done", "resume", "todo"

#: Every stage the pipeline knows, in pipeline order (export runs only when listed or asked for).
STAGE_ORDER = ("prune", "train", "eval", "export", "report")

REPORT_FILE = "report.md"


@dataclass(frozen=True)
class ModelEntry:
    """One model the run evaluates and reports: the dense model, the one-shot run dir, the retrained run dir."""

    key: str  # "dense" | "prune" | "train": also the eval file's name
    spec: str  # what load_model takes
    label: str  # display name in tables and the report


@dataclass
class Context:
    cfg: PipelineConfig
    out: Path
    progress: bool = True

    def dir(self, stage: str) -> Path:
        return self.out / stage

    def init_source(self) -> str | None:
        """The retraining stage's initial mask: the prune stage's run directory when the run has one."""
        return str(self.dir("prune")) if "prune" in self.cfg.stages else None

    def models(self) -> list[ModelEntry]:
        cfg = self.cfg
        names = cfg.report.names
        entries = [ModelEntry("dense", cfg.model, names.get("dense", "dense"))]
        if "prune" in cfg.stages:
            entries.append(ModelEntry("prune", str(self.dir("prune")),
                                      names.get("prune", f"{cfg.prune.method} one-shot")))
        if "train" in cfg.stages:
            entries.append(ModelEntry("train", str(self.dir("train")),
                                      names.get("train", f"{Path(cfg.train.recipe).stem} retrained")))
        return entries

    def eval_file(self, key: str) -> Path:
        return self.dir("eval") / f"{key}.json"


def _read_json(path: Path) -> dict | None:
    """The JSON object in ``path``, or None when it is absent or unreadable (then the stage runs again)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _run_dir_done(path: Path, stage: str) -> bool:
    """A run directory is complete once its semisparse.json exists: writers put it last (atomically)."""
    meta = _read_json(path / RUN_META)
    return bool(meta) and meta.get("stage") == stage and (path / MODEL_CONFIG).is_file()


class PruneStage:
    name = "prune"

    def status(self, ctx: Context) -> str:
        meta = _read_json(ctx.dir(self.name) / RUN_META)
        done = _run_dir_done(ctx.dir(self.name), "prune") and meta.get("method") == ctx.cfg.prune.method \
            and meta.get("pattern") == ctx.cfg.pattern
        return DONE if done else TODO

    def describe(self, ctx: Context) -> str:
        p = ctx.cfg.prune
        calib = "" if p.method == "magnitude" else f", calibration {p.nsamples} x {p.seqlen} tokens of {p.calib}"
        return f"{p.method} {ctx.cfg.pattern} one-shot{calib}"

    def run(self, ctx: Context, resume: bool) -> None:
        from semisparse import api

        p = ctx.cfg.prune
        # Pruning is one atomic write: an interrupted prune left nothing behind and simply runs again.
        api.prune(ctx.cfg.model, p.method, ctx.cfg.pattern, p.calib, ctx.dir(self.name), p.nsamples, p.seqlen,
                  p.seed, p.text_field, device=ctx.cfg.device, overwrite=True, progress=ctx.progress,
                  calib_sampler=p.calib_sampler, tie_order=p.tie_order, calib_stats=p.calib_stats)


class TrainStage:
    name = "train"

    def status(self, ctx: Context) -> str:
        path = ctx.dir(self.name)
        if _run_dir_done(path, "train"):
            return DONE
        if (path / RUN_FILE).is_file():
            from semisparse.train import checkpoint as ckpt

            if ckpt.latest_checkpoint(path / ckpt.DIR_NAME) is not None:
                return RESUME
        return TODO

    def describe(self, ctx: Context) -> str:
        t = ctx.cfg.train
        init = "the prune stage's masks" if ctx.init_source() else "the recipe's init"
        return f"recipe {t.recipe}, {t.tokens:,} tokens, from {init}"

    def run(self, ctx: Context, resume: bool) -> None:
        from semisparse.train.trainer import train

        train(ctx.cfg.model, ctx.dir(self.name), ctx.cfg.train.recipe, recipe_overrides(ctx.cfg, ctx.init_source()),
              resume=resume, overwrite=not resume, progress=ctx.progress)


class EvalStage:
    name = "eval"

    def _complete(self, ctx: Context, key: str) -> bool:
        record = _read_json(ctx.eval_file(key))
        if record is None:
            return False
        e = ctx.cfg.eval
        ppl = record.get("perplexity") or {}
        if not all(isinstance(ppl.get(spec), dict) and "ppl" in ppl[spec] for spec in e.ppl):
            return False
        if e.tasks:
            zs = record.get("zeroshot") or {}
            have = set(zs.get("tasks") or {}) | set(zs.get("missing") or [])
            if not set(e.tasks) <= have or zs.get("limit") != e.limit:
                return False
        return True

    def status(self, ctx: Context) -> str:
        done = [self._complete(ctx, m.key) for m in ctx.models()]
        return DONE if all(done) else (RESUME if any(done) else TODO)

    def describe(self, ctx: Context) -> str:
        e = ctx.cfg.eval
        parts = []
        if e.ppl:
            windows = f", at most {e.ppl_max_windows} windows" if e.ppl_max_windows else ""
            parts.append(f"perplexity on {', '.join(e.ppl)} (seqlen {e.ppl_seqlen}{windows})")
        if e.tasks:
            parts.append(f"zero-shot {', '.join(e.tasks)}" + (f" (limit {e.limit})" if e.limit else ""))
        return "; ".join(parts) + f" for {', '.join(m.label for m in ctx.models())}"

    def run(self, ctx: Context, resume: bool) -> None:
        from semisparse import api

        e = ctx.cfg.eval
        ctx.dir(self.name).mkdir(parents=True, exist_ok=True)
        for model in ctx.models():
            if self._complete(ctx, model.key):
                continue
            ctx.eval_file(model.key).unlink(missing_ok=True)  # a partial record is redone whole
            api.evaluate(model.spec, ppl=e.ppl or None, ppl_seqlen=e.ppl_seqlen, batch_size=e.batch_size,
                         ppl_max_windows=e.ppl_max_windows, text_field=e.text_field, tasks=e.tasks or None,
                         task_data=e.task_data, limit=e.limit, out=ctx.eval_file(model.key), device=ctx.cfg.device,
                         skip_missing=e.skip_missing, progress=ctx.progress)


def local_model_dir(spec: str) -> Path | None:
    """A folder holding MODEL's config.json and weights, for the report: local paths and `default` as resolved,
    a hub id through the Hugging Face cache (None when it is not cached)."""
    from semisparse.models import resolve_model

    path = Path(resolve_model(spec))
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(spec, local_files_only=True))
    except Exception:  # not cached, or no hub library: the report then lacks the dense row's sizes
        return None


class ExportStage:
    """The train stage's run directory (else the prune stage's) as a compact checkpoint (``semisparse export``).
    Done when OUT/export's manifest verifies (every file's sha256) and records this source and these settings."""

    name = "export"

    def source(self, ctx: Context) -> Path:
        return ctx.dir("train" if "train" in ctx.cfg.stages else "prune")

    def _options(self, ctx: Context) -> dict:
        e = ctx.cfg.export
        options = {"format": e.format, "dtype": e.dtype, "quant": e.quant, "group_size": e.group_size,
                   "merge_slorb": e.merge_slorb}
        if e.quant_method != "rtn":  # as the export manifest records them (rtn manifests carry none of these)
            options.update(quant_method=e.quant_method, calib=e.calib or "default", nsamples=e.nsamples or 128,
                           seqlen=e.seqlen or 2048)
        return options

    def status(self, ctx: Context) -> str:
        from semisparse.export.format import verify

        try:
            manifest = verify(ctx.dir(self.name))
        except UserError:
            return TODO
        same_source = (manifest.get("source") or {}).get("run_dir") == str(self.source(ctx).resolve())
        return DONE if same_source and manifest.get("options") == self._options(ctx) else TODO

    def describe(self, ctx: Context) -> str:
        e = ctx.cfg.export
        quant = "" if e.quant == "none" else f" {e.quant}"
        return f"{e.format} {e.dtype}{quant} checkpoint of the {self.source(ctx).name} stage's run directory"

    def run(self, ctx: Context, resume: bool) -> None:
        from semisparse import api

        # One atomic folder write: an interrupted export left nothing behind and simply runs again.
        options = self._options(ctx)
        if options.get("quant_method", "rtn") != "rtn":  # the manifest's defaults filled in above are what we pass
            options.update(device=ctx.cfg.device, progress=ctx.progress)
        api.export(self.source(ctx), ctx.dir(self.name), overwrite=True, **options)


class ReportStage:
    name = "report"

    def status(self, ctx: Context) -> str:
        report = ctx.dir(self.name) / REPORT_FILE
        inputs = [ctx.eval_file(m.key) for m in ctx.models()] + [ctx.out / "pipeline.json"]
        if report.is_file() and all(p.is_file() and p.stat().st_mtime <= report.stat().st_mtime for p in inputs):
            return DONE
        return TODO

    def describe(self, ctx: Context) -> str:
        return f"report.md + plots comparing {', '.join(m.label for m in ctx.models())}"

    def runs(self, ctx: Context) -> list[tuple[Path, str, Path | None]]:
        """(model folder, display name, eval file) per model; the dense row needs a local copy of the model."""
        out = []
        for m in ctx.models():
            folder = Path(m.spec) if m.key != "dense" else local_model_dir(m.spec)
            if folder is None:
                raise UserError(f"the dense model {m.spec!r} is not in the local Hugging Face cache")
            ev = ctx.eval_file(m.key)
            out.append((folder, m.label, ev if ev.is_file() else None))
        return out

    def run(self, ctx: Context, resume: bool) -> None:
        from semisparse.report import write_report

        runs = self.runs(ctx)
        write_report([r[0] for r in runs], ctx.dir(self.name), [r[1] for r in runs], eval_files=[r[2] for r in runs])


STAGES = {cls.name: cls for cls in (PruneStage, TrainStage, EvalStage, ExportStage, ReportStage)}
assert all(name in STAGE_ORDER for name in STAGES)

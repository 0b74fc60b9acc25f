"""The pipeline config: one YAML file (or flags, or a preset) for prune -> train -> eval -> (export ->) report.

Every field is validated before any model is loaded; a problem is one line naming the field::

    semisparse: error: pipeline run.yaml: train.tokens: less than one optimizer step (4 x 1 x 256 = 1024 tokens)

A config is plain data (``PipelineConfig.to_dict()``); the pipeline records it in ``OUT/pipeline.json`` so a re-run
can tell which stages it may skip.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator

from semisparse.config import StrictSection as _Section
from semisparse.config import format_validation_error, nm_pattern, read_yaml_mapping
from semisparse.errors import UserError

#: Shipped presets (package data under semisparse/presets/).
PRESETS = ("quick", "paper")
#: Stages run when the config lists none; export only when listed or asked for (--export).
DEFAULT_STAGES = ("prune", "train", "eval", "report")


class PruneSection(_Section):
    """The one-shot pruning stage; its run directory is the retraining stage's initial mask."""

    method: str = Field("sparsegpt", description="magnitude | wanda | sparsegpt")
    calib: str = Field("default", description="calibration text (a DATA spec)")
    nsamples: int = Field(128, gt=0, description="calibration windows")
    seqlen: int = Field(2048, ge=2, description="calibration window length (capped at the model's context)")
    seed: int = 0
    text_field: str = "text"
    calib_sampler: Literal["random", "reference"] = Field("random", description="reference: the SparseGPT/Wanda draw")
    tie_order: Literal["stable", "reference"] = Field("stable", description="reference: torch.topk(largest=False)")
    calib_stats: Literal["float64", "reference"] = Field(
        "float64", description="reference: the SparseGPT/Wanda codes' float32 running-mean statistics")

    @field_validator("method")
    @classmethod
    def _method(cls, value: str) -> str:
        from semisparse.prune import METHODS

        if value not in METHODS:
            raise ValueError(f"unknown pruning method {value!r} (choose from {', '.join(METHODS)})")
        return value


class TrainSection(_Section):
    """The retraining stage: a recipe plus the budget; ``set`` reaches every recipe field."""

    recipe: str = Field("ast-naive", description="a shipped recipe or a YAML file")
    tokens: int | None = Field(None, gt=0, description="training budget in tokens (required)")
    data: str | None = Field(None, description="training text (default: the recipe's data.train)")
    set: dict[str, Any] = Field(default_factory=dict, description="recipe fields, SECTION.FIELD: VALUE")


class EvalSection(_Section):
    """Perplexity and zero-shot scores of every model of the run (dense, one-shot, retrained)."""

    ppl: list[str] = Field(default_factory=lambda: ["default"], description="perplexity data (DATA specs)")
    ppl_seqlen: int = Field(2048, ge=2)
    ppl_max_windows: int | None = Field(None, gt=0)
    tasks: list[str] = Field(default_factory=list, description="zero-shot tasks (lm-evaluation-harness)")
    task_data: str | None = Field(None, description="folder of local task files (offline)")
    limit: int | None = Field(None, gt=0, description="documents per zero-shot task")
    skip_missing: bool = False
    batch_size: int = Field(1, gt=0)
    text_field: str = "text"


class ExportSection(_Section):
    """The export stage (not run unless listed in ``stages`` or asked with --export): the train stage's run
    directory (else the prune stage's) as a compact checkpoint in OUT/export (``semisparse export``)."""

    format: str = Field("packed", description="packed | hf")
    dtype: str = Field("fp16", description="fp16 | bf16 | fp32")
    quant: str = Field("none", description="none | int8 | int4 (packed only)")
    group_size: int | None = Field(None, gt=0, description="int4 group size (default: 128, 64 or 32)")
    merge_slorb: bool = Field(False, description="hf: fold a SLoRB branch into dense weights (no longer N:M)")
    quant_method: str = Field("rtn", description="rtn (round to nearest) | gptq (calibrated, keeps the pattern)")
    calib: str | None = Field(None, description="gptq: calibration DATA (default: the shipped text)")
    nsamples: int | None = Field(None, gt=0, description="gptq: calibration windows (default 128)")
    seqlen: int | None = Field(None, ge=2, description="gptq: calibration window length (default 2048)")

    @field_validator("format", "dtype", "quant")
    @classmethod
    def _choice(cls, value: str, info) -> str:
        from semisparse.export import options

        choices = {"format": options.FORMATS, "dtype": options.DTYPES, "quant": options.QUANTS}[info.field_name]
        if value not in choices:
            raise ValueError(f"unknown {info.field_name} {value!r} (choose from {', '.join(choices)})")
        return value


class ReportSection(_Section):
    names: dict[str, str] = Field(default_factory=dict, description="display name per model (dense/prune/train)")


class PipelineConfig(_Section):
    description: str = ""
    model: str = "default"
    out: str | None = None
    pattern: str = "2:4"
    device: str = "auto"
    stages: list[str] = Field(default_factory=lambda: list(DEFAULT_STAGES))
    prune: PruneSection = PruneSection()
    train: TrainSection = TrainSection()
    eval: EvalSection = EvalSection()
    export: ExportSection = ExportSection()
    report: ReportSection = ReportSection()

    _check_pattern = field_validator("pattern")(nm_pattern)

    @field_validator("stages")
    @classmethod
    def _stages(cls, value: list[str]) -> list[str]:
        from semisparse.pipeline.stages import STAGE_ORDER, STAGES

        unknown = [s for s in value if s not in STAGES]
        if unknown:
            raise ValueError(f"unknown stage(s) {', '.join(map(repr, unknown))} (stages: {', '.join(STAGES)})")
        if not value:
            raise ValueError("no stages to run")
        if len(set(value)) != len(value):
            raise ValueError("a stage is listed twice")
        return sorted(value, key=STAGE_ORDER.index)

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")


def preset_path(name: str) -> Path:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r} (presets: {', '.join(PRESETS)})")
    return Path(str(resources.files("semisparse") / "presets" / f"{name}.yaml"))


def read_config_file(path: Path) -> dict:
    return read_yaml_mapping(Path(path), f"pipeline {path}")


def merge_fields(base: dict, top: dict) -> dict:
    """Nested dict merge: ``top`` wins; its None values mean "not given" (at every depth)."""
    out = dict(base)
    for key, value in top.items():
        if value is None:
            continue
        if isinstance(value, dict) and (isinstance(out.get(key), dict) or key not in out):
            merged = merge_fields(out.get(key) or {}, value)
            if merged or key in out or not value:
                out[key] = merged
        else:
            out[key] = value
    return out


def build_config(
    config_file: str | Path | None = None, preset: str | None = None, overrides: dict | None = None,
    add_stages: list[str] | None = None,
) -> tuple[PipelineConfig, str]:
    """Preset (if any) <- config file (if any) <- overrides (flags; None = not given). Validated as a whole.

    ``add_stages``: stages added to whatever list the layers above settle on (``--export``)."""
    data: dict = {}
    where = "(flags)"
    if preset is not None:
        data = read_config_file(preset_path(preset))
        where = f"preset {preset}"
    if config_file is not None:
        data = merge_fields(data, read_config_file(Path(config_file)))
        where = str(config_file)
    data = merge_fields(data, overrides or {})
    if add_stages:
        stages = data.get("stages")
        stages = list(stages) if isinstance(stages, list) else list(DEFAULT_STAGES)
        data["stages"] = stages + [s for s in add_stages if s not in stages]
    try:
        cfg = PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise UserError(format_validation_error(f"pipeline {where}", exc)) from None
    check_config(cfg, where)
    return cfg, where


def recipe_overrides(cfg: PipelineConfig, init_source: str | None) -> dict[str, Any]:
    """The train stage's recipe overrides: ``train.set``, then the pipeline's own fields."""
    out: dict[str, Any] = dict(cfg.train.set)
    out.update({"pattern": cfg.pattern, "train.device": cfg.device, "train.tokens": cfg.train.tokens})
    if cfg.train.data is not None:
        out["data.train"] = cfg.train.data
    if init_source is not None:
        out["init.source"] = init_source
    return out


def check_config(cfg: PipelineConfig, where: str) -> None:
    """Cross-field checks that need no model: the recipe validates, the budget holds one optimizer step."""
    if cfg.out is None:
        raise UserError(f"pipeline {where}: out: give the output directory (--out DIR)")
    if "train" in cfg.stages:
        from semisparse.config import load_recipe

        if cfg.train.tokens is None:
            raise UserError(f"pipeline {where}: train.tokens: give the training budget (--tokens N)")
        try:
            recipe, _ = load_recipe(cfg.train.recipe, recipe_overrides(cfg, None))
        except UserError as exc:
            raise UserError(f"pipeline {where}: train: {exc}") from None
        t = recipe.train
        per_step = t.batch_size * t.grad_accum * t.seq_len
        if cfg.train.tokens < per_step:
            raise UserError(
                f"pipeline {where}: train.tokens: {cfg.train.tokens} is less than one optimizer step "
                f"({t.batch_size} x {t.grad_accum} x {t.seq_len} = {per_step} tokens)"
            )
    if "export" in cfg.stages:
        from semisparse.export.options import check_options, check_quant_method

        if not {"prune", "train"} & set(cfg.stages):
            raise UserError(f"pipeline {where}: export: it exports the train (or prune) stage's run directory: "
                            "list one of them in stages")
        e = cfg.export
        try:
            check_options(e.format, e.dtype, e.quant, e.group_size, e.merge_slorb)
            check_quant_method(e.quant_method, e.format, e.quant, e.calib, e.nsamples, e.seqlen)
        except UserError as exc:
            raise UserError(f"pipeline {where}: export: {exc}") from None
    if "eval" in cfg.stages:
        if not cfg.eval.ppl and not cfg.eval.tasks:
            raise UserError(f"pipeline {where}: eval: nothing to evaluate (give eval.ppl and/or eval.tasks)")
        if cfg.eval.tasks:
            from semisparse.evaluate.zeroshot import check_zeroshot_args

            try:
                check_zeroshot_args(cfg.eval.tasks, cfg.eval.task_data, cfg.eval.limit, cfg.eval.batch_size)
            except UserError as exc:
                raise UserError(f"pipeline {where}: eval.tasks: {exc}") from None


def dump_config(cfg: PipelineConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)

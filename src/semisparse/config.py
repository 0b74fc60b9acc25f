"""The training recipe: one YAML file holds every hyper-parameter of ``semisparse train``.

A recipe is validated by pydantic models that forbid unknown fields; a validation problem becomes one line::

    semisparse: error: recipe x.yaml: optim.lr: Input should be greater than 0

``load_recipe`` takes a shipped recipe name (``ast-naive``, ``ast-boosted``, ``fixed-mask-kd``, ``naive-ce``) or a
path, applies dotted overrides (the CLI flags: ``{"optim.lr": 1e-3}``) and validates the result as a whole.

Step counts that are naturally relative to the run length (``optim.warmup``, ``decay.ramp``) take either an int
(a number of optimizer steps) or a float in [0, 1] (a fraction of the total steps): ``ramp: 0.25`` is the paper's
10k of 40k steps.

Defaults are the paper's values where it gives them (AST.md §5, GPT-2 "our method"): lr 2e-4 with 5% linear
warmup and cosine to 10% of it, AdamW β = (0.9, 0.95), ε = 1e-8, wd 0.1 on ≥2-D params, clip 1.0, λ_max = 1e-4
ramped over the first 25% of steps, Δt = 10, α = 0.67, T = 2, SLoRB k = 16 with trainable X, seq_len 1024.
The batch defaults (8 sequences, no accumulation) are sized for one device; the paper's global batch is 128.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from semisparse.errors import UserError

#: Shipped recipes (package data under semisparse/recipes/).
SHIPPED_RECIPES = ("ast-naive", "ast-boosted", "cast", "fixed-mask-kd", "naive-ce")
DEFAULT_RECIPE = "ast-naive"
INIT_METHODS = ("magnitude", "wanda", "sparsegpt")

#: An int is a number of optimizer steps; a float in [0, 1] a fraction of the total steps.
StepsOrFraction = Union[int, float]


class StrictSection(BaseModel):
    """A config section: unknown fields are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def nm_pattern(value: str) -> str:
    """Field validator: an N:M pattern, normalised ("2:4")."""
    from semisparse.masks import Pattern

    try:
        return str(Pattern.parse(value))
    except UserError as exc:
        raise ValueError(str(exc)) from None


def _steps_or_fraction(value: int | float) -> int | float:
    if isinstance(value, bool):
        raise ValueError("expected a step count (int) or a fraction of the run (float in [0, 1])")
    if isinstance(value, int) and value < 0:
        raise ValueError("a step count must be >= 0")
    if isinstance(value, float) and not 0.0 <= value <= 1.0:
        raise ValueError("a fraction of the run must be in [0, 1] (use an int for a number of steps)")
    return value


def resolve_steps(value: int | float, total_steps: int) -> int:
    """An int is steps as given; a float is that fraction of ``total_steps`` (rounded)."""
    if isinstance(value, float):
        return int(round(value * total_steps))
    return int(value)


class InitConfig(StrictSection):
    """Where the student and its initial mask come from."""

    source: str = Field("magnitude", description="magnitude | wanda | sparsegpt | a `semisparse prune` run dir")
    calib_samples: int = Field(128, gt=0, description="calibration windows for wanda/sparsegpt")
    calib_seqlen: int | None = Field(None, ge=2, description="calibration window length (default: train.seq_len)")
    calib_sampler: Literal["random", "reference"] = Field(
        "random", description="random: windows of the joined text; reference: the SparseGPT/Wanda codes' draw")
    tie_order: Literal["stable", "reference"] = Field(
        "stable", description="equal scores: ties to the lower index, or as torch.topk(largest=False) (reference)")
    calib_stats: Literal["float64", "reference"] = Field(
        "float64", description="wanda/sparsegpt statistics: float64 sums, or the reference codes' float32 running mean")
    pruned_weights: Literal["dense", "zero"] = Field(
        "dense",
        description="start of the pruned weights after a one-shot init: their dense values (the paper: AST trains "
        "all dense weights) or zero (the pruner's output; keeps e.g. SparseGPT's mask at the first magnitude "
        "recompute). A run-directory init always starts from its stored zeros.",
    )


class MaskConfig(StrictSection):
    update: bool = Field(True, description="recompute masks from |W| (False: the fixed-mask baseline)")
    every: int = Field(10, ge=1, description="Δt: recompute every Δt optimizer steps (see timing), and at the end")
    timing: Literal["after", "before"] = Field(
        "after", description="after: after step t when t % every == 0 (AST's code); before: before the forward of "
        "step t when t % every == 0, step 0 included (CAST's algorithm)")
    forward: Literal["masked", "dense"] = Field(
        "masked", description="masked: the forward uses W ⊙ M (AST, straight-through gradient); dense: the forward "
        "uses W, the mask steers the decay and the final hard prune (CAST)")


class DecayConfig(StrictSection):
    """Decay of the pruned weights. SR-STE (adamw_decoupled, grad): λ(t) = lambda_max · min(t / T0, 1) with T0 = ramp.
    AdamS: λ = lambda_max throughout, and its mixing weight α(t) = min(t / T0, 1) (ramp 1.0: α = t / T, CAST)."""

    variant: Literal["adamw_decoupled", "grad", "adams"] = Field(
        "adamw_decoupled", description="adamw_decoupled: the paper's MaskedAdamW; grad: g += λ¬M⊙W then AdamW; "
        "adams: CAST's AdamS (λ·sign(W) mixed into the pruned weights' first moment)"
    )
    lambda_max: float = Field(1e-4, ge=0)
    ramp: StepsOrFraction = 0.25

    _check_ramp = field_validator("ramp")(_steps_or_fraction)


class DistillConfig(StrictSection):
    alpha: float = Field(0.67, ge=0, le=1, description="weight of T²·KL; 0 = plain CE retraining, no teacher")
    temperature: float = Field(2.0, gt=0)
    chunk_size: int = Field(1024, gt=0, description="tokens whose logits are built at a time (when recomputed)")
    recompute: Literal["auto", "always", "never"] = Field(
        "auto", description="rebuild the logits chunk by chunk in backward instead of keeping them; auto: only when "
        "a micro-batch's [tokens, vocab] logits exceed 2^27 entries")
    teacher: str | None = Field(None, description="dense teacher (default: MODEL, or the init run's dense model)")


class SlorbConfig(StrictSection):
    enabled: bool = False
    k: int = Field(16, ge=1, description="group size; rank = in_features / k")
    train_x: bool = True


class ScaleConfig(StrictSection):
    """CAST's learned weight scale: per sparse layer A [out, blocks], initialised to 1, folded into W at export."""

    enabled: bool = False
    blocks: int = Field(2, ge=1, description="n: scale factors per output row, over contiguous input blocks")


class OptimConfig(StrictSection):
    lr: float = Field(2e-4, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine floor as a fraction of lr")
    warmup: StepsOrFraction = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, ge=0)
    weight_decay: float = Field(0.1, ge=0, description="decoupled AdamW decay, on >=2-D parameters only")
    grad_clip: float = Field(1.0, ge=0, description="max global grad norm; 0 = off")

    _check_warmup = field_validator("warmup")(_steps_or_fraction)

    @field_validator("betas")
    @classmethod
    def _betas(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in value):
            raise ValueError("betas must be in [0, 1)")
        return value


class TrainConfig(StrictSection):
    tokens: int | None = Field(None, gt=0, description="training budget; steps = tokens // (batch·accum·seq)")
    seq_len: int = Field(1024, ge=2)
    batch_size: int = Field(8, gt=0, description="sequences per micro-batch per process")
    grad_accum: int = Field(
        1, gt=0, description="micro-batches per optimizer step, all processes together (each of W processes runs "
        "grad_accum / W): the global batch, batch_size x grad_accum sequences, does not depend on W")
    seed: int = 1337
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast on CUDA and on CPUs with native bf16 (AVX-512 BF16, AMX), else fp32")
    gradient_checkpointing: bool = False
    compile: bool = Field(
        False, description="torch.compile each decoder block of the student (and the teacher); on only where "
        "benchmarks/train_speed.py --compile measures it faster on your hardware")
    deterministic: bool = False


class DataSource(StrictSection):
    """One source of a training mixture (docs/data.md)."""

    path: str = Field(..., description="a token-shard folder (`semisparse tokenize`) or any DATA text source")
    weight: float = Field(1.0, ge=0, allow_inf_nan=False, description="relative share of the training sequences")


class DataConfig(StrictSection):
    train: str = Field("default", description="training DATA: text (tokenized on the fly) or a token-shard folder")
    eval: str | None = Field(None, description="held-out text (default: the eval split of data.train)")
    text_field: str = "text"
    sources: list[DataSource] | None = Field(
        None, description="a weighted mixture instead of data.train: [{path: ..., weight: 0.7}, ...]")

    @field_validator("sources")
    @classmethod
    def _mixture(cls, value: list[DataSource] | None, info) -> list[DataSource] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("give at least one source (or leave data.sources out)")
        if not sum(s.weight for s in value) > 0:
            raise ValueError("the weights must sum to a positive number")
        if info.data.get("train", "default") != "default":
            raise ValueError("give data.train or data.sources, not both")
        return value


class EvalConfig(StrictSection):
    every: int = Field(200, ge=0, description="held-out perplexity every N steps; 0 = never during training")
    windows: int = Field(8, gt=0)
    seqlen: int | None = Field(None, ge=2, description="default: train.seq_len")
    at_start: bool = True
    at_end: bool = True


class LogConfig(StrictSection):
    every: int = Field(1, gt=0)
    tensorboard: bool = True
    plots: bool = True


class CheckpointConfig(StrictSection):
    every: int = Field(200, ge=0, description="save every N steps; 0 = only at the end")
    keep: int = Field(2, gt=0)
    at_end: bool = True


class FsdpConfig(StrictSection):
    """Many processes (torchrun): the student sharded by FSDP2 ``fully_shard`` per decoder block and at the root."""

    reshard_after_forward: bool = Field(
        True, description="free each block's gathered weights after its forward (less memory, one more all-gather "
        "in backward)")
    offload: bool = Field(False, description="keep parameters and optimizer state in CPU memory (CUDA runs only)")
    shard_teacher: bool = Field(
        False, description="shard the frozen teacher too, for models whose bf16 copy does not fit one device "
        "(default: a full copy per process, no communication)")
    timeout_s: int = Field(600, gt=0, description="a collective waiting longer ends the job (a dead process)")
    always: bool = Field(
        False, description="wrap with FSDP2 even when torchrun starts one process (to measure the wrapper's cost); "
        "needs torchrun")


class Recipe(StrictSection):
    description: str = ""
    pattern: str = "2:4"
    init: InitConfig = InitConfig()
    mask: MaskConfig = MaskConfig()
    decay: DecayConfig = DecayConfig()
    distill: DistillConfig = DistillConfig()
    slorb: SlorbConfig = SlorbConfig()
    scale: ScaleConfig = ScaleConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    data: DataConfig = DataConfig()
    eval: EvalConfig = EvalConfig()
    log: LogConfig = LogConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    fsdp: FsdpConfig = FsdpConfig()

    _check_pattern = field_validator("pattern")(nm_pattern)

    @model_validator(mode="after")
    def _fields_that_work_together(self) -> "Recipe":
        """Combinations that cannot work, named by their fields (the model is not loaded yet)."""
        if self.slorb.enabled and self.mask.forward == "dense":
            raise ValueError("slorb.enabled and mask.forward: dense exclude each other (SLoRB stands in for the "
                             "pruned weights, which a dense forward still uses)")
        return self

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")


def format_validation_error(what: str, exc: ValidationError) -> str:
    """One line naming every bad field: ``recipe x.yaml: optim.lr: Input should be greater than 0``."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        parts.append(f"{loc}: {msg}")
    return f"{what}: " + "; ".join(parts)


def shipped_recipe_path(name: str) -> Path | None:
    stem = name[:-5] if name.endswith(".yaml") else name
    if stem not in SHIPPED_RECIPES:
        return None
    return Path(str(resources.files("semisparse") / "recipes" / f"{stem}.yaml"))


def read_yaml_mapping(path: Path, what: str) -> dict:
    """The mapping in a YAML file ({} when empty); an unreadable file or bad YAML is one line starting with ``what``."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{what}: cannot read it ({exc})") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise UserError(f"{what}: invalid YAML{at} ({problem})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{what}: expected a mapping of fields, got {type(data).__name__}")
    return data


def apply_overrides(data: dict, overrides: dict[str, Any] | None) -> dict:
    """Set dotted keys (``"optim.lr"``) in a nested dict (a copy); None values mean "not given" and are skipped."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.get(part)
            child = dict(child) if isinstance(child, dict) else {}
            node[part] = child
            node = child
        node[leaf] = value
    return out


def parse_set(items: list[str] | None) -> dict[str, Any]:
    """``["optim.lr=1e-3", "slorb.enabled=true"]`` -> overrides; values are parsed as YAML scalars (YAML reads
    ``1e-3`` as a string; pydantic turns numeric strings into numbers for numeric fields)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set {item!r}: expected SECTION.FIELD=VALUE, e.g. optim.lr=1e-4")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, int) and not isinstance(value, bool) and ":" in raw:
            value = raw.strip()  # YAML 1.1 reads 2:4 as the base-60 integer 124; an N:M pattern is meant
        out[key.strip()] = value
    return out


def load_recipe(spec: str | Path | None = None, overrides: dict[str, Any] | None = None) -> tuple[Recipe, dict]:
    """Validated recipe + where it came from ({"name", "path"}). ``spec`` None is the shipped ``ast-naive``."""
    spec = DEFAULT_RECIPE if spec is None else spec
    path = Path(spec).expanduser()
    shipped = shipped_recipe_path(str(spec)) if not path.is_file() else None
    if shipped is not None:
        path, name = shipped, shipped.stem
    elif path.is_file():
        name = path.stem
    else:
        raise UserError(
            f"unknown recipe {str(spec)!r}: give a YAML file or a shipped recipe ({', '.join(SHIPPED_RECIPES)})"
        )
    where = path.name if shipped is None else f"{name} (shipped)"
    data = apply_overrides(read_yaml_mapping(path, f"recipe {where}"), overrides)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise UserError(format_validation_error(f"recipe {where}", exc)) from None
    return recipe, {"name": name, "path": str(path), "shipped": shipped is not None}


def recipe_from_dict(data: dict, where: str = "(saved)") -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise UserError(format_validation_error(f"recipe {where}", exc)) from None


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)

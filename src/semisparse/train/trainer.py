"""The AST training loop (AST.md §9), readable top to bottom.

``train(model, out, recipe, overrides)`` retrains a model to N:M sparsity and writes a run directory::

    out/
      config.json, model.safetensors, tokenizer files   # stock transformers model holding W ⊙ M (zeros dense)
      masks.safetensors, slorb.safetensors (AST-Boosted), semisparse.json (stage "train")
      run.json                                           # what was asked (model, resolved recipe): --resume reads it
      metrics.jsonl, plots/*.png, tensorboard/ (if tensorboard is installed)
      checkpoints/step-NNNNNN/                           # atomic, verified on load (checkpoint.py)

One optimizer step t (0-based) is:
  1. lr(t): linear warmup, then cosine down to min_lr_ratio·lr; λ(t) = λ_max·min(t/T0, 1).
  2. grad_accum micro-batches: teacher hidden states (no grad), student hidden states, then the chunked loss
     α·T²·KL + (1−α)·CE (distill.py), backward of loss / grad_accum. A non-finite loss stops the run.
  3. clip the global grad norm; variant "grad" adds λ·(¬M⊙W) to the masked weights' gradients; optimizer step
     (variant "adamw_decoupled": MaskedAdamW puts λ·(¬M⊙W) in the update and 2nd moment).
  4. masks: if t % Δt == 0 (and after the last step), recompute every mask from |W| and log the flip rates
     (mask.timing "before", CAST: before step t's forward instead, and after the last step).
  5. log; every eval.every steps held-out perplexity; every checkpoint.every steps a checkpoint.

Metrics lines (``metrics.jsonl``; "step" is the 0-based index of the optimizer step just taken, "tokens" the
global training tokens seen after it):
  {"step", "tokens", "loss", "ce", "kl", "lr", "lambda", "grad_norm", "tokens_per_s", "teacher_s", "step_s"}
  {"step", "flip_rate", "init_flip_rate", "flips", "init_flips"}   (flips vs the previous mask / vs M0, divided by
                                                                     the dense parameter count of the sparse layers;
                                                                     + "when" and, with a dense forward,
                                                                     "pruned_abs_max")
  step records of AdamS runs also carry "decay_mix" (its α)
  {"step", "tokens", "eval_ppl"}                                    (step -1: before training)

Multi-process ready (a later issue wraps the model in FSDP/DDP): the token stream is sharded by rank, masks are
a deterministic function of the weights, and only rank 0 writes logs, checkpoints and the run directory.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import json
import math
import os
import random
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.profiler import record_function
from tqdm.auto import tqdm

from semisparse import data as data_mod
from semisparse.config import INIT_METHODS, Recipe, apply_overrides, load_recipe, recipe_from_dict, resolve_steps
from semisparse.devices import resolve_device, resolve_precision
from semisparse.errors import UserError
from semisparse.evaluate.perplexity import perplexity
from semisparse.layers import LayerFilter, select_layers, weight_matrix
from semisparse.masks import Pattern, flip_count
from semisparse import rundir
from semisparse.models import load_model, model_skeleton, package_versions, write_run_files
from semisparse.rundir import (  # noqa: F401 (read_metrics, truncate_metrics: re-exported for older imports)
    METRICS_FILE,
    PLOTS_DIR,
    RUN_FILE,
    RUN_META,
    TB_DIR,
    load_masks,
    read_metrics,
    truncate_metrics,
)
from semisparse.train import checkpoint as ckpt
from semisparse.train.distill import distill_loss, final_hidden_states, lm_head, logits_fit
from semisparse.train.optim import (
    AdamS,
    MaskedAdamW,
    add_masked_decay_to_grad,
    decay_lambda,
    set_adams_alpha,
    set_srste_lambda,
)
from semisparse.train.sparse_linear import (
    WEIGHT_SCALE,
    SparseLinear,
    attach_slorb,
    densify,
    masked_forward,
    param_masks,
    slorb_parameter_count,
    sparsify,
)
from semisparse.train.stream import dist_info

M0_PREFIX = "m0."


@dataclass
class TrainResult:
    run_dir: Path
    summary: dict
    model: nn.Module | None = field(default=None, repr=False)  # the trained model as exported (SLoRB attached)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# -------------------------------------------------------------------------------------------------- schedules


def lr_at(step: int, total_steps: int, lr: float, warmup_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup to ``lr`` over ``warmup_steps``, then cosine down to ``min_lr_ratio·lr`` at the last step."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    span = max(total_steps - 1 - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    return lr * (min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def adams_reach(total_steps: int, lr: float, warmup_steps: int, min_lr_ratio: float, ramp_steps: int) -> float:
    """Σ_t lr(t)·α(t): about the farthest AdamS can move a pruned weight over the run. Its step is Adam-normalised,
    so once the decay dominates a pruned weight moves ≈ lr·α per step whatever λ is (CAST.md §2)."""
    return sum(lr_at(t, total_steps, lr, warmup_steps, min_lr_ratio) * decay_lambda(t, 1.0, ramp_steps)
               for t in range(total_steps))


@torch.no_grad()
def median_pruned_magnitude(layers: dict[str, SparseLinear]) -> float:
    """Median |w| over the pruned entries of all layers (a sample of up to 2^20 per layer keeps it cheap)."""
    samples = []
    for layer in layers.values():
        pruned = layer.scaled_weight().detach().abs()[~layer.mask]
        if pruned.numel() > 2**20:
            pruned = pruned[:: pruned.numel() // 2**20 + 1]
        samples.append(pruned.float())
    return float(torch.cat(samples).median()) if samples else 0.0


# -------------------------------------------------------------------------------------------------- masks


@torch.no_grad()
def recompute_masks(layers: dict[str, SparseLinear], initial: dict[str, torch.Tensor]) -> dict:
    """Recompute every mask from |W| (in place); flips vs the previous masks and vs the initial masks M0."""
    flips = init_flips = total = 0
    for name, layer in layers.items():
        old = layer.mask.clone()
        new = layer.recompute_mask()
        flips += flip_count(new, old)
        init_flips += flip_count(new, initial[name].to(new.device))
        total += new.numel()
    return {"flips": flips, "init_flips": init_flips, "flip_rate": flips / total, "init_flip_rate": init_flips / total}


def mask_update_steps(total_steps: int, every: int) -> list[int]:
    """The steps after which masks are recomputed: t % every == 0, and the last step (AST.md §1)."""
    steps = [t for t in range(total_steps) if t % every == 0]
    if total_steps and steps[-1] != total_steps - 1:
        steps.append(total_steps - 1)
    return steps


# -------------------------------------------------------------------------------------------------- logging


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


# -------------------------------------------------------------------------------------------------- setup


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if "numpy" in sys.modules:
        import numpy as np

        np.random.seed(seed % 2**32)


def _exact_filter(names) -> LayerFilter:
    return LayerFilter(include=[f"^{re.escape(n)}$" for n in names], exclude=[], blocks_only=False)


def _init_masks(net: nn.Module, cfg: Recipe, stream: torch.Tensor, seq_len: int, device, progress: bool,
                tokenizer=None, docs: list[str] | None = None):
    """One-shot masks by the init method. Kept weights come from the pruner (SparseGPT updates them). Pruned weights
    restart from their dense values (``init.pruned_weights: dense``, the paper: AST trains all dense weights, so the
    straight-through gradient can bring them back) or stay at the pruner's zeros (``zero``: the first magnitude
    recompute then keeps the pruner's mask instead of reverting groups to magnitude's choice)."""
    from semisparse.prune import get_method, prune_model

    pruner = get_method(cfg.init.source, cfg.init.tie_order)
    windows = None
    if pruner.needs_calibration:
        calib_len = min(cfg.init.calib_seqlen or seq_len, stream.numel() - 1)
        if cfg.init.calib_sampler == "reference":
            windows = data_mod.reference_calibration_windows(tokenizer, docs, cfg.init.calib_samples, calib_len,
                                                             cfg.train.seed)
        else:
            windows = data_mod.calibration_windows(stream, cfg.init.calib_samples, calib_len, cfg.train.seed)
    restore = cfg.init.pruned_weights == "dense"
    dense = {name: weight_matrix(m).detach().clone() for name, m in select_layers(net).items()} if restore else {}
    result = prune_model(net, pruner, Pattern.parse(cfg.pattern), windows, None, False, device, progress)
    if restore:
        layers = select_layers(net)
        with torch.no_grad():
            for name, w_dense in dense.items():
                w = weight_matrix(layers[name])
                w.copy_(torch.where(result.masks[name].to(w.device), w, w_dense.to(w.device)))
    return result.masks


def _check_scale_widths(spec: str, cfg: Recipe) -> None:
    """scale.blocks must split every sparse layer's input into whole groups of M: checked on the config's shapes,
    before the weights load."""
    skeleton = model_skeleton(spec)
    if skeleton is None:
        return  # sparsify checks the same after the load
    step = cfg.scale.blocks * Pattern.parse(cfg.pattern).m
    for name, module in select_layers(skeleton).items():
        width = weight_matrix(module).shape[1]
        if width % step:
            raise UserError(f"scale.blocks {cfg.scale.blocks}: layer {name} has input width {width}, not a multiple "
                            f"of scale.blocks x M = {step} (a weight scale block would split a group of M)")


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW weight decay on >=2-D parameters only (AST.md §5); norms, biases and CAST's weight scales get none."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 and not name.endswith(WEIGHT_SCALE) else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def _autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    if resume and overwrite:
        raise UserError("--resume and --overwrite exclude each other")
    if resume:
        if not (run_dir / RUN_FILE).is_file():
            raise UserError(f"{run_dir} is not a training run to resume (no {RUN_FILE})")
    elif run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())) and not overwrite:
        raise UserError(
            f"output directory {run_dir} exists and is not empty "
            "(pass --resume to continue its training or --overwrite to replace it)"
        )


def _create_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Called once every input has been checked, so a bad flag never costs an existing run."""
    if overwrite and run_dir.exists():
        shutil.rmtree(run_dir) if run_dir.is_dir() else run_dir.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)


def _resolve_recipe(run_dir: Path, model: str, recipe, overrides, resume: bool) -> tuple[Recipe, dict]:
    if not resume:
        return load_recipe(recipe, overrides)
    saved = json.loads((run_dir / RUN_FILE).read_text())
    if Path(model).expanduser().resolve() != Path(saved["model"]).expanduser().resolve() and model != saved["model"]:
        raise UserError(f"--resume: this run trains {saved['model']!r}, not {model!r}")
    cfg = recipe_from_dict(saved["recipe"], f"{run_dir / RUN_FILE}")
    given = overrides or {}
    if recipe is not None:
        wanted = load_recipe(recipe, given)[0].to_dict()
    else:
        wanted = recipe_from_dict(apply_overrides(cfg.to_dict(), given)).to_dict()
    diffs = [
        f"{section}.{key} ({value!r} in the run, {wanted[section][key]!r} given)"
        for section, values in cfg.to_dict().items()
        if isinstance(values, dict)
        for key, value in values.items()
        if wanted[section][key] != value
    ]
    if diffs:
        raise UserError("--resume continues the run with its saved recipe; these differ: " + ", ".join(diffs))
    return cfg, saved["recipe_info"]


# -------------------------------------------------------------------------------------------------- train


def train(
    model: str,
    out: str | Path,
    recipe: str | Path | None = None,
    overrides: dict | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """Retrain ``model`` with AST into the run directory ``out``.

    ``recipe``: a shipped recipe name or a YAML path (default ``ast-naive``); ``overrides``: dotted recipe fields
    (``{"train.tokens": 1_000_000, "init.source": "wanda"}``), as the CLI flags give them. ``resume`` continues from
    the newest valid checkpoint in ``out`` with the run's saved recipe. ``on_step(step)`` is called after every
    optimizer step (e.g. ``torch.profiler.profile.step``); the loop's phases are labelled for the profiler.
    """
    started = time.perf_counter()
    rank, world = dist_info()
    if max(world, int(os.environ.get("WORLD_SIZE", "1") or 1)) > 1:
        # Until FSDP is wired, each rank would train its own unsynchronised copy and rank 0's would be exported.
        raise UserError("distributed training is not supported yet: run one process (not under torchrun)")
    is_main = rank == 0
    run_dir = Path(out)
    _check_run_dir(run_dir, resume, overwrite)
    cfg, recipe_info = _resolve_recipe(run_dir, model, recipe, overrides, resume)
    say = (lambda msg: tqdm.write(f"semisparse: {msg}", file=sys.stdout)) if is_main else (lambda msg: None)

    # ---- where things run
    device = resolve_device(cfg.train.device)
    precision, precision_reason = resolve_precision(cfg.train.precision, device)
    if cfg.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    say(f"precision {precision} ({precision_reason})")
    _seed_everything(cfg.train.seed + rank)

    # ---- text first (fail fast on a bad DATA), then models
    init_source = cfg.init.source
    init_dir = None if init_source in INIT_METHODS else Path(init_source).expanduser()
    if init_dir is not None and not (init_dir / RUN_META).is_file():
        raise UserError(
            f"--init {init_source!r} is neither a pruning method ({', '.join(INIT_METHODS)}) "
            f"nor a run directory written by `semisparse prune` (no {RUN_META})"
        )
    if cfg.train.tokens is None:
        raise UserError("give the training budget with --tokens N (or train.tokens in the recipe)")
    from semisparse.shards import open_training_data  # text, token shards or a weighted mixture (docs/data.md)

    train_data = open_training_data(cfg.data, cfg.init)
    want_eval = cfg.eval.every > 0 or cfg.eval.at_start or cfg.eval.at_end
    eval_spec = cfg.data.eval or train_data.eval_spec
    eval_src = data_mod.load_text(eval_spec, "eval", cfg.data.text_field) if want_eval else None
    if eval_src is not None and cfg.data.eval is None and eval_src.split == "file":
        say(f"note: evaluating on the training file {eval_spec} itself (set data.eval / --eval-data for held-out text)")

    checkpoint_root = run_dir / ckpt.DIR_NAME
    resume_from = None
    if resume:  # pick (and verify) the checkpoint before any slow loading
        if is_main:
            ckpt.cleanup_leftovers(checkpoint_root)
        resume_from = ckpt.latest_checkpoint(checkpoint_root, warn=say)
        if resume_from is None:
            raise UserError(f"no checkpoint in {checkpoint_root} to resume from (start over with --overwrite)")

    # Student: the init run directory, or MODEL (pruned one-shot below).
    student_src = str(init_dir) if init_dir is not None else model
    if cfg.scale.enabled:
        _check_scale_widths(student_src, cfg)
    loaded = load_model(student_src, device=device)
    net, tokenizer = loaded.model, loaded.tokenizer
    init_meta = loaded.run_meta if init_dir is not None else None
    dense_spec = (init_meta or {}).get("dense_model") or (loaded.run_meta or {}).get("dense_model") or model
    teacher_spec = cfg.distill.teacher or dense_spec
    if init_dir is not None and cfg.distill.alpha > 0 and cfg.distill.teacher is None and model != dense_spec:
        say(f"note: the teacher is {dense_spec}, the dense model recorded in {init_dir} (--teacher overrides)")
    seq_len = data_mod.effective_seqlen(net, cfg.train.seq_len)
    if seq_len != cfg.train.seq_len:
        say(f"note: train.seq_len {cfg.train.seq_len} capped at the model's context {seq_len}")
    train_data.prepare(tokenizer, student_src)  # shards: same tokenizer? text: tokenized here
    stream = train_data.calibration_stream(cfg.init.calib_samples * (cfg.init.calib_seqlen or seq_len))
    tokens_per_step = cfg.train.batch_size * cfg.train.grad_accum * seq_len * world
    total_steps = cfg.train.tokens // tokens_per_step
    if total_steps < 1:
        raise UserError(
            f"--tokens {cfg.train.tokens} is less than one optimizer step "
            f"({cfg.train.batch_size} x {cfg.train.grad_accum} x {seq_len} x {world} = {tokens_per_step} tokens)"
        )
    eval_tokens = eval_seqlen = None
    if eval_src is not None:
        eval_seqlen = data_mod.effective_seqlen(net, cfg.eval.seqlen or seq_len)
        eval_tokens = data_mod.tokenize_joined(tokenizer, eval_src.docs)[: cfg.eval.windows * eval_seqlen]
        if eval_tokens.numel() < eval_seqlen:
            raise UserError(
                f"the evaluation text has {eval_tokens.numel()} tokens, fewer than one window of {eval_seqlen}"
            )

    # Teacher: a frozen dense copy, made BEFORE sparsify (SparseLinear shares nn.Linear's weight Parameter).
    teacher = None
    if cfg.distill.alpha > 0:
        if teacher_spec == student_src and init_dir is None and not loaded.run_meta:
            teacher = copy.deepcopy(net)
        else:
            teacher = load_model(teacher_spec, device=device).model
        if teacher.get_output_embeddings().weight.shape[0] != net.get_output_embeddings().weight.shape[0]:
            raise UserError(f"teacher {teacher_spec!r} has a different vocabulary than the student")
        teacher.eval().requires_grad_(False)
        teacher.config.use_cache = False
        if precision == "bf16":
            teacher.to(torch.bfloat16)  # frozen: no fp32 master copy needed, and half the bytes to read

    # Initial masks M0: from the checkpoint (resume), the init run directory, or a one-shot pruner.
    if resume_from is not None:
        extra = ckpt.read_extra(resume_from)
        masks0 = {k[len(M0_PREFIX):]: v for k, v in extra.items() if k.startswith(M0_PREFIX)}
    elif init_dir is not None:
        if Pattern.parse(init_meta.get("pattern", cfg.pattern)) != Pattern.parse(cfg.pattern):
            raise UserError(
                f"--init {init_dir} is {init_meta.get('pattern')} sparse, but the recipe asks for {cfg.pattern}"
            )
        masks0 = load_masks(init_dir)
    else:
        masks0 = _init_masks(net, cfg, stream, seq_len, device, progress and is_main, tokenizer, train_data.docs)
    masks0 = {k: v.to(torch.bool).cpu() for k, v in masks0.items()}
    try:
        layers = sparsify(
            net, masks0, cfg.pattern, _exact_filter(masks0),
            slorb_k=cfg.slorb.k if cfg.slorb.enabled else None, train_x=cfg.slorb.train_x,
            weight_scale_n=cfg.scale.blocks if cfg.scale.enabled else None, dense_forward=cfg.mask.forward == "dense",
        )
    except (ValueError, TypeError) as exc:
        raise UserError(f"cannot make the model sparse: {exc}") from exc
    net.to(device).train()
    use_cache = getattr(net.config, "use_cache", None)
    net.config.use_cache = False
    if cfg.train.gradient_checkpointing:
        if hasattr(net, "activation_checkpointing_enable"):  # transformers >= 5.x name
            net.activation_checkpointing_enable({"use_reentrant": False})
        else:  # pragma: no cover - older transformers
            net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    dense_params = sum(layer.weight.numel() for layer in layers.values())
    slorb_params = slorb_parameter_count(net) if cfg.slorb.enabled else 0
    slorb_info = None
    if cfg.slorb.enabled:
        slorb_info = {
            "k": cfg.slorb.k, "train_x": cfg.slorb.train_x, "init": "mean", "params": slorb_params,
            "layers": len(layers), "overhead_vs_dense": slorb_params / dense_params,
            "overhead_vs_kept": slorb_params / (dense_params * Pattern.parse(cfg.pattern).density),
        }
        say(f"SLoRB k={cfg.slorb.k}: {slorb_params:,} parameters (+{100 * slorb_info['overhead_vs_kept']:.1f}% of the "
            f"kept sparse weights, {100 * slorb_info['overhead_vs_dense']:.2f}% of the dense ones)")

    # Optimizer: masked weights get the SR-STE decay; wd only on >=2-D params.
    groups = _param_groups(net, cfg.optim.weight_decay)
    opt_kw = dict(lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps)
    masked = param_masks(net)
    if cfg.decay.variant == "adamw_decoupled":
        optimizer: torch.optim.Optimizer = MaskedAdamW(groups, masks=masked, **opt_kw)
    elif cfg.decay.variant == "adams":
        try:
            optimizer = AdamS(groups, masks=masked, srste_lambda=cfg.decay.lambda_max, **opt_kw)
        except TypeError as exc:
            raise UserError(f"decay.variant adams: {exc}") from exc
    else:
        optimizer = torch.optim.AdamW(groups, **opt_kw)
    warmup_steps = resolve_steps(cfg.optim.warmup, total_steps)
    ramp_steps = resolve_steps(cfg.decay.ramp, total_steps)
    decay_reach = None
    if cfg.decay.variant == "adams" and cfg.mask.forward == "dense":
        reach = adams_reach(total_steps, cfg.optim.lr, warmup_steps, cfg.optim.min_lr_ratio, ramp_steps)
        typical = median_pruned_magnitude(layers)
        decay_reach = {"reach": reach, "median_pruned_abs": typical, "headroom": reach / typical if typical else None}
        say(f"AdamS can move a pruned weight about Σ lr·α = {reach:.3g} over the run; the median pruned |w| is "
            f"{typical:.3g} now" + (f" (headroom {reach / typical:.2f}x)" if typical else ""))
        if typical and reach < typical:
            say("warning: most pruned weights cannot reach zero before the final hard prune, which then cuts them "
                "as a one-shot prune would: raise optim.lr or train.tokens (docs/cast.md)")

    batches = train_data.batches(seq_len, cfg.train.batch_size, cfg.train.seed, rank, world)
    start_step, tokens_seen, state_extra = 0, 0, {}
    if resume_from is not None:
        state = ckpt.load_checkpoint(resume_from, net, optimizer)
        batches.load_state_dict(state["data"])
        start_step, tokens_seen = int(state["step"]), int(state["tokens"])
        state_extra = state.get("trainer", {})
        if state.get("total_steps") != total_steps:
            raise UserError(
                f"cannot resume: the checkpoint was made for {state.get('total_steps')} steps, not {total_steps}"
            )
        say(f"resuming from {resume_from} (step {start_step} of {total_steps})")
    else:
        _seed_everything(cfg.train.seed + rank)  # the same RNG state whatever the init method consumed

    if is_main:
        if resume_from is not None:
            truncate_metrics(run_dir / METRICS_FILE, start_step - 1)
        else:
            _create_run_dir(run_dir, overwrite)
            run_record = {"model": model, "recipe": cfg.to_dict(), "recipe_info": recipe_info, "world_size": world,
                          "created": _now()}
            rundir.atomic_write_json(run_dir / RUN_FILE, run_record, indent=1)
    log = MetricsLog(run_dir, is_main, cfg.log.tensorboard)
    student_head, teacher_head = lm_head(net), (lm_head(teacher) if teacher is not None else None)
    vocab = student_head.weight.shape[0]
    recompute_logits = cfg.distill.recompute == "always" or (
        cfg.distill.recompute == "auto" and not logits_fit(cfg.train.batch_size * seq_len, vocab))
    params = [p for g in optimizer.param_groups for p in g["params"]]

    def evaluate_now() -> float:
        # float32 whatever the training precision: the numbers compare with `semisparse eval` and the pruned init;
        # through the masks also with a dense forward (CAST): the model a hard prune now would give
        with masked_forward(layers):
            res = perplexity(net, eval_tokens, eval_seqlen, data=eval_src.name, split=eval_src.split,
                             device=device, progress=False)
        return res.ppl

    last_ckpt = resume_from
    last = {"loss": None, "ce": None, "kl": None, "eval_ppl": state_extra.get("eval_ppl"),
            "initial_eval_ppl": state_extra.get("initial_eval_ppl")}

    def save(step_done: int) -> Path:
        nonlocal last_ckpt
        if is_main:
            trainer_state = {"eval_ppl": last["eval_ppl"], "initial_eval_ppl": last["initial_eval_ppl"]}
            last_ckpt = ckpt.save_checkpoint(
                checkpoint_root, step_done, net, optimizer,
                {"tokens": tokens_seen, "total_steps": total_steps, "data": batches.state_dict(),
                 "trainer": trainer_state},
                {f"{M0_PREFIX}{k}": v for k, v in masks0.items()}, keep=cfg.checkpoint.keep,
            )
        return last_ckpt

    def stop(what: str, value: float, step: int) -> UserError:
        where = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
        return UserError(
            f"training stopped: the {what} became {value} at step {step} ({where}; lower optim.lr or check the data)"
        )

    def refresh_masks(step: int, when: str) -> None:
        with record_function("semisparse.mask_recompute"):
            record = {"step": step, **recompute_masks(layers, masks0)}
        if cfg.mask.timing == "before":
            record["when"] = when
        if cfg.mask.forward == "dense":
            # what a hard prune with this mask would cut (CAST.md §2: it must reach ≈ 0 by the end)
            record["pruned_abs_max"] = max(layer.pruned_abs_max() for layer in layers.values())
        log.write(record)

    bar = tqdm(total=total_steps, initial=start_step, unit="step", desc="train", disable=not (progress and is_main),
               dynamic_ncols=True)
    try:
        if start_step == 0 and eval_tokens is not None and cfg.eval.at_start:
            last["eval_ppl"] = last["initial_eval_ppl"] = evaluate_now()
            log.write({"step": -1, "tokens": 0, "eval_ppl": last["eval_ppl"]})
            say(f"held-out perplexity before training: {last['eval_ppl']:.3f}")
        for step in range(start_step, total_steps):
            t0 = time.perf_counter()
            # 1. schedules
            lr = lr_at(step, total_steps, cfg.optim.lr, warmup_steps, cfg.optim.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            mix = None
            if cfg.decay.variant == "adams":  # λ constant, the mixing weight α ramps (CAST.md §2)
                lam, mix = cfg.decay.lambda_max, decay_lambda(step, 1.0, ramp_steps)
                set_adams_alpha(optimizer, mix)
            else:
                lam = decay_lambda(step, cfg.decay.lambda_max, ramp_steps)
            if cfg.decay.variant in ("adamw_decoupled", "adams"):
                set_srste_lambda(optimizer, lam)
            # masks, CAST's timing: before the forward of step t when t % Δt == 0
            if cfg.mask.update and cfg.mask.timing == "before" and step % cfg.mask.every == 0:
                refresh_masks(step, "before")

            # 2. forward/backward over the micro-batches
            optimizer.zero_grad(set_to_none=True)
            sums = {"loss": 0.0, "ce": 0.0, "kl": 0.0}
            teacher_s = 0.0
            for _ in range(cfg.train.grad_accum):
                inputs, targets = (t.to(device, non_blocking=True) for t in batches.next_batch())
                with _autocast(device, precision):
                    teacher_hidden = None
                    if teacher is not None:
                        t1 = time.perf_counter()
                        with torch.no_grad(), record_function("semisparse.teacher_forward"):
                            teacher_hidden = final_hidden_states(teacher, inputs)
                        if device.type == "cuda":
                            torch.cuda.synchronize(device)
                        teacher_s += time.perf_counter() - t1
                    with record_function("semisparse.student_forward"):
                        student_hidden = final_hidden_states(net, inputs)
                    with record_function("semisparse.loss"):
                        out = distill_loss(
                            student_hidden, targets, student_head, teacher_hidden, teacher_head,
                            alpha=cfg.distill.alpha, temperature=cfg.distill.temperature,
                            chunk_size=cfg.distill.chunk_size, recompute=recompute_logits,
                        )
                if not math.isfinite(out.total):
                    raise stop("loss", out.total, step)
                with record_function("semisparse.backward"):
                    (out.loss / cfg.train.grad_accum).backward()
                sums["loss"] += out.total / cfg.train.grad_accum
                sums["ce"] += out.ce / cfg.train.grad_accum
                sums["kl"] += (out.kl or 0.0) / cfg.train.grad_accum

            # 3. clip, masked decay, step
            with record_function("semisparse.grad_clip"):
                if cfg.optim.grad_clip > 0:
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip))
                else:
                    grad_norm = float(torch.linalg.vector_norm(
                        torch.stack([p.grad.detach().float().norm() for p in params if p.grad is not None])))
            if not math.isfinite(grad_norm):
                raise stop("gradient norm", grad_norm, step)
            with record_function("semisparse.optimizer"):
                if cfg.decay.variant == "grad":
                    add_masked_decay_to_grad(masked, lam)  # after clipping: the decay is not clipped
                optimizer.step()
            tokens_seen += tokens_per_step

            # 4. masks: after step t when t % Δt == 0 (AST's timing), and once more at the end (either timing)
            after = cfg.mask.timing == "after" and step % cfg.mask.every == 0
            if cfg.mask.update and (after or step == total_steps - 1):
                refresh_masks(step, "after")

            # 5. log, evaluate, checkpoint
            step_s = time.perf_counter() - t0
            last.update(loss=sums["loss"], ce=sums["ce"], kl=sums["kl"] if teacher is not None else None)
            if step % cfg.log.every == 0 or step == total_steps - 1:
                log.write({
                    "step": step, "tokens": tokens_seen, "loss": sums["loss"], "ce": sums["ce"],
                    "kl": sums["kl"] if teacher is not None else None, "lr": lr, "lambda": lam,
                    **({"decay_mix": mix} if mix is not None else {}),
                    "grad_norm": grad_norm, "tokens_per_s": tokens_per_step / step_s, "teacher_s": teacher_s,
                    "step_s": step_s,
                })
            done = step + 1
            if eval_tokens is not None and (
                (cfg.eval.every and done % cfg.eval.every == 0) or (cfg.eval.at_end and done == total_steps)
            ):
                last["eval_ppl"] = evaluate_now()
                log.write({"step": step, "tokens": tokens_seen, "eval_ppl": last["eval_ppl"]})
            if (cfg.checkpoint.every and done % cfg.checkpoint.every == 0) or (
                cfg.checkpoint.at_end and done == total_steps
            ):
                save(done)
            bar.set_postfix(loss=f"{sums['loss']:.4f}", tok_s=f"{tokens_per_step / step_s:,.0f}", refresh=False)
            bar.update(1)
            if on_step is not None:
                on_step(step)
    finally:
        bar.close()
        log.close()

    # ---- export: a stock model dir holding W ⊙ M, masks, SLoRB, provenance (rank 0)
    if teacher is not None:
        del teacher, teacher_head
    if cfg.train.gradient_checkpointing:
        (getattr(net, "activation_checkpointing_disable", None) or net.gradient_checkpointing_disable)()
    net.config.use_cache = use_cache
    net.eval()
    pruned_abs_max = max(layer.pruned_abs_max() for layer in layers.values())  # cut by the final hard prune
    masks, slorb = densify(net)  # W ⊙ M with any weight scale folded in: an ordinary N:M model
    kept = sum(int(m.sum()) for m in masks.values())
    total_sparse = sum(m.numel() for m in masks.values())
    elapsed = time.perf_counter() - started
    meta = {
        "stage": "train",
        "source_model": student_src,
        "source_path": loaded.path,
        "dense_model": dense_spec,
        "teacher": teacher_spec if cfg.distill.alpha > 0 else None,
        "method": "ast",
        "recipe": {"name": recipe_info.get("name"), "path": recipe_info.get("path"), "values": cfg.to_dict()},
        "init": {"source": init_source, "method": (init_meta or {}).get("method", init_source),
                 "path": str(init_dir) if init_dir is not None else None},
        "pattern": cfg.pattern,
        "layers_pruned": list(masks),
        "sparse_weights": {"kept": kept, "total": total_sparse, "density": kept / total_sparse},
        "slorb": slorb_info,
        "data": train_data.describe(batches),
        "eval_data": eval_src.describe() if eval_src is not None else None,
        "steps": total_steps,
        "tokens": tokens_seen,
        "seq_len": seq_len,
        "tokens_per_step": tokens_per_step,
        "precision": {"used": precision, "reason": precision_reason},
        "recompute_logits": recompute_logits,
        "forward": cfg.mask.forward,
        "adams_reach": decay_reach,
        "weight_scale": {"blocks": cfg.scale.blocks, "folded": True} if cfg.scale.enabled else None,
        "world_size": world,
        "final": {"loss": last["loss"], "ce": last["ce"], "kl": last["kl"], "eval_ppl": last["eval_ppl"],
                  "initial_eval_ppl": last["initial_eval_ppl"], "pruned_abs_max": pruned_abs_max,
                  "eval_protocol": {"windows": cfg.eval.windows, "seqlen": eval_seqlen} if eval_src else None},
        "seed": cfg.train.seed,
        "resumed_from": str(resume_from) if resume_from else None,
        "train_seconds": round(elapsed, 2),
        "created": _now(),
        "versions": package_versions(),
    }
    if is_main:
        _export_run_dir(run_dir, net, tokenizer, masks, slorb, meta)
        if cfg.log.plots:
            write_plots(run_dir)
    if slorb:  # give the caller the model as it was trained (and as load_model re-attaches it)
        attach_slorb(net, slorb, cfg.pattern, masks, train_x=cfg.slorb.train_x)
    summary = {
        "run_dir": str(run_dir), "steps": total_steps, "tokens": tokens_seen, "final_loss": last["loss"],
        "final_eval_ppl": last["eval_ppl"], "initial_eval_ppl": last["initial_eval_ppl"],
        "slorb_params": slorb_params, "train_seconds": round(elapsed, 2),
        "resumed_from": str(resume_from) if resume_from else None,
        "last_checkpoint": str(last_ckpt) if last_ckpt else None,
    }
    say(f"trained {total_steps} steps ({tokens_seen:,} tokens) in {elapsed:.1f}s -> {run_dir}")
    return TrainResult(run_dir, summary, net)


def _export_run_dir(run_dir: Path, net, tokenizer, masks, slorb, meta) -> None:
    """The run files, staged inside the run dir and moved up (semisparse.json last, so a run dir with
    semisparse.json always has a complete model next to it). Checkpoints and metrics stay."""
    with rundir.staged_files(run_dir, last=RUN_META) as stage:
        write_run_files(stage, net, tokenizer, masks, meta, slorb=slorb or None)

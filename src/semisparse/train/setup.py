"""Everything a training run needs before its first step, built once: ``prepare(...) -> Run``.

In order: the run directory and recipe (checked before anything slow), the process group and device, the training
and evaluation text, the student (from MODEL or an init run directory) and the frozen teacher, the initial masks M0
and the sparse layers, FSDP2 wrapping when torchrun started several processes, the optimizer and the schedules, and
on ``--resume`` the newest valid checkpoint's state. Every input is checked before the run directory is created,
so a bad flag never costs an existing run.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import json
import os
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from semisparse import data as data_mod
from semisparse import rundir
from semisparse.config import INIT_METHODS, Recipe, apply_overrides, load_recipe, recipe_from_dict
from semisparse.devices import precision_warning, resolve_precision
from semisparse.errors import UserError
from semisparse.layers import LayerFilter, select_layers, weight_matrix
from semisparse.masks import Pattern
from semisparse.models import load_model, load_skeleton, model_skeleton, skeleton_loadable
from semisparse.rundir import MASKS_FILE, METRICS_FILE, RUN_FILE, RUN_META, read_mask_file, truncate_metrics
from semisparse.train import checkpoint as ckpt
from semisparse.train import distributed
from semisparse.train.distill import lm_head, logits_fit
from semisparse.train.metrics import MetricsLog
from semisparse.train.optim import AdamS, MaskedAdamW, local_row_range, local_rows
from semisparse.train.schedules import Decay, LrSchedule, MaskSchedule, adams_reach
from semisparse.train.sparse_linear import (
    WEIGHT_SCALE,
    SparseLinear,
    param_masks,
    slorb_parameter_count,
    sparsify,
)


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class Evaluation:
    """Held-out text for the in-training perplexity."""

    tokens: torch.Tensor
    seqlen: int
    source: object  # data.TextSource


@dataclass
class Run:
    """A prepared run: what the loop reads and updates (step, tokens, last values), and what the export records."""

    cfg: Recipe
    recipe_info: dict
    model_spec: str
    run_dir: Path
    dist: distributed.Dist
    device: torch.device
    precision: str
    precision_reason: str
    net: nn.Module
    layers: dict[str, SparseLinear]
    tokenizer: object
    loaded: object  # models.LoadedModel of the student source
    student_src: str
    init_source: str
    init_dir: Path | None
    init_meta: dict | None
    dense_spec: str
    teacher_spec: str
    teacher: nn.Module | None
    optimizer: torch.optim.Optimizer
    masked: dict
    lr: LrSchedule
    decay: Decay
    mask_schedule: MaskSchedule
    train_data: object
    batches: object
    seq_len: int
    total_steps: int
    tokens_per_step: int
    micro_steps: int  # micro-batches per optimizer step in this process
    evaluation: Evaluation | None
    masks0: dict[str, torch.Tensor]
    log: MetricsLog
    recompute_logits: bool
    resume_from: Path | None
    start_step: int = 0
    tokens_seen: int = 0
    slorb_info: dict | None = None
    slorb_params: int = 0
    decay_reach: dict | None = None
    use_cache: object = None
    started: float = field(default_factory=time.perf_counter)
    last: dict = field(default_factory=dict)  # loss, ce, kl, eval_ppl, initial_eval_ppl
    last_checkpoint: Path | None = None

    @property
    def checkpoint_root(self) -> Path:
        return self.run_dir / ckpt.DIR_NAME

    def say(self, msg: str) -> None:
        if self.dist.is_main:
            tqdm.write(f"semisparse: {msg}", file=sys.stdout)


# -------------------------------------------------------------------------------------------------- small pieces


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if "numpy" in sys.modules:
        import numpy as np

        np.random.seed(seed % 2**32)


def _exact_filter(names) -> LayerFilter:
    return LayerFilter(include=[f"^{re.escape(n)}$" for n in names], exclude=[], blocks_only=False)


def init_masks(net: nn.Module, cfg: Recipe, stream: torch.Tensor, seq_len: int, device, progress: bool,
               tokenizer=None, docs: list[str] | None = None):
    """One-shot masks by the init method. Kept weights come from the pruner (SparseGPT updates them). Pruned weights
    restart from their dense values (``init.pruned_weights: dense``, the paper: AST trains all dense weights, so the
    straight-through gradient can bring them back) or stay at the pruner's zeros (``zero``: the first magnitude
    recompute then keeps the pruner's mask instead of reverting groups to magnitude's choice)."""
    from semisparse.prune import get_method, prune_model

    pruner = get_method(cfg.init.source, cfg.init.tie_order, cfg.init.calib_stats)
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


def check_scale_widths(spec: str, cfg: Recipe) -> None:
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


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW weight decay on >=2-D parameters only (AST.md §5); norms, biases and CAST's weight scales get none."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 and not name.endswith(WEIGHT_SCALE) else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


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


def compile_blocks(net: nn.Module, teacher: nn.Module | None) -> None:
    """torch.compile per decoder block (before FSDP2 wraps them, as torch's own recipes do): the blocks share one
    graph, the mask product and the block's elementwise work fuse; masks change in place without a recompile."""
    from semisparse.layers import find_blocks

    for model in (net, teacher):
        if model is not None:
            for block in find_blocks(model)[1]:
                block.compile()


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
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


def local_initial_masks(layers: dict[str, SparseLinear], masks0: dict[str, torch.Tensor],
                        source: tuple[Path, str] | None = None) -> dict[str, torch.Tensor]:
    """This process's rows of M0, copied: FSDP2 splits each weight (and its live mask) by output rows and the flip
    count vs M0 is summed over rows, so a process never needs the other rows (1 byte a sparse weight otherwise, in
    every process: 6.5 GB each for LLaMA-2-7B). ``source``: read just those rows from M0's file (a process that
    holds only M0's shapes). One process: M0 as it is."""
    if source is not None:
        rows = read_mask_file(source, rows={name: local_row_range(layer.weight) for name, layer in layers.items()})
        return {name: rows[name].to(torch.bool) for name in layers}
    local = {name: local_rows(layer.weight, masks0[name]) for name, layer in layers.items()}
    return {name: rows if rows is masks0[name] else rows.clone() for name, rows in local.items()}  # a view: copied


def create_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Called once every input has been checked, so a bad flag never costs an existing run."""
    if overwrite and run_dir.exists():
        shutil.rmtree(run_dir) if run_dir.is_dir() else run_dir.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)


def resolve_recipe(run_dir: Path, model: str, recipe, overrides, resume: bool) -> tuple[Recipe, dict]:
    if not resume:
        return load_recipe(recipe, overrides)
    saved = json.loads((run_dir / RUN_FILE).read_text())
    if Path(model).expanduser().resolve() != Path(saved["model"]).expanduser().resolve() and model != saved["model"]:
        raise UserError(f"--resume: this run trains {saved['model']!r}, not {model!r}")
    data = saved["recipe"]
    data.setdefault("fsdp", {})  # runs written before the fsdp section
    cfg = recipe_from_dict(data, f"{run_dir / RUN_FILE}")
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


def _pick_checkpoint(run_dir: Path, d: distributed.Dist, warn) -> Path:
    """The newest valid checkpoint (rank 0 verifies it; every process gets its path), before any slow loading."""
    root = run_dir / ckpt.DIR_NAME
    found = problem = None
    if d.is_main:
        ckpt.cleanup_leftovers(root)
        try:
            found = ckpt.latest_checkpoint(root, warn=warn)
            if found is None:
                problem = f"no checkpoint in {root} to resume from (start over with --overwrite)"
        except UserError as exc:
            problem = str(exc)
    found, problem = distributed.broadcast(d, (str(found) if found else None, problem))
    if problem:
        raise UserError(problem)
    return Path(found)


# -------------------------------------------------------------------------------------------------- prepare


def prepare(model: str, out: str | Path, recipe, overrides, resume: bool, overwrite: bool, progress: bool) -> Run:
    run_dir = Path(out)
    check_run_dir(run_dir, resume, overwrite)
    cfg, recipe_info = resolve_recipe(run_dir, model, recipe, overrides, resume)

    # ---- processes and devices (torchrun's environment; one process otherwise)
    from semisparse.devices import resolve_device

    world = distributed.launched_world_size()
    if cfg.train.grad_accum % world:
        raise UserError(f"train.grad_accum {cfg.train.grad_accum} is not a multiple of the {world} processes: the "
                        f"global batch (batch_size x grad_accum sequences) is split evenly between them; set "
                        f"--grad-accum to a multiple of {world}")
    distributed.check_options(cfg.fsdp, resolve_device(cfg.train.device))
    d, device = distributed.start(cfg.train.device, cfg.fsdp.timeout_s, cfg.fsdp.always)
    say = (lambda msg: tqdm.write(f"semisparse: {msg}", file=sys.stdout)) if d.is_main else (lambda msg: None)
    precision, precision_reason = resolve_precision(cfg.train.precision, device)
    if cfg.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    wrapped = f", {d.world} process{'es' if d.world > 1 else ''} (FSDP2)" if d.sharded else ""
    say(f"precision {precision} ({precision_reason}){wrapped}")
    if (warning := precision_warning(precision, device)) is not None:
        say(warning)
    seed_everything(cfg.train.seed + d.rank)

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
    resume_from = _pick_checkpoint(run_dir, d, say) if resume else None
    masks0_record = masks0_file = None  # run.json's record of the M0 file (None: to write), M0's (file, key prefix)
    if resume_from is not None:  # checked with the checkpoint, before any slow loading
        masks0_record = json.loads((run_dir / RUN_FILE).read_text()).get("initial_masks")
        masks0_file = ckpt.initial_masks_source(resume_from, masks0_record, d)

    # ---- the student: the init run directory, or MODEL (pruned one-shot below)
    student_src = str(init_dir) if init_dir is not None else model
    if cfg.scale.enabled:
        check_scale_widths(student_src, cfg)
    # Read into CPU memory: the teacher is copied and cast to bf16 there, and with several processes the student
    # stays there until FSDP2 shards it, one block at a time onto the GPU (never a whole fp32 copy on a GPU: 4 bytes
    # a parameter, 52 GB for a 13B model). One process moves it to its device after sparsify.
    # Several processes with M0 on disk (--init, --resume): rank 0 alone reads the weights, the others build the
    # model on the meta device and receive rank 0's values once it is sharded (distributed.fill_from_rank0), and
    # read only their rows of M0. Not with fsdp.offload (shards kept in CPU memory, a start torch documents
    # differently; GPU-only, untested here).
    from_rank0 = (d.world > 1 and (resume_from is not None or init_dir is not None) and not cfg.fsdp.offload
                  and skeleton_loadable(student_src))
    skeleton = from_rank0 and not d.is_main
    if from_rank0:
        say(f"rank 0 reads the weights; the other {d.world - 1} process(es) receive them from it")
    loaded = load_skeleton(student_src) if skeleton else load_model(student_src, device="cpu")
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
    # The global batch is batch_size x grad_accum sequences whatever the number of processes.
    tokens_per_step = cfg.train.batch_size * cfg.train.grad_accum * seq_len
    total_steps = cfg.train.tokens // tokens_per_step
    if total_steps < 1:
        raise UserError(
            f"--tokens {cfg.train.tokens} is less than one optimizer step "
            f"({cfg.train.batch_size} x {cfg.train.grad_accum} x {seq_len} = {tokens_per_step} tokens)"
        )
    evaluation = None
    if eval_src is not None:
        eval_seqlen = data_mod.effective_seqlen(net, cfg.eval.seqlen or seq_len)
        eval_tokens = data_mod.tokenize_joined(tokenizer, eval_src.docs)[: cfg.eval.windows * eval_seqlen]
        if eval_tokens.numel() < eval_seqlen:
            raise UserError(
                f"the evaluation text has {eval_tokens.numel()} tokens, fewer than one window of {eval_seqlen}"
            )
        evaluation = Evaluation(eval_tokens, eval_seqlen, eval_src)

    # ---- the teacher: a frozen dense copy, made BEFORE sparsify (SparseLinear shares nn.Linear's weight Parameter)
    teacher, teacher_from_rank0 = None, False
    if cfg.distill.alpha > 0:
        copied = teacher_spec == student_src and init_dir is None and not loaded.run_meta
        teacher_from_rank0 = from_rank0 and (copied or skeleton_loadable(teacher_spec))
        # read in the dtype it runs in: a bf16 teacher never exists in float32 (2 bytes a parameter, not 4 + 2)
        teacher_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        if copied:
            teacher = copy.deepcopy(net)  # (a skeleton's copy is a skeleton)
        elif teacher_from_rank0 and skeleton:
            teacher = load_skeleton(teacher_spec, dtype=teacher_dtype).model
        else:
            teacher = load_model(teacher_spec, dtype=teacher_dtype, device="cpu").model
        if teacher.get_output_embeddings().weight.shape[0] != net.get_output_embeddings().weight.shape[0]:
            raise UserError(f"teacher {teacher_spec!r} has a different vocabulary than the student")
        teacher.eval().requires_grad_(False)
        teacher.config.use_cache = False
        if precision == "bf16":
            teacher.to(torch.bfloat16)  # frozen: no fp32 master copy needed, and half the bytes to read
        if not (d.sharded and cfg.fsdp.shard_teacher) and not (teacher_from_rank0 and skeleton):
            teacher.to(device)  # (a sharded teacher moves to the GPU as it is sharded, a skeleton when it is filled)

    # ---- initial masks M0: from the run (resume, read above), the init run directory, or a one-shot pruner
    if masks0_file is None and init_dir is not None:
        if Pattern.parse(init_meta.get("pattern", cfg.pattern)) != Pattern.parse(cfg.pattern):
            raise UserError(
                f"--init {init_dir} is {init_meta.get('pattern')} sparse, but the recipe asks for {cfg.pattern}"
            )
        masks0_file = (init_dir / MASKS_FILE, "")
    if masks0_file is not None:  # a skeleton needs only their shapes now (its rows are read after sharding)
        masks0 = read_mask_file(masks0_file, shapes_only=skeleton)
    else:
        net.to(device)  # the pruner runs the whole model on the device
        masks0 = init_masks(net, cfg, stream, seq_len, device, progress and d.is_main, tokenizer, train_data.docs)
    if not skeleton:
        masks0 = {k: v.to(torch.bool).cpu() for k, v in masks0.items()}
    try:
        layers = sparsify(
            net, masks0, cfg.pattern, _exact_filter(masks0),
            slorb_k=cfg.slorb.k if cfg.slorb.enabled else None, train_x=cfg.slorb.train_x,
            weight_scale_n=cfg.scale.blocks if cfg.scale.enabled else None, dense_forward=cfg.mask.forward == "dense",
        )
    except (ValueError, TypeError) as exc:
        raise UserError(f"cannot make the model sparse: {exc}") from exc
    if not d.sharded:
        net.to(device)
    net.train()
    use_cache = getattr(net.config, "use_cache", None)
    net.config.use_cache = False
    if cfg.train.gradient_checkpointing:
        if hasattr(net, "activation_checkpointing_enable"):  # transformers >= 5.x name
            net.activation_checkpointing_enable({"use_reentrant": False})
        else:  # pragma: no cover - older transformers
            net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    if cfg.train.compile:
        compile_blocks(net, teacher)

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

    lr = LrSchedule.from_recipe(cfg, total_steps)
    decay = Decay.from_recipe(cfg, total_steps)
    decay_reach = None
    if cfg.decay.variant == "adams" and cfg.mask.forward == "dense" and not skeleton:  # on whole weights, unsharded
        reach = adams_reach(total_steps, cfg.optim.lr, lr.warmup_steps, cfg.optim.min_lr_ratio, decay.ramp_steps)
        typical = median_pruned_magnitude(layers)
        decay_reach = {"reach": reach, "median_pruned_abs": typical, "headroom": reach / typical if typical else None}
        say(f"AdamS can move a pruned weight about Σ lr·α = {reach:.3g} over the run; the median pruned |w| is "
            f"{typical:.3g} now" + (f" (headroom {reach / typical:.2f}x)" if typical else ""))
        if typical and reach < typical:
            say("warning: most pruned weights cannot reach zero before the final hard prune, which then cuts them "
                "as a one-shot prune would: raise optim.lr or train.tokens (docs/cast.md)")

    # ---- many processes: shard the student (and optionally the teacher); the optimizer is built on the shards
    from semisparse.train.trainer import TEACHER_FORWARD, TRAIN_LOSS, attach_train_loss

    attach_train_loss(net)
    if teacher is not None:
        attach_train_loss(teacher)
    # rank 0's values, taken before sharding (a resumed run's come from its checkpoint: only the buffers are sent)
    student_state = net.state_dict() if from_rank0 and d.is_main and resume_from is None else None
    teacher_state = teacher.state_dict() if teacher_from_rank0 and d.is_main else None
    if d.sharded:
        distributed.shard(net, cfg.fsdp, device, precision, train_method=TRAIN_LOSS)
        if teacher is not None and cfg.fsdp.shard_teacher:
            distributed.shard(teacher, cfg.fsdp, device, precision, train_method=TEACHER_FORWARD)
    if from_rank0:
        distributed.fill_from_rank0(d, net, student_state, device, values=resume_from is None)
    if teacher_from_rank0:
        distributed.fill_from_rank0(d, teacher, teacher_state, device)
    del student_state, teacher_state
    masks0_to_write = masks0 if d.is_main and masks0_record is None else None
    masks0 = local_initial_masks(layers, masks0, masks0_file if skeleton else None)

    groups = param_groups(net, cfg.optim.weight_decay)
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

    batches = train_data.batches(seq_len, cfg.train.batch_size, cfg.train.seed, d.rank, d.world)
    start_step, tokens_seen, trainer_state = 0, 0, {}
    if resume_from is not None:
        state = ckpt.load_checkpoint(resume_from, net, optimizer, dist=d)
        batches.load_state_dict(state["data"])
        start_step, tokens_seen = int(state["step"]), int(state["tokens"])
        trainer_state = state.get("trainer", {})
        if state.get("total_steps") != total_steps:
            raise UserError(
                f"cannot resume: the checkpoint was made for {state.get('total_steps')} steps, not {total_steps}"
            )
        written_by = state.get("world_size", 1)
        say(f"resuming from {resume_from} (step {start_step} of {total_steps})"
            + (f"; written by {written_by} processes, continued by {d.world}" if written_by != d.world else ""))
    else:
        seed_everything(cfg.train.seed + d.rank)  # the same RNG state whatever the init method consumed

    distributed.barrier(d)  # every process has checked its inputs before rank 0 touches the run directory
    if d.is_main:
        if resume_from is not None:
            truncate_metrics(run_dir / METRICS_FILE, start_step - 1)
        else:
            create_run_dir(run_dir, overwrite)
        if masks0_to_write is not None:
            masks0_record = ckpt.save_initial_masks(run_dir / ckpt.DIR_NAME, masks0_to_write)
        if resume_from is None:
            run_record = {"model": model, "recipe": cfg.to_dict(), "recipe_info": recipe_info, "world_size": d.world,
                          "created": now(), "initial_masks": masks0_record}
            rundir.atomic_write_json(run_dir / RUN_FILE, run_record, indent=1)
        elif masks0_to_write is not None:  # a run from before the M0 file: record it, later checkpoints omit M0
            run_record = {**json.loads((run_dir / RUN_FILE).read_text()), "initial_masks": masks0_record}
            rundir.atomic_write_json(run_dir / RUN_FILE, run_record, indent=1)
    del masks0_to_write
    distributed.barrier(d)
    vocab = lm_head(net).weight.shape[0]
    recompute_logits = cfg.distill.recompute == "always" or (
        cfg.distill.recompute == "auto" and not logits_fit(cfg.train.batch_size * seq_len, vocab))
    run = Run(
        cfg=cfg, recipe_info=recipe_info, model_spec=model, run_dir=run_dir, dist=d, device=device,
        precision=precision, precision_reason=precision_reason, net=net, layers=layers, tokenizer=tokenizer,
        loaded=loaded, student_src=student_src, init_source=init_source, init_dir=init_dir, init_meta=init_meta,
        dense_spec=dense_spec, teacher_spec=teacher_spec, teacher=teacher, optimizer=optimizer, masked=masked, lr=lr,
        decay=decay, mask_schedule=MaskSchedule.from_recipe(cfg, total_steps), train_data=train_data,
        batches=batches, seq_len=seq_len, total_steps=total_steps, tokens_per_step=tokens_per_step,
        micro_steps=cfg.train.grad_accum // d.world, evaluation=evaluation, masks0=masks0,
        log=MetricsLog(run_dir, d.is_main, cfg.log.tensorboard), recompute_logits=recompute_logits,
        resume_from=resume_from, start_step=start_step, tokens_seen=tokens_seen, slorb_info=slorb_info,
        slorb_params=slorb_params, decay_reach=decay_reach, use_cache=use_cache, last_checkpoint=resume_from,
    )
    run.last = {"loss": None, "ce": None, "kl": None, "eval_ppl": trainer_state.get("eval_ppl"),
                "initial_eval_ppl": trainer_state.get("initial_eval_ppl")}
    return run

"""The AST training loop (AST.md §9), readable top to bottom.

``train(model, out, recipe, overrides)`` retrains a model to N:M sparsity and writes a run directory::

    out/
      config.json, model.safetensors, tokenizer files   # stock transformers model holding W ⊙ M (zeros dense)
      masks.safetensors, slorb.safetensors (AST-Boosted), semisparse.json (stage "train")
      run.json                                           # what was asked (model, resolved recipe): --resume reads it
      metrics.jsonl, plots/*.png, tensorboard/ (if tensorboard is installed)
      checkpoints/step-NNNNNN/                           # atomic, verified on load, any process count (checkpoint.py)

Set-up (run directory, recipe, processes, data, models, initial masks, FSDP2 wrapping, optimizer) is
``setup.prepare``; this file is the step loop and the export. One optimizer step t (0-based) is:
  1. schedules: lr(t) (linear warmup, cosine to min_lr_ratio·lr), the decay's λ(t) (and AdamS's α(t)); masks
     first when they are refreshed before the forward (mask.timing "before", CAST).
  2. this process's micro-batches (grad_accum / processes of them): teacher hidden states (no grad), then the
     student's hidden states and the chunked loss α·T²·KL + (1−α)·CE (distill.py), backward of loss / micro-steps.
     FSDP2 averages the gradients over the processes, so a step sees the same global batch with any process count.
  3. losses averaged over the processes; a non-finite loss or gradient norm stops the run; clip the global grad
     norm; the "grad" decay variant adds λ·(¬M⊙W) to the gradients; optimizer step (MaskedAdamW / AdamS put their
     decay in the update).
  4. masks: if t % Δt == 0 (and after the last step), recompute every mask from |W| and log the flip rates.
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

Many processes (``torchrun --nproc-per-node N -m semisparse train ...``): the same loop on every process with the
student sharded by FSDP2; masks are a deterministic function of the weights (each process recomputes its rows),
only rank 0 writes logs and the run directory, every process writes its shards of a checkpoint.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.profiler import record_function
from tqdm.auto import tqdm

from semisparse import rundir
from semisparse.errors import UserError
from semisparse.evaluate.perplexity import perplexity
from semisparse.masks import flip_count
from semisparse.models import load_model, load_skeleton, package_versions, skeleton_loadable, write_run_files
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
from semisparse.train import distributed
from semisparse.train.distill import distill_loss, final_hidden_states, lm_head
from semisparse.train.metrics import MetricsLog, write_plots  # noqa: F401 (re-exported)
from semisparse.train.optim import MaskedAdamW, local_rows  # noqa: F401 (MaskedAdamW re-exported: tests patch it)
from semisparse.train.schedules import adams_reach, lr_at, mask_update_steps  # noqa: F401 (re-exported)
from semisparse.train.setup import Run, autocast, now, param_groups, prepare
from semisparse.train.sparse_linear import SparseLinear, attach_slorb, densify, masked_forward, sparsify

TRAIN_LOSS = distributed.TRAIN_LOSS_METHOD
TEACHER_FORWARD = "semisparse_teacher_forward"
_autocast, _param_groups = autocast, param_groups  # older names (benchmarks)


@dataclass
class TrainResult:
    run_dir: Path
    summary: dict
    model: nn.Module | None = field(default=None, repr=False)  # the trained model as exported (SLoRB attached)


# -------------------------------------------------------------------------------------------------- model pieces


def _train_loss(model: nn.Module, inputs, targets, teacher_hidden=None, teacher_head=None, **loss_kw):
    """The student's hidden states and the distillation loss: one call FSDP2 treats as a forward, so the root's
    parameters (embeddings, final norm, LM head) are gathered for it and the head's gradient is reduced."""
    with record_function("semisparse.student_forward"):
        hidden = final_hidden_states(model, inputs)
    with record_function("semisparse.loss"):
        return distill_loss(hidden, targets, lm_head(model), teacher_hidden, teacher_head, **loss_kw)


def _teacher_forward(model: nn.Module, inputs, sharded: bool):
    """The teacher's final hidden states, and its LM head: the module, or (a sharded teacher) a copy of the gathered
    weight, since the shards are freed once this call returns."""
    hidden = final_hidden_states(model, inputs)
    return hidden, (lm_head(model).weight.detach().clone() if sharded else lm_head(model))


def attach_train_loss(model: nn.Module) -> None:
    """Give ``model`` the method the loop calls (``model.semisparse_train_loss``): the student's loss, or for a
    teacher its hidden states (registered with FSDP2 by distributed.shard)."""
    setattr(model, TRAIN_LOSS, functools.partial(_train_loss, model))
    setattr(model, TEACHER_FORWARD, functools.partial(_teacher_forward, model))


@torch.no_grad()
def recompute_masks(layers: dict[str, SparseLinear], initial: dict[str, torch.Tensor],
                    d: distributed.Dist = distributed.Dist()) -> dict:
    """Recompute every mask from |W| (in place); flips vs the previous masks and vs the initial masks M0
    (``initial``: this process's rows of them, setup.local_initial_masks), summed over the processes."""
    flips = init_flips = total = 0
    for name, layer in layers.items():
        old = local_rows(layer.weight, layer.mask).clone()
        new = layer.recompute_mask()
        flips += flip_count(new, old)
        init_flips += flip_count(new, initial[name].to(new.device))  # this process's rows (local_initial_masks)
        total += new.numel()
    device = next(iter(layers.values())).weight.device
    flips, init_flips, total = distributed.total(d, [flips, init_flips, total], device)
    flips, init_flips = int(flips), int(init_flips)
    return {"flips": flips, "init_flips": init_flips, "flip_rate": flips / total, "init_flip_rate": init_flips / total}


def _pruned_abs_max(run: Run) -> float:
    """The largest pruned |w| over all layers (and processes): what a hard prune with the current masks cuts."""
    local = max(layer.pruned_abs_max() for layer in run.layers.values())
    return distributed.maximum(run.dist, local, run.device)


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
    Under torchrun every process calls this; rank 0 writes the run directory.
    """
    started = time.perf_counter()
    run = None
    try:
        run = prepare(model, out, recipe, overrides, resume, overwrite, progress)
        run.started = started
        loop(run, progress, on_step)
        return finish(run)
    finally:
        if run is not None:
            distributed.stop(run.dist)


def loop(run: Run, progress: bool, on_step: Callable[[int], None] | None) -> None:
    cfg, net, layers, optimizer, d = run.cfg, run.net, run.layers, run.optimizer, run.dist
    teacher = run.teacher
    shard_teacher = teacher is not None and d.sharded and cfg.fsdp.shard_teacher
    params = [p for g in optimizer.param_groups for p in g["params"]]
    loss_kw = dict(alpha=cfg.distill.alpha, temperature=cfg.distill.temperature, chunk_size=cfg.distill.chunk_size,
                   recompute=run.recompute_logits)

    def evaluate_now() -> float:
        # float32 whatever the training precision: the numbers compare with `semisparse eval` and the pruned init;
        # through the masks also with a dense forward (CAST): the model a hard prune now would give
        ev = run.evaluation
        with masked_forward(layers):
            res = perplexity(net, ev.tokens, ev.seqlen, data=ev.source.name, split=ev.source.split,
                             device=run.device, progress=False)
        return res.ppl

    def save(step_done: int) -> None:
        trainer_state = {"eval_ppl": run.last["eval_ppl"], "initial_eval_ppl": run.last["initial_eval_ppl"]}
        run.last_checkpoint = ckpt.save_checkpoint(
            run.checkpoint_root, step_done, net, optimizer,
            {"tokens": run.tokens_seen, "total_steps": run.total_steps, "data": run.batches.state_dict(),
             "world_size": d.world, "trainer": trainer_state},
            keep=cfg.checkpoint.keep, dist=d,
        )

    def stop(what: str, value: float, step: int) -> UserError:
        last = run.last_checkpoint
        where = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
        return UserError(
            f"training stopped: the {what} became {value} at step {step} ({where}; lower optim.lr or check the data)"
        )

    def refresh_masks(step: int, when: str) -> None:
        with record_function("semisparse.mask_recompute"):
            record = {"step": step, **recompute_masks(layers, run.masks0, d)}
        if cfg.mask.timing == "before":
            record["when"] = when
        if cfg.mask.forward == "dense":
            # what a hard prune with this mask would cut (CAST.md §2: it must reach ≈ 0 by the end)
            record["pruned_abs_max"] = _pruned_abs_max(run)
        run.log.write(record)

    bar = tqdm(total=run.total_steps, initial=run.start_step, unit="step", desc="train",
               disable=not (progress and d.is_main), dynamic_ncols=True)
    try:
        if run.start_step == 0 and run.evaluation is not None and cfg.eval.at_start:
            run.last["eval_ppl"] = run.last["initial_eval_ppl"] = evaluate_now()
            run.log.write({"step": -1, "tokens": 0, "eval_ppl": run.last["eval_ppl"]})
            run.say(f"held-out perplexity before training: {run.last['eval_ppl']:.3f}")
        for step in range(run.start_step, run.total_steps):
            t0 = time.perf_counter()
            # 1. schedules (and CAST's masks, before the forward of step t when t % Δt == 0)
            lr = run.lr.set(optimizer, step)
            lam, mix = run.decay.set(optimizer, step)
            if run.mask_schedule.before_forward(step):
                refresh_masks(step, "before")

            # 2. forward/backward over this process's micro-batches
            optimizer.zero_grad(set_to_none=True)
            sums = [0.0, 0.0, 0.0]  # loss, ce, kl
            teacher_s = 0.0
            for _ in range(run.micro_steps):
                inputs, targets = (t.to(run.device, non_blocking=True) for t in run.batches.next_batch())
                with autocast(run.device, run.precision):
                    teacher_hidden = teacher_head = None
                    if teacher is not None:
                        t1 = time.perf_counter()
                        with torch.no_grad(), record_function("semisparse.teacher_forward"):
                            teacher_hidden, teacher_head = getattr(teacher, TEACHER_FORWARD)(inputs, shard_teacher)
                        if run.device.type == "cuda":
                            torch.cuda.synchronize(run.device)
                        teacher_s += time.perf_counter() - t1
                    out = getattr(net, TRAIN_LOSS)(inputs, targets, teacher_hidden, teacher_head, **loss_kw)
                with record_function("semisparse.backward"):
                    (out.loss / run.micro_steps).backward()
                sums[0] += out.total / run.micro_steps
                sums[1] += out.ce / run.micro_steps
                sums[2] += (out.kl or 0.0) / run.micro_steps
            loss, ce, kl = distributed.mean(d, sums, run.device)  # every process sees the same values
            if not math.isfinite(loss):
                raise stop("loss", loss, step)

            # 3. clip, masked decay, step
            with record_function("semisparse.grad_clip"):
                norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip or float("inf"))
                grad_norm = float(distributed.full_tensor(norm))
            if not math.isfinite(grad_norm):
                raise stop("gradient norm", grad_norm, step)
            with record_function("semisparse.optimizer"):
                run.decay.before_optimizer_step(run.masked, lam)
                optimizer.step()
            run.tokens_seen += run.tokens_per_step

            # 4. masks: after step t when t % Δt == 0 (AST's timing), and once more at the end (either timing)
            if run.mask_schedule.after_step(step):
                refresh_masks(step, "after")

            # 5. log, evaluate, checkpoint
            step_s = time.perf_counter() - t0
            run.last.update(loss=loss, ce=ce, kl=kl if teacher is not None else None)
            if step % cfg.log.every == 0 or step == run.total_steps - 1:
                run.log.write({
                    "step": step, "tokens": run.tokens_seen, "loss": loss, "ce": ce,
                    "kl": kl if teacher is not None else None, "lr": lr, "lambda": lam,
                    **({"decay_mix": mix} if mix is not None else {}),
                    "grad_norm": grad_norm, "tokens_per_s": run.tokens_per_step / step_s, "teacher_s": teacher_s,
                    "step_s": step_s,
                })
            done = step + 1
            if run.evaluation is not None and (
                (cfg.eval.every and done % cfg.eval.every == 0) or (cfg.eval.at_end and done == run.total_steps)
            ):
                run.last["eval_ppl"] = evaluate_now()
                run.log.write({"step": step, "tokens": run.tokens_seen, "eval_ppl": run.last["eval_ppl"]})
            if (cfg.checkpoint.every and done % cfg.checkpoint.every == 0) or (
                cfg.checkpoint.at_end and done == run.total_steps
            ):
                save(done)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{run.tokens_per_step / step_s:,.0f}", refresh=False)
            bar.update(1)
            if on_step is not None:
                on_step(step)
    finally:
        bar.close()
        run.log.close()


# -------------------------------------------------------------------------------------------------- export


def _export_model(run: Run) -> nn.Module:
    """The trained model as one process holds it. Sharded: the full state gathered on rank 0 into a fresh unsharded
    copy (rank 0 only; the other processes get None)."""
    if not run.dist.sharded:
        return run.net
    cfg = run.cfg
    state = distributed.full_state_dict(run.net, run.dist)  # every process takes part
    if not run.dist.is_main:
        return None
    from semisparse.train.setup import _exact_filter

    # The gathered state is the whole model: a meta-device structure adopts its tensors (one copy in memory, not
    # the state plus a second model read from disk to copy it into).
    adopt = skeleton_loadable(run.student_src)
    fresh = (load_skeleton if adopt else functools.partial(load_model, device="cpu"))(run.student_src).model
    masks = {name: state[f"{name}.mask"] for name in run.layers}  # gathered with the weights (sharded like them)
    sparsify(fresh, masks, cfg.pattern, _exact_filter(masks),
             slorb_k=cfg.slorb.k if cfg.slorb.enabled else None, train_x=cfg.slorb.train_x,
             weight_scale_n=cfg.scale.blocks if cfg.scale.enabled else None,
             dense_forward=cfg.mask.forward == "dense")
    fresh.load_state_dict(state, strict=True, assign=adopt)
    if adopt:
        fresh.tie_weights()  # assigned tensors replace the shared embedding Parameter: tie it again
        live = dict(run.net.named_buffers())  # FSDP2 leaves buffers whole: the rotary frequencies
        for name, buffer in list(fresh.named_buffers()):
            if buffer.is_meta:
                owner, _, leaf = name.rpartition(".")
                fresh.get_submodule(owner).register_buffer(leaf, live[name].detach().to("cpu", copy=True),
                                                           persistent=False)
    return fresh


def finish(run: Run) -> TrainResult:
    """A stock model dir holding W ⊙ M, the masks, SLoRB and the provenance (rank 0)."""
    cfg, d = run.cfg, run.dist
    run.teacher = None
    net = run.net
    if cfg.train.gradient_checkpointing:
        (getattr(net, "activation_checkpointing_disable", None) or net.gradient_checkpointing_disable)()
    net.config.use_cache = run.use_cache
    net.eval()
    pruned_abs_max = _pruned_abs_max(run)  # cut by the final hard prune
    export = _export_model(run)
    elapsed = time.perf_counter() - run.started
    summary = {
        "run_dir": str(run.run_dir), "steps": run.total_steps, "tokens": run.tokens_seen,
        "final_loss": run.last["loss"], "final_eval_ppl": run.last["eval_ppl"],
        "initial_eval_ppl": run.last["initial_eval_ppl"], "slorb_params": run.slorb_params,
        "train_seconds": round(elapsed, 2), "resumed_from": str(run.resume_from) if run.resume_from else None,
        "last_checkpoint": str(run.last_checkpoint) if run.last_checkpoint else None,
    }
    if export is None:  # not rank 0
        return TrainResult(run.run_dir, summary, None)
    export.config.use_cache = run.use_cache
    masks, slorb = densify(export)  # W ⊙ M with any weight scale folded in: an ordinary N:M model
    kept = sum(int(m.sum()) for m in masks.values())
    total_sparse = sum(m.numel() for m in masks.values())
    meta = {
        "stage": "train",
        "source_model": run.student_src,
        "source_path": run.loaded.path,
        "dense_model": run.dense_spec,
        "teacher": run.teacher_spec if cfg.distill.alpha > 0 else None,
        "method": "ast",
        "recipe": {"name": run.recipe_info.get("name"), "path": run.recipe_info.get("path"),
                   "values": cfg.to_dict()},
        "init": {"source": run.init_source, "method": (run.init_meta or {}).get("method", run.init_source),
                 "path": str(run.init_dir) if run.init_dir is not None else None},
        "pattern": cfg.pattern,
        "layers_pruned": list(masks),
        "sparse_weights": {"kept": kept, "total": total_sparse, "density": kept / total_sparse},
        "slorb": run.slorb_info,
        "data": run.train_data.describe(run.batches),
        "eval_data": run.evaluation.source.describe() if run.evaluation is not None else None,
        "steps": run.total_steps,
        "tokens": run.tokens_seen,
        "seq_len": run.seq_len,
        "tokens_per_step": run.tokens_per_step,
        "precision": {"used": run.precision, "reason": run.precision_reason},
        "recompute_logits": run.recompute_logits,
        "forward": cfg.mask.forward,
        "adams_reach": run.decay_reach,
        "weight_scale": {"blocks": cfg.scale.blocks, "folded": True} if cfg.scale.enabled else None,
        "world_size": d.world,
        "final": {"loss": run.last["loss"], "ce": run.last["ce"], "kl": run.last["kl"],
                  "eval_ppl": run.last["eval_ppl"], "initial_eval_ppl": run.last["initial_eval_ppl"],
                  "pruned_abs_max": pruned_abs_max,
                  "eval_protocol": ({"windows": cfg.eval.windows, "seqlen": run.evaluation.seqlen}
                                    if run.evaluation is not None else None)},
        "seed": cfg.train.seed,
        "resumed_from": str(run.resume_from) if run.resume_from else None,
        "train_seconds": round(elapsed, 2),
        "created": now(),
        "versions": package_versions(),
    }
    _export_run_dir(run.run_dir, export, run.tokenizer, masks, slorb, meta)
    if cfg.log.plots:
        write_plots(run.run_dir)
    if slorb:  # give the caller the model as it was trained (and as load_model re-attaches it)
        attach_slorb(export, slorb, cfg.pattern, masks, train_x=cfg.slorb.train_x)
    run.say(f"trained {run.total_steps} steps ({run.tokens_seen:,} tokens) in {elapsed:.1f}s -> {run.run_dir}")
    return TrainResult(run.run_dir, summary, export)


def _export_run_dir(run_dir: Path, net, tokenizer, masks, slorb, meta) -> None:
    """The run files, staged inside the run dir and moved up (semisparse.json last, so a run dir with
    semisparse.json always has a complete model next to it). Checkpoints and metrics stay."""
    with rundir.staged_files(run_dir, last=RUN_META) as stage:
        write_run_files(stage, net, tokenizer, masks, meta, slorb=slorb or None)

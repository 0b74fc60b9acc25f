"""``--dry-run`` estimates: time and peak memory of each stage on this machine, measured, not assumed.

No weights are loaded and nothing is written: the model is built from its config alone with random weights (the
same shapes, so the same arithmetic), and a few steps of each stage's work are timed on it:

- prune: two block-by-block passes over the calibration windows (hooks, then the pruned outputs) = 2 forward
  passes per window, plus the method's per-layer solve timed once per distinct layer shape;
- train: optimizer steps exactly as the trainer takes them (teacher forward, student forward + chunked loss +
  backward, the recipe's optimizer), one warm-up and one timed; peak memory is measured around them;
- eval: one perplexity window forward per window and model; zero-shot as documents x 4 choices x a forward of
  128 tokens (rough: the real count depends on the task).
"""

from __future__ import annotations

import resource
import statistics
import time
from dataclasses import dataclass, field

import torch

from semisparse.pipeline.stages import Context

ZS_CHOICES, ZS_TOKENS = 4, 128


@dataclass
class Estimate:
    seconds: dict[str, float] = field(default_factory=dict)  # per stage
    notes: dict[str, str] = field(default_factory=dict)
    peak_bytes: int | None = None
    peak_what: str = ""
    train: dict = field(default_factory=dict)  # steps, tokens per step, seconds per step, precision


def _config_and_tokenizer(spec: str):
    """The model's config and tokenizer without its weights (a GGUF model not yet converted: from its metadata)."""
    from transformers import AutoConfig, AutoTokenizer

    from semisparse.models import gguf_source, is_cached, resolve_model

    gguf = gguf_source(spec)
    if gguf is not None and not is_cached(gguf[1]):
        file = gguf[0]
        return (AutoConfig.from_pretrained(file.parent, gguf_file=file.name),
                AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name))
    path = resolve_model(spec)
    return AutoConfig.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def _random_model(config, device):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.to(device).eval()


def _timed(fn, repeat: int, device) -> float:
    """Median seconds of ``fn`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _forward_seconds(model, seqlen: int, device, batch: int = 1) -> float:
    from semisparse.data import effective_seqlen

    seqlen = effective_seqlen(model, seqlen)
    ids = torch.randint(0, model.config.vocab_size, (batch, seqlen), device=device)
    with torch.no_grad():
        return _timed(lambda: model(ids, use_cache=False), 1, device)


def _prune_seconds(ctx: Context, model, device) -> float:
    from semisparse.layers import select_layers, weight_matrix
    from semisparse.masks import Pattern
    from semisparse.prune import get_method

    p = ctx.cfg.prune
    method = get_method(p.method)
    pattern = Pattern.parse(ctx.cfg.pattern)
    layers = select_layers(model)
    by_shape: dict[tuple, list] = {}
    for module in layers.values():
        by_shape.setdefault(tuple(weight_matrix(module).shape), []).append(module)
    solve = 0.0
    for shape, modules in by_shape.items():
        w = weight_matrix(modules[0]).detach().clone()
        stats = method.new_stats(shape[1]) if method.needs_calibration else None
        if stats is not None:
            method.observe(stats, torch.randn(2 * shape[1], shape[1], device=w.device))  # a full-rank Hessian
        t0 = time.perf_counter()
        method.prune(w, stats, pattern)
        solve += (time.perf_counter() - t0) * len(modules)
    passes = 2 * p.nsamples * _forward_seconds(model, p.seqlen, device) if method.needs_calibration else 0.0
    return passes + solve


def _train_probe(ctx: Context, model, device) -> dict:
    """Seconds per optimizer step and peak memory, from steps taken the way the trainer takes them."""
    import copy

    from semisparse.config import load_recipe
    from semisparse.masks import Pattern, nm_mask
    from semisparse.data import effective_seqlen
    from semisparse.layers import select_layers, weight_matrix
    from semisparse.pipeline.config import recipe_overrides
    from semisparse.train.distill import distill_loss, final_hidden_states, lm_head
    from semisparse.train.optim import MaskedAdamW
    from semisparse.train.sparse_linear import param_masks, sparsify
    from semisparse.devices import resolve_precision
    from semisparse.train.trainer import _autocast, _param_groups

    recipe, _ = load_recipe(ctx.cfg.train.recipe, recipe_overrides(ctx.cfg, None))
    t = recipe.train
    precision = resolve_precision(t.precision, device)[0]
    seq_len = effective_seqlen(model, t.seq_len)
    teacher = copy.deepcopy(model).requires_grad_(False) if recipe.distill.alpha > 0 else None
    pattern = Pattern.parse(recipe.pattern)
    masks = {n: nm_mask(weight_matrix(m).abs(), pattern).cpu() for n, m in select_layers(model).items()}
    sparsify(model, masks, recipe.pattern, slorb_k=recipe.slorb.k if recipe.slorb.enabled else None)
    model.train()
    opt_kw = dict(lr=1e-6, betas=recipe.optim.betas, eps=recipe.optim.eps)  # tiny lr: a probe, not training
    groups = _param_groups(model, recipe.optim.weight_decay)
    optimizer = MaskedAdamW(groups, masks=param_masks(model), **opt_kw) \
        if recipe.decay.variant == "adamw_decoupled" else torch.optim.AdamW(groups, **opt_kw)
    ids = torch.randint(0, model.config.vocab_size, (t.batch_size, seq_len), device=device)
    targets = torch.roll(ids, -1, dims=1)
    heads = lm_head(model), (lm_head(teacher) if teacher is not None else None)

    def step():
        optimizer.zero_grad(set_to_none=True)
        for _ in range(t.grad_accum):
            with _autocast(device, precision):
                hidden_t = None
                if teacher is not None:
                    with torch.no_grad():
                        hidden_t = final_hidden_states(teacher, ids)
                out = distill_loss(final_hidden_states(model, ids), targets, heads[0], hidden_t, heads[1],
                                   alpha=recipe.distill.alpha, temperature=recipe.distill.temperature,
                                   chunk_size=recipe.distill.chunk_size)
            (out.loss / t.grad_accum).backward()
        optimizer.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = _timed(step, 1, device)
    if device.type == "cuda":
        peak, what = torch.cuda.max_memory_allocated(device), "CUDA memory allocated by torch (training probe)"
    else:
        peak, what = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process RSS (training probe)"
    per_step = t.batch_size * t.grad_accum * seq_len
    steps = ctx.cfg.train.tokens // per_step
    return {"seconds_per_step": seconds, "steps": steps, "tokens_per_step": per_step, "precision": precision,
            "seq_len": seq_len, "batch_size": t.batch_size, "grad_accum": t.grad_accum, "peak": peak, "what": what,
            "eval_every": recipe.eval.every, "eval_windows": recipe.eval.windows}


def _eval_seconds(ctx: Context, model, tokenizer, device) -> tuple[float, str]:
    from semisparse import data as data_mod

    e = ctx.cfg.eval
    n_models = len(ctx.models())
    seconds, notes = 0.0, []
    if e.ppl:
        window = _forward_seconds(model, e.ppl_seqlen, device)
        seqlen = data_mod.effective_seqlen(model, e.ppl_seqlen)
        for spec in e.ppl:
            tokens = data_mod.tokenize_joined(tokenizer, data_mod.load_text(spec, "eval", e.text_field).docs)
            windows = tokens.numel() // seqlen
            windows = min(windows, e.ppl_max_windows) if e.ppl_max_windows else windows
            seconds += n_models * windows * window
            notes.append(f"{spec}: {windows} windows")
    if e.tasks:
        from semisparse.evaluate.zeroshot import load_local_docs

        docs = 0
        for task in e.tasks:
            local = load_local_docs(task, e.task_data) if e.task_data else None
            n = len(local) if local is not None else (e.limit or 1000)
            docs += min(n, e.limit) if e.limit else n
        per = _forward_seconds(model, ZS_TOKENS, device, batch=e.batch_size) / e.batch_size
        seconds += n_models * docs * ZS_CHOICES * per
        notes.append(f"zero-shot ~{docs} documents a model (rough: {ZS_CHOICES} choices each)")
    return seconds, "; ".join(notes)


def estimate(ctx: Context) -> Estimate:
    """Measured estimates for every stage of ``ctx.cfg`` that is not complete yet."""
    from semisparse.devices import resolve_device
    from semisparse.pipeline.stages import DONE, STAGES

    device = resolve_device(ctx.cfg.device)
    config, tokenizer = _config_and_tokenizer(ctx.cfg.model)
    todo = [s for s in ctx.cfg.stages if STAGES[s]().status(ctx) != DONE]
    est = Estimate()
    if not {"prune", "eval", "train"} & set(todo):
        return est
    model = _random_model(config, device)  # one model for every probe; the training probe (last) sparsifies it
    if "prune" in todo:
        est.seconds["prune"] = _prune_seconds(ctx, model, device)
    if "eval" in todo:
        est.seconds["eval"], est.notes["eval"] = _eval_seconds(ctx, model, tokenizer, device)
    if "train" in todo:
        from semisparse.config import load_recipe
        from semisparse.data import effective_seqlen
        from semisparse.pipeline.config import recipe_overrides

        recipe, _ = load_recipe(ctx.cfg.train.recipe, recipe_overrides(ctx.cfg, None))
        eval_window = _forward_seconds(model, effective_seqlen(model, recipe.eval.seqlen or recipe.train.seq_len),
                                       device)
        probe = _train_probe(ctx, model, device)
        evals = (probe["steps"] // probe["eval_every"] if probe["eval_every"] else 0) \
            + recipe.eval.at_start + recipe.eval.at_end
        est.seconds["train"] = probe["steps"] * probe["seconds_per_step"] + evals * probe["eval_windows"] * eval_window
        est.train = probe
        est.peak_bytes, est.peak_what = probe["peak"], probe["what"]
        est.notes["train"] = (f"{probe['steps']} steps x {probe['seconds_per_step']:.2f} s "
                              f"({probe['batch_size']} x {probe['grad_accum']} x {probe['seq_len']} tokens, "
                              f"{probe['precision']}) + {evals} held-out evaluations")
    if "export" in todo:
        est.notes["export"] = "seconds: one pass over the weights"
    if "report" in todo:
        est.notes["report"] = "seconds: it only reads files"
    if est.peak_bytes is None:
        est.peak_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        est.peak_what = "process RSS (probes)"
    return est

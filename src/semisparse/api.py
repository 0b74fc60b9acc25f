"""The pipeline verbs as Python functions; the CLI is a thin layer over these."""

from __future__ import annotations

import datetime as _dt
import time
from pathlib import Path

import torch

from semisparse import data as data_mod
from semisparse.devices import resolve_device
from semisparse.errors import UserError
from semisparse.evaluate.perplexity import PerplexityResult, perplexity
from semisparse.layers import LayerFilter, select_layers
from semisparse.masks import Pattern
from semisparse.models import load_model, package_versions, save_run_dir
from semisparse.prune import get_method, prune_model


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def dense_origin(loaded) -> str:
    """The dense model a run descends from (its teacher by default)."""
    if loaded.run_meta and loaded.run_meta.get("dense_model"):
        return loaded.run_meta["dense_model"]
    return loaded.source


def ppl_eval(
    model,
    tokenizer,
    source: data_mod.TextSource,
    seqlen: int = 2048,
    batch_size: int = 1,
    max_windows: int | None = None,
    device="cpu",
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity on a text source (for DATA specs: ``load_text(spec, split="eval")``)."""
    tokens = data_mod.tokenize_joined(tokenizer, source.docs)
    seqlen = data_mod.effective_seqlen(model, seqlen)
    return perplexity(
        model, tokens, seqlen, data=source.name, split=source.split, batch_size=batch_size, device=device,
        max_windows=max_windows, progress=progress,
    )


def tokenize(
    data: str,
    out: str | Path,
    model: str = "default",
    *,
    seqlen: int | None = None,
    shard_tokens: int | None = None,
    text_field: str = "text",
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """``semisparse tokenize``: stream DATA into token shards in ``out`` with MODEL's tokenizer (docs/data.md).

    Returns the shard index plus ``"unchanged"``: True when ``out`` already held these shards (nothing written).
    ``seqlen`` (optional) is recorded and checked: the text must hold one sequence of that length.
    """
    from semisparse.shards import DEFAULT_SHARD_TOKENS, tokenize_to_shards

    return tokenize_to_shards(data, out, model=model, seqlen=seqlen, text_field=text_field, overwrite=overwrite,
                              shard_tokens=shard_tokens or DEFAULT_SHARD_TOKENS, progress=progress)


def generate(
    model: str,
    out: str | Path,
    *,
    tokens: int,
    prompts: str | None = None,
    prompt_tokens: int | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 256,
    batch_size: int = 32,
    seed: int = 0,
    shard_tokens: int | None = None,
    text_field: str = "text",
    device: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
    say=print,
) -> dict:
    """``semisparse generate``: sample about ``tokens`` tokens from ``model`` into the token-shard folder ``out``
    (docs/data.md), resuming a killed run of the same arguments. Returns the shard index plus ``"unchanged"``
    (True: ``out`` was complete already) and ``"resumed_from"`` (the batch a partial run continued at, or None)."""
    from semisparse.shards import DEFAULT_SHARD_TOKENS
    from semisparse.shards.generate import Sampling, generate_to_shards

    sampling = Sampling(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, batch_size=batch_size,
                        seed=seed)
    return generate_to_shards(model, out, tokens=tokens, sampling=sampling, prompts=prompts,
                              prompt_tokens=prompt_tokens, text_field=text_field,
                              shard_tokens=shard_tokens or DEFAULT_SHARD_TOKENS, device=device, overwrite=overwrite,
                              progress=progress, say=say)


def prune(
    model: str = "default",
    method: str = "sparsegpt",
    pattern: str = "2:4",
    calib: str = "default",
    out: str | Path | None = None,
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    text_field: str = "text",
    layer_filter: LayerFilter | None = None,
    skip_indivisible: bool = False,
    ppl: list[str] | None = None,
    ppl_seqlen: int = 2048,
    ppl_max_windows: int | None = None,
    device: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
    calib_sampler: str = "random",
    tie_order: str = "stable",
    calib_stats: str = "float64",
) -> dict:
    """``semisparse prune``: prune a model one-shot to N:M and (if ``out``) write a run directory. Returns the provenance
    record. ``calib_sampler`` (data.CALIB_SAMPLERS), ``tie_order`` (masks.TIE_ORDERS) and ``calib_stats``
    (prune.CALIB_STATS) "reference" reproduce the SparseGPT/Wanda reference codes' calibration draw, tie rule and
    float32 running-mean statistics."""
    pattern_obj = Pattern.parse(pattern)
    pruner = get_method(method, tie_order, calib_stats)
    if calib_sampler not in data_mod.CALIB_SAMPLERS:
        raise UserError(f"unknown calibration sampler {calib_sampler!r} (choose from "
                        f"{', '.join(data_mod.CALIB_SAMPLERS)})")
    if out is not None and Path(out).exists() and any(Path(out).iterdir()) and not overwrite:
        raise UserError(f"output directory {out} exists and is not empty (pass --overwrite to replace it)")
    # Read the text before the (slow) model load, so a bad DATA argument fails at once.
    calib_source = data_mod.load_text(calib, split="train", field=text_field) if pruner.needs_calibration else None
    eval_sources = {spec: data_mod.load_text(spec, split="eval", field=text_field) for spec in ppl or []}
    torch.manual_seed(seed)
    device = resolve_device(device)
    loaded = load_model(model, device=device)
    net, tok = loaded.model, loaded.tokenizer
    results: dict[str, dict] = {}
    for spec, source in eval_sources.items():
        results[f"dense:{spec}"] = ppl_eval(net, tok, source, ppl_seqlen, max_windows=ppl_max_windows,
                                            device=device, progress=progress).to_dict()

    calibration = None
    windows = None
    if calib_source is not None:
        source = calib_source
        seqlen_eff = data_mod.effective_seqlen(net, seqlen)
        calibration = {**source.describe(), "nsamples": nsamples, "seqlen": seqlen_eff, "sampler": calib_sampler}
        if calib_sampler == "reference":
            windows = data_mod.reference_calibration_windows(tok, source.docs, nsamples, seqlen_eff, seed)
        else:
            stream = data_mod.token_stream(tok, source.docs)
            windows = data_mod.calibration_windows(stream, nsamples, seqlen_eff, seed)
            calibration["stream_tokens"] = int(stream.numel())

    started = time.perf_counter()
    result = prune_model(net, pruner, pattern_obj, windows, layer_filter, skip_indivisible, device, progress)
    elapsed = time.perf_counter() - started

    for spec, source in eval_sources.items():
        results[f"pruned:{spec}"] = ppl_eval(net, tok, source, ppl_seqlen, max_windows=ppl_max_windows,
                                             device=device, progress=progress).to_dict()

    kept = sum(int(m.sum()) for m in result.masks.values())
    total = sum(m.numel() for m in result.masks.values())
    meta = {
        "stage": "prune",
        "source_model": loaded.source,
        "source_path": loaded.path,
        "dense_model": dense_origin(loaded),
        "method": method,
        "pattern": str(pattern_obj),
        "layers_pruned": list(result.masks),
        "layers_skipped": result.skipped,
        "layers_dense": [n for n in select_layers(net, LayerFilter(blocks_only=False, exclude=[]))
                         if n not in result.masks],
        "calibration": calibration,
        "tie_order": tie_order,
        "calib_stats": calib_stats if pruner.needs_calibration else None,
        "seed": seed,
        "sparse_weights": {"kept": kept, "total": total, "density": kept / total if total else None},
        "prune_seconds": round(elapsed, 2),
        "created": _now(),
        "versions": package_versions(),
    }
    if out is not None:
        save_run_dir(Path(out), net, tok, result.masks, meta, overwrite=overwrite)
        if results:
            write_eval_json(Path(out) / "eval.json", loaded.source, {"perplexity": results})
    meta["perplexity"] = results
    return meta


def write_eval_json(path: Path, model: str, record: dict) -> Path:
    """Merge ``record`` (results of ``model``) into an eval JSON file, written atomically; earlier results of the
    same model are kept.

    One file holds one model's results (``rundir.eval_results_for``): merging into a file of another model, or
    into one that is not a JSON object, raises UserError and leaves the file as it was.
    """
    from semisparse import rundir

    path = Path(path)
    current = rundir.eval_results_for(path, model)
    current.setdefault("model", model)
    for key, value in record.items():
        if isinstance(value, dict):
            current.setdefault(key, {}).update(value)
        else:
            current[key] = value
    current["updated"] = _now()
    return rundir.atomic_write_json(path, current)


def evaluate(
    model: str,
    ppl: list[str] | None = None,
    ppl_seqlen: int = 2048,
    ppl_max_windows: int | None = None,
    batch_size: int = 1,
    text_field: str = "text",
    tasks: list[str] | None = None,
    task_data: str | None = None,
    limit: int | None = None,
    skip_missing: bool = False,
    out: str | Path | None = None,
    device: str = "auto",
    progress: bool = True,
    backend: str | None = None,
    lm_head: str = "float",
) -> dict:
    """``semisparse eval``: perplexity on each DATA of ``ppl`` and zero-shot ``tasks``; results merged into a JSON file.

    ``out``: the results file. Default: ``DIR/eval.json`` for a local model or run directory DIR; for a hub id
    or ``default``, ``./eval-<slug of the model spec>.json`` in the working directory (e.g.
    ``eval-HuggingFaceTB--SmolLM2-135M.json``), so two models never share a file. Merging into a file that holds
    another model's results, or is not valid JSON, is refused before the model is loaded.
    ``skip_missing``: with ``task_data``, tasks whose local files are missing are reported under ``missing``
    instead of raising UserError (asking only for missing tasks is always an error).
    ``backend`` (an exported folder only): "cpu" runs an int8/int4 export through torch's weight-only CPU kernels,
    "semi-structured" a packed 2:4 export through torch's sparse CUDA kernels (without CUDA: one line and the float
    path) (``semisparse.load``); the per-layer choice is saved under ``backend`` in the results. ``lm_head`` "int8"
    (cpu backend only) also runs the LM head through the int8 kernel, quantized at load.
    """
    from semisparse.export.options import check_backend, check_lm_head

    backend = check_backend(backend)
    check_lm_head(lm_head, backend)
    if not ppl and not tasks:
        raise UserError("nothing to evaluate: give --ppl DATA and/or --tasks NAMES")
    if limit is not None and limit <= 0:
        raise UserError(f"--limit must be positive (got {limit})")
    if tasks:  # check names and folders before the (slow) model load
        from semisparse.evaluate.zeroshot import check_zeroshot_args

        check_zeroshot_args(tasks, task_data, limit, batch_size, skip_missing=skip_missing)
    sources = {spec: data_mod.load_text(spec, split="eval", field=text_field) for spec in ppl or []}
    from semisparse import rundir

    # Results live beside a local model; a hub id or the shipped default gets its own file in the working
    # directory. A file that cannot take these results fails here, before the (slow) evaluation.
    json_out = Path(out) if out is not None else rundir.default_eval_file(model)
    rundir.eval_results_for(json_out, model)
    device = resolve_device(device)
    loaded = (load_model(model, device=device) if backend == "none"
              else _load_with_backend(model, device, backend, lm_head))
    record: dict = {}
    if backend != "none":
        record["backend"] = loaded.model.semisparse_backend
    if sources:
        record["perplexity"] = {
            spec: ppl_eval(loaded.model, loaded.tokenizer, source, ppl_seqlen, batch_size, ppl_max_windows, device,
                           progress).to_dict()
            for spec, source in sources.items()
        }
    if tasks:
        from semisparse.evaluate.zeroshot import run_zeroshot

        record["zeroshot"] = run_zeroshot(
            loaded.model, loaded.tokenizer, tasks, Path(task_data) if task_data else None, limit=limit,
            batch_size=batch_size, device=device, skip_missing=skip_missing,
        )
    record_path = write_eval_json(json_out, loaded.source, record)
    record["json"] = str(record_path)
    return record


def _load_with_backend(model: str, device, backend: str, lm_head: str = "float"):
    """An exported folder through a backend (``semisparse.load``), as load_model's LoadedModel."""
    from semisparse.export.format import is_export_dir
    from semisparse.export.load import load_export
    from semisparse.models import LoadedModel

    if not is_export_dir(Path(model).expanduser()):
        raise UserError(f"--backend {backend} needs an exported folder (semisparse export), not {model}")
    net, tokenizer, manifest = load_export(Path(model).expanduser(), device, backend=backend, lm_head=lm_head)
    return LoadedModel(model=net, tokenizer=tokenizer, source=model, path=str(Path(model).expanduser()),
                       run_meta=None, export=manifest)


def train(
    model: str = "default",
    out: str | Path | None = None,
    recipe: str | Path | None = None,
    *,
    init: str | None = None,
    pattern: str | None = None,
    data: str | None = None,
    eval_data: str | None = None,
    tokens: int | None = None,
    teacher: str | None = None,
    seqlen: int | None = None,
    batch_size: int | None = None,
    grad_accum: int | None = None,
    lr: float | None = None,
    alpha: float | None = None,
    seed: int | None = None,
    device: str | None = None,
    text_field: str | None = None,
    set: list[str] | dict | None = None,  # noqa: A002 - the CLI's --set
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
):
    """Retrain ``model`` with AST into the run directory ``out`` (``semisparse train``); returns a TrainResult.

    Keyword arguments left at None keep the recipe's value; ``set`` takes any recipe field, as
    ``["optim.lr=1e-4"]`` (the CLI's ``--set``) or ``{"optim.lr": 1e-4}``. Flags win over ``set``.
    """
    from semisparse.config import parse_set
    from semisparse.train.trainer import train as run_training

    if out is None:
        raise UserError("give the output run directory (out=...)")
    overrides = dict(set) if isinstance(set, dict) else parse_set(set)
    flags = {
        "init.source": init, "pattern": pattern, "data.train": data, "data.eval": eval_data,
        "data.text_field": text_field, "train.tokens": tokens, "distill.teacher": teacher,
        "train.seq_len": seqlen, "train.batch_size": batch_size, "train.grad_accum": grad_accum,
        "optim.lr": lr, "distill.alpha": alpha, "train.seed": seed, "train.device": device,
    }
    overrides.update({key: value for key, value in flags.items() if value is not None})  # only flags given
    return run_training(model, out, recipe, overrides, resume=resume, overwrite=overwrite, progress=progress)


def export(
    run_dir: str | Path,
    out: str | Path,
    format: str = "packed",  # noqa: A002 - the CLI's --format
    dtype: str = "fp16",
    quant: str = "none",
    group_size: int | None = None,
    merge_slorb: bool = False,
    overwrite: bool = False,
    quant_method: str = "rtn",
    calib: str | None = None,
    nsamples: int | None = None,
    seqlen: int | None = None,
    device: str = "auto",
    progress: bool = True,
) -> dict:
    """``semisparse export``: write the run directory ``run_dir`` as a compact checkpoint into ``out``.

    ``format`` packed (default): kept values + bit-packed positions per sparse layer, ``semisparse.load`` rebuilds
    the model; hf: a stock transformers folder (zeros stored densely). ``dtype`` fp16 | bf16 | fp32 for floating
    tensors; ``quant`` none | int8 (per output channel) | int4 (groups of ``group_size`` along the compacted input,
    default the largest of 128, 64, 32 that divides it), symmetric round-to-nearest. ``merge_slorb`` (hf only) folds
    a SLoRB branch into dense weights (no longer N:M). Returns the manifest (docs/export.md), plus ``out``.
    ``format`` gguf: one llama.cpp file ``out`` (FILE.gguf, llama models), ``quant`` none (floats in ``dtype``),
    q8_0 or q4_0; ``merge_slorb`` as for hf. ``quant_method`` rtn (default) | gptq: error-compensating rounding on
    the grid above, calibrated block by block on ``calib`` (DATA, default "default"), ``nsamples`` (128) windows of
    ``seqlen`` (2048, capped at the model's context and the text) tokens, on ``device``.
    """
    from semisparse.export.writer import export_run

    return export_run(run_dir, out, format, dtype, quant, group_size, merge_slorb, overwrite, quant_method=quant_method,
                      calib=calib, nsamples=nsamples, seqlen=seqlen, device=device, progress=progress)


def bench(
    export: str | Path,
    device: str = "cpu",
    backend: str | None = None,
    json: str | Path | None = None,
    prefill_tokens: int = 512,
    new_tokens: int = 128,
    batches: list[int] | tuple[int, ...] = (1, 8),
    repeats: int = 3,
    say=print,
    lm_head: str = "float",
) -> dict:
    """``semisparse bench``: the exported folder ``export`` against dense float32 and bf16 on the CPU: prefill
    tokens/s (1 × ``prefill_tokens``), decode tokens/s with the KV cache at each of ``batches`` (``new_tokens``
    greedy tokens), peak RSS, bytes on disk, the machine and versions; written to ``json`` (default
    ./bench-<folder>.json). ``backend`` None: cpu for an int8/int4 export, else none; ``lm_head`` "int8": the
    export's LM head through the int8 kernel too (cpu backend). Returns the record."""
    from semisparse.bench import BenchSettings, bench as run_bench

    settings = BenchSettings(prefill_tokens=prefill_tokens, new_tokens=new_tokens, batches=tuple(batches),
                             repeats=repeats)
    return run_bench(export, device, backend, json, settings, say, lm_head=lm_head)


def report(run_dirs: list[str | Path], out: str | Path, names: list[str] | None = None) -> Path:
    """``semisparse report``: report.md + PNG plots comparing run directories; returns the report's path."""
    from semisparse.report import write_report

    return write_report([Path(p) for p in run_dirs], Path(out), names)


def _pipeline_overrides(set_items: list[str] | None) -> dict:
    """``--set`` of ``run``: dotted pipeline fields; ``recipe.X.Y=V`` goes to the retraining recipe (train.set)."""
    from semisparse.config import apply_overrides, parse_set

    items = parse_set(set_items)
    recipe = {k[len("recipe."):]: v for k, v in items.items() if k.startswith("recipe.")}
    out = apply_overrides({}, {k: v for k, v in items.items() if not k.startswith("recipe.")})
    if recipe:
        out.setdefault("train", {}).setdefault("set", {}).update(recipe)
    return out


def run(
    model: str | None = None,
    out: str | Path | None = None,
    *,
    config: str | Path | None = None,
    preset: str | None = None,
    recipe: str | None = None,
    tokens: int | None = None,
    method: str | None = None,
    pattern: str | None = None,
    calib: str | None = None,
    nsamples: int | None = None,
    data: str | None = None,
    ppl: list[str] | None = None,
    ppl_max_windows: int | None = None,
    tasks: list[str] | None = None,
    task_data: str | None = None,
    limit: int | None = None,
    skip_missing: bool | None = None,
    stages: list[str] | None = None,
    export: str | None = None,
    device: str | None = None,
    set: list[str] | None = None,  # noqa: A002 - the CLI's --set
    dry_run: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    say=print,
):
    """``semisparse run``: prune -> train -> eval -> (export ->) report into ``out``; see ``semisparse.pipeline``.

    ``model`` may also be a pipeline YAML file (then it is ``config``). Settings stack: ``preset`` <- ``config``
    <- ``set`` <- the keyword arguments (None: not given). ``export`` (packed | hf) adds the export stage with that
    format (OUT/export; other export settings: ``set=["export.quant=int4"]`` or the config's ``export`` section).
    Returns a PipelineResult, or with ``dry_run`` a DryRun (the plan and measured estimates; no weights loaded,
    nothing written).
    """
    from semisparse.pipeline import Context, build_config, plan, run_pipeline

    if model is not None and str(model).endswith((".yaml", ".yml")):
        if config is not None:
            raise UserError("give the pipeline config once (as MODEL or as config=)")
        if not Path(model).is_file():
            raise UserError(f"pipeline config {model} not found")
        config, model = model, None
    overrides = _pipeline_overrides(set)
    given = {
        "model": model, "out": str(out) if out is not None else None, "pattern": pattern, "device": device,
        "stages": stages,
        "prune": {"method": method, "calib": calib, "nsamples": nsamples},
        "train": {"recipe": recipe, "tokens": tokens, "data": data},
        "eval": {"ppl": ppl, "ppl_max_windows": ppl_max_windows, "tasks": tasks, "task_data": task_data,
                 "limit": limit, "skip_missing": skip_missing},
        "export": {"format": export},
    }
    from semisparse.pipeline.config import merge_fields

    cfg, _where = build_config(config, preset, merge_fields(overrides, given),
                               add_stages=["export"] if export is not None else None)
    if dry_run:
        from semisparse.pipeline.estimate import estimate
        from semisparse.pipeline.runner import check_folder
        from semisparse.pipeline.show import DryRun

        check_folder(cfg, Path(cfg.out).expanduser(), overwrite)
        ctx = Context(cfg, Path(cfg.out).expanduser(), progress)
        return DryRun(cfg, plan(ctx), estimate(ctx))
    return run_pipeline(cfg, overwrite=overwrite, progress=progress, say=say)

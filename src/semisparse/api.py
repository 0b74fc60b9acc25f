"""The pipeline verbs as Python functions; the CLI is a thin layer over these."""

from __future__ import annotations

import datetime as _dt
import json
import os
import time
from pathlib import Path

import torch

from semisparse import data as data_mod
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
    device: str = "cpu",
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Prune a model one-shot to N:M and (if ``out``) write a run directory. Returns the provenance record."""
    pattern_obj = Pattern.parse(pattern)
    pruner = get_method(method)
    if out is not None and Path(out).exists() and any(Path(out).iterdir()) and not overwrite:
        raise UserError(f"output directory {out} exists and is not empty (pass --overwrite to replace it)")
    # Read the text before the (slow) model load, so a bad DATA argument fails at once.
    calib_source = data_mod.load_text(calib, split="train", field=text_field) if pruner.needs_calibration else None
    eval_sources = {spec: data_mod.load_text(spec, split="eval", field=text_field) for spec in ppl or []}
    torch.manual_seed(seed)
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
        stream = data_mod.token_stream(tok, source.docs)
        windows = data_mod.calibration_windows(stream, nsamples, seqlen_eff, seed)
        calibration = {**source.describe(), "nsamples": nsamples, "seqlen": seqlen_eff,
                       "stream_tokens": int(stream.numel())}

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
    """Merge ``record`` into an eval JSON file (results of earlier calls are kept), written atomically."""
    path = Path(path)
    current: dict = {}
    if path.is_file():
        try:
            current = json.loads(path.read_text())
        except json.JSONDecodeError:
            current = {}
    current.setdefault("model", model)
    for key, value in record.items():
        if isinstance(value, dict):
            current.setdefault(key, {}).update(value)
        else:
            current[key] = value
    current["updated"] = _now()
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(current, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def evaluate(
    model: str,
    ppl: list[str] | None = None,
    seqlen: int = 2048,
    batch_size: int = 1,
    max_windows: int | None = None,
    text_field: str = "text",
    tasks: list[str] | None = None,
    task_data: str | None = None,
    limit: int | None = None,
    json_out: str | Path | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> dict:
    """Perplexity on each DATA of ``ppl`` and zero-shot ``tasks``; results merged into a JSON file."""
    if not ppl and not tasks:
        raise UserError("nothing to evaluate: give --ppl DATA and/or --tasks NAMES")
    if limit is not None and limit <= 0:
        raise UserError(f"--limit must be positive (got {limit})")
    if tasks:  # check names and folders before the (slow) model load
        from semisparse.evaluate.zeroshot import check_zeroshot_args

        check_zeroshot_args(tasks, task_data, limit, batch_size)
    sources = {spec: data_mod.load_text(spec, split="eval", field=text_field) for spec in ppl or []}
    loaded = load_model(model, device=device)
    record: dict = {}
    if sources:
        record["perplexity"] = {
            spec: ppl_eval(loaded.model, loaded.tokenizer, source, seqlen, batch_size, max_windows, device,
                           progress).to_dict()
            for spec, source in sources.items()
        }
    if tasks:
        from semisparse.evaluate.zeroshot import run_zeroshot

        record["zeroshot"] = run_zeroshot(
            loaded.model, loaded.tokenizer, tasks, Path(task_data) if task_data else None, limit=limit,
            batch_size=batch_size, device=device,
        )
    if json_out is None:
        # Results live beside a local model; a hub id or the shipped default writes into the working directory.
        local = Path(model).expanduser()
        json_out = local / "eval.json" if local.is_dir() else Path("eval.json")
    record_path = write_eval_json(Path(json_out), loaded.source, record)
    record["json"] = str(record_path)
    return record

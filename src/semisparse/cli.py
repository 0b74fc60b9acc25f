"""Command line: one thin command per verb of ``semisparse.api``, listed in pipeline order.

A UserError becomes one line on stderr and exit code 2; a usage error (a missing or malformed flag) prints the
usage line and the problem, also with exit code 2. Flags spell one thing one way in every command.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Prune causal LMs to N:M (2:4) sparsity, retrain them with AST, evaluate and report. "
    "`semisparse run` does it all in one command.",
)
# Wide tables even when piped to a file or a CI log.
console = Console(width=None if sys.stdout.isatty() else 160)
_state = {"debug": False}

MODEL_HELP = ("Hugging Face id, local model or run directory, a .gguf file, or 'default' (the shipped "
              "SmolLM2-135M-Instruct).")
DATA_HELP = "A .txt/.jsonl/.parquet file or folder, 'wikitext2', 'c4', or 'default' (the shipped Wikipedia text)."
DEVICE_HELP = "auto (CUDA when available, else CPU), cpu, cuda, cuda:1, ..."
SET_HELP = "Any recipe field, SECTION.FIELD=VALUE (repeatable), e.g. --set mask.every=20."
BACKEND_HELP = ("An exported folder's kernels: none (de-quantized float weights), cpu (an int8/int4 export "
                "through torch's weight-only CPU kernels, per layer where measured faster) or semi-structured (a "
                "packed 2:4 export through torch's sparse CUDA kernels, per layer where measured faster; without "
                "CUDA it says so and runs dense; docs/export.md).")
LM_HEAD_HELP = ("float (as exported) or int8: with --backend cpu, the LM head quantized at load (one scale per row) "
                "and run through the int8 kernel where measured not slower.")


def _methods() -> str:
    from semisparse.prune import METHODS

    return ", ".join(METHODS)


def _recipes() -> str:
    from semisparse.config import SHIPPED_RECIPES

    return ", ".join(SHIPPED_RECIPES)


def _presets() -> str:
    from semisparse.pipeline.config import PRESETS

    return ", ".join(PRESETS)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        print(f"semisparse {version('semisparse')}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    _state["debug"] = debug


def _layer_filter(include: list[str] | None, exclude: list[str] | None):
    from semisparse.layers import LayerFilter

    lf = LayerFilter()
    if include:
        lf.include = list(include)
    if exclude:
        lf.exclude = lf.exclude + list(exclude)
    return lf


def _ppl_table(title: str, rows: dict[str, dict]) -> Table:
    table = Table(title=title)
    for col in ("result", "ppl", "data", "split", "seqlen", "stride", "windows", "tokens"):
        table.add_column(col, justify="right" if col in ("ppl", "seqlen", "stride", "windows", "tokens") else "left")
    for key, r in rows.items():
        table.add_row(key, f"{r['ppl']:.3f}", r["data"], r["split"], str(r["seqlen"]), str(r["stride"]),
                      str(r["windows"]), str(r["tokens"]))
    return table


def _split(items: Optional[str]) -> list[str] | None:
    return [t.strip() for t in items.split(",") if t.strip()] if items else None


@app.command()
def tokenize(
    data: str = typer.Argument(..., help="Text to tokenize. " + DATA_HELP),
    model: str = typer.Option("default", help="Model whose tokenizer makes the ids. " + MODEL_HELP),
    out: Path = typer.Option(..., help="Shard folder to write (binary shards + index.json; one atomic write)."),
    seqlen: Optional[int] = typer.Option(None, help="Training sequence length to record and check (optional)."),
    shard_tokens: Optional[int] = typer.Option(None, help="Tokens per shard file (default 100,000,000)."),
    text_field: str = typer.Option("text", help="Field holding the text in .jsonl/.parquet data."),
    overwrite: bool = typer.Option(False, help="Replace an existing shard folder made otherwise."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Tokenize DATA once into token shards that `train --data` reads lazily (for corpora past memory)."""
    from semisparse import api

    index = api.tokenize(data, out, model, seqlen=seqlen, shard_tokens=shard_tokens, text_field=text_field,
                         overwrite=overwrite, progress=progress)
    what = f"{index['tokens']:,} tokens of {index['documents']:,} documents in {len(index['shards'])} shards"
    if index["unchanged"]:
        console.print(f"{out} is up to date ({what}): nothing to do")
    else:
        console.print(f"tokenized {what} ({index['dtype']}) -> {out}")


@app.command()
def generate(
    model: str = typer.Argument(..., help="Dense model to sample from (the teacher). " + MODEL_HELP),
    tokens: int = typer.Option(..., help="Token budget: stop after the batch that reaches it (kept whole)."),
    out: Path = typer.Option(..., help="Shard folder to write (as `tokenize` writes; resumable, renamed in place "
                             "when complete)."),
    prompts: Optional[str] = typer.Option(
        None, help="Prompt each sequence with the first --prompt-tokens tokens of DATA's documents, in order, "
        "cycling (default: the BOS token alone). " + DATA_HELP),
    prompt_tokens: Optional[int] = typer.Option(None, help="Prompt length in tokens, with --prompts (default 16)."),
    temperature: float = typer.Option(1.0, help="Sampling temperature; 0 = greedy (needs --prompts)."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling: keep the smallest set of tokens of this mass, (0, 1]."),
    max_new_tokens: int = typer.Option(256, help="Sampled tokens per sequence at most (it ends earlier at EOS)."),
    batch_size: int = typer.Option(32, help="Sequences per model.generate call (part of the result: seeds are per "
                                   "batch)."),
    seed: int = typer.Option(0, help="Seed; batch b is sampled from a seed derived from (seed, b)."),
    shard_tokens: Optional[int] = typer.Option(None, help="Tokens per shard file (default 100,000,000)."),
    text_field: str = typer.Option("text", help="Field holding the text in .jsonl/.parquet prompt data."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    overwrite: bool = typer.Option(False, help="Replace a shard folder (or a partial run) made otherwise."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Sample training text from MODEL into token shards for `train --data` (data-free distillation; resumable)."""
    from semisparse import api

    index = api.generate(model, out, tokens=tokens, prompts=prompts, prompt_tokens=prompt_tokens,
                         temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, batch_size=batch_size,
                         seed=seed, shard_tokens=shard_tokens, text_field=text_field, device=device,
                         overwrite=overwrite, progress=progress,
                         say=lambda msg: console.print(msg, markup=False, highlight=False))
    what = f"{index['tokens']:,} tokens of {index['documents']:,} documents in {len(index['shards'])} shards"
    if index["unchanged"]:
        console.print(f"{out} is up to date ({what}): nothing to do")
    else:
        console.print(f"generated {what} ({index['generation']['batches']:,} batches, {index['run']['device']}, "
                      f"{index['source']['precision']}) -> {out}")


@app.command()
def prune(
    model: str = typer.Argument(..., help=MODEL_HELP),
    out: Path = typer.Option(..., help="Run directory to write (a stock transformers model dir + masks)."),
    method: str = typer.Option("sparsegpt", help=f"One of: {_methods()}."),
    pattern: str = typer.Option("2:4", help="N:M pattern: keep N of every M consecutive input weights."),
    calib: str = typer.Option("default", help="Calibration text. " + DATA_HELP),
    nsamples: int = typer.Option(128, help="Calibration sequences."),
    seqlen: int = typer.Option(2048, help="Calibration sequence length (capped at the model's context)."),
    seed: int = typer.Option(0, help="Seed for the calibration windows."),
    calib_sampler: str = typer.Option("random", help="random (windows of the joined text) or reference (the "
                                      "SparseGPT/Wanda codes' draw, to reproduce their numbers)."),
    tie_order: str = typer.Option("stable", help="Equal scores in a group: stable (ties to the lower index) or "
                                  "reference (as torch.topk(largest=False) in the SparseGPT/Wanda codes)."),
    calib_stats: str = typer.Option("float64", help="Wanda/SparseGPT statistics: float64 (plain sums) or reference "
                                    "(the SparseGPT/Wanda codes' float32 running means, to reproduce their numbers)."),
    text_field: str = typer.Option("text", help="Field holding the text in .jsonl/.parquet data."),
    include: Optional[list[str]] = typer.Option(None, help="Regex on layer names to prune (repeatable)."),
    exclude: Optional[list[str]] = typer.Option(None, help="Regex on layer names to keep dense (repeatable)."),
    skip_indivisible: bool = typer.Option(False, help="Leave layers whose input width is not a multiple of M dense."),
    ppl: Optional[list[str]] = typer.Option(None, help="Also report dense vs pruned perplexity on DATA (repeatable)."),
    ppl_seqlen: int = typer.Option(2048, help="Perplexity window length."),
    ppl_max_windows: Optional[int] = typer.Option(None, help="Score at most this many perplexity windows."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    overwrite: bool = typer.Option(False, help="Replace an existing output directory."),
) -> None:
    """Prune MODEL one-shot to N:M sparsity and write a run directory."""
    from semisparse import api

    meta = api.prune(
        model, method, pattern, calib, out, nsamples, seqlen, seed, text_field, _layer_filter(include, exclude),
        skip_indivisible, ppl, ppl_seqlen, ppl_max_windows, device, overwrite,
        calib_sampler=calib_sampler, tie_order=tie_order, calib_stats=calib_stats,
    )
    sw = meta["sparse_weights"]
    console.print(
        f"pruned {len(meta['layers_pruned'])} layers with {method} {meta['pattern']} "
        f"({sw['kept']:,} of {sw['total']:,} weights kept) in {meta['prune_seconds']:.1f}s -> {out}"
    )
    if meta["layers_skipped"]:
        console.print(f"left dense: {', '.join(meta['layers_skipped'])}")
    if meta["perplexity"]:
        console.print(_ppl_table("perplexity (dense vs pruned)", meta["perplexity"]))


@app.command()
def train(
    model: str = typer.Argument(..., help=MODEL_HELP + " Also the frozen dense teacher (see --teacher)."),
    out: Path = typer.Option(..., help="Run directory to write (model, masks, metrics, plots, checkpoints)."),
    recipe: Optional[str] = typer.Option(None, help=f"Shipped recipe ({_recipes()}) or a YAML file (default: ast-naive)."),
    init: Optional[str] = typer.Option(
        None, help=f"Initial mask: {_methods()}, or a `semisparse prune` run directory (default: recipe)."
    ),
    pattern: Optional[str] = typer.Option(None, help="N:M pattern (default: recipe, 2:4)."),
    data: Optional[str] = typer.Option(
        None, help="Training text (default: recipe, default), or a token-shard folder from `semisparse tokenize` "
        "(read lazily). " + DATA_HELP),
    eval_data: Optional[str] = typer.Option(None, help="Held-out text for perplexity (default: the eval part of --data)."),
    tokens: Optional[int] = typer.Option(None, help="Training token budget (steps = tokens / tokens per step)."),
    teacher: Optional[str] = typer.Option(
        None, help="Dense teacher (default: MODEL, or the dense model recorded in an --init run directory)."
    ),
    seqlen: Optional[int] = typer.Option(None, help="Training sequence length (default: recipe)."),
    batch_size: Optional[int] = typer.Option(None, help="Sequences per micro-batch (default: recipe)."),
    grad_accum: Optional[int] = typer.Option(
        None, help="Micro-batches per optimizer step, all processes together (default: recipe)."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate (default: recipe)."),
    alpha: Optional[float] = typer.Option(None, help="Distillation weight α, 0 to 1; 0 = CE only (default: recipe)."),
    seed: Optional[int] = typer.Option(None, help="Seed for data order and initialisation (default: recipe)."),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP + " (default: recipe, auto)."),
    text_field: Optional[str] = typer.Option(None, help="Field holding the text in .jsonl/.parquet data."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
    resume: bool = typer.Option(False, help="Continue the run in --out from its newest valid checkpoint."),
    overwrite: bool = typer.Option(False, help="Replace an existing output directory."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Retrain MODEL to N:M sparsity with AST (adaptive masks, annealed SR-STE, distillation, optional SLoRB)."""
    from semisparse import api

    result = api.train(
        model, out, recipe, init=init, pattern=pattern, data=data, eval_data=eval_data, tokens=tokens,
        teacher=teacher, seqlen=seqlen, batch_size=batch_size, grad_accum=grad_accum, lr=lr, alpha=alpha, seed=seed,
        device=device, text_field=text_field, set=set_, resume=resume, overwrite=overwrite, progress=progress,
    )
    s = result.summary
    ppl = ""
    if s["final_eval_ppl"] is not None and s["initial_eval_ppl"] is not None:
        ppl = f", held-out ppl {s['initial_eval_ppl']:.3f} -> {s['final_eval_ppl']:.3f}"
    slorb = f", SLoRB {s['slorb_params']:,} params" if s["slorb_params"] else ""
    console.print(f"trained {s['steps']} steps ({s['tokens']:,} tokens){ppl}{slorb} -> {out}")


@app.command("eval")
def eval_(
    model: str = typer.Argument(..., help=MODEL_HELP),
    ppl: Optional[list[str]] = typer.Option(None, help="Perplexity on DATA's evaluation part (repeatable). " + DATA_HELP),
    ppl_seqlen: int = typer.Option(2048, help="Perplexity window length (capped at the model's context)."),
    ppl_max_windows: Optional[int] = typer.Option(None, help="Score at most this many perplexity windows."),
    batch_size: int = typer.Option(1, help="Windows (or zero-shot requests) per forward pass."),
    text_field: str = typer.Option("text", help="Field holding the text in .jsonl/.parquet data."),
    tasks: Optional[str] = typer.Option(None, help="Comma-separated zero-shot tasks (lm-evaluation-harness)."),
    task_data: Optional[Path] = typer.Option(None, help="Folder with local task files (offline)."),
    limit: Optional[int] = typer.Option(None, help="Documents per zero-shot task."),
    skip_missing: bool = typer.Option(False, help="Report tasks whose local files are missing instead of failing."),
    out: Optional[Path] = typer.Option(
        None, help="JSON file for the results (default: MODEL_DIR/eval.json, or ./eval-<model>.json for a hub id)."
    ),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    backend: str = typer.Option("none", help=BACKEND_HELP),
    lm_head: str = typer.Option("float", help=LM_HEAD_HELP),
) -> None:
    """Evaluate MODEL: perplexity with its protocol, and zero-shot accuracy."""
    from semisparse import api

    record = api.evaluate(
        model, ppl=ppl, ppl_seqlen=ppl_seqlen, ppl_max_windows=ppl_max_windows, batch_size=batch_size,
        text_field=text_field, tasks=_split(tasks), task_data=str(task_data) if task_data else None, limit=limit,
        skip_missing=skip_missing, out=out, device=device, backend=backend, lm_head=lm_head,
    )
    if "perplexity" in record:
        console.print(_ppl_table(f"perplexity of {model}", record["perplexity"]))
    if "zeroshot" in record:
        from semisparse.evaluate.zeroshot import zeroshot_table

        console.print(zeroshot_table(record["zeroshot"]))
    console.print(f"results written to {record['json']}")


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="Run directory to export (from `semisparse prune` or `train`)."),
    out: Path = typer.Option(..., help="Folder to write (one atomic write; see docs/export.md)."),
    format: str = typer.Option(  # noqa: A002
        "packed", help="packed: kept values + 2-bit positions per 2:4 layer, loaded by semisparse.load (and "
        "semisparse eval); hf: a stock transformers folder, zeros stored densely; gguf: one llama.cpp file, "
        "--out FILE.gguf (llama models)."),
    dtype: str = typer.Option("fp16", help="Floating tensors as fp16, bf16 or fp32."),
    quant: str = typer.Option(
        "none", help="Weight-only quantization of the kept values (packed only): none, int8 (one scale per "
        "output channel) or int4 (one scale per --group-size values), see --quant-method. gguf: none "
        "(--dtype floats), q8_0 or q4_0 (GGUF's own blocks of 32)."),
    group_size: Optional[int] = typer.Option(
        None, help="int4 group along the compacted input (default: the largest of 128, 64, 32 dividing it)."),
    quant_method: str = typer.Option(
        "rtn", help="rtn (round to nearest) or gptq (error-compensating rounding calibrated on --calib, block by "
        "block, as SparseGPT; packed int8/int4 only)."),
    calib: Optional[str] = typer.Option(None, help="Calibration text (gptq; default: default). " + DATA_HELP),
    nsamples: Optional[int] = typer.Option(None, help="Calibration sequences (gptq; default 128)."),
    seqlen: Optional[int] = typer.Option(
        None, help="Calibration sequence length (gptq; default 2048, capped at the model's context and the text)."),
    device: str = typer.Option("auto", help="Where gptq's calibration runs: " + DEVICE_HELP),
    merge_slorb: bool = typer.Option(
        False, help="hf: fold a SLoRB branch into the dense weights (W⊙M + S·X); the result is no longer N:M."),
    overwrite: bool = typer.Option(False, help="Replace an existing output folder."),
) -> None:
    """Write a run directory as a compact checkpoint: packed N:M weights (optionally int8/int4) or a stock folder.

    The packed format is a storage format: loading unpacks to dense weights, or hands them to a backend
    (``--backend cpu``: weight-only int8/int4 kernels; ``--backend semi-structured``: CUDA 2:4 kernels)."""
    from semisparse import api

    m = api.export(run_dir, out, format=format, dtype=dtype, quant=quant, group_size=group_size,
                   merge_slorb=merge_slorb, overwrite=overwrite, quant_method=quant_method, calib=calib,
                   nsamples=nsamples, seqlen=seqlen, device=device)
    files = sum(f["bytes"] for f in m["files"].values())
    what = f"{format} {dtype}" + (f" {quant} {quant_method}" if quant != "none" else "")
    sizes = m.get("sizes")
    detail = ""
    if sizes:
        sp = sizes["sparse_layers"]
        detail = (f", {sp['count']} {m['pattern']} layers at {8 * sp['bytes'] / sp['weights']:.3f} bits per weight "
                  f"({100 * sp['bytes'] / (2 * sp['weights']):.2f} % of dense fp16)")
    count = len(m["files"]) + (format != "gguf")  # a folder also holds its export.json manifest; a .gguf is one file
    console.print(f"exported {what}{detail}: {files:,} bytes in {count} file{'s' * (count > 1)} -> {out}")
    if m.get("slorb") and m["slorb"]["merged"]:
        console.print(f"note: SLoRB merged into the dense weights of {m['slorb']['layers']} layers: the exported "
                      f"model is no longer {m['pattern']} sparse")


@app.command()
def bench(
    export: Path = typer.Argument(..., help="Exported folder (`semisparse export`)."),
    device: str = typer.Option("cpu", help="cpu (a CUDA bench is not implemented yet)."),
    backend: Optional[str] = typer.Option(
        None, help="none, cpu or semi-structured (default: cpu for an int8/int4 export, else none; bench runs on "
                   "the CPU, where semi-structured runs dense). " + BACKEND_HELP),
    json: Optional[Path] = typer.Option(None, help="JSON file for the results (default: ./bench-<folder>.json)."),
    prefill_tokens: int = typer.Option(512, help="Prefill: one forward of 1 x this many tokens."),
    new_tokens: int = typer.Option(128, help="Decode: greedy new tokens per generate call."),
    batch: Optional[list[int]] = typer.Option(None, help="Decode batch size (repeatable; default 1 and 8)."),
    repeats: int = typer.Option(3, help="Median of this many timed calls."),
    lm_head: str = typer.Option("float", help=LM_HEAD_HELP),
) -> None:
    """Time an exported model against dense fp32 and bf16 on the CPU: prefill and decode tokens/s, RSS, bytes."""
    from semisparse import api

    r = api.bench(export, device=device, backend=backend, json=json, prefill_tokens=prefill_tokens,
                  new_tokens=new_tokens, batches=tuple(batch) if batch else (1, 8), repeats=repeats, lm_head=lm_head,
                  say=lambda msg: console.print(msg, markup=False, highlight=False))
    table = Table(title=f"bench of {export} ({r['backend']} backend)")
    batches = list(r["models"]["export"]["decode_tokens_per_s"])
    for col in ("model", "prefill tok/s", *[f"decode b{b} tok/s" for b in batches], "peak RSS MiB", "bytes"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for name, m in r["models"].items():
        table.add_row(name, f"{m['prefill_tokens_per_s']:,.0f}",
                      *[f"{m['decode_tokens_per_s'][b]:,.1f}" for b in batches],
                      f"{m['peak_rss_bytes'] / 2**20:,.0f}", f"{m['bytes_on_disk']:,}")
    console.print(table)
    for base, ratio in r["ratios"].items():
        console.print(f"{base}: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratio.items()))
    console.print(f"results written to {r['json']}")


@app.command()
def report(
    run_dirs: list[Path] = typer.Argument(..., help="Run directories to compare (dense, one-shot, retrained)."),
    out: Path = typer.Option(..., help="Folder for report.md and its PNG plots."),
    name: Optional[list[str]] = typer.Option(None, help="Display name per run, in order (repeatable)."),
) -> None:
    """Write a Markdown report with plots comparing run directories."""
    from semisparse import api

    path = api.report(list(run_dirs), out, list(name) if name else None)
    console.print(f"report written to {path}")


@app.command()
def run(
    model: Optional[str] = typer.Argument(None, help=MODEL_HELP + " Or a pipeline CONFIG.yaml holding every setting."),
    out: Optional[Path] = typer.Option(None, help="Output folder: one sub-directory per stage (required unless in the config)."),
    preset: Optional[str] = typer.Option(None, help=f"Start from a shipped pipeline config: {_presets()}."),
    recipe: Optional[str] = typer.Option(None, help=f"Retraining recipe ({_recipes()}) or a YAML file."),
    tokens: Optional[int] = typer.Option(None, help="Retraining token budget."),
    method: Optional[str] = typer.Option(None, help=f"One-shot pruning method for the initial mask: {_methods()}."),
    pattern: Optional[str] = typer.Option(None, help="N:M pattern (default 2:4)."),
    calib: Optional[str] = typer.Option(None, help="Calibration text. " + DATA_HELP),
    nsamples: Optional[int] = typer.Option(None, help="Calibration sequences."),
    data: Optional[str] = typer.Option(None, help="Training text (default: the recipe's). " + DATA_HELP),
    ppl: Optional[list[str]] = typer.Option(None, help="Perplexity data for every model (repeatable). " + DATA_HELP),
    ppl_max_windows: Optional[int] = typer.Option(None, help="Score at most this many perplexity windows."),
    tasks: Optional[str] = typer.Option(None, help="Comma-separated zero-shot tasks."),
    task_data: Optional[Path] = typer.Option(None, help="Folder with local task files (offline)."),
    limit: Optional[int] = typer.Option(None, help="Documents per zero-shot task."),
    skip_missing: Optional[bool] = typer.Option(None, "--skip-missing", help="Report missing task files instead of failing."),
    stages: Optional[str] = typer.Option(None, help="Comma-separated stages to run (default: prune,train,eval,report)."),
    export: Optional[str] = typer.Option(
        None, help="Also export the retrained model (else the one-shot one) into OUT/export: packed or hf (see "
        "`semisparse export`; --set export.quant=int4 and the like for the rest)."),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP),
    set_: Optional[list[str]] = typer.Option(
        None, "--set", help="Any pipeline field, FIELD=VALUE (repeatable), e.g. --set prune.nsamples=16; "
        "recipe fields as recipe.SECTION.FIELD=VALUE, e.g. --set recipe.optim.lr=1e-4."
    ),
    dry_run: bool = typer.Option(False, help="Print the plan with measured time and memory estimates; load no "
                                 "weights, write nothing."),
    overwrite: bool = typer.Option(False, help="Start over: replace the output folder."),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """Prune -> train -> eval -> (export ->) report in one folder; re-running it skips complete stages and resumes
    training."""
    from semisparse import api

    result = api.run(
        model, out, preset=preset, recipe=recipe, tokens=tokens, method=method, pattern=pattern, calib=calib,
        nsamples=nsamples, data=data, ppl=ppl, ppl_max_windows=ppl_max_windows, tasks=_split(tasks),
        task_data=str(task_data) if task_data else None, limit=limit, skip_missing=skip_missing,
        stages=_split(stages), export=export, device=device, set=set_, dry_run=dry_run, overwrite=overwrite,
        progress=progress,
        say=lambda msg: console.print(msg, markup=False, highlight=False),
    )
    from semisparse.pipeline.show import print_plan, print_summary

    if dry_run:
        print_plan(console, result)
    else:
        print_summary(console, result)


def _is_usage_error(exc: BaseException) -> bool:
    """Usage errors of typer's own click copy (typer >= 0.20 vendors it) or of a plain click."""
    import typer.exceptions

    bases = [getattr(typer.exceptions, "TyperException", None)]
    try:
        import click

        bases.append(click.exceptions.ClickException)
    except ImportError:  # pragma: no cover - typer without click
        pass
    return any(b is not None and isinstance(exc, b) for b in bases) and hasattr(exc, "show")


def main(argv: list[str] | None = None) -> None:
    from semisparse.errors import UserError

    try:
        app(args=argv, prog_name="semisparse", standalone_mode=False)
    except UserError as exc:
        if _state["debug"]:
            raise
        print(f"semisparse: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        print("semisparse: interrupted", file=sys.stderr)
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:
        if _is_usage_error(exc):
            exc.show()  # the usage line and the problem; usage errors carry exit code 2
            sys.exit(getattr(exc, "exit_code", 2))
        if _state["debug"]:
            raise
        print(f"semisparse: internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
              file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

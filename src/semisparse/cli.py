"""Command line: one thin command per verb. A UserError becomes one line on stderr and exit code 2."""

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
    help="Prune causal LMs to N:M (2:4) sparsity, retrain them with AST, evaluate and export them.",
)
# Wide tables even when piped to a file or a CI log.
console = Console(width=None if sys.stdout.isatty() else 160)
_state = {"debug": False}

MODEL_HELP = "Hugging Face id, local model or run directory, or 'default' (the shipped SmolLM2-135M-Instruct)."
DATA_HELP = "A .txt/.jsonl/.parquet file or folder, 'wikitext2', 'c4', or 'default' (the shipped Wikipedia text)."


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
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


@app.command()
def prune(
    model: str = typer.Argument(..., help=MODEL_HELP),
    method: str = typer.Option("sparsegpt", help="magnitude, wanda or sparsegpt."),
    pattern: str = typer.Option("2:4", help="N:M pattern: keep N of every M consecutive input weights."),
    calib: str = typer.Option("default", help="Calibration text. " + DATA_HELP),
    out: Path = typer.Option(..., help="Run directory to write (a stock transformers model dir + masks)."),
    nsamples: int = typer.Option(128, help="Calibration sequences."),
    seqlen: int = typer.Option(2048, help="Calibration sequence length (capped at the model's context)."),
    seed: int = typer.Option(0, help="Seed for the calibration windows."),
    text_field: str = typer.Option("text", help="Field holding the text in .jsonl/.parquet data."),
    include: Optional[list[str]] = typer.Option(None, help="Regex on layer names to prune (repeatable)."),
    exclude: Optional[list[str]] = typer.Option(None, help="Regex on layer names to keep dense (repeatable)."),
    skip_indivisible: bool = typer.Option(False, help="Leave layers whose input width is not a multiple of M dense."),
    ppl: Optional[list[str]] = typer.Option(None, help="Also report dense vs pruned perplexity on DATA (repeatable)."),
    ppl_seqlen: int = typer.Option(2048, help="Perplexity window length."),
    ppl_max_windows: Optional[int] = typer.Option(None, help="Score at most this many perplexity windows."),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:1, ..."),
    overwrite: bool = typer.Option(False, help="Replace an existing output directory."),
) -> None:
    """Prune MODEL one-shot to N:M sparsity and write a run directory."""
    from semisparse import api

    meta = api.prune(
        model, method, pattern, calib, out, nsamples, seqlen, seed, text_field, _layer_filter(include, exclude),
        skip_indivisible, ppl, ppl_seqlen, ppl_max_windows, device, overwrite,
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


@app.command("eval")
def eval_(
    model: str = typer.Argument(..., help=MODEL_HELP),
    ppl: Optional[list[str]] = typer.Option(None, help="Perplexity on DATA's evaluation part (repeatable). " + DATA_HELP),
    seqlen: int = typer.Option(2048, help="Perplexity window length (capped at the model's context)."),
    batch_size: int = typer.Option(1, help="Windows (or zero-shot requests) per forward pass."),
    max_windows: Optional[int] = typer.Option(None, help="Score at most this many perplexity windows."),
    text_field: str = typer.Option("text", help="Field holding the text in .jsonl/.parquet data."),
    tasks: Optional[str] = typer.Option(None, help="Comma-separated zero-shot tasks (lm-evaluation-harness)."),
    task_data: Optional[Path] = typer.Option(None, help="Folder with local task files (offline)."),
    limit: Optional[int] = typer.Option(None, help="Documents per zero-shot task."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Where to write results (default: RUN_DIR/eval.json or ./eval.json)."),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:1, ..."),
) -> None:
    """Evaluate MODEL: perplexity with its protocol, and zero-shot accuracy."""
    from semisparse import api

    task_list = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None
    record = api.evaluate(
        model, ppl, seqlen, batch_size, max_windows, text_field, task_list,
        str(task_data) if task_data else None, limit, json_out, device,
    )
    if "perplexity" in record:
        console.print(_ppl_table(f"perplexity of {model}", record["perplexity"]))
    if "zeroshot" in record:
        from semisparse.evaluate.zeroshot import zeroshot_table

        console.print(zeroshot_table(record["zeroshot"]))
    console.print(f"results written to {record['json']}")


@app.command()
def report(
    run_dirs: list[Path] = typer.Argument(..., help="Run directories to compare (dense, one-shot, retrained)."),
    out: Path = typer.Option(..., help="Folder for report.md and its PNG plots."),
    name: Optional[list[str]] = typer.Option(None, help="Display name per run, in order (repeatable)."),
) -> None:
    """Write a Markdown report with plots comparing run directories."""
    from semisparse.evaluate.report import write_report

    path = write_report(list(run_dirs), out, list(name) if name else None)
    console.print(f"report written to {path}")


@app.command()
def train(
    model: str = typer.Argument(..., help=MODEL_HELP + " Also the frozen dense teacher (see --teacher)."),
    out: Path = typer.Option(..., help="Run directory to write (model, masks, metrics, plots, checkpoints)."),
    recipe: Optional[str] = typer.Option(
        None, help="Shipped recipe (ast-naive, ast-boosted, fixed-mask-kd, naive-ce) or a YAML file "
        "(default: ast-naive)."
    ),
    init: Optional[str] = typer.Option(
        None, help="Initial mask: magnitude, wanda, sparsegpt, or a `semisparse prune` run directory (default: recipe)."
    ),
    pattern: Optional[str] = typer.Option(None, help="N:M pattern (default: recipe, 2:4)."),
    data: Optional[str] = typer.Option(None, help="Training text (default: recipe, default). " + DATA_HELP),
    eval_data: Optional[str] = typer.Option(
        None, help="Held-out text for perplexity (default: the eval part of --data)."
    ),
    tokens: Optional[int] = typer.Option(None, help="Training token budget (steps = tokens / tokens per step)."),
    teacher: Optional[str] = typer.Option(
        None, help="Dense teacher (default: MODEL, or the dense model recorded in an --init run directory)."
    ),
    seq_len: Optional[int] = typer.Option(None, help="Training sequence length (default: recipe)."),
    batch_size: Optional[int] = typer.Option(None, help="Sequences per micro-batch (default: recipe)."),
    grad_accum: Optional[int] = typer.Option(None, help="Micro-batches per optimizer step (default: recipe)."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate (default: recipe)."),
    alpha: Optional[float] = typer.Option(None, help="Distillation weight α, 0 to 1; 0 = CE only (default: recipe)."),
    seed: Optional[int] = typer.Option(None, help="Seed for data order and initialisation (default: recipe)."),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda, cuda:1, ... (default: recipe, auto)."),
    text_field: Optional[str] = typer.Option(None, help="Field holding the text in .jsonl/.parquet data."),
    set_: Optional[list[str]] = typer.Option(
        None, "--set", help="Any recipe field, SECTION.FIELD=VALUE (repeatable), e.g. --set mask.every=20."
    ),
    resume: bool = typer.Option(False, help="Continue the run in --out from its newest valid checkpoint."),
    overwrite: bool = typer.Option(False, help="Replace an existing output directory."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Retrain MODEL to N:M sparsity with AST (adaptive masks, annealed SR-STE, distillation, optional SLoRB)."""
    from semisparse.config import parse_set
    from semisparse.train.trainer import train as run_training

    overrides = parse_set(set_)
    overrides.update({
        "init.source": init, "pattern": pattern, "data.train": data, "data.eval": eval_data,
        "data.text_field": text_field, "train.tokens": tokens, "distill.teacher": teacher,
        "train.seq_len": seq_len, "train.batch_size": batch_size, "train.grad_accum": grad_accum,
        "optim.lr": lr, "distill.alpha": alpha, "train.seed": seed, "train.device": device,
    })
    result = run_training(model, out, recipe, overrides, resume=resume, overwrite=overwrite, progress=progress)
    s = result.summary
    ppl = ""
    if s["final_eval_ppl"] is not None and s["initial_eval_ppl"] is not None:
        ppl = f", held-out ppl {s['initial_eval_ppl']:.3f} -> {s['final_eval_ppl']:.3f}"
    slorb = f", SLoRB {s['slorb_params']:,} params" if s["slorb_params"] else ""
    console.print(f"trained {s['steps']} steps ({s['tokens']:,} tokens){ppl}{slorb} -> {out}")


def main(argv: list[str] | None = None) -> None:
    from semisparse.errors import UserError

    try:
        app(args=argv, standalone_mode=False)
    except UserError as exc:
        if _state["debug"]:
            raise
        print(f"semisparse: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        print("semisparse: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # click usage errors carry their own exit code and message
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Exit):
            sys.exit(exc.exit_code)
        if _state["debug"]:
            raise
        print(f"semisparse: internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
              file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

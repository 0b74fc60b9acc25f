"""A Markdown report with plots comparing run directories (dense, one-shot, retrained).

``write_report`` only *reads* run directories (see ARCHITECTURE.md; names and readers: ``semisparse.rundir``):
``eval.json`` (or a results file given per run) for perplexity and zero-shot scores, ``semisparse.json`` for provenance, ``masks.safetensors`` / ``slorb.safetensors`` /
``model.safetensors`` for parameter counts (shapes come from the safetensors headers; only the masks are
read, one tensor at a time, to count their kept entries) and ``metrics.jsonl`` for training curves. It
never loads a model and never computes a score.

Layout of ``out_dir``::

    report.md          runs, perplexity (one table per evaluation data and protocol), zero-shot
                       (tasks x models), parameters and size, training summary, links to the plots
    perplexity.png     bar chart, one group of bars per (data, protocol)
    zeroshot.png       bar chart of acc per task (+ mean), one bar per model
    train_<q>.png      one plot per training quantity (loss, ce, kl, lambda, flip_rate, init_flip_rate,
                       eval_ppl), one line per run that logged it

Perplexity numbers are only put side by side when they were measured with the same protocol (data, split,
seqlen, stride, windows, tokens); a data spec measured under several protocols gets one table per protocol
and a warning.

Modules: ``runs`` (reading a run directory), ``markdown`` (cells and tables), ``perplexity``, ``zeroshot`` and
``sections`` (the report's sections), ``plots`` (the PNGs), ``writer`` (``write_report``).
"""

from semisparse.report.perplexity import PROTOCOL_FIELDS
from semisparse.report.plots import TRAIN_PLOTS
from semisparse.report.runs import RunInfo, read_run
from semisparse.report.sections import compressed_bytes_estimate
from semisparse.report.writer import write_report

__all__ = ["PROTOCOL_FIELDS", "TRAIN_PLOTS", "RunInfo", "compressed_bytes_estimate", "read_run", "write_report"]

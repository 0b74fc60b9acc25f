"""The report's other sections: the runs overview, parameters and size, and the training summary."""

from __future__ import annotations

from semisparse.report.markdown import NOT_EVALUATED, NOT_RUN, finite, fmt_bytes, fmt_int, fmt_short, table
from semisparse.report.runs import RunInfo, last_value
from semisparse.rundir import EVAL_FILE, METRICS_FILE, PACKED_WEIGHTS, RUN_META


def _results_cell(run: RunInfo) -> str:
    if run.eval_path is None:
        return NOT_EVALUATED
    return "yes" if run.eval_path == run.path / EVAL_FILE else f"`{run.eval_path}`"  # a file given for the run


def runs_section(runs: list[RunInfo]) -> list[str]:
    rows = []
    for r in runs:
        m = r.meta or {}
        slorb = m.get("slorb")
        slorb_text = (f"k={slorb.get('k')}, train_x={slorb.get('train_x')}" if isinstance(slorb, dict)
                      else ("yes" if r.slorb_params is not None else NOT_RUN))
        rows.append([
            r.name, f"`{r.path}`", r.stage, m.get("method") or NOT_RUN, m.get("pattern") or NOT_RUN,
            fmt_short(m.get("source_model")), fmt_short(m.get("dense_model")), fmt_short(m.get("init")),
            fmt_short(m.get("recipe")), slorb_text,
            _results_cell(r),
        ])
    return ["## Runs", "", *table(["name", "path", "stage", "method", "pattern", "source model", "dense model",
                                    "init", "recipe", "SLoRB", EVAL_FILE], rows, ["l"] * 11), ""]


FP16_BYTES = 2
META_BITS_PER_KEPT = 2


def compressed_bytes_estimate(params_total: int, sparse_total: int, kept: int, slorb_params: int = 0) -> float:
    """Bytes of an fp16 2:4 compressed model: dense weights in fp16, each kept value of a sparse layer in fp16
    plus 2 bits of position metadata (its index within its group of 4), SLoRB parameters in fp16.

        bytes = 2 * (P_total - P_sparse) + 2 * K + K * 2 / 8 + 2 * P_slorb
    """
    return (FP16_BYTES * (params_total - sparse_total) + FP16_BYTES * kept + kept * META_BITS_PER_KEPT / 8
            + FP16_BYTES * slorb_params)


def params_section(runs: list[RunInfo]) -> list[str]:
    out = ["## Parameters and size", ""]
    header = ["", *(r.name for r in runs)]

    def row(label, fn):
        return [label, *(fn(r) for r in runs)]

    def density(r):
        return NOT_RUN if not r.sparse_total or r.kept is None else f"{100 * r.kept / r.sparse_total:.2f} %"

    def nonzero(r):
        if r.params_total is None:
            return NOT_RUN
        if r.kept is None or r.sparse_total is None:
            return fmt_int(r.params_total)
        return fmt_int(r.params_total - r.sparse_total + r.kept)

    def dense_fp16(r):
        return NOT_RUN if r.params_total is None else fmt_bytes(FP16_BYTES * r.params_total)

    def compressed(r):
        if r.params_total is None:
            return NOT_RUN
        return fmt_bytes(compressed_bytes_estimate(r.params_total, r.sparse_total or 0,
                                                r.kept if r.kept is not None else 0, r.slorb_params or 0)
                      if r.kept is not None and r.sparse_total is not None
                      else FP16_BYTES * (r.params_total + (r.slorb_params or 0)))

    def kept_cell(r):
        if r.kept is None:
            return NOT_RUN
        text = fmt_int(r.kept)
        if r.kept_source == RUN_META:
            text += f" (from {RUN_META})"
        elif r.kept_meta is not None and r.kept_meta != r.kept:
            text += f" ({RUN_META} says {r.kept_meta:,})"
        return text

    def slorb_cell(r):
        if r.slorb_params is None:
            return NOT_RUN if r.slorb_params_meta is None else f"{r.slorb_params_meta:,} (from {RUN_META})"
        text = fmt_int(r.slorb_params)
        if r.slorb_params_meta is not None and r.slorb_params_meta != r.slorb_params:
            text += f" ({RUN_META} says {r.slorb_params_meta:,})"
        return text

    def slorb_pct(r):
        if r.slorb_params is None or not r.params_total:
            return NOT_RUN
        return f"{100 * r.slorb_params / r.params_total:.3f} %"

    rows = [
        row("sparse layers", lambda r: fmt_int(r.sparse_layers)),
        row("sparse-layer weights", lambda r: fmt_int(r.sparse_total)),
        row("kept non-zeros (sparse layers)", kept_cell),
        row("density of sparse layers", density),
        row("total parameters (model.safetensors)", lambda r: fmt_int(r.params_total)),
        row("non-zero parameters (total \u2212 pruned)", nonzero),
        row("SLoRB S entries", lambda r: fmt_int(r.slorb_S)),
        row("SLoRB X entries", lambda r: fmt_int(r.slorb_X)),
        row("SLoRB extra parameters", slorb_cell),
        row("SLoRB extra / total", slorb_pct),
        row("weight file on disk (model.safetensors or packed)", lambda r: fmt_bytes(r.model_bytes)),
        row("stored dtypes", lambda r: ", ".join(f"{k}" for k in r.weight_dtypes) or NOT_RUN),
        row("dense fp16 size (estimate)", dense_fp16),
        row("compressed 2:4 fp16 size (estimate)", compressed),
    ]
    if any(r.export is not None for r in runs):
        rows += export_rows(runs)
    out += table(header, rows)
    if any(r.export is not None for r in runs):
        out += ["", "*Exported folders* (`semisparse export`, docs/export.md): a packed folder's weight file is "
                f"`{PACKED_WEIGHTS}` and its parameters are counted densely (pruned zeros included). *Bits per "
                "weight* = 8 · weight-file bytes / total parameters; *bits per sparse-layer weight* = 8 · "
                "bytes of the packed layers (values, positions, scales) / their dense weight count (9 for 2:4 fp16)."]
    out += [
        "",
        "*Kept non-zeros* count the `True` entries of `masks.safetensors` (or `sparse_weights.kept` of "
        "`semisparse.json` when there is no mask file). *Total parameters* are the entries of the tensors stored "
        "in `model.safetensors` (read from its header; a tied output embedding is stored once). The pruned zeros "
        "are stored densely, so the file is as large as the dense model's. *SLoRB extra parameters* are the entries "
        "of `slorb_S` ([out, in/k]) plus `slorb_X` ([in/k, in]) from `slorb.safetensors` shapes; a frozen X "
        "(`train_x: false`, the block indicator) is a weight-free group sum at inference and is not counted.",
        "",
        "Compressed size estimate (fp16 values, 2-bit position metadata per kept value of a 2:4 layer):",
        "",
        "    bytes = 2 \u00b7 (P_total \u2212 P_sparse) + 2 \u00b7 K + 2/8 \u00b7 K + 2 \u00b7 P_slorb",
        "",
        "with P_total the total parameters, P_sparse the sparse-layer weights, K the kept non-zeros and P_slorb the "
        "SLoRB extra parameters. For exact 2:4 (K = P_sparse / 2) the sparse layers shrink to 1.125 of 2 bytes per "
        "weight (56.25 %). Dense models: 2 \u00b7 P_total.",
        "",
    ]
    return out


def export_rows(runs: list[RunInfo]) -> list[list[str]]:
    """Rows for exported folders: format, bytes on disk, bits per weight (NOT_RUN for run directories)."""

    def fmt_export(r):
        if r.export is None:
            return NOT_RUN
        o, quant = r.export.get("options") or {}, r.export.get("quantization") or {}
        text = f"{o.get('format')} {o.get('dtype')}"
        if quant.get("scheme") not in (None, "none"):
            text += f", {quant['scheme']} {quant.get('method', '')}".rstrip()
        return text + ("" if r.export.get("nm", True) else ", SLoRB merged (not N:M)")

    def bits(r):
        if r.model_bytes is None or not r.params_total:
            return NOT_RUN
        return f"{8 * r.model_bytes / r.params_total:.3f}"

    def sparse_bits(r):
        return NOT_RUN if r.sparse_bytes is None or not r.sparse_total else f"{8 * r.sparse_bytes / r.sparse_total:.3f}"

    return [
        ["export format", *(fmt_export(r) for r in runs)],
        ["exported folder on disk", *(fmt_bytes(r.export_bytes) if r.export is not None else NOT_RUN for r in runs)],
        ["bits per weight (weight file)", *(bits(r) for r in runs)],
        ["bits per sparse-layer weight (packed)", *(sparse_bits(r) for r in runs)],
    ]


def train_section(runs: list[RunInfo], plots: list[tuple[str, str]]) -> list[str]:
    trained = [r for r in runs if r.metrics or r.metrics_bad_lines]
    if not trained:
        return []
    out = ["## Training", ""]
    rows = []
    for r in trained:
        m = r.metrics
        steps = [v for v in (rec.get("step") for rec in m) if isinstance(v, (int, float))]
        eval_ppls = [v for v in (finite(rec.get("eval_ppl")) for rec in m) if v is not None]

        def fmt(v, spec=".4f"):
            v = finite(v)
            return NOT_RUN if v is None else format(v, spec)

        rows.append([
            r.name,
            fmt_int(int(max(steps))) if steps else NOT_RUN,
            fmt_int(last_value(m, "tokens")) if isinstance(last_value(m, "tokens"), int) else NOT_RUN,
            fmt(last_value(m, "loss")), fmt(last_value(m, "ce")), fmt(last_value(m, "kl")),
            fmt(last_value(m, "eval_ppl"), ".2f"), fmt(min(eval_ppls) if eval_ppls else None, ".2f"),
            fmt(last_value(m, "flip_rate"), ".4g"),
            fmt(last_value(m, "tokens_per_s"), ",.0f"),
        ])
    out += table(["run", "last step", "tokens", "loss", "ce", "kl", "last eval ppl", "best eval ppl",
                   "last flip rate", "tokens/s"], rows)
    out.append("")
    bad = [f"{r.name}: {r.metrics_bad_lines}" for r in trained if r.metrics_bad_lines]
    if bad:
        out += [f"Unreadable lines skipped in {METRICS_FILE}: {', '.join(bad)}.", ""]
    for title, png in plots:
        out += [f"![{title}]({png})", ""]
    return out

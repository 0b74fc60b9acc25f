"""The perplexity section: results grouped by evaluation data and protocol, so only comparable numbers share a
table."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from semisparse.report.markdown import NOT_EVALUATED, NOT_RUN, finite, fmt_ppl, table
from semisparse.report.runs import RunInfo
from semisparse.rundir import EVAL_FILE

#: The fields of a perplexity record that define its protocol: two numbers are comparable only if these match.
PROTOCOL_FIELDS = ("data", "split", "seqlen", "stride", "windows", "tokens")

_PPL_PREFIXES = {"dense": "dense", "pruned": "pruned"}  # keys "dense:DATA" / "pruned:DATA" written by `prune`


def protocol(rec: dict) -> tuple:
    return tuple(rec.get(k) for k in PROTOCOL_FIELDS)


def protocol_text(proto: tuple) -> str:
    def value(k: str, v: Any) -> str:
        if k == "data":
            return f"`{v}`"
        if k in ("tokens", "windows") and isinstance(v, int):
            return f"{v:,}"
        return NOT_RUN if v is None else str(v)

    return ", ".join(f"{k}={value(k, v)}" for k, v in zip(PROTOCOL_FIELDS, proto))


@dataclass
class PplRow:
    label: str
    run: str  # the run this row was read from
    rec: dict


def ppl_groups(runs: list[RunInfo]) -> dict[str, dict[tuple, list[PplRow]]]:
    """{data spec: {protocol: rows}} in first-seen order; dense rows of several runs deduplicated."""
    groups: dict[str, dict[tuple, list[PplRow]]] = {}
    seen_dense: set = set()
    for run in runs:
        records = (run.eval or {}).get("perplexity") or {}
        if not isinstance(records, dict):
            continue
        for key, rec in records.items():
            if not isinstance(rec, dict):
                continue
            prefix, sep, spec = str(key).partition(":")
            if not sep or prefix not in _PPL_PREFIXES:
                prefix, spec = "", str(key)  # a plain DATA spec (which may itself contain ':')
            proto = protocol(rec)
            if prefix == "dense":
                dense = (run.meta or {}).get("dense_model") or (run.meta or {}).get("source_model")
                label = f"dense: {dense}" if dense else f"{run.name} (dense source)"
                ident = (label, spec, proto, rec.get("ppl"))
                if ident in seen_dense:
                    continue
                seen_dense.add(ident)
            elif prefix == "pruned":
                label = f"{run.name} (right after pruning)"
            else:
                label = run.name
            groups.setdefault(spec, {}).setdefault(proto, []).append(PplRow(label, run.name, rec))
    return groups


def ppl_section(runs: list[RunInfo], groups, plot: str | None) -> list[str]:
    out = ["## Perplexity", ""]
    out.append(
        "Lower is better. Non-overlapping windows of `seqlen` tokens (the SparseGPT/Wanda protocol); "
        "`tokens` is the number of predicted tokens. Numbers are only put in the same table when they were "
        "measured with the same protocol (data, split, seqlen, stride, windows, tokens)."
    )
    out.append("")
    unevaluated = [r.name for r in runs if r.eval is None]
    if not groups:
        out += ["No perplexity results.", ""]
    for spec, by_proto in groups.items():
        out += [f"### `{spec}`", ""]
        if len(by_proto) > 1:
            out += [
                f"> **Warning: protocols differ** \u2014 `{spec}` was measured with {len(by_proto)} different protocols; "
                "the tables below are not comparable with each other.",
                "",
            ]
        for i, (proto, rows) in enumerate(by_proto.items(), 1):
            tag = f" ({i} of {len(by_proto)})" if len(by_proto) > 1 else ""
            out += [f"Protocol{tag}: {protocol_text(proto)}", ""]
            out += table(["model", "ppl", "nll (nats/token)"],
                          [[r.label, fmt_ppl(r.rec.get("ppl")),
                            NOT_RUN if finite(r.rec.get("nll")) is None else f"{r.rec['nll']:.4f}"] for r in rows])
            out.append("")
        measured = {r.run for rows in by_proto.values() for r in rows if not r.label.startswith("dense: ")}
        others = [r.name for r in runs if r.name not in measured and r.eval is not None]
        if others:
            out += [f"Not evaluated on `{spec}`: {', '.join(others)}.", ""]
    if unevaluated:
        out += [f"{NOT_EVALUATED.capitalize()} (no {EVAL_FILE}): {', '.join(unevaluated)}.", ""]
    if plot:
        out += [f"![perplexity]({plot})", ""]
    return out

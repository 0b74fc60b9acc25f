"""Markdown cells and tables, and how numbers and absent values are written in them."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from typing import Any

NOT_EVALUATED = "not evaluated"
MISSING = "missing"
NOT_RUN = "\u2014"  # em dash: the model was evaluated, but not on this data / task


def cell(value: Any) -> str:
    """A Markdown table cell: pipes escaped, newlines flattened."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def row(cells: Iterable[Any]) -> str:
    return "| " + " | ".join(cell(c) for c in cells) + " |"


def table(header: Sequence[Any], rows: Iterable[Sequence[Any]], align: Sequence[str] | None = None) -> list[str]:
    align = align or ["l"] + ["r"] * (len(header) - 1)
    sep = "| " + " | ".join("---:" if a == "r" else "---" for a in align) + " |"
    return [row(header), sep, *(row(r) for r in rows)]


def fmt_int(n: int | None) -> str:
    return NOT_RUN if n is None else f"{n:,}"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return NOT_RUN
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit} ({int(round(n)):,} B)"
    return f"{int(round(n)):,} B"


def fmt_pct(v: float | None) -> str:
    return NOT_RUN if v is None else f"{100 * v:.2f}"


def finite(v: Any) -> float | None:
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    return None


def fmt_ppl(v: Any) -> str:
    x = finite(v)
    return NOT_RUN if x is None else f"{x:.2f}"


def fmt_short(value: Any, width: int = 60) -> str:
    if value is None:
        return NOT_RUN
    if isinstance(value, dict):
        for key in ("name", "path", "recipe", "model", "source"):
            if isinstance(value.get(key), str):
                return fmt_short(value[key], width)
        value = json.dumps(value, sort_keys=True)
    s = str(value)
    return s if len(s) <= width else s[: width - 1] + "\u2026"

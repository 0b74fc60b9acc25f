"""Reading run directories (and exported folders) for the report: provenance, results, training records and
parameter counts.

Everything comes from files (through ``semisparse.rundir``): shapes from the safetensors headers, kept entries by
reading the masks one tensor at a time. No model is loaded, no score computed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from semisparse import rundir
from semisparse.errors import UserError, first_line


@dataclass
class RunInfo:
    """Everything the report needs from one run directory."""

    name: str
    path: Path
    meta: dict | None  # semisparse.json (None for a plain model directory, e.g. the dense baseline)
    eval: dict | None  # eval.json or the eval file given for this run (None: not evaluated)
    metrics: list[dict] = field(default_factory=list)  # metrics.jsonl records
    metrics_bad_lines: int = 0
    params_total: int | None = None  # tensor entries stored in model*.safetensors
    model_bytes: int | None = None  # size of model*.safetensors on disk
    weight_dtypes: dict[str, int] = field(default_factory=dict)  # safetensors dtype -> entries
    sparse_layers: int | None = None
    sparse_total: int | None = None  # entries of the sparse layers' weights (mask entries)
    kept: int | None = None  # non-zeros kept by the masks
    kept_source: str | None = None  # "masks.safetensors" | "semisparse.json"
    kept_meta: int | None = None  # semisparse.json sparse_weights.kept, when present
    slorb_S: int | None = None
    slorb_X: int | None = None
    slorb_layers: int | None = None
    slorb_params: int | None = None  # counted extra parameters (S, plus X unless X is a frozen indicator)
    slorb_params_meta: int | None = None
    eval_path: Path | None = None  # the eval file read (None: not evaluated)
    export: dict | None = None  # export.json of an exported folder (semisparse export); meta is then its source's
    export_bytes: int | None = None  # every file of the exported folder on disk
    sparse_bytes: int | None = None  # packed: bytes of the sparse layers' tensors (values, positions, scales)

    @property
    def stage(self) -> str:
        if self.export is not None:
            return f"export ({self.export.get('options', {}).get('format', '?')})"
        if self.meta is None:
            return "model"
        return str(self.meta.get("stage") or "?")


def _safe_open(path: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt")
    except Exception as exc:  # safetensors raises its own error types on corrupt files
        raise UserError(f"cannot read {path}: {first_line(exc)}") from None


def _shapes(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """{tensor name: (shape, safetensors dtype)} from the file header, without reading the tensors."""
    with _safe_open(path) as f:
        out = {}
        for key in f.keys():
            sl = f.get_slice(key)
            out[key] = (tuple(int(d) for d in sl.get_shape()), str(sl.get_dtype()))
        return out


def _numel(shape: Sequence[int]) -> int:
    return math.prod(shape) if shape else 1


def _model_files(run_dir: Path) -> list[Path]:
    single = run_dir / rundir.MODEL_WEIGHTS
    if single.is_file():
        return [single]
    return sorted(p for p in run_dir.glob("model-*.safetensors") if p.is_file())  # sharded checkpoints


def _count_params(info: RunInfo) -> None:
    files = _model_files(info.path)
    if not files:
        return
    total, size, dtypes = 0, 0, {}
    for path in files:
        size += path.stat().st_size
        for shape, dtype in _shapes(path).values():
            n = _numel(shape)
            total += n
            dtypes[dtype] = dtypes.get(dtype, 0) + n
    info.params_total, info.model_bytes, info.weight_dtypes = total, size, dtypes


def _count_masks(info: RunInfo) -> None:
    sw = (info.meta or {}).get("sparse_weights") or {}
    if isinstance(sw.get("kept"), int):
        info.kept_meta = sw["kept"]
    path = info.path / rundir.MASKS_FILE
    if path.is_file():
        kept = total = 0
        with _safe_open(path) as f:
            keys = list(f.keys())
            for key in keys:
                mask = f.get_tensor(key)
                kept += int(mask.count_nonzero())
                total += mask.numel()
        info.sparse_layers, info.sparse_total, info.kept, info.kept_source = len(keys), total, kept, rundir.MASKS_FILE
    elif isinstance(sw.get("kept"), int):
        info.kept = sw["kept"]
        info.sparse_total = sw.get("total") if isinstance(sw.get("total"), int) else None
        layers = (info.meta or {}).get("layers_pruned")
        info.sparse_layers = len(layers) if isinstance(layers, list) else None
        info.kept_source = rundir.RUN_META


def _count_slorb(info: RunInfo, path: Path | None = None) -> None:
    """SLoRB counts from the shapes in ``path`` (default: slorb.safetensors; an exported folder: its packed file)."""
    slorb_meta = (info.meta or {}).get("slorb")
    if isinstance(slorb_meta, dict) and isinstance(slorb_meta.get("params"), int):
        info.slorb_params_meta = slorb_meta["params"]
    path = path or info.path / rundir.SLORB_FILE
    if not path.is_file():
        return
    s = x = 0
    layers = set()
    for key, (shape, _dtype) in _shapes(path).items():
        layer, _, kind = key.rpartition(".")
        if kind == "slorb_S":
            s += _numel(shape)
            layers.add(layer)
        elif kind == "slorb_X":
            x += _numel(shape)
            layers.add(layer)
    train_x = not (isinstance(slorb_meta, dict) and slorb_meta.get("train_x") is False)
    info.slorb_S, info.slorb_X, info.slorb_layers = s, x, len(layers)
    # A frozen X is the block indicator: at inference a plain group sum with no weights (AST.md §4).
    info.slorb_params = s + (x if train_x else 0)


def _count_export(info: RunInfo) -> None:
    """An exported folder: sizes from its manifest and file sizes; a packed one has no model.safetensors, its
    parameters are counted densely (pruned zeros included) so they compare with the run directory's."""
    manifest = info.export or {}
    info.export_bytes = sum(p.stat().st_size for p in info.path.rglob("*") if p.is_file() and p.name != "eval.json")
    packed = info.path / rundir.PACKED_WEIGHTS
    sizes = manifest.get("sizes")
    if not packed.is_file() or not isinstance(sizes, dict):
        _count_params(info)
        if manifest.get("nm", True):
            _count_masks(info)  # zeros stored densely: the source's kept count still holds
        return
    sparse, dense = sizes.get("sparse_layers") or {}, sizes.get("dense_tensors") or {}
    info.sparse_layers, info.sparse_total, info.kept = sparse.get("count"), sparse.get("weights"), sparse.get("kept")
    info.kept_source = rundir.EXPORT_MANIFEST
    info.sparse_bytes = sparse.get("bytes")
    info.params_total = (sparse.get("weights") or 0) + (dense.get("entries") or 0)
    info.model_bytes = packed.stat().st_size
    for shape, dtype in _shapes(packed).values():
        info.weight_dtypes[dtype] = info.weight_dtypes.get(dtype, 0) + _numel(shape)
    if (manifest.get("slorb") or {}).get("layers"):
        _count_slorb(info, packed)


def read_run(run_dir: Path, name: str | None = None, eval_file: Path | None = None) -> RunInfo:
    """Read one run directory (or a plain model directory). Raises UserError if it is not one.

    ``eval_file``: the run's results file instead of ``run_dir/eval.json`` (e.g. a dense model's results kept
    outside its cache folder); it must exist.
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise UserError(f"{path} is not a run directory (no such directory)")
    export = None
    if (path / rundir.EXPORT_MANIFEST).is_file():
        from semisparse.export.format import read_manifest

        export = read_manifest(path)
    elif not rundir.is_model_dir(path):
        raise UserError(f"{path} is not a run directory (no {rundir.MODEL_CONFIG})")
    if eval_file is not None and not Path(eval_file).is_file():
        raise UserError(f"eval file {eval_file} given for {path} does not exist")
    eval_path = Path(eval_file) if eval_file is not None else path / rundir.EVAL_FILE
    if export is not None:
        source_meta = (export.get("source") or {}).get("meta")
        meta = source_meta if isinstance(source_meta, dict) else None
    else:
        meta = rundir.read_run_meta(path) if (path / rundir.RUN_META).is_file() else None
    ev = rundir.read_eval(eval_path)
    info = RunInfo(name=name or path.resolve().name, path=path, meta=meta, eval=ev,
                   eval_path=eval_path if ev is not None else None, export=export)
    info.metrics, info.metrics_bad_lines = rundir.read_metrics_counted(path / rundir.METRICS_FILE)
    if export is not None:
        _count_export(info)
        return info
    _count_params(info)
    _count_masks(info)
    _count_slorb(info)
    return info


def default_names(paths: Sequence[Path]) -> list[str]:
    """Directory names; where two are equal, parent folders are prepended until they differ (then a counter)."""
    resolved = [p.resolve() for p in paths]
    names = [p.name or str(p) for p in resolved]
    depth = 1
    while len(set(names)) < len(names) and depth < 4:
        depth += 1
        dup = {n for n in names if names.count(n) > 1}
        names = ["/".join(p.parts[-depth:]) if n in dup else n for n, p in zip(names, resolved)]
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n} ({seen[n]})")
    return out


def metric_series(records: list[dict], y: str, x: str) -> tuple[list[float], list[float]]:
    """(xs, ys) of the records holding both keys; a later record for the same x (a resumed run) wins."""
    points: dict[float, float] = {}
    for rec in records:
        xv, yv = rec.get(x), rec.get(y)
        if isinstance(xv, (int, float)) and not isinstance(xv, bool) and isinstance(yv, (int, float)) \
                and not isinstance(yv, bool):
            points[float(xv)] = float(yv)
    xs = sorted(points)
    return xs, [points[v] for v in xs]


def last_value(records: list[dict], key: str) -> Any:
    for rec in reversed(records):
        if key in rec and rec[key] is not None:
            return rec[key]
    return None

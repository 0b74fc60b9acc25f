"""Documents of a DATA spec one at a time, for corpora too large to hold in memory.

The rows are those of ``data.load_text`` (same files, same order, same row rules), but local ``.txt``/``.raw``,
``.jsonl``/``.json`` and ``.parquet`` files are read incrementally. The named sources (``default``, ``wikitext2``,
``c4``) come through ``data.load_text`` as they are (they fit in memory).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from semisparse import data as data_mod
from semisparse.errors import UserError
from semisparse.shards.format import is_shard_dir

_NAMED = (data_mod.DEFAULT_DATA, "wikitext2", "c4")
_SUFFIXES = data_mod._SUFFIXES  # the files data.load_text reads; one list, so both readers agree


def _txt_rows(path: Path) -> Iterator[str]:
    # Universal newlines turn "\r\n"/"\r" into "\n" as read_text does; splitlines then ends rows where
    # data._read_txt ends them (also at \f, \v, \x1c-\x1e, \x85, \u2028, \u2029).
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            for row in line.splitlines(keepends=True):
                yield row if row.strip() else ""


def _jsonl_rows(path: Path, field: str) -> Iterator[str]:
    for record, row in enumerate(data_mod.iter_jsonl(path), 1):
        if field not in row:
            raise UserError(f"{path}: record {record} has no field {field!r} (choose one with --text-field)")
        yield str(row[field])


def _parquet_rows(path: Path, field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    if field not in parquet.schema_arrow.names:
        raise UserError(f"{path}: no column {field!r} (columns: {', '.join(parquet.schema_arrow.names)})")
    for batch in parquet.iter_batches(batch_size=1024, columns=[field]):
        yield from (str(x) for x in batch.column(0).to_pylist())


def iter_file(path: Path, field: str = "text") -> Iterator[str]:
    suffix = path.suffix.lower()
    readers = {".txt": _txt_rows, ".raw": _txt_rows, ".jsonl": _jsonl_rows, ".json": _jsonl_rows,
               ".parquet": _parquet_rows}
    if suffix not in readers:
        raise UserError(f"unsupported data file {path}: expected one of {', '.join(_SUFFIXES)}")
    rows = readers[suffix](path) if readers[suffix] is _txt_rows else readers[suffix](path, field)
    try:
        yield from rows
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from exc


@dataclass
class DocumentSource:
    """Where documents come from, without reading them: ``spec`` as given, files (local), a change signature."""

    spec: str
    field: str
    files: list[Path] | None  # None: a named source
    name: str
    split: str

    def __iter__(self) -> Iterator[str]:
        if self.files is None:
            yield from data_mod.load_text(self.spec, "train", self.field).docs
            return
        for path in self.files:
            yield from iter_file(path, self.field)

    def signature(self) -> str:
        """Changes when an input file does (name, size, modification time); a named source is its name."""
        if self.files is None:
            return self.spec
        stats = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in self.files]
        return hashlib.sha256(json.dumps(stats).encode()).hexdigest()

    def identity(self) -> str:
        """The source whatever the working directory: a named source, or the resolved path."""
        return self.spec if self.files is None else str(Path(self.spec).expanduser().resolve())

    def describe(self) -> dict:
        return {"data": self.spec, "name": self.name, "split": self.split,
                "files": None if self.files is None else len(self.files), "text_field": self.field}


def open_documents(spec: str, field: str = "text") -> DocumentSource:
    """A DATA spec as a lazy document source; a missing file or folder fails here, before any model is loaded."""
    if spec in _NAMED:
        split = "train"
        return DocumentSource(spec, field, None, spec, split)
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(f"data {spec!r} not found (a file, a folder, 'default', 'wikitext2' or 'c4')")
    if is_shard_dir(path):
        raise UserError(f"data {spec!r} is already a token-shard folder (train on it with --data {spec})")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _SUFFIXES)
        if not files:
            raise UserError(f"data folder {path} has no {', '.join(_SUFFIXES)} files")
    else:
        if path.suffix.lower() not in _SUFFIXES:
            raise UserError(f"unsupported data file {path}: expected one of {', '.join(_SUFFIXES)}")
        files = [path]
    return DocumentSource(spec, field, files, str(path), "file")

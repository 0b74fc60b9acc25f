"""``semisparse tokenize``: a text source streamed into token shards, in bounded memory, written atomically."""

from __future__ import annotations

import datetime as _dt
import hashlib
import itertools
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from semisparse import rundir
from semisparse.errors import UserError
from semisparse.shards.format import (
    CONVENTION, FORMAT, INDEX_FILE, VERSION, ShardSet, dtype_name, is_shard_dir, shard_name, token_dtype,
    tokenizer_fingerprint,
)
from semisparse.shards.readers import DocumentSource, open_documents

DEFAULT_SHARD_TOKENS = 100_000_000  # 200 MB per uint16 shard: few files, each still quick to copy
# Text handed to the tokenizer at once. Bounds memory: a fast tokenizer keeps ~100 bytes per token of a call.
BATCH_CHARS = 1 << 18
BATCH_DOCS = 2048


def load_tokenizer(model: str):
    """MODEL's tokenizer alone (no weights), wherever load_model would find it."""
    from transformers import AutoTokenizer

    from semisparse.errors import first_line
    from semisparse.models import resolve_model

    try:
        return AutoTokenizer.from_pretrained(resolve_model(model))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load the tokenizer of {model!r}: {first_line(exc)}") from exc


def _batches(docs, max_chars: int = BATCH_CHARS, max_docs: int = BATCH_DOCS):
    """Non-blank documents in lists of bounded total length (blank ones are skipped, as data.token_stream does)."""
    batch, chars = [], 0
    for doc in docs:
        if not doc.strip():
            continue
        batch.append(doc)
        chars += len(doc)
        if chars >= max_chars or len(batch) >= max_docs:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


class _ShardWriter:
    """Appends token ids to shard files of ``shard_tokens`` tokens each, counting documents by where they start."""

    def __init__(self, folder: Path, dtype: np.dtype, shard_tokens: int) -> None:
        self.folder, self.dtype, self.shard_tokens = folder, dtype, shard_tokens
        self.shards: list[dict] = []
        self.tokens = self.documents = 0
        self.stream_hash = hashlib.sha256()  # = train.stream.fingerprint of the whole stream
        self._fh = None
        self._file_hash = None

    def _open_next(self) -> None:
        self._close_current()
        name = shard_name(len(self.shards))
        self.shards.append({"file": name, "tokens": 0, "documents": 0})
        self._fh = (self.folder / name).open("wb")
        self._file_hash = hashlib.sha256()

    def _close_current(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self.shards[-1]["sha256"] = self._file_hash.hexdigest()
            self._fh = None

    def add(self, ids: np.ndarray, lengths: np.ndarray) -> None:
        """``ids``: the documents' tokens one after another; ``lengths``: tokens per document."""
        starts = self.tokens + np.cumsum(lengths) - lengths  # global offset of each document's first token
        self.stream_hash.update(ids.astype(np.int64).tobytes())
        done = 0
        while done < ids.size:
            if self._fh is None or self.shards[-1]["tokens"] == self.shard_tokens:
                self._open_next()
            shard = self.shards[-1]
            take = min(ids.size - done, self.shard_tokens - shard["tokens"])
            piece = ids[done:done + take].astype(self.dtype).tobytes()
            self._fh.write(piece)
            self._file_hash.update(piece)
            lo = self.tokens + done
            shard["documents"] += int(np.count_nonzero((starts >= lo) & (starts < lo + take)))
            shard["tokens"] += take
            done += take
        self.tokens += ids.size
        self.documents += lengths.size

    def close(self) -> list[dict]:
        self._close_current()
        return self.shards


def _flatten(batch_ids: list[list[int]], eos: int | None) -> tuple[np.ndarray, np.ndarray]:
    tail = [] if eos is None else [eos]
    lengths = np.fromiter((len(ids) + len(tail) for ids in batch_ids), dtype=np.int64, count=len(batch_ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids + tail for ids in batch_ids), dtype=np.int64,
                       count=int(lengths.sum()))
    return flat, lengths


def _arguments(source: DocumentSource, tokenizer, seqlen: int | None, shard_tokens: int) -> dict:
    """What the shards depend on: an existing folder made from the same is up to date."""
    return {"version": VERSION, "data": source.identity(), "source_signature": source.signature(),
            "text_field": source.field, "tokenizer": tokenizer_fingerprint(tokenizer), "seqlen": seqlen,
            "shard_tokens": shard_tokens}


def _up_to_date(out: Path, args: dict, overwrite: bool) -> dict | None:
    """The index of an intact ``out`` made with ``args`` (nothing to do); None to (re)write; else a UserError."""
    if overwrite or not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return None
    if not is_shard_dir(out):
        raise UserError(f"{out} exists and is not a token-shard folder (pass --overwrite to replace it)")
    shards = ShardSet(out)  # a truncated shard is a UserError naming it
    old = shards.index.get("args", {})
    differ = [key for key in args if old.get(key) != args[key]]
    if differ:
        raise UserError(f"{out} holds shards made with other arguments (differ: {', '.join(differ)}): "
                        "pass --overwrite to replace them")
    return shards.index


def tokenize_to_shards(data: str, out: str | Path, *, model: str | None = None, tokenizer=None,
                       seqlen: int | None = None, shard_tokens: int = DEFAULT_SHARD_TOKENS, text_field: str = "text",
                       overwrite: bool = False, progress: bool = True) -> dict:
    """Tokenize DATA into the shard folder ``out``; returns its index plus ``"unchanged"`` (True: it was up to date).

    ``tokenizer`` (an object) or ``model`` (a MODEL spec whose tokenizer is loaded) decides the ids.
    """
    if shard_tokens < 1:
        raise UserError(f"--shard-tokens must be at least 1 (got {shard_tokens})")
    if seqlen is not None and seqlen < 2:
        raise UserError(f"--seqlen must be at least 2 (got {seqlen})")
    out = Path(out).expanduser()
    source = open_documents(data, text_field)  # a bad DATA fails before the tokenizer loads
    if tokenizer is None:
        if model is None:
            raise UserError("give the model whose tokenizer to use (--model MODEL)")
        tokenizer = load_tokenizer(model)
    args = _arguments(source, tokenizer, seqlen, shard_tokens)
    current = _up_to_date(out, args, overwrite)
    if current is not None:
        return {**current, "unchanged": True}

    vocab = len(tokenizer)
    dtype = token_dtype(vocab)
    eos = tokenizer.eos_token_id
    with rundir.atomic_dir(out, replace=out.exists()) as stage:
        writer = _ShardWriter(stage, dtype, shard_tokens)
        bar = tqdm(desc="tokenize", unit="tok", unit_scale=True, disable=not progress)
        for batch in _batches(source):
            ids = tokenizer(batch, add_special_tokens=False, verbose=False, return_attention_mask=False,
                            return_token_type_ids=False).input_ids
            flat, lengths = _flatten(ids, eos)
            if flat.size and int(flat.max()) >= 1 << (8 * dtype.itemsize):
                raise UserError(f"token id {int(flat.max())} does not fit {dtype_name(dtype)} (vocabulary {vocab})")
            writer.add(flat, lengths)
            bar.update(flat.size)
        bar.close()
        shards = writer.close()
        if writer.tokens == 0:
            raise UserError(f"data {data!r} is empty (no document with text)")
        if seqlen is not None and writer.tokens < seqlen + 1:
            raise UserError(f"data {data!r} has {writer.tokens} tokens, fewer than one sequence of {seqlen} (+1)")
        index = {
            "format": FORMAT, "version": VERSION, "args": args, "source": source.describe(),
            "tokenizer": {"fingerprint": args["tokenizer"], "name_or_path": model or tokenizer.name_or_path,
                          "vocab_size": vocab, "eos_token_id": eos, "bos_token_id": tokenizer.bos_token_id},
            "convention": CONVENTION, "dtype": dtype_name(dtype), "tokens": writer.tokens,
            "documents": writer.documents, "stream_sha256": writer.stream_hash.hexdigest(),
            "seqlen": seqlen, "sequences": (writer.tokens - 1) // seqlen if seqlen else None,
            "shards": shards, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        rundir.atomic_write_json(stage / INDEX_FILE, index, indent=1)
    return {**index, "unchanged": False}

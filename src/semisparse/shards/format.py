"""The token-shard format on disk, and its lazy reader.

A shard folder holds ``shard-00000.bin``, ``shard-00001.bin``, ... (raw little-endian token ids, ``uint16`` when
the vocabulary fits, else ``uint32``) and ``index.json``, written last (docs/data.md has the fields). Read in
order, the shards are exactly ``data.token_stream`` of the source: every non-blank document tokenized without
special tokens, followed by EOS, no BOS; the index's ``stream_sha256`` is ``train.stream.fingerprint`` of it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from semisparse.errors import UserError
from semisparse.rundir import read_json

INDEX_FILE = "index.json"
FORMAT = "semisparse-token-shards"
VERSION = 1
#: How documents become one stream: the rule of data.token_stream, recorded so a reader can check it.
CONVENTION = {"special_tokens": False, "bos": False, "eos_after_document": True, "blank_documents": "skipped"}


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.bin"


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest little-endian unsigned type that holds every id below ``vocab_size``."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def dtype_name(dtype: np.dtype) -> str:
    return {2: "uint16", 4: "uint32"}[np.dtype(dtype).itemsize]


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what decides the ids: the serialized fast tokenizer (padding/truncation settings left out), or
    the vocabulary and special tokens of a tokenizer without one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("padding", None)
        spec.pop("truncation", None)
    else:  # pragma: no cover - slow (pure Python) tokenizers
        spec = {"class": type(tokenizer).__name__, "vocab": sorted(tokenizer.get_vocab().items()),
                "special": {str(k): str(v) for k, v in tokenizer.special_tokens_map.items()}}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def is_shard_dir(path: str | Path) -> bool:
    """A folder with an index.json of this format (a folder of text that merely has an index.json is not)."""
    index = Path(path).expanduser() / INDEX_FILE
    if not index.is_file():
        return False
    try:
        return json.loads(index.read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def read_index(root: Path) -> dict:
    index = read_json(root / INDEX_FILE)
    if index.get("format") != FORMAT:
        raise UserError(f"{root} is not a token-shard folder (its {INDEX_FILE} has no format {FORMAT!r})")
    if index.get("version") != VERSION:
        raise UserError(f"{root}: token-shard format version {index.get('version')!r}; this semisparse reads "
                        f"version {VERSION} (re-run `semisparse tokenize`)")
    return index


class ShardSet:
    """The token stream of a shard folder, memory-mapped shard by shard on first use (a TokenArray).

    Opening checks the index and every shard's size against it (a truncated shard is refused); no token is read.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()
        self.index = read_index(self.root)
        self.dtype = np.dtype("<u2") if self.index["dtype"] == "uint16" else np.dtype("<u4")
        self.shards = self.index["shards"]
        for shard in self.shards:
            path = self.root / shard["file"]
            expected = shard["tokens"] * self.dtype.itemsize
            size = path.stat().st_size if path.is_file() else None
            if size != expected:
                what = "is missing" if size is None else f"has {size:,} bytes, the index says {expected:,}"
                raise UserError(f"shard {path} {what} (truncated or damaged: re-run `semisparse tokenize` "
                                "with --overwrite)")
        self.offsets = np.cumsum([0] + [s["tokens"] for s in self.shards])
        self.fingerprint = self.index["stream_sha256"]
        self.tokenizer_fingerprint = self.index["tokenizer"]["fingerprint"]
        self._maps: dict[int, np.memmap] = {}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _map(self, k: int) -> np.memmap:
        if k not in self._maps:
            self._maps[k] = np.memmap(self.root / self.shards[k]["file"], dtype=self.dtype, mode="r")
        return self._maps[k]

    def read(self, start: int, stop: int) -> torch.Tensor:
        """Tokens [start, stop) as int64, across shard boundaries."""
        start, stop = max(0, start), min(stop, len(self))
        pieces = []
        k = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while start < stop:
            lo, hi = int(self.offsets[k]), int(self.offsets[k + 1])
            end = min(stop, hi)
            pieces.append(np.asarray(self._map(k)[start - lo:end - lo], dtype=np.int64))
            start, k = end, k + 1
        return torch.from_numpy(np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64))

    def check_tokenizer(self, tokenizer, model: str) -> None:
        mine = tokenizer_fingerprint(tokenizer)
        if mine != self.tokenizer_fingerprint:
            made = self.index["tokenizer"].get("name_or_path") or "another tokenizer"
            raise UserError(f"{self.root} was tokenized with {made} (tokenizer {self.tokenizer_fingerprint[:12]}), "
                            f"not the tokenizer of {model} ({mine[:12]}): re-run `semisparse tokenize` with "
                            f"--model {model}")

    def describe(self) -> dict:
        src = self.index["source"]
        return {"data": str(self.root), "split": "shards", "documents": self.index["documents"],
                "tokens": len(self), "shards": len(self.shards), "dtype": self.index["dtype"],
                "tokenized_from": src.get("data")}

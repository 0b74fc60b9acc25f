"""``semisparse generate``: text sampled from a dense model (the teacher), written as token shards that ``train``
reads like any others -- the data-free route of LLM-QAT (Liu et al. 2023). docs/data.md has the rules.

Batch ``b`` of ``batch_size`` sequences is a pure function of (model, prompts of batch ``b``, settings, seed, ``b``):
the global torch RNG is seeded with ``batch_seed(seed, b)`` before its ``model.generate``. So a run can stop after
any batch and continue: shard files are appended as batches finish, and ``progress.json`` (the completed batch
count and the shard lengths) is replaced atomically after each batch. A resumed run cuts the files back to the
lengths of the last checkpoint and carries on, giving the bytes an uninterrupted run gives.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import hashlib
import itertools
import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from semisparse import rundir
from semisparse.errors import UserError
from semisparse.shards.format import (
    FORMAT, INDEX_FILE, VERSION, dtype_name, shard_name, token_dtype, tokenizer_fingerprint,
)
from semisparse.shards.readers import DocumentSource, open_documents
from semisparse.shards.writer import DEFAULT_SHARD_TOKENS, _batches, _up_to_date, load_tokenizer

PROGRESS_FILE = "progress.json"
LOCK_FILE = ".lock"
WORK_PREFIX = ".partial-"  # the resumable work folder beside OUT: .partial-NAME
DEFAULT_PROMPT_TOKENS = 16
EMPTY_BATCHES = 64  # batches in a row that add nothing: a model that only ever samples EOS first never finishes
#: How a generated document is laid out (the index records it; the reader needs nothing else).
CONVENTION = {"bos": False, "eos_after_document": True, "prompt_included": True, "stop": "first EOS",
              "blank_documents": "skipped"}


@dataclass(frozen=True)
class Sampling:
    """What decides the sampled tokens besides the model and the prompts (all recorded in the index)."""

    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    max_new_tokens: int = 256
    batch_size: int = 32
    seed: int = 0

    def check(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise UserError(f"--temperature must be a number >= 0, 0 for greedy (got {self.temperature})")
        if not (0 < self.top_p <= 1):
            raise UserError(f"--top-p must be in (0, 1] (got {self.top_p})")
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens must be at least 1 (got {self.max_new_tokens})")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1 (got {self.batch_size})")

    def generation_config(self, eos: int, pad: int):
        """Every knob explicit (top_k 0 = off), so a model's own generation_config.json changes nothing."""
        from transformers import GenerationConfig

        greedy = self.temperature == 0  # sampling knobs at their defaults: greedy ignores them (and warns if set)
        return GenerationConfig(
            do_sample=not greedy, temperature=1.0 if greedy else self.temperature, top_p=1.0 if greedy else self.top_p,
            top_k=None if greedy else 0, min_p=None, typical_p=1.0, repetition_penalty=1.0, no_repeat_ngram_size=0,
            num_beams=1,
            max_new_tokens=self.max_new_tokens, min_new_tokens=0, eos_token_id=eos, pad_token_id=pad, use_cache=True,
        )


def batch_seed(seed: int, batch: int) -> int:
    """The torch seed of batch ``batch``: sha256 of ``generate/SEED/BATCH``, first 15 hex digits."""
    return int(hashlib.sha256(f"generate/{seed}/{batch}".encode()).hexdigest()[:15], 16)


def documents(prompts: list[list[int]], new_tokens: list[list[int]], eos: int) -> list[list[int]]:
    """One document per sequence: its prompt tokens, the sampled tokens up to the first EOS, then EOS.
    An empty one (EOS sampled first, no prompt) is skipped, as token_stream skips blank documents."""
    docs = []
    for prompt, row in zip(prompts, new_tokens):
        body = prompt + (row[:row.index(eos)] if eos in row else row)
        if body:
            docs.append(body + [eos])
    return docs


def prompt_stream(source: DocumentSource, tokenizer, k: int) -> Iterator[list[int]]:
    """The first ``k`` tokens of each document with at least ``k`` (tokenized as token_stream does), in order,
    starting over at the end; a source without one such document is a UserError."""
    for _ in itertools.count():
        found = False
        for batch in _batches(source):
            ids = tokenizer(batch, add_special_tokens=False, verbose=False, return_attention_mask=False).input_ids
            for row in ids:
                if len(row) >= k:
                    found = True
                    yield list(row[:k])
        if not found:
            raise UserError(f"--prompts {source.spec!r} has no document of at least {k} tokens "
                            "(lower --prompt-tokens)")


def _start_token(tokenizer) -> tuple[int, str]:
    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no EOS token, which generate needs to end each document")
    if tokenizer.bos_token_id is not None:
        return tokenizer.bos_token_id, "bos"
    return tokenizer.eos_token_id, "eos"


def _files_signature(path: str) -> str:
    """A local model's files (name, size, modification time), so new weights in the same folder are noticed."""
    root = Path(path).expanduser()
    if not root.exists():
        return path  # a hub id
    files = sorted(p for p in (root.rglob("*") if root.is_dir() else [root]) if p.is_file())
    stats = [[str(p.relative_to(root) if root.is_dir() else p.name), p.stat().st_size, p.stat().st_mtime_ns]
             for p in files]
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()


# ------------------------------------------------------------------------------------------------ the work folder


class _Work:
    """The resumable work folder: shard files appended batch by batch, and the checkpoint ``progress.json``."""

    def __init__(self, folder: Path, shard_tokens: int) -> None:
        self.folder, self.shard_tokens = folder, shard_tokens
        self._lock = None

    def lock(self) -> None:
        """Create the folder and hold its lock: two runs writing one folder would interleave."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._lock = (self.folder / LOCK_FILE).open("a")
        except OSError as exc:
            raise UserError(f"cannot write {self.folder}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise UserError(f"another `semisparse generate` is writing {self.folder}") from None

    def load(self) -> dict | None:
        path = self.folder / PROGRESS_FILE
        return rundir.read_json(path) if path.is_file() else None

    def restore(self, state: dict) -> None:
        """Cut the files back to the checkpoint: bytes a killed run wrote after it are redone."""
        keep = {s["file"]: s["tokens"] * _np_dtype(state["dtype"]).itemsize for s in state["shards"]}
        for path in self.folder.glob("shard-*.bin"):
            if path.name not in keep:
                path.unlink()
        for name, size in keep.items():
            path = self.folder / name
            if not path.is_file() or path.stat().st_size < size:
                raise UserError(f"{path} is shorter than its checkpoint says: pass --overwrite to start over")
            os.truncate(path, size)

    def reset(self) -> None:
        for path in self.folder.iterdir():
            if path.name != LOCK_FILE:
                rundir._remove(path)

    def append(self, state: dict, docs: list[list[int]]) -> None:
        """Write ``docs`` after the checkpointed tokens, into shard files of ``shard_tokens`` each, and count them."""
        if not docs:
            return
        dtype = _np_dtype(state["dtype"])
        flat = np.fromiter(itertools.chain.from_iterable(docs), dtype=np.int64)
        starts = state["tokens"] + np.cumsum([0] + [len(d) for d in docs[:-1]])
        shards, size = state["shards"], self.shard_tokens
        pos = state["tokens"]
        while pos < state["tokens"] + flat.size:
            k = pos // size
            if k == len(shards):
                shards.append({"file": shard_name(k), "tokens": 0, "documents": 0})
            take = min(state["tokens"] + flat.size - pos, (k + 1) * size - pos)
            piece = flat[pos - state["tokens"]:pos - state["tokens"] + take]
            with (self.folder / shards[k]["file"]).open("ab") as fh:
                fh.write(piece.astype(dtype).tobytes())
                fh.flush()
                os.fsync(fh.fileno())
            shards[k]["tokens"] += take
            shards[k]["documents"] += int(np.count_nonzero((starts >= pos) & (starts < pos + take)))
            pos += take
        state["tokens"] += flat.size
        state["documents"] += len(docs)

    def save(self, state: dict) -> None:
        save_progress(self.folder / PROGRESS_FILE, state)

    def hashes(self, state: dict) -> str:
        """Each shard's sha256 (into ``state``) and the stream's (``train.stream.fingerprint``), read back."""
        stream = hashlib.sha256()
        for shard in state["shards"]:
            data = (self.folder / shard["file"]).read_bytes()  # one shard at a time (200 MB at the default size)
            shard["sha256"] = hashlib.sha256(data).hexdigest()
            stream.update(np.frombuffer(data, dtype=_np_dtype(state["dtype"])).astype(np.int64).tobytes())
        return stream.hexdigest()

    def publish(self, out: Path) -> None:
        """Rename the finished folder to ``out`` (an old ``out`` is moved aside first, removed after)."""
        (self.folder / PROGRESS_FILE).unlink(missing_ok=True)
        (self.folder / LOCK_FILE).unlink(missing_ok=True)
        rundir.fsync_tree(self.folder)
        old = out.with_name(f".old-{out.name}-{os.getpid()}")
        try:
            if out.exists() or out.is_symlink():
                rundir._remove(old)
                os.replace(out, old)
                try:
                    os.replace(self.folder, out)
                except OSError:
                    os.replace(old, out)  # put the previous version back
                    raise
                rundir._remove(old)
            else:
                os.replace(self.folder, out)
            rundir.fsync_dir(out.parent)
        except OSError as exc:
            raise UserError(f"cannot write {out}: {exc.strerror or exc}") from None


def _np_dtype(name: str) -> np.dtype:
    return np.dtype("<u2") if name == "uint16" else np.dtype("<u4")


def save_progress(path: Path, state: dict) -> None:
    """The checkpoint, after the batch's tokens are on disk (a test slows or stops runs here)."""
    rundir.atomic_write_json(path, state, indent=1)


# ------------------------------------------------------------------------------------------------ the verb


def _precision(device: torch.device) -> str:
    """bf16 weights on CUDA and on a CPU with native bf16 matmuls, else float32 (devices.resolve_precision). The
    frozen sampler holds its weights in bf16 rather than running under autocast, which would cast every weight
    again at every decoded token: decoding is memory-bound."""
    from semisparse.devices import resolve_precision

    return resolve_precision("auto", device)[0]


def _load_generator(model: str, device: torch.device, length: int, precision: str = "fp32"):
    from semisparse.models import load_model

    net = load_model(model, dtype=torch.bfloat16 if precision == "bf16" else torch.float32, device=device).model
    net.generation_config = type(net.generation_config)()  # the model's own sampling defaults play no part
    max_pos = getattr(net.config, "max_position_embeddings", None)
    if max_pos is not None and length > max_pos:
        raise UserError(f"start token + prompt tokens + --max-new-tokens = {length} tokens, more than the model's "
                        f"context of {max_pos}")
    return net


def _arguments(model: str, tokenizer, tokens: int, sampling: Sampling, prompts: DocumentSource | None,
               prompt_tokens: int, shard_tokens: int, precision: str) -> dict:
    """What the shards depend on: an existing folder (or a partial run) made from the same is this run's."""
    model_path = Path(model).expanduser()
    return {
        "version": VERSION, "kind": "generated",
        # train's default held-out text is args.data of the first source: the prompts' text, else the default text
        "data": prompts.identity() if prompts is not None else "default",
        "prompts": prompts.identity() if prompts is not None else None,
        "prompts_signature": prompts.signature() if prompts is not None else None,
        "text_field": prompts.field if prompts is not None else None,
        "prompt_tokens": prompt_tokens if prompts is not None else 0,
        "model": str(model_path.resolve()) if model_path.exists() else model,
        "model_signature": _files_signature(model),
        "tokenizer": tokenizer_fingerprint(tokenizer), "tokens": tokens, **asdict(sampling),
        "shard_tokens": shard_tokens, "precision": precision,
    }


def _check_budget(tokens: int, prompt_tokens: int | None, prompts: str | None, shard_tokens: int) -> None:
    if tokens < 1:
        raise UserError(f"--tokens must be positive (got {tokens})")
    if shard_tokens < 1:
        raise UserError(f"--shard-tokens must be at least 1 (got {shard_tokens})")
    if prompt_tokens is not None and prompts is None:
        raise UserError("--prompt-tokens needs --prompts DATA (without it every sequence starts from BOS alone)")
    if prompt_tokens is not None and prompt_tokens < 1:
        raise UserError(f"--prompt-tokens must be at least 1 (got {prompt_tokens})")


def generate_to_shards(model: str, out: str | Path, *, tokens: int, sampling: Sampling = Sampling(),
                       prompts: str | None = None, prompt_tokens: int | None = None, text_field: str = "text",
                       shard_tokens: int = DEFAULT_SHARD_TOKENS, device: str = "auto", overwrite: bool = False,
                       progress: bool = True, say=print) -> dict:
    """Sample about ``tokens`` tokens from ``model`` into the shard folder ``out``; returns its index plus
    ``"unchanged"`` (True: it was complete already) and ``"resumed_from"`` (the batch a partial run continued at)."""
    from semisparse.devices import resolve_device

    _check_budget(tokens, prompt_tokens, prompts, shard_tokens)
    sampling.check()
    if sampling.temperature == 0 and prompts is None:
        raise UserError("--temperature 0 (greedy) from the start token alone gives one sequence over and over: "
                        "sample (--temperature > 0) or give --prompts DATA")
    out = Path(out).expanduser()
    source = open_documents(prompts, text_field) if prompts is not None else None
    k = (prompt_tokens or DEFAULT_PROMPT_TOKENS) if source is not None else 0
    device = resolve_device(device)
    precision = _precision(device)
    tokenizer = load_tokenizer(model)  # an unknown model fails here, before the weights load
    start, start_kind = _start_token(tokenizer)
    if source is not None:
        next(prompt_stream(source, tokenizer, k))  # DATA without a usable prompt fails before any writing
    args = _arguments(model, tokenizer, tokens, sampling, source, k, shard_tokens, precision)
    current = _up_to_date(out, args, overwrite)
    if current is not None:
        return {**current, "unchanged": True, "resumed_from": None}

    work = _Work(out.with_name(WORK_PREFIX + out.name), shard_tokens)
    work.lock()
    state = work.load()
    if state is not None and state.get("args") != args:
        differ = [key for key in args if state.get("args", {}).get(key) != args[key]]
        if not overwrite:
            raise UserError(f"{work.folder} holds a partial run with other arguments (differ: {', '.join(differ)}): "
                            "pass --overwrite to start over")
        state = None  # discarded below, once the model has loaded
    if start_kind == "eos":
        say("note: the tokenizer has no BOS token; every sequence starts from the EOS token")
    try:
        net = _load_generator(model, device, 1 + k + sampling.max_new_tokens, precision)
    except BaseException:
        if work.load() is None:  # the folder was made by this run and holds nothing yet
            rundir._remove(work.folder)
        raise

    resumed_from = None if state is None else state["batches"]
    if state is None:
        work.reset()
        vocab = max(len(tokenizer), int(getattr(net.config, "vocab_size", 0) or 0))
        state = {"args": args, "dtype": dtype_name(token_dtype(vocab)), "batches": 0, "sequences": 0,
                 "stopped_at_eos": 0, "tokens": 0, "documents": 0, "seconds": 0.0, "shards": []}
        work.save(state)
    else:
        work.restore(state)
        say(f"resuming {out} at batch {state['batches']:,} ({state['tokens']:,} tokens written)")
    prompt_iter = (itertools.islice(prompt_stream(source, tokenizer, k), state["batches"] * sampling.batch_size, None)
                   if source is not None else itertools.repeat([]))
    _sample_batches(net, tokenizer, start, prompt_iter, sampling, tokens, work, state, progress)

    index = _index(args, state, work, model, tokenizer, sampling, prompts, source, k, start, start_kind, precision,
                   device)
    rundir.atomic_write_json(work.folder / INDEX_FILE, index, indent=1)
    work.publish(out)
    return {**index, "unchanged": False, "resumed_from": resumed_from}


def _sample_batches(net, tokenizer, start: int, prompt_iter, sampling: Sampling, tokens: int, work: _Work,
                    state: dict, progress: bool) -> None:
    """Batch after batch until ``tokens`` document tokens are written, each followed by its checkpoint."""
    eos = tokenizer.eos_token_id
    config = sampling.generation_config(eos, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos)
    bar = tqdm(desc="generate", unit="tok", unit_scale=True, total=tokens, initial=state["tokens"],
               disable=not progress)
    empty = 0
    while state["tokens"] < tokens:
        began = time.perf_counter()
        batch_prompts = list(itertools.islice(prompt_iter, sampling.batch_size))
        ids = torch.tensor([[start] + p for p in batch_prompts], dtype=torch.long, device=net.device)
        torch.manual_seed(batch_seed(sampling.seed, state["batches"]))
        with torch.inference_mode():
            outputs = net.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
        new = outputs[:, ids.shape[1]:].tolist()
        before = state["tokens"]
        work.append(state, documents(batch_prompts, new, eos))
        state["batches"] += 1
        state["sequences"] += len(new)
        state["stopped_at_eos"] += sum(eos in row for row in new)
        state["seconds"] += time.perf_counter() - began
        work.save(state)
        bar.update(state["tokens"] - before)
        empty = 0 if state["tokens"] > before else empty + 1
        if empty == EMPTY_BATCHES:
            raise UserError(f"{empty} batches in a row ended every sequence at once (EOS first): nothing to write "
                            "(give --prompts DATA, or raise --temperature)")
    bar.total = max(tokens, state["tokens"])  # the last batch is kept whole: it may pass the budget
    bar.close()


def _index(args: dict, state: dict, work: _Work, model: str, tokenizer, sampling: Sampling, prompts: str | None,
           source: DocumentSource | None, k: int, start: int, start_kind: str, precision: str, device) -> dict:
    """index.json of the finished folder: a tokenize index, with the generated source described."""
    return {
        "format": FORMAT, "version": VERSION, "args": args,
        "source": {"kind": "generated", "data": prompts, "model": model, "seed": sampling.seed,
                   "sampling": {**asdict(sampling), "top_k": 0, "greedy": sampling.temperature == 0},
                   "prompts": None if source is None else {**source.describe(), "tokens": k},
                   "start_token": {"id": start, "is": start_kind}, "precision": precision,
                   "seed_rule": "torch.manual_seed(int(sha256('generate/{seed}/{batch}').hexdigest()[:15], 16)) "
                                "before the model.generate of batch `batch`",
                   "tokens_requested": args["tokens"]},
        "tokenizer": {"fingerprint": args["tokenizer"], "name_or_path": model, "vocab_size": len(tokenizer),
                      "eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.bos_token_id},
        "convention": CONVENTION, "dtype": state["dtype"], "tokens": state["tokens"],
        "documents": state["documents"], "stream_sha256": work.hashes(state), "seqlen": None, "sequences": None,
        "generation": {"batches": state["batches"], "sequences": state["sequences"],
                       "stopped_at_eos": state["stopped_at_eos"]},
        "shards": state["shards"],
        # Varies between runs that write the same shards (the only fields that do):
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "run": {"device": str(device), "seconds": round(state["seconds"], 3),
                "tokens_per_s": round(state["tokens"] / state["seconds"], 1) if state["seconds"] else None},
    }

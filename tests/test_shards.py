"""Token shards (`semisparse tokenize`, semisparse.shards): the shards are the tokenizer's own ids of the input,
counted right in the index, narrow or wide by vocabulary; memory stays flat; batches over shards resume exactly
inside and across shards and split disjointly over ranks; bad input is one line, exit 2, nothing overwritten;
and `train --data SHARDS` trains end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from semisparse import data as data_mod
from semisparse.errors import UserError
from semisparse.shards import ShardSet, token_dtype, tokenize_to_shards
from semisparse.shards.readers import open_documents
from semisparse.train.stream import TokenBatches, fingerprint
from tiny import _SAMPLE, PROJECT_ROOT, make_tokenizer

C4 = "c4/c4_train_shard0_first1000.jsonl"


def shards(src, out, tok, **kw):
    return tokenize_to_shards(str(src), out, tokenizer=tok, progress=False, **kw)


def split_at_eos(ids: list[int], eos: int) -> list[list[int]]:
    docs, current = [], []
    for i in ids:
        if i == eos:
            docs.append(current)
            current = []
        else:
            current.append(i)
    assert not current, "the stream must end with EOS"
    return docs


@pytest.fixture
def tricky_text(tmp_path):
    """Line endings of every kind, blank and whitespace-only lines, non-ASCII text."""
    path = tmp_path / "tricky.txt"
    path.write_bytes("First line\r\nSecond line\rThird\fpart\n \n\n  crêpes – naïve  \u2028next\nlast line, no end"
                     .encode("utf-8"))
    return path


# ------------------------------------------------------------------------------------------- round trip


def test_streamed_rows_are_the_rows_load_text_reads(tmp_path, tricky_text, fixture_data, text):
    table = pa.Table.from_pylist([{"text": "alpha beta"}, {"text": "  "}, {"text": "gamma\ndelta"}])
    pq.write_table(table, tmp_path / "rows.parquet")
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text('{"text": "one"}\n\n{"text": "two", "x": 1}\n')
    for spec in (tricky_text, text, fixture_data / C4, fixture_data / "wikitext2" / "wiki.valid.raw", jsonl,
                 tmp_path / "rows.parquet", fixture_data / "c4"):
        assert list(open_documents(str(spec))) == data_mod.load_text(str(spec)).docs, spec


def test_shards_decode_to_the_tokenizers_ids_of_every_document(tmp_path, tricky_text, fixture_data, tokenizer):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_bytes(tricky_text.read_bytes())
    (folder / "b.jsonl").write_bytes((fixture_data / C4).read_bytes())
    (folder / "c.txt").write_text(_SAMPLE.replace(". ", ".\n"))
    docs = [d for d in data_mod.load_text(str(folder)).docs if d.strip()]
    expected = [tokenizer(d, add_special_tokens=False).input_ids for d in docs]

    index = shards(folder, tmp_path / "sh", tokenizer, shard_tokens=97)
    got = ShardSet(tmp_path / "sh")
    stream = got.read(0, len(got)).tolist()
    assert split_at_eos(stream, tokenizer.eos_token_id) == expected
    assert [tokenizer.decode(ids) for ids in expected] == docs  # byte-level BPE: the text itself comes back
    # counts: totals, shard sizes, documents by the shard they start in, bytes on disk, the stream's hash
    lengths = [len(ids) + 1 for ids in expected]
    starts = np.cumsum([0] + lengths[:-1])
    assert index["tokens"] == sum(lengths) == len(stream) and index["documents"] == len(docs)
    assert [s["tokens"] for s in index["shards"]][:-1] == [97] * (len(index["shards"]) - 1)
    assert sum(s["tokens"] for s in index["shards"]) == sum(lengths)
    assert [s["documents"] for s in index["shards"]] == [
        int(((starts >= 97 * k) & (starts < 97 * (k + 1))).sum()) for k in range(len(index["shards"]))]
    assert index["dtype"] == "uint16"
    assert all((tmp_path / "sh" / s["file"]).stat().st_size == 2 * s["tokens"] for s in index["shards"])
    assert index["stream_sha256"] == fingerprint(torch.tensor(stream))
    assert index["convention"]["eos_after_document"] and not index["convention"]["bos"]
    assert index["tokenizer"]["eos_token_id"] == tokenizer.eos_token_id
    # the same stream as the in-memory path that train used until now
    assert torch.equal(got.read(0, len(got)), data_mod.token_stream(tokenizer, docs))


class _WideTokenizer:
    """The tiny tokenizer with every id moved past 65535, as a large vocabulary would have them."""

    SHIFT = 70_000

    def __init__(self, inner):
        self.inner = inner
        self.backend_tokenizer = inner.backend_tokenizer
        self.name_or_path = "wide"
        self.eos_token_id = inner.eos_token_id + self.SHIFT
        self.bos_token_id = None

    def __len__(self):
        return len(self.inner) + self.SHIFT

    def __call__(self, docs, **kw):
        ids = self.inner(docs, **kw).input_ids
        return type("Out", (), {"input_ids": [[i + self.SHIFT for i in row] for row in ids]})


def test_dtype_follows_the_vocabulary(tmp_path, text, tokenizer):
    assert token_dtype(1 << 16) == np.uint16 and token_dtype((1 << 16) + 1) == np.uint32
    wide = _WideTokenizer(tokenizer)
    index = shards(text, tmp_path / "wide", wide, shard_tokens=64)
    assert index["dtype"] == "uint32"
    got = ShardSet(tmp_path / "wide")
    assert all((tmp_path / "wide" / s["file"]).stat().st_size == 4 * s["tokens"] for s in index["shards"])
    reference = data_mod.token_stream(tokenizer, data_mod.load_text(str(text)).docs) + _WideTokenizer.SHIFT
    assert torch.equal(got.read(0, len(got)), reference) and int(reference.max()) > 1 << 16


# ------------------------------------------------------------------------------------------- memory


_MEASURE = """
import resource, sys
sys.path.insert(0, {tests!r})
from tiny import make_tokenizer
from semisparse.shards import tokenize_to_shards
tok = make_tokenizer()
tokenize_to_shards(sys.argv[1], sys.argv[3] + "-warm", tokenizer=tok, progress=False)  # allocate what stays
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tokenize_to_shards(sys.argv[2], sys.argv[3], tokenizer=tok, progress=False)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)  # ru_maxrss: KiB on Linux
"""


def test_memory_stays_flat_on_a_source_larger_than_the_budget(tmp_path):
    budget = 3 * 2**20
    words = sorted(set(_SAMPLE.split()))
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(words, size=n)) + "\n" for n in rng.integers(3, 30, size=4000)]
    small, big = tmp_path / "small.txt", tmp_path / "big.txt"
    small.write_text("".join(lines[:2000]))
    with big.open("w") as fh:
        while fh.tell() < budget + 2**20:  # larger than the budget: holding it in memory breaks the budget
            fh.write("".join(lines))
    script = _MEASURE.format(tests=str(PROJECT_ROOT / "tests"))
    r = subprocess.run([sys.executable, "-c", script, str(small), str(big), str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    grown = int(r.stdout.split()[-1])
    assert grown < budget, f"peak RSS grew by {grown / 2**20:.1f} MiB tokenizing {big.stat().st_size / 2**20:.1f} MiB"
    assert json.loads((tmp_path / "out" / "index.json").read_text())["tokens"] > big.stat().st_size // 8


# ------------------------------------------------------------------------------------------- batches


@pytest.fixture
def shard_set(tmp_path, text, tokenizer):
    shards(text, tmp_path / "sh", tokenizer, shard_tokens=37)  # not a multiple of seq_len: sequences straddle
    return ShardSet(tmp_path / "sh")


def test_batches_over_shards_are_the_in_memory_batches(shard_set, text, tokenizer):
    stream = data_mod.token_stream(tokenizer, data_mod.load_text(str(text)).docs)
    seq = 8
    for i in range(len(shard_set) // seq - 1):
        assert torch.equal(shard_set.read(i * seq, (i + 1) * seq + 1), stream[i * seq:(i + 1) * seq + 1])
    on_disk, in_memory = TokenBatches(shard_set, seq, 3, seed=5), TokenBatches(stream, seq, 3, seed=5)
    assert on_disk.fingerprint == in_memory.fingerprint and on_disk.n_sequences == in_memory.n_sequences
    for _ in range(2 * on_disk.n_sequences // 3 + 1):  # past an epoch boundary
        a, b = on_disk.next_batch(), in_memory.next_batch()
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_resume_inside_a_shard_and_across_a_boundary(shard_set, tmp_path):
    seq, batch = 8, 2
    full = TokenBatches(shard_set, seq, batch, seed=3)
    states, batches = [], []
    for _ in range(12):
        states.append(full.state_dict())
        batches.append(full.next_batch()[0])
    bounds = set(shard_set.offsets[1:-1].tolist())

    def crosses(row_start):  # the seq_len + 1 tokens from row_start span a shard boundary
        return any(row_start < b <= row_start + seq for b in bounds)

    kinds = set()
    for k in range(12):
        fresh = TokenBatches(ShardSet(tmp_path / "sh"), seq, batch, seed=3)  # as a restarted process would
        fresh.load_state_dict(states[k])
        assert torch.equal(fresh.next_batch()[0], batches[k])
        first = fresh.orders[0]._epoch_order(0)[states[k]["position"]] * seq
        kinds.add(crosses(int(first)))
    assert kinds == {True, False}  # resumed at a sequence inside a shard and at one across a boundary
    moved = TokenBatches(shard_set, seq, batch, seed=4)
    with pytest.raises(UserError, match="training data differ"):
        moved.load_state_dict(states[3])


class _CountingTokenizer:
    """Ids 0, 1, 2, ... one per word across all calls, no EOS: every token of the stream is distinct."""

    def __init__(self, inner):
        self.backend_tokenizer = inner.backend_tokenizer
        self.name_or_path, self.eos_token_id, self.bos_token_id, self.next = "counting", None, None, 0

    def __len__(self):
        return 1 << 20

    def __call__(self, docs, **kw):
        rows = []
        for doc in docs:
            rows.append(list(range(self.next, self.next + len(doc.split()))))
            self.next += len(doc.split())
        return type("Out", (), {"input_ids": rows})


def test_two_ranks_read_disjoint_batches_whose_union_is_one_rank(tmp_path, text, tokenizer):
    shards(text, tmp_path / "count", _CountingTokenizer(tokenizer), shard_tokens=41)
    counted = ShardSet(tmp_path / "count")
    assert torch.equal(counted.read(0, len(counted)), torch.arange(len(counted)))
    one = TokenBatches(counted, 8, 2, seed=1)
    ranks = [TokenBatches(counted, 8, 2, seed=1, rank=r, world_size=2) for r in range(2)]
    single = [one.next_batch()[0] for _ in range(8)]
    both = [[tb.next_batch()[0] for tb in ranks] for _ in range(4)]
    assert torch.equal(torch.cat([x for pair in both for x in pair]), torch.cat(single))
    starts = [{int(row[0]) for step in both for row in step[r]} for r in range(2)]
    assert len(starts[0]) == len(starts[1]) == 8 and not starts[0] & starts[1]
    assert starts[0] | starts[1] == {int(row[0]) for x in single for row in x}
    assert all(s % 8 == 0 for s in starts[0] | starts[1])  # whole sequences, as in one process


# ------------------------------------------------------------------------------------------- idempotence, bad input


def _snapshot(folder: Path) -> dict:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def test_second_run_is_a_no_op_and_other_arguments_need_overwrite(tmp_path, text, tokenizer):
    out = tmp_path / "sh"
    first = shards(text, out, tokenizer, shard_tokens=50)
    before = _snapshot(out)
    again = shards(text, out, tokenizer, shard_tokens=50)
    assert again["unchanged"] and not first["unchanged"] and _snapshot(out) == before
    with pytest.raises(UserError, match="other arguments.*shard_tokens.*--overwrite"):
        shards(text, out, tokenizer, shard_tokens=60)
    changed = tmp_path / "copy.txt"
    changed.write_text(text.read_text())
    other = tmp_path / "other.txt"
    other.write_text("something else entirely\n")
    with pytest.raises(UserError, match="data, source_signature"):
        shards(other, out, tokenizer, shard_tokens=50)
    assert _snapshot(out) == before
    redone = shards(text, out, tokenizer, shard_tokens=60, overwrite=True)
    assert not redone["unchanged"] and all(s["tokens"] <= 60 for s in redone["shards"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging leftovers


def _other_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["completely different training text for another vocabulary"], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def _train(cli, model, out, data, *extra):
    return cli("train", model, "--out", out, "--data", data, "--tokens", 64, "--seqlen", 16, "--batch-size", 2,
               "--set", "eval.at_start=false", "--set", "eval.at_end=false", "--set", "log.plots=false",
               "--set", "checkpoint.every=0", "--recipe", "naive-ce", "--no-progress", *extra)


def _one_error_line(r) -> str:
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("semisparse: error: ")]
    assert len(errors) == 1 and r.stderr.strip().endswith(errors[0]) and "Traceback" not in r.stderr, r.stderr
    return errors[0]


def test_bad_input_is_one_line_exit_2_and_nothing_is_overwritten(tmp_path, tiny_dir, text, tokenizer, cli):
    blank = tmp_path / "blank.txt"
    blank.write_text("  \n\n\t\n")
    assert "is empty" in _one_error_line(cli("tokenize", blank, "--model", tiny_dir, "--out", tmp_path / "e",
                                             "--no-progress"))
    assert not (tmp_path / "e").exists()
    good = tmp_path / "good"
    assert cli("tokenize", text, "--model", tiny_dir, "--out", good, "--no-progress").returncode == 0
    before = _snapshot(good)
    assert "is empty" in _one_error_line(cli("tokenize", blank, "--model", tiny_dir, "--out", good, "--overwrite",
                                             "--no-progress"))
    assert _snapshot(good) == before  # a failed --overwrite keeps the old shards
    assert "fewer than one sequence" in _one_error_line(
        cli("tokenize", text, "--model", tiny_dir, "--out", tmp_path / "s", "--seqlen", 100_000, "--no-progress"))

    foreign = tmp_path / "foreign"
    shards(text, foreign, _other_tokenizer())
    line = _one_error_line(_train(cli, tiny_dir, tmp_path / "r1", foreign))
    assert "tokenized with" in line and "--model" in line and not (tmp_path / "r1").exists()

    cut = tmp_path / "cut"
    shards(text, cut, tokenizer, shard_tokens=100)
    shard = cut / "shard-00001.bin"
    shard.write_bytes(shard.read_bytes()[:-3])
    line = _one_error_line(_train(cli, tiny_dir, tmp_path / "r2", cut))
    assert "shard-00001.bin" in line and "truncated" in line and not (tmp_path / "r2").exists()
    # re-tokenizing over a damaged folder names it too, and leaves it for --overwrite
    assert "truncated" in _one_error_line(cli("tokenize", text, "--model", tiny_dir, "--out", cut,
                                              "--shard-tokens", 100, "--no-progress"))


# ------------------------------------------------------------------------------------------- end to end


def test_tokenize_then_train_on_the_shards(tmp_path, tiny_dir, text, cli):
    out = tmp_path / "shards"
    r = cli("tokenize", text, "--model", tiny_dir, "--out", out, "--seqlen", 16, "--shard-tokens", 200,
            "--no-progress")
    assert r.returncode == 0 and "tokenized" in r.stdout, r.stderr
    r = cli("tokenize", text, "--model", tiny_dir, "--out", out, "--seqlen", 16, "--shard-tokens", 200,
            "--no-progress")
    assert r.returncode == 0 and "nothing to do" in r.stdout, r.stderr
    index = json.loads((out / "index.json").read_text())
    r = _train(cli, tiny_dir, tmp_path / "run", out, "--set", "checkpoint.at_end=true", "--init", "sparsegpt",
               "--set", "init.calib_samples=4")  # calibration windows come from the shards' first tokens
    assert r.returncode == 0, r.stderr
    r = _train(cli, tiny_dir, tmp_path / "ref", out, "--init", "sparsegpt", "--set", "init.calib_sampler=reference")
    assert "needs data.train to be text" in _one_error_line(r) and not (tmp_path / "ref").exists()
    meta = json.loads((tmp_path / "run" / "semisparse.json").read_text())
    assert meta["steps"] == 2 and meta["data"]["split"] == "shards" and meta["data"]["data"] == str(out)
    assert meta["data"]["stream_tokens"] == index["tokens"] and meta["data"]["shards"] == len(index["shards"])
    assert meta["data"]["sequences"] == (index["tokens"] - 1) // 16
    assert meta["data"]["epochs"] == pytest.approx(2 * 2 / meta["data"]["sequences"])
    state = json.loads(next((tmp_path / "run" / "checkpoints").glob("*/state.json")).read_text())
    assert state["data"]["fingerprint"] == index["stream_sha256"] and state["data"]["position"] == 4

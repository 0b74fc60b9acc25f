"""`semisparse generate` (semisparse.shards.generate): the shards are what transformers' own generate samples for
the same prompts, seeds and settings; the index counts them; they train; the same seed gives the same bytes and
another seed others; a run SIGKILLed mid-way and rerun gives the bytes of an uninterrupted run; bad input is one
line, exit 2, nothing written."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from clirun import kill_once_written
from semisparse import data as data_mod
from semisparse.devices import resolve_precision
from semisparse.shards import ShardSet
from semisparse.shards.generate import PROGRESS_FILE, WORK_PREFIX, documents
from semisparse.train.stream import fingerprint
from tiny import make_llama, make_tokenizer, save_model_dir

VOLATILE = ("created", "run")  # index fields that differ between runs writing the same shards


@pytest.fixture(scope="module")
def eos_model(tmp_path_factory):
    """The tiny Llama with an untied head whose EOS row points along the mean final hidden state, so EOS has a
    few % of the mass and sequences end at different lengths (a random tiny model almost never samples EOS)."""
    model, tok = make_llama(), make_tokenizer()
    with torch.no_grad():
        mean = model.model(torch.randint(1, 384, (8, 32), generator=torch.Generator().manual_seed(0))) \
            .last_hidden_state.reshape(-1, 64).mean(0)
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.detach().clone())
        model.lm_head.weight[tok.eos_token_id] = 2.5 * mean / mean.norm() ** 2
    return save_model_dir(model, tok, tmp_path_factory.mktemp("models") / "eos-llama")


def gen(cli, model, out, *extra, tokens=300, batch=4, new=20):
    return cli("generate", model, "--out", out, "--tokens", tokens, "--batch-size", batch, "--max-new-tokens", new,
               "--shard-tokens", 97, "--no-progress", *extra)


def stream_of(folder: Path) -> list[int]:
    shards = ShardSet(folder)
    return shards.read(0, len(shards)).tolist()


def split_at_eos(ids: list[int], eos: int) -> list[list[int]]:
    docs, current = [], []
    for i in ids:
        current.append(i)
        if i == eos:
            docs.append(current)
            current = []
    assert not current, "the stream must end with EOS"
    return docs


def snapshot(folder: Path) -> dict:
    files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != "index.json"}
    index = json.loads((folder / "index.json").read_text())
    return {"files": files, "index": {k: v for k, v in index.items() if k not in VOLATILE}}


# ------------------------------------------------------------------------------------------- the reference


def reference_documents(model_dir, tokens, batch, new, seed, temperature=1.0, top_p=1.0, data=None, k=0):
    """What the docs promise, built here from transformers directly: batch b of `batch` sequences (start token +
    the first k tokens of the next documents with >= k tokens, cycling), torch seeded with
    int(sha256("generate/SEED/b")[:15], 16), generated with exactly these settings; each sequence becomes
    prompt + sampled tokens before the first EOS + EOS; batches until `tokens` is reached, the last one whole."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    bf16 = resolve_precision("auto", torch.device("cpu"))[0] == "bf16"  # bf16 weights where the CPU has native bf16
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if bf16 else torch.float32).eval()
    eos = tok.eos_token_id
    start = tok.bos_token_id if tok.bos_token_id is not None else eos
    prompts = []
    if data is not None:
        docs = [d for d in data_mod.load_text(str(data)).docs if d.strip()]
        prompts = [ids[:k] for ids in tok(docs, add_special_tokens=False).input_ids if len(ids) >= k]
    out, total, b = [], 0, 0
    while total < tokens:
        rows = [prompts[(b * batch + i) % len(prompts)] if prompts else [] for i in range(batch)]
        ids = torch.tensor([[start] + r for r in rows])
        torch.manual_seed(int(hashlib.sha256(f"generate/{seed}/{b}".encode()).hexdigest()[:15], 16))
        sample = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature else {}
        with torch.inference_mode():
            got = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, top_k=0,
                                 eos_token_id=eos, pad_token_id=eos, **sample)
        for row, generated in zip(rows, got[:, ids.shape[1]:].tolist()):
            cut = generated.index(eos) if eos in generated else len(generated)
            if row + generated[:cut]:
                out.append(row + generated[:cut] + [eos])
                total += len(out[-1])
        b += 1
    return out, b


def test_documents_end_at_the_first_eos_and_empty_ones_are_skipped():
    got = documents([[5, 6], [], [], [7]], [[1, 0, 2, 0], [0, 3], [4, 4, 4], [0, 0]], eos=0)
    assert got == [[5, 6, 1, 0], [4, 4, 4, 0], [7, 0]]


@pytest.mark.parametrize("settings", [
    {"temperature": 0.0},                               # greedy: different prompts, different sequences
    {"temperature": 0.9, "top_p": 0.8},                 # sampled
])
def test_shards_are_what_transformers_generate_samples(tmp_path, eos_model, text, cli, settings):
    out = tmp_path / "gen"
    flags = ["--prompts", text, "--prompt-tokens", 3, "--seed", 7, "--temperature", settings["temperature"]]
    if "top_p" in settings:
        flags += ["--top-p", settings["top_p"]]
    r = gen(cli, eos_model, out, *flags)
    assert r.returncode == 0 and "generated" in r.stdout, r.stderr
    expected, batches = reference_documents(eos_model, 300, 4, 20, 7, data=text, k=3, **settings)
    eos = make_tokenizer().eos_token_id
    stream = stream_of(out)
    assert split_at_eos(stream, eos) == expected
    lengths = [len(d) for d in expected]
    assert min(lengths) < max(lengths) == 3 + 20 + 1  # some end at EOS, some run to --max-new-tokens

    index = json.loads((out / "index.json").read_text())
    starts = np.cumsum([0] + [len(d) for d in expected[:-1]])
    assert index["tokens"] == len(stream) == sum(map(len, expected)) >= 300
    assert index["tokens"] - sum(map(len, expected[:-4])) < 300  # stopped after the batch that reached the budget
    assert index["documents"] == len(expected) and index["generation"]["batches"] == batches
    assert [s["documents"] for s in index["shards"]] == [
        int(((starts >= 97 * k) & (starts < 97 * (k + 1))).sum()) for k in range(len(index["shards"]))]
    assert [s["tokens"] for s in index["shards"]][:-1] == [97] * (len(index["shards"]) - 1)
    assert all(hashlib.sha256((out / s["file"]).read_bytes()).hexdigest() == s["sha256"] for s in index["shards"])
    assert index["stream_sha256"] == fingerprint(torch.tensor(stream)) and index["dtype"] == "uint16"
    src = index["source"]
    assert src["kind"] == "generated" and src["seed"] == 7 and src["model"] == str(eos_model)
    assert src["sampling"]["temperature"] == settings["temperature"] and src["prompts"]["tokens"] == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the work folder is gone


def test_bos_only_prompts_and_the_output_trains(tmp_path, eos_model, tiny_dir, cli):
    out = tmp_path / "gen"
    r = gen(cli, tiny_dir, out, "--seed", 3, tokens=200)
    assert r.returncode == 0, r.stderr
    expected, _ = reference_documents(tiny_dir, 200, 4, 20, 3)
    assert split_at_eos(stream_of(out), make_tokenizer().eos_token_id) == expected
    assert json.loads((out / "index.json").read_text())["source"]["prompts"] is None

    r = cli("train", tiny_dir, "--out", tmp_path / "run", "--data", out, "--tokens", 64, "--seqlen", 16,
            "--batch-size", 2, "--set", "eval.at_start=false", "--set", "eval.at_end=false", "--set",
            "log.plots=false", "--set", "checkpoint.every=0", "--recipe", "naive-ce", "--no-progress")
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "run" / "semisparse.json").read_text())
    index = json.loads((out / "index.json").read_text())
    assert meta["steps"] == 2 and meta["data"]["split"] == "shards" and meta["data"]["stream_tokens"] == index["tokens"]


def test_a_tokenizer_without_bos_starts_from_eos(tmp_path, cli):
    from transformers import PreTrainedTokenizerFast

    tok = make_tokenizer()
    no_bos = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, eos_token=tok.eos_token)
    model_dir = save_model_dir(make_llama(seed=1), no_bos, tmp_path / "no-bos")
    r = gen(cli, model_dir, tmp_path / "gen", "--seed", 4, tokens=120)
    assert r.returncode == 0 and "no BOS token" in r.stdout and "starts from the EOS token" in r.stdout, r.stderr
    expected, _ = reference_documents(model_dir, 120, 4, 20, 4)
    assert split_at_eos(stream_of(tmp_path / "gen"), tok.eos_token_id) == expected
    index = json.loads((tmp_path / "gen" / "index.json").read_text())
    assert index["source"]["start_token"] == {"id": tok.eos_token_id, "is": "eos"}


def test_same_seed_same_bytes_other_seed_other_bytes_and_reruns_are_no_ops(tmp_path, eos_model, cli):
    runs = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        assert gen(cli, eos_model, tmp_path / name, "--seed", seed).returncode == 0
        runs[name] = snapshot(tmp_path / name)
    assert runs["a"] == runs["b"]
    assert runs["a"]["files"]["shard-00000.bin"] != runs["c"]["files"]["shard-00000.bin"]

    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "a").iterdir()}
    r = gen(cli, eos_model, tmp_path / "a", "--seed", 1)
    assert r.returncode == 0 and "nothing to do" in r.stdout, r.stderr
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "a").iterdir()} == before
    line = one_error_line(gen(cli, eos_model, tmp_path / "a", "--seed", 5))
    assert "other arguments (differ: seed)" in line and "--overwrite" in line
    assert snapshot(tmp_path / "a") == runs["a"]
    assert gen(cli, eos_model, tmp_path / "a", "--seed", 2, "--overwrite").returncode == 0
    assert snapshot(tmp_path / "a") == runs["c"]


# ------------------------------------------------------------------------------------------- kill and resume

#: Single-threaded (as the tests run in-process); the checkpoint of batch KILL_AT is held back: the script writes
#: the marker and waits there to be SIGKILLed, its tokens on disk and its checkpoint not.
_KILL_PRELUDE = """
import sys, time, torch
torch.set_num_threads(1)
from pathlib import Path
from semisparse.shards import generate
_save = generate.save_progress
def _stall(path, state):
    if state["batches"] == {kill_at}:
        Path({marker!r}).touch()
        time.sleep(120)
    _save(path, state)
generate.save_progress = _stall
from semisparse.cli import main
main(sys.argv[1:])
"""


def test_sigkill_mid_run_then_rerun_gives_the_uninterrupted_bytes(tmp_path, eos_model, text, cli):
    flags = ["--prompts", text, "--prompt-tokens", 3, "--temperature", 0.9, "--seed", 11]
    assert gen(cli, eos_model, tmp_path / "whole", *flags, tokens=400).returncode == 0
    whole = snapshot(tmp_path / "whole")
    assert len(whole["files"]) >= 4

    out, work = tmp_path / "cut", tmp_path / (WORK_PREFIX + "cut")
    args = ["generate", str(eos_model), "--out", str(out), "--tokens", "400", "--batch-size", "4",
            "--max-new-tokens", "20", "--shard-tokens", "97", "--no-progress", *map(str, flags)]
    for kill_at in (2, 5):  # killed twice: inside the first shards, then later on
        marker = tmp_path / f"killed-{kill_at}"
        script = _KILL_PRELUDE.format(kill_at=kill_at, marker=str(marker))
        assert kill_once_written(script, args, marker, 120, f"batch {kill_at} was never written") == -9
        state = json.loads((work / PROGRESS_FILE).read_text())
        on_disk = sum(p.stat().st_size for p in work.glob("shard-*.bin"))
        assert state["batches"] == kill_at - 1 and on_disk > 2 * state["tokens"]  # bytes past the checkpoint
        assert not out.exists()
    other = one_error_line(cli(*args, "--seed", 12))  # the later --seed wins: another run's arguments
    assert "partial run with other arguments (differ: seed)" in other
    r = cli(*args)
    assert r.returncode == 0 and "resuming" in r.stdout and "at batch 4" in r.stdout, r.stderr
    assert snapshot(out) == whole
    assert not work.exists()


# ------------------------------------------------------------------------------------------- bad input


def one_error_line(r) -> str:
    assert r.returncode == 2, (r.stdout, r.stderr)
    errors = [line for line in r.stderr.splitlines() if line.startswith("semisparse: error: ")]
    assert len(errors) == 1 and r.stderr.strip().endswith(errors[0]) and "Traceback" not in r.stderr, r.stderr
    return errors[0]


def test_bad_input_is_one_line_exit_2_and_nothing_is_written(tmp_path, tiny_dir, text, cli):
    good = tmp_path / "good"
    assert gen(cli, tiny_dir, good, tokens=60).returncode == 0
    before = snapshot(good)
    cases = [
        (["--tokens", 0], "--tokens must be positive"),
        (["--tokens", -5], "--tokens must be positive"),
        (["--temperature", -0.1], "--temperature must be a number >= 0"),
        (["--top-p", 0], "--top-p must be in (0, 1]"),
        (["--top-p", 1.5], "--top-p must be in (0, 1]"),
        (["--temperature", 0], "greedy"),
        (["--prompt-tokens", 4], "--prompt-tokens needs --prompts"),
        (["--prompts", text, "--prompt-tokens", 10_000], "no document of at least 10000 tokens"),
        (["--max-new-tokens", 1000, "--overwrite"], "more than the model's context of 256"),
        (["--seed", 9], "other arguments (differ: seed)"),
    ]
    for extra, message in cases:
        r = gen(cli, tiny_dir, good, *extra, tokens=60) if "--tokens" not in extra else \
            cli("generate", tiny_dir, "--out", good, "--no-progress", *extra)
        assert message in one_error_line(r), (extra, r.stderr)
        assert snapshot(good) == before, extra
    assert "does not exist" in one_error_line(gen(cli, tmp_path / "no-such-model", tmp_path / "x"))
    (tmp_path / "not-a-model").mkdir()
    assert "has no config.json" in one_error_line(gen(cli, tmp_path / "not-a-model", tmp_path / "x"))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert "cannot write" in one_error_line(gen(cli, tiny_dir, blocker / "out"))
    assert "not a token-shard folder" in one_error_line(gen(cli, tiny_dir, blocker))
    assert blocker.read_text() == "not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "good", "not-a-model"]  # no work folder left behind

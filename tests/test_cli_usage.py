"""The CLI a new user meets: usage errors, --version, command order, flags listing their choices, --set reaching
every recipe field, refused multi-process runs, missing zero-shot files, --device auto."""

from __future__ import annotations

import json
import re
from importlib.metadata import version

import pytest
import torch

from clirun import run_subprocess
from semisparse.config import SHIPPED_RECIPES
from semisparse.devices import resolve_device
from semisparse.errors import UserError
from semisparse.prune import METHODS
from tiny import _SAMPLE


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(_SAMPLE.replace(". ", ".\n"))
    return path


@pytest.mark.parametrize(
    "args, problem",
    [
        (["prune", "default"], "Missing option '--out'"),
        (["prune", "default", "--out", "o", "--nsamples", "abc"], "Invalid value for '--nsamples'"),
        (["train", "default", "--out", "o", "--no-such-flag"], "No such option: --no-such-flag"),
        (["no-such-command"], "No such command 'no-such-command'"),
    ],
)
def test_usage_errors_print_usage_and_exit_2(cli, args, problem):
    r = cli(*args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Usage: semisparse" in r.stderr and problem in r.stderr
    assert "internal error" not in r.stderr and "Traceback" not in r.stderr


def test_usage_error_exit_code_from_a_real_process():
    r = run_subprocess("prune", "default")
    assert r.returncode == 2 and "Missing option '--out'" in r.stderr and "internal error" not in r.stderr


def test_version(cli):
    r = cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"semisparse {version('semisparse')}"


def test_commands_are_listed_in_pipeline_order(cli):
    r = cli("--help")
    listed = re.findall(r"^│ (\w+)\s{2,}", r.stdout, flags=re.M)
    commands = [c for c in listed if c in {"prune", "train", "eval", "report", "run", "export"}]
    assert commands == ["prune", "train", "eval", "export", "report", "run"]


def test_method_and_recipe_flags_list_their_choices(cli):
    text = " ".join(cli("prune", "--help").stdout.split())
    assert all(m in text for m in METHODS)
    text = " ".join(cli("train", "--help").stdout.split())
    assert all(r in text for r in SHIPPED_RECIPES) and all(m in text for m in METHODS)


def test_the_same_meaning_has_the_same_flag_everywhere(cli):
    helps = {c: cli(c, "--help").stdout for c in ("prune", "train", "eval", "run")}
    for c, text in helps.items():
        assert "--seq-len" not in text and "--json" not in text and "--max-windows" not in text.replace(
            "--ppl-max-windows", ""), c
    assert "--ppl-max-windows" in helps["prune"] and "--ppl-max-windows" in helps["eval"]
    assert "--ppl-seqlen" in helps["prune"] and "--ppl-seqlen" in helps["eval"]
    assert "--seqlen" in helps["prune"] and "--seqlen" in helps["train"]
    for c in ("prune", "eval", "run"):
        assert "auto (CUDA" in " ".join(helps[c].split()), c


def _train_args(tiny_dir, out, text, *extra):
    return ["train", tiny_dir, "--out", out, "--data", text, "--seqlen", 16, "--batch-size", 2,
            "--set", "eval.at_start=false", "--set", "eval.at_end=false", "--set", "log.plots=false",
            "--set", "checkpoint.every=0", "--recipe", "naive-ce", "--no-progress", *extra]


def test_set_reaches_fields_that_also_have_a_flag(tmp_path, llama_dir, text, cli):
    r = cli(*_train_args(llama_dir, tmp_path / "a", text, "--set", "train.tokens=64", "--set", "optim.lr=3e-4"))
    assert r.returncode == 0, r.stderr
    recipe = json.loads((tmp_path / "a" / "run.json").read_text())["recipe"]
    assert recipe["train"]["tokens"] == 64 and recipe["optim"]["lr"] == 3e-4
    # a flag that is given wins over --set
    r = cli(*_train_args(llama_dir, tmp_path / "b", text, "--set", "train.tokens=64", "--tokens", 96))
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "b" / "run.json").read_text())["recipe"]["train"]["tokens"] == 96


def test_set_keeps_an_nm_pattern_a_string(tmp_path, llama_dir, text, cli):
    r = cli(*_train_args(llama_dir, tmp_path / "a", text, "--tokens", 64, "--set", "pattern=1:4"))
    assert r.returncode == 0, r.stderr  # YAML 1.1 alone would read 1:4 as the integer 64
    assert json.loads((tmp_path / "a" / "run.json").read_text())["recipe"]["pattern"] == "1:4"


def test_a_global_batch_that_does_not_split_over_the_processes_is_refused(tmp_path, llama_dir, text, cli,
                                                                           monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets in every process it starts
    monkeypatch.setenv("RANK", "0")
    r = cli(*_train_args(llama_dir, tmp_path / "a", text, "--tokens", 64, "--grad-accum", 3))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "train.grad_accum 3 is not a multiple of the 2 processes" in r.stderr and "--grad-accum" in r.stderr
    assert not (tmp_path / "a").exists()


def test_an_fsdp_option_that_needs_cuda_is_refused_on_cpu(tmp_path, llama_dir, text, cli):
    r = cli(*_train_args(llama_dir, tmp_path / "a", text, "--tokens", 64, "--device", "cpu", "--set",
                         "fsdp.offload=true"))
    assert r.returncode == 2 and "fsdp.offload" in r.stderr and "needs CUDA" in r.stderr
    assert not (tmp_path / "a").exists()


def test_more_processes_than_gpus_is_one_line(monkeypatch):
    """torchrun --nproc-per-node 4 on a node with 2 visible GPUs: process 3 says so instead of failing in NCCL."""
    import torch

    from semisparse.errors import UserError
    from semisparse.train import distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "3")
    with pytest.raises(UserError) as exc:
        distributed._local_device("auto")
    assert "process 3 of this node has no GPU" in str(exc.value) and "the 2 visible CUDA device(s)" in str(exc.value)


def _copa_only(tmp_path):
    folder = tmp_path / "tasks"
    (folder / "copa").mkdir(parents=True)
    rows = [{"query": "The man turned on the faucet, therefore", "gold": 1,
             "choices": ["the toilet filled with water.", "water flowed from the spout."]},
            {"query": "The hamburger meat browned, because", "gold": 1,
             "choices": ["the cook froze it.", "the cook grilled it."]}]
    (folder / "copa" / "llmfoundry_copa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_eval_with_missing_task_files_fails_unless_skipped(tmp_path, llama_dir, cli):
    tasks = _copa_only(tmp_path)
    r = cli("eval", llama_dir, "--tasks", "copa,piqa", "--task-data", tasks, "--out", tmp_path / "e.json")
    assert r.returncode == 2
    line = r.stderr.strip().splitlines()[-1]
    assert str(tasks) in line and "piqa/valid.jsonl" in line and "piqa/valid-labels.lst" in line
    assert "--skip-missing" in line
    assert not (tmp_path / "e.json").exists()

    r = cli("eval", llama_dir, "--tasks", "copa,piqa", "--task-data", tasks, "--skip-missing",
            "--out", tmp_path / "e.json")
    assert r.returncode == 0, r.stderr
    zs = json.loads((tmp_path / "e.json").read_text())["zeroshot"]
    assert zs["missing"] == ["piqa"] and list(zs["tasks"]) == ["copa"]

    r = cli("eval", llama_dir, "--tasks", "piqa", "--task-data", tasks, "--skip-missing")
    assert r.returncode == 2 and "piqa" in r.stderr  # only missing tasks asked: always an error


def test_device_auto():
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == resolve_device("auto")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            resolve_device("cuda")

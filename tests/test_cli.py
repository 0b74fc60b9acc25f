import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from clirun import run_subprocess
from semisparse.layers import select_layers, weight_matrix
from semisparse.masks import is_nm


@pytest.fixture
def run_cli(cli):
    return cli


@pytest.fixture
def calib_txt(tmp_path):
    p = tmp_path / "calib.txt"
    p.write_text("The quick brown fox jumps over the lazy dog.\n" * 200)
    return p


@pytest.mark.parametrize("method", ["magnitude", "sparsegpt"])
def test_prune_cli_writes_stock_loadable_run_dir(tmp_path, llama_dir, calib_txt, method, run_cli):
    out = tmp_path / "run"
    r = run_cli("prune", llama_dir, "--method", method, "--calib", calib_txt, "--nsamples", 4, "--seqlen", 32,
                "--out", out, "--ppl", calib_txt, "--ppl-seqlen", 32)
    assert r.returncode == 0, r.stderr
    model = AutoModelForCausalLM.from_pretrained(out)
    masks = load_file(str(out / "masks.safetensors"))
    layers = select_layers(model)
    assert set(masks) == set(layers)
    for name, module in layers.items():
        assert masks[name].dtype == torch.bool and is_nm(masks[name], "2:4")
        assert (weight_matrix(module)[~masks[name]] == 0).all()
    meta = json.loads((out / "semisparse.json").read_text())
    assert meta["method"] == method and meta["pattern"] == "2:4" and meta["seed"] == 0
    assert meta["layers_pruned"] == list(layers) and meta["layers_skipped"] == {}
    assert meta["sparse_weights"]["density"] == 0.5
    assert "torch" in meta["versions"] and "transformers" in meta["versions"]
    if method == "sparsegpt":
        assert meta["calibration"]["nsamples"] == 4 and meta["calibration"]["seqlen"] == 32
    else:
        assert meta["calibration"] is None
    assert (out / "tokenizer.json").is_file()
    ev = json.loads((out / "eval.json").read_text())
    assert set(ev["perplexity"]) == {f"dense:{calib_txt}", f"pruned:{calib_txt}"}

    # eval on the run dir merges its result into eval.json and prints the protocol.
    r = run_cli("eval", out, "--ppl", calib_txt, "--ppl-seqlen", 32)
    assert r.returncode == 0, r.stderr
    assert "windows" in r.stdout and "ppl" in r.stdout
    ev = json.loads((out / "eval.json").read_text())
    assert ev["perplexity"][str(calib_txt)]["ppl"] == pytest.approx(ev["perplexity"][f"pruned:{calib_txt}"]["ppl"])


def test_eval_writes_json_where_asked(tmp_path, gpt2_dir, calib_txt, run_cli):
    target = tmp_path / "res.json"
    r = run_cli("eval", gpt2_dir, "--ppl", calib_txt, "--ppl-seqlen", 64, "--out", target)
    assert r.returncode == 0, r.stderr
    res = json.loads(target.read_text())["perplexity"][str(calib_txt)]
    assert res["seqlen"] == 64 and res["stride"] == 64 and res["windows"] >= 1 and res["ppl"] > 1


@pytest.mark.parametrize(
    "args,message",
    [
        (["prune", "{model}", "--pattern", "3:2", "--out", "{tmp}/o"], "impossible N:M pattern"),
        (["prune", "{model}", "--pattern", "0:4", "--out", "{tmp}/o"], "impossible N:M pattern"),
        (["prune", "{model}", "--pattern", "2:4:1", "--out", "{tmp}/o"], "malformed N:M pattern"),
        (["prune", "{model}", "--method", "random", "--out", "{tmp}/o"], "unknown pruning method"),
        (["prune", "{tmp}/no-such-model", "--out", "{tmp}/o"], "does not exist"),
        (["prune", "{model}", "--calib", "{tmp}/missing.txt", "--out", "{tmp}/o"], "not found"),
        (["prune", "{model}", "--calib", "{tmp}/empty.txt", "--out", "{tmp}/o"], "empty"),
        (["eval", "{model}", "--ppl", "{tmp}/missing.jsonl"], "not found"),
        (["eval", "{model}"], "nothing to evaluate"),
        (["eval", "{tmp}", "--ppl", "default"], "no config.json"),
    ],
)
def test_bad_input_one_line_exit_2(tmp_path, llama_dir, args, message, run_cli):
    (tmp_path / "empty.txt").write_text("")
    args = [a.format(model=llama_dir, tmp=tmp_path) for a in args]
    r = run_cli(*args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [line for line in r.stderr.strip().splitlines() if not line.startswith("Loading weights")]
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_real_exit_code_and_single_line_from_a_subprocess(tmp_path, llama_dir):
    r = run_subprocess("prune", llama_dir, "--pattern", "2:4:1", "--out", tmp_path / "o")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["semisparse: error: malformed N:M pattern '2:4:1': expected two integers like '2:4'"]


def test_debug_shows_traceback(tmp_path, llama_dir):
    r = run_subprocess("--debug", "prune", llama_dir, "--pattern", "3:2", "--out", tmp_path / "o")
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_existing_output_is_not_overwritten(tmp_path, llama_dir, run_cli):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    r = run_cli("prune", llama_dir, "--method", "magnitude", "--out", out)
    assert r.returncode == 2 and "--overwrite" in r.stderr
    assert (out / "keep.txt").read_text() == "precious"


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--tasks", "arc_easy,not_a_task"], "unknown zero-shot task"),
        (["--tasks", "arc_easy", "--limit", "0"], "--limit must be positive"),
        (["--tasks", "arc_easy", "--task-data", "{tmp}/nowhere"], "task data folder not found"),
    ],
)
def test_zeroshot_bad_input_exit_2(tmp_path, llama_dir, extra, message, run_cli):
    r = run_cli("eval", llama_dir, *[a.format(tmp=tmp_path) for a in extra])
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr


def test_zeroshot_cli_table_json_and_report(tmp_path, llama_dir, fixture_data, calib_txt, run_cli):
    out = tmp_path / "run"
    task_data = tmp_path / "task-data"  # arc_easy and copa only (made-up files): arc_challenge's files are missing
    task_data.mkdir()
    for name in ("arc_easy", "copa"):
        (task_data / name).symlink_to(fixture_data / name, target_is_directory=True)
    assert run_cli("prune", llama_dir, "--method", "magnitude", "--out", out).returncode == 0
    r = run_cli("eval", out, "--tasks", "arc_easy,arc_challenge,copa", "--task-data", task_data, "--limit", 2,
                "--skip-missing", "--ppl", calib_txt, "--ppl-seqlen", 32)
    assert r.returncode == 0, r.stderr
    assert "arc_easy" in r.stdout and "missing" in r.stdout and "mean" in r.stdout
    ev = json.loads((out / "eval.json").read_text())
    assert ev["zeroshot"]["missing"] == ["arc_challenge"]
    assert ev["zeroshot"]["tasks"]["arc_easy"]["n_docs"] == 2
    assert str(calib_txt) in ev["perplexity"]
    r = run_cli("report", llama_dir, out, "--out", tmp_path / "report")
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "report" / "report.md").read_text()
    assert "arc_easy" in text and f"{ev['perplexity'][str(calib_txt)]['ppl']:.2f}" in text

"""`semisparse run`: prune -> train -> eval -> report on a tiny model; skip, resume after SIGKILL, dry run, config
errors before any model load, refused config changes."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clirun import SLOW_STEPS_PRELUDE, kill_once_written
from semisparse import api
from semisparse.masks import is_nm
from semisparse.train import checkpoint as ckpt


def flags(text: Path, steps: int = 8) -> list[str]:
    """A pipeline sized for a tiny model: SparseGPT on 4 x 32 tokens, `steps` AST steps of 2 x 16 tokens."""
    return [
        "--method", "sparsegpt", "--calib", text, "--nsamples", 4, "--data", text, "--tokens", steps * 2 * 16,
        "--ppl", text, "--set", "prune.seqlen=32", "--set", "eval.ppl_seqlen=32",
        "--set", "recipe.train.seq_len=16", "--set", "recipe.train.batch_size=2", "--set", "recipe.eval.windows=1",
        "--set", "recipe.checkpoint.every=2", "--set", "recipe.checkpoint.keep=3", "--set", "recipe.optim.lr=1e-3",
        "--no-progress",
    ]


def tensors_equal(a: Path, b: Path) -> bool:
    ta, tb = load_file(str(a)), load_file(str(b))
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_full_pipeline_then_rerun_skips_everything(tmp_path, tiny_dir, text, cli):
    out = tmp_path / "out"
    r = cli("run", tiny_dir, "--out", out, *flags(text))
    assert r.returncode == 0, r.stderr
    for stage in ("prune", "train", "eval", "report"):
        assert f"{stage}: running" in r.stdout
    # each stage wrote its own sub-directory
    assert json.loads((out / "prune" / "semisparse.json").read_text())["stage"] == "prune"
    train_meta = json.loads((out / "train" / "semisparse.json").read_text())
    assert train_meta["stage"] == "train" and train_meta["steps"] == 8
    assert train_meta["init"]["path"] == str(out / "prune")  # the retraining starts from the prune stage's masks
    masks = load_file(str(out / "train" / "masks.safetensors"))
    assert masks and all(is_nm(m, "2:4") for m in masks.values())
    evals = {key: json.loads((out / "eval" / f"{key}.json").read_text()) for key in ("dense", "prune", "train")}
    ppl = {key: ev["perplexity"][str(text)]["ppl"] for key, ev in evals.items()}
    assert evals["dense"]["model"] == str(tiny_dir) and evals["train"]["model"] == str(out / "train")
    # the report and the closing table show the eval files' numbers, one row per model
    report = (out / "report" / "report.md").read_text()
    for label in ("dense", "sparsegpt one-shot", "ast-naive retrained"):
        assert label in report and label in r.stdout
    for value in ppl.values():
        assert f"{value:.2f}" in report and f"{value:.2f}" in r.stdout
    assert "report:" in r.stdout and str(out / "report" / "report.md") in r.stdout
    assert list((out / "train" / "plots").glob("*.png"))

    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again = cli("run", tiny_dir, "--out", out, *flags(text))
    assert again.returncode == 0, again.stderr
    for stage in ("prune", "train", "eval", "report"):
        assert f"{stage}: complete, skipped" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamps  # nothing rewritten


_KILLED_SCRIPT = SLOW_STEPS_PRELUDE + """
from semisparse.cli import main
main(sys.argv[1:])
"""


def test_killed_inside_train_reruns_to_the_same_weights(tmp_path, tiny_dir, text, cli):
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    args = [str(a) for a in ("run", tiny_dir, *flags(text, steps=16))]
    marker = killed / "train" / "checkpoints" / "step-000004" / ckpt.MANIFEST
    code = kill_once_written(_KILLED_SCRIPT, [*args, "--out", str(killed)], marker, 180, "no training checkpoint past step 4")
    assert code == -signal.SIGKILL
    assert not (killed / "train" / "semisparse.json").exists() and not (killed / "eval").exists()
    prune_stamp = (killed / "prune" / "model.safetensors").stat().st_mtime_ns

    r = cli(*args[:2], "--out", killed, *args[2:])
    assert r.returncode == 0, r.stderr
    assert "prune: complete, skipped" in r.stdout and "train: resuming" in r.stdout
    assert (killed / "prune" / "model.safetensors").stat().st_mtime_ns == prune_stamp
    resumed_from = json.loads((killed / "train" / "semisparse.json").read_text())["resumed_from"]
    assert resumed_from is not None and int(Path(resumed_from).name[len("step-"):]) >= 4

    assert cli(*args[:2], "--out", reference, *args[2:]).returncode == 0
    for name in ("model.safetensors", "masks.safetensors"):
        assert tensors_equal(killed / "train" / name, reference / "train" / name), name
    ppl = lambda root: json.loads((root / "eval" / "train.json").read_text())["perplexity"][str(text)]["ppl"]
    assert ppl(killed) == ppl(reference)


def _no_weights(monkeypatch):
    """Make every way of loading weights fail loudly."""
    import safetensors.torch
    import transformers

    import semisparse.models

    def refuse(*a, **k):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(semisparse.models, "load_model", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(safetensors.torch, "load_file", refuse)


def test_dry_run_loads_no_weights_and_writes_nothing(tmp_path, tiny_dir, text, cli, monkeypatch):
    _no_weights(monkeypatch)
    out = tmp_path / "out"
    before = sorted(tmp_path.rglob("*"))
    r = cli("run", tiny_dir, "--out", out, *flags(text), "--dry-run")
    assert r.returncode == 0, r.stderr
    assert not out.exists() and sorted(tmp_path.rglob("*")) == before
    for stage in ("prune", "train", "eval", "report"):
        assert stage in r.stdout
    assert "estimated time" in r.stdout and "peak memory" in r.stdout and "measured on: CPU" in r.stdout
    assert "8 optimizer steps of 32 tokens" in r.stdout


def test_dry_run_of_a_finished_folder_says_what_is_skipped(tmp_path, tiny_dir, text, cli, monkeypatch):
    out = tmp_path / "out"
    assert cli("run", tiny_dir, "--out", out, *flags(text), "--stages", "prune").returncode == 0
    _no_weights(monkeypatch)
    r = cli("run", tiny_dir, "--out", out, *flags(text), "--stages", "prune", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "complete: skipped" in r.stdout and "runs" not in r.stdout.split("total")[0].split("prune")[-1]


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("prune:\n  nsample: 4\n", "prune.nsample: unknown field"),
        ("pattern: '3:2'\n", "pattern: impossible N:M pattern"),
        ("stages: [prune, distill]\n", "stages: unknown stage(s) 'distill'"),
        ("train:\n  tokens: 8\n  set: {train.seq_len: 16, train.batch_size: 2}\n",
         "train.tokens: 8 is less than one optimizer step (2 x 1 x 16 = 32 tokens)"),
        ("train:\n  tokens: 64\n  set: {optim.lr: -1, train.seq_len: 16}\n", "train: recipe ast-naive (shipped): optim.lr"),
        ("train:\n  tokens: 64\n  recipe: no-such-recipe\n", "unknown recipe 'no-such-recipe'"),
        ("eval:\n  tasks: [arc_easy, mmlu]\n", "eval.tasks: unknown zero-shot task"),
        ("- a list\n", "expected a mapping"),
        ("prune: [unclosed\n", "invalid YAML at line"),
    ],
)
def test_config_errors_are_one_line_before_any_model_load(tmp_path, tiny_dir, cli, monkeypatch, yaml_text, message):
    _no_weights(monkeypatch)
    config = tmp_path / "pipeline.yaml"
    base = f"model: {tiny_dir}\nout: {tmp_path / 'out'}\n" + (
        "" if "train:" in yaml_text else "train: {tokens: 64, set: {train.seq_len: 16, train.batch_size: 2}}\n")
    config.write_text(yaml_text if yaml_text.startswith("-") else base + yaml_text)
    r = cli("run", config)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert not (tmp_path / "out").exists()


def test_a_config_file_holds_the_whole_pipeline(tmp_path, tiny_dir, text, cli, monkeypatch):
    _no_weights(monkeypatch)
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: {tiny_dir}\nout: {tmp_path / 'out'}\nprune: {{method: wanda, calib: {text}, nsamples: 4, seqlen: 32}}\n"
        f"train:\n  tokens: 320\n  data: {text}\n  set: {{train.seq_len: 16, train.batch_size: 2}}\n"
        f"eval: {{ppl: ['{text}'], ppl_seqlen: 32}}\n"
    )
    r = cli("run", config, "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "wanda 2:4 one-shot" in r.stdout and "10 optimizer steps of 32 tokens" in r.stdout
    # a flag overrides the file
    r = cli("run", config, "--dry-run", "--tokens", 640)
    assert "20 optimizer steps" in r.stdout


def test_a_changed_config_is_refused_and_eval_settings_are_redone(tmp_path, tiny_dir, text, cli):
    out = tmp_path / "out"
    assert cli("run", tiny_dir, "--out", out, *flags(text)).returncode == 0
    weights = (out / "train" / "model.safetensors").stat().st_mtime_ns
    r = cli("run", tiny_dir, "--out", out, *flags(text), "--tokens", 512)
    assert r.returncode == 2 and "train.tokens (256 in the folder, 512 asked)" in r.stderr
    assert "--overwrite" in r.stderr

    r = cli("run", tiny_dir, "--out", out, *flags(text), "--ppl-max-windows", 1)
    assert r.returncode == 0, r.stderr
    assert "eval: settings changed, redoing it" in r.stdout and "train: complete, skipped" in r.stdout
    assert (out / "train" / "model.safetensors").stat().st_mtime_ns == weights
    ev = json.loads((out / "eval" / "train.json").read_text())["perplexity"][str(text)]
    assert ev["windows"] == 1


def test_a_failing_stage_names_itself_and_the_fix(tmp_path, tiny_dir, text, cli):
    r = cli("run", tiny_dir, "--out", tmp_path / "out", *flags(text), "--calib", tmp_path / "missing.txt")
    assert r.returncode == 2
    line = r.stderr.strip().splitlines()[-1]
    assert "stage prune failed" in line and "not found" in line and "re-run the same command" in line


def test_api_run_mirrors_the_cli(tmp_path, tiny_dir, text):
    out = tmp_path / "api"
    set_items = [a for a in flags(text)[flags(text).index("--ppl") + 2:] if a not in ("--set", "--no-progress")]
    result = api.run(str(tiny_dir), out, method="magnitude", data=str(text), tokens=64, ppl=[str(text)],
                     set=set_items, progress=False, say=lambda msg: None)
    assert result.ran == ["prune", "train", "eval", "report"] and result.report.is_file()
    assert [row["model"] for row in result.rows] == ["dense", "magnitude one-shot", "ast-naive retrained"]
    dense, pruned = result.rows[0], result.rows[1]
    assert dense["kept"] is None and pruned["kept"] * 2 == pruned["sparse_total"]
    # fp16 size with 2:4 layers packed: values halved, 2 bits of position per kept value
    assert pruned["bytes_fp16_nm"] == pytest.approx(
        2 * (pruned["params"] - pruned["sparse_total"]) + 2 * pruned["kept"] + pruned["kept"] / 4)


def test_a_single_optimizer_step_still_writes_its_plots(tmp_path, tiny_dir, text, cli):
    out = tmp_path / "out"
    r = cli("run", tiny_dir, "--out", out, *flags(text, steps=1))
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "train" / "semisparse.json").read_text())["steps"] == 1
    assert {p.name for p in (out / "train" / "plots").glob("*.png")} >= {"loss.png", "eval_ppl.png"}
    assert {p.name for p in (out / "report").glob("train_*.png")} >= {"train_loss.png", "train_eval_ppl.png"}

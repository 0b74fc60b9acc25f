"""Recipes: shipped files, paper defaults, overrides, and one-line errors for bad recipes and bad flags."""

from __future__ import annotations

import sys

import pytest

from semisparse import cli
from semisparse.config import (
    SHIPPED_RECIPES,
    Recipe,
    apply_overrides,
    load_recipe,
    parse_set,
    resolve_steps,
)
from semisparse.errors import UserError


def test_defaults_are_the_paper_values():
    r = Recipe()
    assert (r.optim.lr, r.optim.betas, r.optim.eps, r.optim.weight_decay, r.optim.grad_clip) == (
        2e-4, (0.9, 0.95), 1e-8, 0.1, 1.0)
    assert (r.decay.lambda_max, r.decay.ramp, r.decay.variant) == (1e-4, 0.25, "adamw_decoupled")
    assert (r.mask.update, r.mask.every) == (True, 10)
    assert (r.distill.alpha, r.distill.temperature) == (0.67, 2.0)
    assert (r.slorb.k, r.slorb.train_x, r.slorb.enabled) == (16, True, False)
    assert r.pattern == "2:4" and r.init.source == "magnitude"


def test_shipped_recipes():
    recipes = {name: load_recipe(name)[0] for name in SHIPPED_RECIPES}
    naive, boosted, fixed, ce = (recipes[n] for n in ("ast-naive", "ast-boosted", "fixed-mask-kd", "naive-ce"))
    assert naive.mask.update and naive.decay.lambda_max == 1e-4 and naive.distill.alpha == 0.67
    assert not naive.slorb.enabled
    assert boosted.slorb.enabled and boosted.slorb.k == 16 and boosted.slorb.train_x and boosted.mask.update
    assert not fixed.mask.update and fixed.decay.lambda_max == 0 and fixed.distill.alpha == 0.67
    assert not ce.mask.update and ce.decay.lambda_max == 0 and ce.distill.alpha == 0
    # A name with .yaml and the default (None) also resolve to the shipped files.
    assert load_recipe("ast-boosted.yaml")[1]["name"] == "ast-boosted"
    assert load_recipe(None)[1] == load_recipe("ast-naive")[1]


def test_overrides_and_set_flags(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("optim:\n  lr: 1.0e-3\ntrain:\n  seq_len: 64\n")
    recipe, info = load_recipe(path, {"train.batch_size": 2, "optim.lr": None, "decay.ramp": 100})
    assert info["name"] == "mine" and recipe.optim.lr == 1e-3 and recipe.train.seq_len == 64
    assert recipe.train.batch_size == 2 and recipe.decay.ramp == 100
    sets = parse_set(["optim.lr=5e-4", "slorb.enabled=true", "decay.ramp=0.5", "distill.teacher=gpt2"])
    assert sets == {"optim.lr": "5e-4", "slorb.enabled": True, "decay.ramp": 0.5, "distill.teacher": "gpt2"}
    recipe = load_recipe("ast-naive", sets)[0]
    assert recipe.optim.lr == 5e-4 and recipe.slorb.enabled and recipe.distill.teacher == "gpt2"
    assert apply_overrides({"a": {"b": 1}}, {"a.c": 2, "d": 3}) == {"a": {"b": 1, "c": 2}, "d": 3}


def test_steps_or_fraction():
    assert resolve_steps(0.25, 1000) == 250 and resolve_steps(30, 1000) == 30 and resolve_steps(1.0, 7) == 7
    with pytest.raises(UserError, match="decay.ramp: .*fraction of the run must be in"):
        load_recipe("ast-naive", {"decay.ramp": 1.5})


@pytest.mark.parametrize(
    "text,message",
    [
        ("train:\n  lrr: 1\n", "recipe bad.yaml: train.lrr: unknown field"),
        ("optim:\n  lr: -1\n", "recipe bad.yaml: optim.lr: Input should be greater than 0"),
        ("optim:\n  lr: fast\n", "recipe bad.yaml: optim.lr: Input should be a valid number"),
        ("distill:\n  alpha: 1.5\n", "recipe bad.yaml: distill.alpha: Input should be less than or equal to 1"),
        ("train:\n  batch_size: 2.5\n", "train.batch_size: Input should be a valid integer"),
        ("mask: 3\n", "mask: Input should be a valid dictionary"),
        ("pattern: '3:2'\n", "pattern: impossible N:M pattern 3:2"),
        ("decay:\n  variant: sgd\n", "decay.variant: Input should be 'adamw_decoupled', 'grad' or 'adams'"),
        ("optim: [1\n", "recipe bad.yaml: invalid YAML"),
        ("- 1\n- 2\n", "expected a mapping of fields"),
    ],
)
def test_bad_recipe_one_line(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as exc:
        load_recipe(path)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_unknown_recipe_name():
    with pytest.raises(UserError, match="unknown recipe 'ast-turbo'.*ast-naive, ast-boosted"):
        load_recipe("ast-turbo")


def _cli(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["semisparse", *map(str, args)])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    return exc.value.code, capsys.readouterr()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--recipe", "ast-turbo"], "unknown recipe 'ast-turbo'"),
        (["--alpha", "2"], "distill.alpha: Input should be less than or equal to 1"),
        (["--lr", "-1"], "optim.lr: Input should be greater than 0"),
        (["--set", "optim.momentum=0.9"], "optim.momentum: unknown field"),
        (["--set", "nonsense"], "expected SECTION.FIELD=VALUE"),
        (["--tokens", "0"], "train.tokens: Input should be greater than 0"),
        (["--pattern", "2:4:1"], "malformed N:M pattern"),
        (["--init", "{tmp}/nowhere"], "neither a pruning method"),
        (["--resume"], "not a training run to resume"),
    ],
)
def test_bad_flags_exit_2_one_line(tmp_path, monkeypatch, capsys, args, message):
    args = [a.format(tmp=tmp_path) for a in args]
    code, out = _cli(monkeypatch, capsys, "train", tmp_path / "no-model-needed", "--out", tmp_path / "o", *args)
    lines = out.err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], out.err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_existing_output_needs_resume_or_overwrite(tmp_path, monkeypatch, capsys):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("x")
    code, out = _cli(monkeypatch, capsys, "train", "m", "--out", tmp_path / "o")
    assert code == 2 and "--resume" in out.err and "--overwrite" in out.err
    code, out = _cli(monkeypatch, capsys, "train", "m", "--out", tmp_path / "o", "--resume", "--overwrite")
    assert code == 2 and "exclude each other" in out.err
    assert (tmp_path / "o" / "keep.txt").read_text() == "x"

"""The Markdown + PNG report (semisparse.report) and the zero-shot console table.

Run directories are built by hand with known numbers: small safetensors files, semisparse.json,
eval.json and metrics.jsonl; nothing is loaded or evaluated.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from semisparse.errors import UserError
from semisparse.report import compressed_bytes_estimate, read_run, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# model.safetensors of every fake run: 2 "sparse" layers [8, 16] and [4, 8], a dense embedding [10, 4], a bias [8]
MODEL_SHAPES = {"layers.0.q.weight": (8, 16), "layers.0.o.weight": (4, 8), "embed.weight": (10, 4), "layers.0.q.bias": (8,)}
TOTAL = 8 * 16 + 4 * 8 + 10 * 4 + 8  # 208
SPARSE_TOTAL = 8 * 16 + 4 * 8  # 160


def ppl_rec(ppl, nll, seqlen=128, windows=10, data="wikitext2", split="test"):
    return {"ppl": ppl, "nll": nll, "data": data, "split": split, "seqlen": seqlen, "stride": seqlen,
            "windows": windows, "tokens": windows * (seqlen - 1), "tokens_total": windows * seqlen + 7}


def zs_result(tasks: dict, missing=(), limit=None):
    accs = [t["acc"] for t in tasks.values()]
    return {"tasks": tasks, "missing": list(missing), "missing_files": {}, "mean_acc": sum(accs) / len(accs),
            "mean_acc_over": list(tasks), "mode": "offline", "task_data": "/data", "limit": limit,
            "num_fewshot": 0, "lm_eval_version": "0.4.13"}


def task(acc, acc_err, acc_norm=None, norm_err=None, n=100):
    e = {"acc": acc, "acc_stderr": acc_err, "n_docs": n, "n_docs_total": n, "source": "x", "note": None}
    if acc_norm is not None:
        e.update(acc_norm=acc_norm, acc_norm_stderr=norm_err)
    return e


def make_run(path: Path, meta=None, eval_json=None, masks=None, slorb=None, metrics=None) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    save_file({k: torch.zeros(s) for k, s in MODEL_SHAPES.items()}, str(path / "model.safetensors"))
    if meta is not None:
        (path / "semisparse.json").write_text(json.dumps(meta))
    if eval_json is not None:
        (path / "eval.json").write_text(json.dumps(eval_json))
    if masks is not None:
        save_file(masks, str(path / "masks.safetensors"))
    if slorb is not None:
        save_file(slorb, str(path / "slorb.safetensors"))
    if metrics is not None:
        (path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics) + '{"step": 9, "lo')
    return path


def two_four_masks(kept_extra_zero: int = 0) -> dict[str, torch.Tensor]:
    """Exact 2:4 masks on both sparse layers, with ``kept_extra_zero`` kept entries removed from the first."""
    q = torch.tensor([True, True, False, False]).repeat(8, 4)
    q.view(-1)[:4 * kept_extra_zero:4] = False
    o = torch.tensor([False, True, False, True]).repeat(4, 2)
    return {"model.layers.0.q": q, "model.layers.0.o": o}


@pytest.fixture
def runs(tmp_path):
    masks = two_four_masks(kept_extra_zero=3)  # 64 - 3 + 16 = 77 kept
    dense = make_run(tmp_path / "dense", eval_json={
        "model": "dense", "updated": "2025-01-01T00:00:00+00:00",
        "perplexity": {"wikitext2": ppl_rec(21.4567, 3.0659)},
        "zeroshot": zs_result({"arc_easy": task(0.6125, 0.0101, 0.5833, 0.0099), "piqa": task(0.7012, 0.0107, 0.6987, 0.0105)}),
    })
    pruned = make_run(
        tmp_path / "a" / "run", masks=masks,
        meta={"stage": "prune", "source_model": "tiny", "dense_model": "tiny-dense", "method": "sparsegpt",
              "pattern": "2:4", "layers_pruned": list(masks), "layers_skipped": {}, "calibration": None, "seed": 0,
              "sparse_weights": {"kept": 77, "total": SPARSE_TOTAL, "density": 77 / SPARSE_TOTAL}},
        eval_json={
            "model": "pruned",
            "perplexity": {"dense:wikitext2": ppl_rec(21.4567, 3.0659), "pruned:wikitext2": ppl_rec(45.6789, 3.8217),
                           "/data/wiki.valid.raw": ppl_rec(50.1234, 3.9145, seqlen=64, windows=20, data="/data/wiki.valid.raw",
                                                           split="all")},
            "zeroshot": zs_result({"arc_easy": task(0.4567, 0.0102, 0.4321, 0.0100)}, missing=["piqa"]),
        },
    )
    slorb = {
        # k = 4: S [out, in/k], X [in/k, in]
        "model.layers.0.q.slorb_S": torch.zeros(8, 4), "model.layers.0.q.slorb_X": torch.zeros(4, 16),
        "model.layers.0.o.slorb_S": torch.zeros(4, 2), "model.layers.0.o.slorb_X": torch.zeros(2, 8),
    }
    metrics = [
        {"step": 1, "tokens": 1000, "loss": 4.5, "ce": 4.0, "kl": 0.5, "lr": 1e-4, "lambda": 0.1, "tokens_per_s": 900.0},
        {"step": 1, "flip_rate": 0.02, "init_flip_rate": 0.02},
        {"step": 2, "tokens": 2000, "loss": 3.25, "ce": 3.0, "kl": 0.25, "lr": 1e-4, "lambda": 0.2, "tokens_per_s": 950.0},
        {"step": 2, "flip_rate": 0.01, "init_flip_rate": 0.025},
        {"step": 2, "tokens": 2000, "eval_ppl": 30.5},
    ]
    trained = make_run(
        tmp_path / "b" / "run", masks=two_four_masks(), slorb=slorb, metrics=metrics,
        meta={"stage": "train", "source_model": str(pruned), "dense_model": "tiny-dense", "method": "sparsegpt",
              "pattern": "2:4", "layers_pruned": list(masks), "layers_skipped": {}, "seed": 0, "init": str(pruned),
              "recipe": {"name": "ast-boosted"}, "slorb": {"k": 4, "train_x": True, "params": 32 + 64 + 8 + 16},
              "sparse_weights": {"kept": 80, "total": SPARSE_TOTAL, "density": 0.5}},
        eval_json={
            "model": "trained",
            # same data, different protocol (seqlen 256) -> must get its own table and a warning
            "perplexity": {"wikitext2": ppl_rec(27.8912, 3.3283, seqlen=256, windows=5)},
            "zeroshot": zs_result({"arc_easy": task(0.5555, 0.0103, 0.5111, 0.0101), "piqa": task(0.6666, 0.011)}),
        },
    )
    return dense, pruned, trained


def test_report_contents(runs, tmp_path):
    dense, pruned, trained = runs
    out = tmp_path / "report"
    path = write_report([dense, pruned, trained], out)
    assert path == out / "report.md"
    md = path.read_text()

    # names: directory names, the two "run" folders deduplicated with their parents
    assert "| dense |" in md and "a/run" in md and "b/run" in md

    # perplexity: exact numbers, prefixed keys labelled, dense row from the prune run kept
    for s in ("21.46", "3.0659", "45.68", "3.8217", "50.12", "27.89", "3.3283"):
        assert s in md
    assert "dense: tiny-dense" in md and "a/run (right after pruning)" in md
    assert "seqlen=128" in md and "seqlen=256" in md and "windows=10" in md and "tokens=1,270" in md
    # protocol mismatch for wikitext2 flagged; /data/wiki.valid.raw has one protocol
    assert md.count("protocols differ") == 1
    wt = md[md.index("### `wikitext2`"):md.index("### `/data/wiki.valid.raw`")]
    assert "protocols differ" in wt and "(1 of 2)" in wt and "(2 of 2)" in wt
    t1, t2 = wt.index("(1 of 2)"), wt.index("(2 of 2)")
    assert "21.46" in wt[t1:t2] and "45.68" in wt[t1:t2] and "27.89" not in wt[t1:t2]
    assert "27.89" in wt[t2:]
    raw = md[md.index("### `/data/wiki.valid.raw`"):md.index("## Zero-shot")]
    assert "Not evaluated on `/data/wiki.valid.raw`: dense, b/run." in raw

    # zero-shot: acc ± stderr in %, acc_norm, missing marked, means
    zs = md[md.index("## Zero-shot"):md.index("## Parameters")]
    assert "| arc_easy | 100 | 61.25 ± 1.01 | 45.67 ± 1.02 | 55.55 ± 1.03 |" in zs
    assert "| piqa | 100 | 70.12 ± 1.07 | missing | 66.66 ± 1.10 |" in zs
    assert "58.33 ± 0.99" in zs and "43.21 ± 1.00" in zs
    assert "65.69 (2)" in zs  # dense mean acc (0.6125 + 0.7012) / 2
    assert "mean over common tasks** (1)" in zs  # the pruned run only has arc_easy
    acc_norm = zs[zs.index("### acc_norm"):]
    assert "| piqa | 100 | 69.87 ± 1.05 | missing | — |" in acc_norm  # trained piqa has no acc_norm

    # parameters: kept counted from masks (77, not the 80 of a stale semisparse.json for b/run)
    params = md[md.index("## Parameters"):md.index("## Training")]
    assert "| kept non-zeros (sparse layers) | — | 77 | 80 |" in params
    assert "| sparse-layer weights | — | 160 | 160 |" in params
    assert "| total parameters (model.safetensors) | 208 | 208 | 208 |" in params
    assert "| non-zero parameters (total − pruned) | 208 | 125 | 128 |" in params
    assert "| SLoRB extra parameters | — | — | 120 |" in params  # 8*4 + 4*16 + 4*2 + 2*8
    assert "| SLoRB S entries | — | — | 40 |" in params and "| SLoRB X entries | — | — | 80 |" in params
    size = (dense / "model.safetensors").stat().st_size
    assert f"({size:,} B)" in params
    est = compressed_bytes_estimate(TOTAL, SPARSE_TOTAL, 80, 120)
    assert est == 2 * 48 + 2 * 80 + 80 * 2 / 8 + 2 * 120
    assert f"{int(est):,} B" in params and "2/8 · K" in params

    # training summary from metrics.jsonl (the cut last line is skipped and reported)
    train = md[md.index("## Training"):]
    assert "| b/run | 2 | 2,000 | 3.2500 | 3.0000 | 0.2500 | 30.50 | 30.50 | 0.01 | 950 |" in train
    assert "Unreadable lines skipped in metrics.jsonl: b/run: 1." in train

    # plots exist, are PNGs and are linked
    for png in ("perplexity.png", "zeroshot.png", "train_loss.png", "train_ce.png", "train_kl.png", "train_lambda.png",
                "train_flip_rate.png", "train_init_flip_rate.png", "train_eval_ppl.png"):
        data = (out / png).read_bytes()
        assert len(data) > 1000 and data.startswith(PNG_MAGIC), png
        assert f"]({png})" in md


def test_read_run_counts(runs):
    _, pruned, trained = runs
    p = read_run(pruned)
    assert (p.kept, p.sparse_total, p.sparse_layers, p.kept_source) == (77, 160, 2, "masks.safetensors")
    assert p.params_total == TOTAL and p.slorb_params is None
    t = read_run(trained)
    assert (t.slorb_S, t.slorb_X, t.slorb_params, t.slorb_layers) == (40, 80, 120, 2)


def test_frozen_x_not_counted_and_kept_from_meta(tmp_path):
    slorb = {"l.slorb_S": torch.zeros(8, 4), "l.slorb_X": torch.zeros(4, 16)}
    run = make_run(tmp_path / "r", slorb=slorb,
                   meta={"stage": "train", "slorb": {"k": 4, "train_x": False, "params": 32},
                         "sparse_weights": {"kept": 80, "total": 160, "density": 0.5}, "layers_pruned": ["l"]})
    info = read_run(run)
    assert info.slorb_params == 32 and info.slorb_X == 64
    assert (info.kept, info.sparse_total, info.kept_source) == (80, 160, "semisparse.json")


def test_missing_eval_json(tmp_path):
    a = make_run(tmp_path / "x" / "m", eval_json={"model": "m", "perplexity": {"default": ppl_rec(12.0, 2.4849)},
                                                   "zeroshot": zs_result({"rte": task(0.5234, 0.03)})})
    b = make_run(tmp_path / "y" / "m", masks=two_four_masks())  # no eval.json
    md = write_report([a, b], tmp_path / "out", names=["base", "sparse"]).read_text()
    assert "| sparse |" in md and "not evaluated" in md.lower()
    assert "Not evaluated (no eval.json): sparse." in md
    assert "12.00" in md and "| kept non-zeros (sparse layers) | — | 80 |" in md
    assert "| rte | 100 | 52.34 ± 3.00 | not evaluated |" in md
    assert "| **mean** (number of tasks) |  | 52.34 (1) | not evaluated |" in md
    for png in ("perplexity.png", "zeroshot.png"):
        assert (tmp_path / "out" / png).read_bytes().startswith(PNG_MAGIC)
    assert not list((tmp_path / "out").glob("train_*.png"))


def test_eval_file_given_per_run_replaces_its_eval_json(tmp_path):
    # The dense model lives in a cache folder; its results were written elsewhere (e.g. ./eval-default.json).
    dense = make_run(tmp_path / "cache" / "models" / "Dense", eval_json={
        "model": "stale", "perplexity": {"wikitext2": ppl_rec(99.9999, 4.6052)}})
    results = tmp_path / "eval-default.json"
    results.write_text(json.dumps({"model": "default", "perplexity": {"wikitext2": ppl_rec(12.3456, 2.5133)},
                                   "zeroshot": zs_result({"rte": task(0.5234, 0.03)})}))
    sparse = make_run(tmp_path / "sparse", masks=two_four_masks(), eval_json={
        "model": "sparse", "perplexity": {"wikitext2": ppl_rec(20.5, 3.0204)}})
    md = write_report([dense, sparse], tmp_path / "out", names=["dense", "sparse"],
                      eval_files=[results, None]).read_text()
    assert "12.35" in md and "2.5133" in md and "99.99" not in md  # the given file, not the cache's eval.json
    assert "20.50" in md  # None: the run's own eval.json
    assert "| rte | 100 | 52.34 ± 3.00 | not evaluated |" in md
    runs = md[md.index("## Runs"):md.index("## Perplexity")]
    assert f"`{results}` |" in runs and runs.rstrip().endswith("| yes |")
    assert read_run(dense, eval_file=results).eval["model"] == "default"
    assert read_run(dense).eval["model"] == "stale"

    with pytest.raises(UserError, match="1 eval files given for 2 run directories"):
        write_report([dense, sparse], tmp_path / "out", eval_files=[results])
    with pytest.raises(UserError, match=r"eval file .*nowhere\.json given for .*Dense does not exist"):
        write_report([dense, sparse], tmp_path / "out", eval_files=[tmp_path / "nowhere.json", None])
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(UserError, match=r"broken\.json is not valid JSON"):
        write_report([dense], tmp_path / "out", eval_files=[tmp_path / "broken.json"])


def test_old_import_path_still_works():
    from semisparse.evaluate import report as old

    assert old.write_report is write_report and old.read_run is read_run


def test_errors(tmp_path):
    (tmp_path / "notarun").mkdir()
    (tmp_path / "notarun" / "eval.json").write_text("{}")
    with pytest.raises(UserError, match="no config.json"):
        write_report([tmp_path / "notarun"], tmp_path / "out")
    with pytest.raises(UserError, match="no such directory"):
        write_report([tmp_path / "nothere"], tmp_path / "out")
    with pytest.raises(UserError):
        write_report([], tmp_path / "out")
    run = make_run(tmp_path / "r")
    with pytest.raises(UserError, match="names"):
        write_report([run, run], tmp_path / "out", names=["same", "same"])
    with pytest.raises(UserError, match="names"):
        write_report([run], tmp_path / "out", names=["a", "b"])
    (run / "eval.json").write_text("{not json")
    with pytest.raises(UserError, match="eval.json") as exc:
        write_report([run], tmp_path / "out")
    assert "\n" not in str(exc.value)


def test_zeroshot_table():
    from rich.console import Console

    from semisparse.evaluate.zeroshot import zeroshot_table

    result = zs_result({"arc_easy": task(0.6125, 0.0101, 0.5833, 0.0099), "boolq": task(0.7, 0.02, n=50)},
                       missing=["arc_challenge"], limit=50)
    result["tasks"]["arc_easy"]["n_docs_total"] = 2376
    result["tasks"]["arc_easy"]["n_docs"] = 50
    console = Console(width=120, record=True)
    console.print(zeroshot_table(result))
    text = console.export_text()
    lines = text.splitlines()
    arc = next(line for line in lines if "arc_easy" in line)
    assert "61.25 ± 1.01" in arc and "58.33 ± 0.99" in arc and "50/2376" in arc
    boolq = next(line for line in lines if "boolq" in line)
    assert "70.00 ± 2.00" in boolq and "50" in boolq
    assert "missing" in next(line for line in lines if "arc_challenge" in line)
    mean = next(line for line in lines if "mean" in line)
    assert "65.62" in mean and "2 tasks" in mean
    assert lines.index(mean) > lines.index(next(line for line in lines if "arc_challenge" in line))

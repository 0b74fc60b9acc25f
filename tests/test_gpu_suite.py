"""benchmarks/gpu_suite.py, proven on the CPU: the --smoke run (every part, figures or skip reasons, CUDA-only paths
skipped, tokens/s read from the trainer's metrics, MFU from its stated formula, the FSDP2 wrapper timed under a
one-process torchrun on gloo) and the time budget (parts stop on time and the JSON says which were cut). matplotlib and lm-eval are made unimportable, as on the GPU machine."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "gpu_suite.py"
PARTS = ("1_train_throughput", "2_kernels", "3_quality")
SKIP_CUDA = "skipped: needs CUDA"


def run_suite(tmp_path: Path, name: str, *extra: str, timeout: float = 240) -> tuple[subprocess.CompletedProcess,
                                                                                       float, Path]:
    """Run the suite exactly as on the GPU machine but with --smoke; no matplotlib or lm_eval importable."""
    shadow = tmp_path / "no-gpu-machine-packages"
    for pkg in ("matplotlib", "lm_eval"):
        (shadow / pkg).mkdir(parents=True, exist_ok=True)
        (shadow / pkg / "__init__.py").write_text(f"raise ImportError('{pkg} is not on the GPU machine')\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(shadow), str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / name
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(SUITE), "--smoke", "--out", str(out), *extra], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - start, out


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu-suite")
    proc, wall, out = run_suite(tmp, "smoke")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return {"wall": wall, "out": out, "stdout": proc.stdout, "json": json.loads((out / "gpu_suite.json").read_text())}


def test_smoke_runs_every_part_fast(smoke):
    assert smoke["wall"] < 90, f"smoke took {smoke['wall']:.1f} s"
    res = smoke["json"]
    assert res["smoke"] is True and res["environment"]["device"] == "cpu"
    assert res["environment"]["torch"] and "cusparselt_version" in res["environment"]
    for key in PARTS:
        part = res["parts"][key]
        assert part["status"] in ("ok", "cut", "skipped"), (key, part.get("error"))
        if part["status"] == "skipped":
            assert part["reason"].startswith("skipped:")
    # figures for every part in smoke (the budget is ample)
    assert all(res["parts"][k]["status"] == "ok" for k in PARTS)
    assert res["budget"]["cut"] == []
    log = (smoke["out"] / "gpu_suite.log").read_text()
    assert "gpu_suite plan" in log and "| part | item | status | figures |" in smoke["stdout"]


def test_cuda_only_entries_say_skipped(smoke):
    res = smoke["json"]
    rows = res["parts"]["2_kernels"]["rows"]
    assert rows and res["parts"]["2_kernels"]["rows_not_run"] == 0
    for row in rows:
        if row["impl"] != "dense" or row["dtype"] in ("int8", "fp8"):
            assert row["status"] == "skipped" and row["reason"] == SKIP_CUDA, row
        else:  # the dense timing path runs on the CPU
            assert row["status"] == "ok" and row["median_ms"] > 0, row
    assert {r["impl"] for r in rows} == {"dense", "sparse_cutlass", "sparse_cusparselt"}
    assert {r["dtype"] for r in rows} == {"bf16", "fp16", "int8", "fp8"}
    e2e = res["parts"]["2_kernels"]["export_e2e"]
    assert e2e["status"] == "skipped" and e2e["reason"].startswith("skipped:")
    part1 = res["parts"]["1_train_throughput"]
    for v in [*part1["variants"].values(), part1["fsdp2_torchrun"]]:
        assert v["peak_mem_bytes"] is None and v["peak_mem"] == SKIP_CUDA


def test_training_throughput_comes_from_the_metrics(smoke):
    part = smoke["json"]["parts"]["1_train_throughput"]
    assert set(part["variants"]) == {"dense_kd", "fixed_mask_kd", "ast", "cast"}
    for key, v in part["variants"].items():
        assert v["status"] == "ok", (key, v.get("error"))
        assert v["tokens_per_s"] > 0
        records = [json.loads(line) for line in (smoke["out"] / v["metrics_file"]).read_text().splitlines()]
        steps = {r["step"]: r for r in records if "step_s" in r}
        used = [steps[s] for s in v["timed_steps"]]
        assert len(used) == 2  # smoke: 2 timed steps after the warm-up
        assert all(s >= v["warmup_steps"] for s in v["timed_steps"])
        if key != "dense_kd":  # trainer runs: the last step (always a mask recompute) is left out
            assert max(v["timed_steps"]) < max(steps)
            assert v["how"].startswith("semisparse.train.trainer.train")
        assert v["step_tokens_per_s"] == [r["tokens_per_s"] for r in used]
        assert v["tokens_per_s"] == statistics.median(r["tokens_per_s"] for r in used)
        assert v["step_s"] == [r["step_s"] for r in used]
        assert math.isclose(v["tokens_per_s_amortized"], v["tokens_per_step"] * 2 / sum(v["step_s"]))
    assert "dense" in part["dense_kd_note"] and part["ratios"]["ast_over_dense_kd"]["step_time_median"] > 0


def test_fsdp2_leg_times_ast_under_a_single_torchrun_process(smoke):
    """ast again as `torchrun --nproc-per-node 1` with fsdp.always (gloo on the CPU): FSDP2 really wrapped the one
    process, the run had the in-process ast's settings, and its figures and ratio come from its own metrics."""
    part = smoke["json"]["parts"]["1_train_throughput"]
    leg, ast = part["fsdp2_torchrun"], part["variants"]["ast"]
    assert leg["status"] == "ok", (leg.get("error"), leg.get("output_tail"))
    assert leg["wrapped"] is True and "--nproc-per-node=1" in leg["command"] and leg["recipe"] == ast["recipe"]
    assert leg["overrides"] == {**ast["overrides"], "fsdp.always": True}
    assert leg["steps_planned"] == ast["steps_planned"] and leg["tokens_per_step"] == ast["tokens_per_step"]
    records = [json.loads(line) for line in (smoke["out"] / leg["metrics_file"]).read_text().splitlines()]
    steps = {r["step"]: r for r in records if "step_s" in r}
    used = [steps[s] for s in leg["timed_steps"]]
    assert len(used) == 2 and min(leg["timed_steps"]) >= leg["warmup_steps"] and max(leg["timed_steps"]) < max(steps)
    assert leg["tokens_per_s"] > 0
    assert leg["tokens_per_s"] == statistics.median(r["tokens_per_s"] for r in used)
    assert leg["step_s"] == [r["step_s"] for r in used]
    ratio = leg["over_ast"]
    assert ratio == part["ratios"]["fsdp1_over_ast"]
    assert math.isclose(ratio["step_time_median"], leg["median_step_s"] / ast["median_step_s"])
    assert math.isclose(ratio["tokens_per_s_median"], leg["tokens_per_s"] / ast["tokens_per_s"])


def test_fsdp2_leg_is_skipped_without_an_ast_figure():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from gpu_suite_parts.train_part import fsdp1_leg
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    for ast in ({"status": "skipped", "reason": "skipped: budget (0.4 s share < 1 s)"},
                {"status": "error", "error": "RuntimeError: boom"}):
        leg = fsdp1_leg(None, {}, {"variants": {"ast": ast}}, time.monotonic() + 100)
        assert leg["status"] == "skipped" and leg["reason"].startswith("skipped: the in-process ast variant is ")
        assert ast.get("reason", ast.get("error")) in leg["reason"]


def test_mfu_follows_the_stated_formula(smoke):
    part = smoke["json"]["parts"]["1_train_throughput"]
    fl, peak = part["flops"], part["peak"]
    assert "6*N_student + 2*N_teacher" in fl["formula"]
    assert math.isclose(peak["flops_per_s"], 2 * peak["m"] * peak["n"] * peak["k"] / min(peak["times_s"]))
    # the tiny smoke Llama: 2 layers x (q 64x64, k/v 32x64, o 64x64, gate/up 128x64, down 64x128) + head 384x64
    assert fl["n_student"] == 2 * (64 * 64 * 2 + 32 * 64 * 2 + 128 * 64 * 3) + 384 * 64
    assert (fl["layers"], fl["d_attn"], fl["seq_len"]) == (2, 64, 32)
    per_token = (6 * fl["n_student"] + 2 * fl["n_teacher"] + 6 * fl["layers"] * fl["seq_len"] * fl["d_attn"]
                 + 2 * fl["layers"] * fl["seq_len"] * fl["d_attn"])
    for v in [*part["variants"].values(), part["fsdp2_torchrun"]]:
        assert v["flops_per_token"] == per_token
        assert math.isclose(v["mfu"], per_token * v["tokens_per_s"] / peak["flops_per_s"], rel_tol=1e-12)


def test_quality_part_compares_equal_budgets(smoke):
    part = smoke["json"]["parts"]["3_quality"]
    assert part["init"]["method"] == "sparsegpt" and part["init"]["sparse_weights"]["density"] == 0.5
    assert part["budget"]["sized_from"].startswith("part 1")
    tokens = part["budget"]["tokens"]
    assert tokens > 0
    for key in ("fixed_mask_kd", "ast"):
        run = part["runs"][key]
        assert run["status"] == "ok", run.get("error")
        assert run["tokens"] == tokens and run["overrides"]["train.tokens"] == tokens
        assert run["overrides"]["log.plots"] is False and run["overrides"]["log.tensorboard"] is False
        assert len(run["curves"]["loss"]["loss"]) == run["steps"]
        assert math.isfinite(run["perplexity"]["ppl"]) and run["perplexity"]["seqlen"] == 32
    assert part["runs"]["ast"]["curves"]["flip_rate"]["flip_rate"]  # AST recomputes masks
    assert part["runs"]["fixed_mask_kd"]["curves"]["flip_rate"]["flip_rate"] == []  # a fixed mask never flips
    assert set(part["perplexity"]) == {"dense", "sparsegpt_init", "fixed_mask_kd", "ast"}


def test_tiny_budget_skips_parts_and_says_so(tmp_path):
    proc, wall, out = run_suite(tmp_path, "b5", "--budget-s", "5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "gpu_suite.json").read_text())
    cut = {c["where"] for c in res["budget"]["cut"]}
    for key in PARTS:  # the start-up (imports, tiny model) alone takes about 5 s here
        part = res["parts"][key]
        assert part["status"] in ("skipped", "cut"), key
        assert key in cut or any(c.startswith(key + "/") for c in cut)
    assert res["budget"]["elapsed_s"] < 5 + 10 and wall < 40


def test_budget_stops_parts_on_time(tmp_path):
    """A part 1 that asks for far more time than the budget is stopped at its share; the rest still run."""
    budget = 24
    proc, wall, out = run_suite(tmp_path, "b24", "--budget-s", str(budget), "--train-seconds", "600")
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "gpu_suite.json").read_text())
    assert res["budget"]["elapsed_s"] <= budget + 3, res["budget"]
    cut = res["budget"]["cut"]
    assert any(c["where"].startswith("1_train_throughput/") for c in cut), cut
    variants = res["parts"]["1_train_throughput"]["variants"]
    dense = variants["dense_kd"]
    if dense["status"] != "skipped":  # started: stopped by the clock well before its 600 s target
        assert dense["status"] == "cut" and dense["limited_by"] == "budget"
        assert sum(dense["step_s"]) < budget
    leg = res["parts"]["1_train_throughput"]["fsdp2_torchrun"]  # the torchrun leg keeps to its share too
    assert leg["status"] in ("ok", "cut", "skipped"), (leg.get("error"), leg.get("output_tail"))
    if leg["status"] != "ok":
        assert leg["reason"].startswith(leg["status"] + ":")
    for key in PARTS:
        part = res["parts"][key]
        assert part["status"] in ("ok", "cut", "skipped"), (key, part.get("error"))
        if part["status"] == "skipped":
            assert part["reason"].startswith("skipped:")
        else:
            assert part["elapsed_s"] <= part["share_s"] + 2.0, (key, part["elapsed_s"], part["share_s"])


def test_plan_and_parts_subset():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_suite
        from gpu_suite_parts.kernels import export_capability
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    args = gpu_suite.parse_args(["--out", "x", "--parts", "1,2"])
    rows = gpu_suite.plan(args, 300.0)
    assert [r["part"] for r in rows] == [1, 2]
    assert math.isclose(sum(r["share_s_if_on_time"] for r in rows), 300.0, abs_tol=0.2)
    assert rows[0]["share_s_if_on_time"] == pytest.approx(200.0, abs=0.1)  # weights 0.4 : 0.2
    with pytest.raises(SystemExit):
        gpu_suite.parse_args(["--out", "x", "--parts", "4"])
    cap = export_capability()  # whatever semisparse.export holds now, a reason when it cannot run end to end
    assert cap["why"] == "" or cap["why"].startswith("skipped:")

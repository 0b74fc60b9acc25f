"""The README and docs say what the code does: links resolve inside the repository, the quick-start test command is
what CI runs, the config example validates, and the Python API example runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^ *```{lang}\n(.*?)^ *```", text, flags=re.S | re.M)


@pytest.mark.parametrize("doc", ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))])
def test_links_stay_inside_the_repository(doc):
    path = ROOT / doc
    targets = re.findall(r"\]\(([^)\s]+)\)", path.read_text(encoding="utf-8"))
    assert targets, doc
    for target in targets:
        if target.startswith(("http://", "https://", "#")):
            continue
        resolved = (path.parent / target.split("#")[0]).resolve()
        assert resolved.is_relative_to(ROOT), f"{doc} links outside the repository: {target}"
        assert resolved.exists(), f"{doc} links to a missing file: {target}"


def test_quick_start_commands():
    commands = [line for block in _blocks(README, "bash") for line in block.splitlines()
                if line.startswith("bash scripts/setup.sh")]
    assert commands[0].startswith("bash scripts/setup.sh && .venv/bin/semisparse run default --preset quick")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert commands[1] in ci  # CI runs exactly the README's test command


def test_the_config_example_is_a_valid_pipeline_config():
    from semisparse.pipeline.config import PipelineConfig

    example = next(b for b in _blocks(README, "yaml") if "prune:" in b)
    cfg = PipelineConfig.model_validate(yaml.safe_load(example))
    assert cfg.train.tokens == 1_000_000 and cfg.prune.method == "sparsegpt"


@pytest.mark.realmodel
def test_the_python_api_example_runs(tmp_path):
    (code,) = _blocks(README.split("## Python API", 1)[1], "python")[:1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(r"^1 step, held-out ppl \d+\.\d$", r.stdout, flags=re.M), r.stdout
    assert (tmp_path / "runs/api/report/report.md").is_file()

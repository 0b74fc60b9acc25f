"""A bare clone (no standard data beside it) passes: the real-data tests skip, naming the folder, the rest run."""

import os
import re
import subprocess
import sys

from tiny import DATA_ENV, PROJECT_ROOT

SUBSET = [
    "tests/test_data.py",
    "tests/test_zeroshot.py::test_local_document_counts",
    "tests/test_zeroshot.py::test_local_document_counts_of_fixture_files",
    "tests/test_zeroshot.py::test_offline_requests_equal_builtin_task",
]


def test_suite_subset_passes_without_standard_data(tmp_path):
    empty = tmp_path / "no-standard-data"
    empty.mkdir()
    env = {**os.environ, DATA_ENV: str(empty)}
    env.pop("PYTEST_ADDOPTS", None)
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-v", "-rs", *SUBSET],
                       cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    outcome = dict(re.findall(r"^(tests/\S+) (PASSED|SKIPPED|FAILED|ERROR)", r.stdout, re.M))
    assert "FAILED" not in outcome.values() and "ERROR" not in outcome.values(), out[-4000:]

    # the real-data tests are skipped ...
    for test in ("tests/test_data.py::test_wikitext_valid_rows_match_recipe", "tests/test_data.py::test_c4_jsonl",
                 "tests/test_data.py::test_fixture_files_follow_the_standard_layout",
                 "tests/test_zeroshot.py::test_local_document_counts",
                 "tests/test_zeroshot.py::test_offline_requests_equal_builtin_task[standard-copa]"):
        assert outcome.get(test) == "SKIPPED", (test, out[-4000:])
    # ... and their fixture counterparts run
    for test in ("tests/test_data.py::test_wikitext_style_rows_on_fixture", "tests/test_data.py::test_c4_style_jsonl_on_fixture",
                 "tests/test_zeroshot.py::test_local_document_counts_of_fixture_files",
                 "tests/test_zeroshot.py::test_offline_requests_equal_builtin_task[fixture-copa]",
                 "tests/test_zeroshot.py::test_offline_requests_equal_builtin_task[fixture-hellaswag]"):
        assert outcome.get(test) == "PASSED", (test, out[-4000:])
    assert sum(v == "SKIPPED" for v in outcome.values()) == 14  # 3 in test_data, 1 + 10 in test_zeroshot

    # every skip says why: the folder looked at and how to point at the data
    skips = [line for line in r.stdout.splitlines() if line.startswith("SKIPPED [")]
    assert skips
    for line in skips:
        assert f"standard data not found at {empty} (set {DATA_ENV} or put shared/data beside the project)" in line, line

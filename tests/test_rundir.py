"""semisparse.rundir: the atomic file and folder writers (a full disk keeps the old version, leaves no temp files)
and the run-directory readers."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import pytest

from semisparse import rundir
from semisparse.errors import UserError


def entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def disk_full(monkeypatch, after_bytes: int = 0, call: str = "write"):
    """Make ``os.write`` (after writing ``after_bytes``) or ``os.fsync`` fail the way a full disk does."""
    real_write, written = os.write, [0]

    def write(fd, data):
        room = after_bytes - written[0]
        if room <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = real_write(fd, bytes(data[:room]))
        written[0] += n
        return n

    def fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if call == "write":
        monkeypatch.setattr(os, "write", write)
    else:
        monkeypatch.setattr(os, "fsync", fsync)


# ------------------------------------------------------------------ atomic files


def test_atomic_write_replaces_content_with_normal_permissions(tmp_path):
    target = tmp_path / "eval.json"
    target.write_text("old")
    rundir.atomic_write_json(target, {"a": [1, 2]})
    assert target.read_text() == '{\n  "a": [\n    1,\n    2\n  ]\n}\n'
    assert entries(tmp_path) == ["eval.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # as open() would create it, not mkstemp's 0600
    rundir.atomic_write_bytes(tmp_path / "new" / "blob.bin", b"\x00\x01" * 70_000)  # creates the folder
    assert (tmp_path / "new" / "blob.bin").read_bytes() == b"\x00\x01" * 70_000


@pytest.mark.parametrize("call, after_bytes", [("write", 0), ("write", 5), ("fsync", 0)])
def test_full_disk_keeps_the_old_file_and_leaves_no_temp_file(tmp_path, monkeypatch, call, after_bytes):
    target = tmp_path / "eval.json"
    target.write_text('{"model": "m", "perplexity": {}}\n')
    with monkeypatch.context() as patch:
        disk_full(patch, after_bytes, call)
        with pytest.raises(UserError) as err:
            rundir.atomic_write_text(target, json.dumps({"model": "m", "much": "x" * 10_000}))
    message = str(err.value)
    assert message == f"cannot write {target}: No space left on device (the previous version is kept)"
    assert target.read_text() == '{"model": "m", "perplexity": {}}\n'
    assert entries(tmp_path) == ["eval.json"]


def test_full_disk_on_a_new_file_leaves_nothing(tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        disk_full(patch, after_bytes=3)
        with pytest.raises(UserError, match=r"^cannot write .*report\.md: No space left on device$"):
            rundir.atomic_write_text(tmp_path / "report.md", "# report\n" * 100)
    assert entries(tmp_path) == []


def test_truncate_metrics_drops_later_steps_and_broken_lines(tmp_path):
    path = tmp_path / rundir.METRICS_FILE
    path.write_text('{"step": -1, "eval_ppl": 9.0}\n{"step": 0, "loss": 2.0}\n{"step": 1, "lo\n{"step": 2, "loss": 1.5}\n')
    rundir.truncate_metrics(path, last_step=0)
    assert path.read_text() == '{"step": -1, "eval_ppl": 9.0}\n{"step": 0, "loss": 2.0}\n'
    assert entries(tmp_path) == [rundir.METRICS_FILE]


# ------------------------------------------------------------------ atomic folders


def test_atomic_dir_builds_and_replaces_a_folder(tmp_path):
    target = tmp_path / "run"
    with rundir.atomic_dir(target) as stage:
        assert stage.parent == tmp_path and stage.name.startswith(".tmp-run-") and not target.exists()
        (stage / "a.txt").write_text("first")
        (stage / "sub").mkdir()
        (stage / "sub" / "b.txt").write_text("nested")
    assert entries(target) == ["a.txt", "sub"] and (target / "sub" / "b.txt").read_text() == "nested"
    with rundir.atomic_dir(target, replace=True) as stage:
        (stage / "c.txt").write_text("second")
    assert entries(target) == ["c.txt"]  # the old folder's files are gone, not merged
    assert entries(tmp_path) == ["run"]


def test_atomic_dir_failure_keeps_the_old_folder_and_removes_the_staging_folder(tmp_path):
    target = tmp_path / "run"
    target.mkdir()
    (target / "model.safetensors").write_text("the old, complete model")
    with pytest.raises(RuntimeError, match="killed half-way"):
        with rundir.atomic_dir(target, replace=True) as stage:
            (stage / "model.safetensors").write_text("half")
            raise RuntimeError("killed half-way")
    assert (target / "model.safetensors").read_text() == "the old, complete model"
    assert entries(tmp_path) == ["run"]


def test_atomic_dir_turns_a_full_disk_into_one_line(tmp_path, monkeypatch):
    target = tmp_path / "run"
    with pytest.raises(UserError) as err:
        with rundir.atomic_dir(target) as stage:
            (stage / "config.json").write_text("{}")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(stage / "model.safetensors"))
    assert str(err.value) == f"cannot write {target}: No space left on device"
    assert entries(tmp_path) == []


def test_atomic_dir_without_replace_refuses_an_existing_target(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("precious")
    with pytest.raises(UserError, match="already exists"):
        with rundir.atomic_dir(tmp_path / "run") as stage:
            (stage / "new.txt").write_text("x")
    assert entries(tmp_path / "run") == ["keep.txt"] and entries(tmp_path) == ["run"]


def test_staged_files_move_up_with_the_marker_last_and_keep_other_entries(tmp_path, monkeypatch):
    run = tmp_path / "run"
    (run / rundir.CHECKPOINTS_DIR / "step-000002").mkdir(parents=True)
    (run / rundir.METRICS_FILE).write_text('{"step": 1}\n')
    (run / rundir.RUN_META).write_text('{"stage": "train", "old": true}')
    (run / rundir.PLOTS_DIR).mkdir()
    (run / rundir.PLOTS_DIR / "stale.png").write_text("old plot")
    moved, real_replace = [], os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: moved.append(Path(dst).name) or real_replace(src, dst))
    with rundir.staged_files(run) as stage:
        assert stage.parent == run
        (stage / rundir.RUN_META).write_text('{"stage": "train"}')
        (stage / "model.safetensors").write_text("weights")
        (stage / rundir.PLOTS_DIR).mkdir()
        (stage / rundir.PLOTS_DIR / "loss.png").write_text("new plot")
    assert moved[-1] == rundir.RUN_META and set(moved) == {rundir.RUN_META, "model.safetensors", rundir.PLOTS_DIR}
    assert entries(run) == sorted([rundir.CHECKPOINTS_DIR, rundir.METRICS_FILE, rundir.RUN_META, "model.safetensors",
                                   rundir.PLOTS_DIR])
    assert json.loads((run / rundir.RUN_META).read_text()) == {"stage": "train"}
    assert entries(run / rundir.PLOTS_DIR) == ["loss.png"]  # a folder is replaced as a whole


def test_staged_files_failure_leaves_the_folder_as_it_was(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / rundir.RUN_META).write_text("{}")
    with pytest.raises(ValueError):
        with rundir.staged_files(run) as stage:
            (stage / "model.safetensors").write_text("half")
            raise ValueError("cannot save")
    assert entries(run) == [rundir.RUN_META]


# ------------------------------------------------------------------ readers and names


def test_read_json_errors_are_one_line(tmp_path):
    bad = tmp_path / "a.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match=r"a\.json is not valid JSON \(Expecting property name.*line 1 column 2\)$"):
        rundir.read_json(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(UserError, match=r"is not valid JSON \(expected an object, found list\)$"):
        rundir.read_json(bad)
    assert rundir.read_eval(tmp_path / "none.json") is None


def test_read_metrics_counts_unreadable_lines(tmp_path):
    path = tmp_path / rundir.METRICS_FILE
    path.write_text('{"step": 0, "loss": 2.0}\n\n[1]\n{"step": 1, "lo')
    assert rundir.read_metrics_counted(path) == ([{"step": 0, "loss": 2.0}], 2)
    assert rundir.read_metrics(path) == [{"step": 0, "loss": 2.0}]
    assert rundir.read_metrics(tmp_path / "absent.jsonl") == []


def test_load_masks_and_run_meta_errors(tmp_path):
    with pytest.raises(UserError, match="has no masks.safetensors"):
        rundir.load_masks(tmp_path)
    (tmp_path / rundir.MASKS_FILE).write_bytes(b"garbage")
    with pytest.raises(UserError, match="corrupted mask file"):
        rundir.load_masks(tmp_path)
    (tmp_path / rundir.RUN_META).write_text('{"stage": "prune"')
    with pytest.raises(UserError, match="semisparse.json is not valid JSON"):
        rundir.read_run_meta(tmp_path)


def test_default_eval_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "default").mkdir()  # a folder named like the shipped model does not capture its results
    (tmp_path / "my-run").mkdir()
    assert rundir.default_eval_file("default") == Path("eval-default.json")
    assert rundir.default_eval_file("HuggingFaceTB/SmolLM2-135M") == Path("eval-HuggingFaceTB--SmolLM2-135M.json")
    assert rundir.default_eval_file("my-run") == Path("my-run") / "eval.json"
    assert rundir.model_slug("org/name with spaces:v1") == "org--name-with-spaces-v1"

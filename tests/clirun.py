"""Run the CLI in-process (fast) or in a subprocess (real exit codes), returning returncode/stdout/stderr."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace


def run_in_process(capsys, *args) -> SimpleNamespace:
    from semisparse.cli import main

    capsys.readouterr()
    code = 0
    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)


def one_line_error(r) -> str:
    """The one line a usage or input error prints (exit 2, one non-blank stderr line); fails the test otherwise."""
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("semisparse: error: "), r.stderr
    return lines[0]


def folder_state(path: Path) -> dict:
    """{relative path: bytes} of every file under ``path``: to show a failed command changed nothing."""
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def run_subprocess(*args, timeout: int = 600, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "semisparse.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, **kwargs)


#: Python source to start a script with: single-threaded, every optimizer step 0.25 s longer (through
#: the lr schedule, schedules.lr_at), so a test can SIGKILL a run after a given checkpoint and before it ends.
SLOW_STEPS_PRELUDE = """
import sys, time, torch
torch.set_num_threads(1)
from semisparse.train import schedules, trainer
_lr_at = schedules.lr_at
def _slow_lr_at(*a, **k):
    time.sleep(0.25)
    return _lr_at(*a, **k)
schedules.lr_at = _slow_lr_at
"""


def kill_once_written(script: str, args: list[str], marker: Path, timeout_s: float, what: str) -> int:
    """Run ``python -c script *args`` (one OpenMP thread), SIGKILL it as soon as ``marker`` exists; its return code.

    Fails the test if the process ends first (with its stderr) or ``marker`` does not appear in ``timeout_s``.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script, *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.time() + timeout_s
        while not marker.is_file():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() < deadline, what
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode

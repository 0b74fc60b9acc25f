"""FSDP2 on CPU (torchrun, 2 processes, gloo): sparse layers, masks and the masked optimizers on sharded weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def torchrun(script: Path, *args: str, nproc: int = 2, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", str(script),
           *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def test_masked_optimizers_and_mask_recompute_on_fsdp2_shards_equal_one_process(tmp_path):
    """FSDP2 shards dim 0 (output rows) and N:M groups run along the input dimension: each rank updates its rows
    with its slice of the mask and recomputes its rows' masks without gathering weights; after 4 steps (two mask
    recomputes) the gathered weights and every rank's full masks equal a one-process run's."""
    out = tmp_path / "result.txt"
    proc = torchrun(HERE / "distributed" / "sharded_masks.py", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    status, count = out.read_text().split()
    assert status == "OK" and int(count) > 40

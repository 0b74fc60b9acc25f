"""Training checkpoints: atomic save, verification, resume at any number of processes.

A checkpoint is a folder ``RUN/checkpoints/step-NNNNNN`` (NNNNNN = optimizer steps completed) holding:

- ``dcp/``: the student's and the optimizer's state through ``torch.distributed.checkpoint`` (DCP): each process
  writes its own shards, keyed by parameter name and global offsets, so a checkpoint written by 2 processes loads
  into 1 (or 8) and the reverse; one process writes one file. Weights, bool masks (sharded like their weights),
  SLoRB S/X, CAST's weight scales and every optimizer moment are in it;
- ``rng.safetensors``: rank 0's torch CPU (and CUDA) generator states;
- ``extra.safetensors``: any other trainer tensors (before 2026-12-08 the initial masks M0, read on resume);
- ``state.json``: step, tokens, data position, python/numpy RNG states and whatever the trainer adds;
- ``manifest.json`` (written last): format version, step and the sha256 + size of every other file.

Saving (every process calls it): rank 0 makes a hidden staging folder, every process writes its DCP shards into it,
then rank 0 adds the rest, fsyncs every file and renames the folder into place (``rundir.atomic_dir``), so a killed
job leaves either a complete checkpoint or a hidden leftover (ignored and cleaned up later). Loading re-hashes every
file (rank 0): a truncated or modified checkpoint is refused with a one-line ``UserError``.

The initial masks M0 (for the flip rate vs M0) never change during a run, so rank 0 writes them once, at the start,
beside the step folders (``RUN/checkpoints/initial_masks.safetensors``; run.json keeps its sha256), instead of
into every checkpoint; each process keeps only its rows of them in memory.

DCP's ``.metadata`` is a pickle (torch's format, not ours): checkpoints are for resuming your own runs; the run
directory's safetensors files are what to share.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from semisparse import rundir
from semisparse.errors import UserError
from semisparse.train.distributed import Dist, barrier, broadcast

FORMAT = 2  # 1: one-process safetensors files (semisparse < 0.2), not readable any more
DIR_NAME = rundir.CHECKPOINTS_DIR
PREFIX = "step-"
MANIFEST = "manifest.json"
DCP_DIR = "dcp"  # model + optimizer, torch.distributed.checkpoint
DCP_METADATA = f"{DCP_DIR}/.metadata"
RNG_FILE = "rng.safetensors"
EXTRA_FILE = "extra.safetensors"
STATE_FILE = "state.json"
INITIAL_MASKS_FILE = "initial_masks.safetensors"  # M0, once per run, beside the step folders
M0_PREFIX = "m0."  # M0's keys in extra.safetensors, where checkpoints before 2026-12-08 kept it
_TMP_PREFIX, _OLD_PREFIX = ".tmp-", ".old-"  # hidden leftovers of a killed save


class CheckpointError(UserError):
    """A checkpoint that cannot be used (missing, truncated, modified, or not fitting the model)."""


# ------------------------------------------------------------------------------------------------ file helpers


def _write_json(path: Path, data: dict) -> None:
    # Inside the staging folder: the folder's rename makes it atomic, the manifest loop fsyncs it.
    path.write_text(rundir.dump_json(data, indent=1))


def step_dir_name(step: int) -> str:
    return f"{PREFIX}{step:06d}"


# ------------------------------------------------------------------------------------------------ state pieces


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """Generator states: torch (CPU, CUDA) as tensors; python ``random`` and numpy (if loaded) as JSON."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    version, internal, gauss = random.getstate()
    doc: dict = {"python": [version, list(internal), gauss]}
    if "numpy" in sys.modules:
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
        doc["numpy"] = [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    return tensors, doc


def set_rng_state(tensors: dict[str, torch.Tensor], doc: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    if "python" in doc:
        version, internal, gauss = doc["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in doc:
        import numpy as np

        name, keys, pos, has_gauss, cached = doc["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# ------------------------------------------------------------------------------------------------ save


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns on every call in a process without a process group; one process is a supported case here."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _dcp_state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """Model (and optimizer) state keyed by parameter names, as DTensor shards under FSDP2: what DCP reshards."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd}


def save_checkpoint(
    root: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict,
    extra_tensors: dict[str, torch.Tensor] | None = None,
    keep: int = 2,
    dist: Dist = Dist(),
) -> Path:
    """Write ``root/step-NNNNNN`` atomically and keep the newest ``keep`` checkpoints. Returns its path.

    Every process calls this (the DCP write is collective); rank 0 alone writes the other files and renames.
    ``state`` is the trainer's JSON-able state (step, tokens, data position, ...); RNG states are added here.
    """
    import torch.distributed.checkpoint as dcp

    root = Path(root)
    final = root / step_dir_name(step)
    # Staged in root/.tmp-<name>-<pid of rank 0>; the same step saved again (the end of a resumed, finished run) is
    # swapped in through root/.old-<name>-<pid>. Files are fsynced here, before hashing, hence fsync=False.
    staging = (rundir.atomic_dir(final, replace=True, fsync=False, stage_prefix=_TMP_PREFIX, old_prefix=_OLD_PREFIX)
               if dist.is_main else contextlib.nullcontext())
    with staging as tmp:
        tmp = Path(broadcast(dist, str(tmp) if tmp is not None else None))
        with _quiet_single_process():
            dcp.save(_dcp_state(model, optimizer), checkpoint_id=str(tmp / DCP_DIR))
        barrier(dist)  # every shard is on disk
        if dist.is_main:
            rng_tensors, rng_doc = rng_state()
            save_file({k: v.contiguous() for k, v in rng_tensors.items()}, str(tmp / RNG_FILE))
            save_file({k: v.detach().cpu().contiguous() for k, v in (extra_tensors or {}).items()},
                      str(tmp / EXTRA_FILE))
            _write_json(tmp / STATE_FILE, {**state, "step": step, "rng": rng_doc})
            files = {}
            for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
                rundir.fsync_file(path)
                files[path.relative_to(tmp).as_posix()] = {"sha256": rundir.sha256_file(path), "bytes": path.stat().st_size}
            _write_json(tmp / MANIFEST, {"format": FORMAT, "step": step, "created": time.time(), "files": files})
            rundir.fsync_file(tmp / MANIFEST)
            rundir.fsync_dir(tmp / DCP_DIR)
            rundir.fsync_dir(tmp)
    if dist.is_main:
        for stale in list_checkpoints(root)[:-keep]:
            shutil.rmtree(stale, ignore_errors=True)
    barrier(dist)  # nobody reads or resumes before the rename
    return final


def cleanup_leftovers(root: Path) -> None:
    """Remove hidden temporary folders a killed save left behind."""
    root = Path(root)
    if root.is_dir():
        for path in root.iterdir():
            if path.name.startswith((_TMP_PREFIX, _OLD_PREFIX)):
                shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ verify, load


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders (complete or not), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        if path.is_dir() and path.name.startswith(PREFIX) and path.name[len(PREFIX):].isdigit():
            found.append((int(path.name[len(PREFIX):]), path))
    return [p for _, p in sorted(found)]


def verify_checkpoint(path: Path) -> dict:
    """The manifest, after checking every listed file's size and sha256. Raises CheckpointError (one line)."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: no {MANIFEST}")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        step = int(manifest["step"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path} is corrupted: unreadable {MANIFEST} ({type(exc).__name__})") from exc
    if manifest.get("format") == 1:
        raise CheckpointError(f"checkpoint {path} was written by an older semisparse (format 1, one process): "
                              "start the run over with --overwrite")
    for name in (DCP_METADATA, RNG_FILE, EXTRA_FILE, STATE_FILE):
        if name not in files:
            raise CheckpointError(f"checkpoint {path} is corrupted: {MANIFEST} does not list {name}")
    for name, info in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} is corrupted: {name} is missing")
        size = file.stat().st_size
        if size != info.get("bytes"):
            raise CheckpointError(
                f"checkpoint {path} is corrupted: {name} has {size} bytes, the manifest says {info.get('bytes')} "
                "(truncated?)"
            )
        if rundir.sha256_file(file) != info.get("sha256"):
            raise CheckpointError(f"checkpoint {path} is corrupted: {name} does not match its sha256 in {MANIFEST}")
    if path.name != step_dir_name(step):
        raise CheckpointError(f"checkpoint {path} is corrupted: its manifest says step {step}")
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {manifest.get('format')!r}, expected {FORMAT}")
    return manifest


def latest_checkpoint(root: Path, warn=None) -> Path | None:
    """The newest checkpoint that verifies. Newer ones that do not are reported through ``warn(message)`` and
    skipped; if there are checkpoints but none verifies, the newest one's problem is raised."""
    candidates = list_checkpoints(root)
    first_error: CheckpointError | None = None
    for path in reversed(candidates):
        try:
            verify_checkpoint(path)
            return path
        except CheckpointError as exc:
            first_error = first_error or exc
            if warn is not None:
                warn(f"skipping {exc}")
    if first_error is not None:
        raise first_error
    return None


def read_state(path: Path) -> dict:
    return json.loads((Path(path) / STATE_FILE).read_text())


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint's DCP part, whole (gathered from every process's shards), by its flat key
    (``model.<parameter>``, ``optim.state.<parameter>.exp_avg``, ...), without building a model or an optimizer."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(Path(path) / DCP_DIR))
    entries = reader.read_metadata().state_dict_metadata
    state = {key: torch.empty(meta.size, dtype=meta.properties.dtype)
             for key, meta in entries.items() if isinstance(meta, TensorStorageMetadata)}
    with _quiet_single_process():
        dcp.load(state, storage_reader=reader)
    return state


def read_model_state(path: Path) -> dict[str, torch.Tensor]:
    """The student's whole state dict (parameter name -> tensor) in a checkpoint: for inspection and tests."""
    return {key[len("model."):]: t for key, t in read_tensors(path).items() if key.startswith("model.")}


def read_extra(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(path) / EXTRA_FILE))


def save_initial_masks(root: Path, masks: dict[str, torch.Tensor]) -> dict:
    """Write M0 once for the whole run (rank 0); returns the record run.json keeps to check it on resume."""
    path = rundir.atomic_save_tensors(Path(root) / INITIAL_MASKS_FILE, {k: v.cpu() for k, v in masks.items()})
    return {"file": f"{DIR_NAME}/{INITIAL_MASKS_FILE}", "sha256": rundir.sha256_file(path),
            "bytes": path.stat().st_size}


def initial_masks_source(checkpoint: Path, record: dict | None, dist: Dist = Dist()) -> tuple[Path, str]:
    """Where M0 of a run resumed from ``checkpoint`` is, as (safetensors file, key prefix): the checkpoint's own copy
    (written before 2026-12-08) or the run's file, checked by rank 0 against ``record`` (run.json's
    ``initial_masks``). Every process calls this; each reads what it needs of the file (rundir.read_mask_file)."""
    from safetensors import safe_open

    checkpoint = Path(checkpoint)
    extra = checkpoint / EXTRA_FILE
    if extra.is_file():
        with safe_open(str(extra), framework="pt") as fh:
            if any(key.startswith(M0_PREFIX) for key in fh.keys()):
                return extra, M0_PREFIX
    path = checkpoint.parent / INITIAL_MASKS_FILE
    problem = None
    if dist.is_main:
        if record is None:
            problem = f"cannot resume: {checkpoint} has no initial masks and run.json records none"
        elif not path.is_file():
            problem = f"cannot resume: the run's initial masks {path} are missing"
        elif path.stat().st_size != record["bytes"] or rundir.sha256_file(path) != record["sha256"]:
            problem = f"cannot resume: {path} is truncated or modified (its sha256 differs from run.json's)"
    problem = broadcast(dist, problem)
    if problem is not None:
        raise CheckpointError(problem)
    return path, ""


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    dist: Dist = Dist()) -> dict:
    """Verify ``path`` (rank 0), load the model (in place) and optimizer states into this process's shards, restore
    the RNGs; return state.json. Every process calls this."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    path = Path(path)
    problem = None
    if dist.is_main:
        try:
            verify_checkpoint(path)
        except CheckpointError as exc:
            problem = str(exc)
    problem = broadcast(dist, problem)
    if problem is not None:
        raise CheckpointError(problem)
    target = _dcp_state(model, optimizer)
    try:
        with _quiet_single_process():
            dcp.load(target, checkpoint_id=str(path / DCP_DIR))
    except (CheckpointException, RuntimeError, ValueError) as exc:  # keys or shapes that do not match
        first = [s.strip() for s in str(exc).strip().splitlines() if s.strip()]
        hint = next((s for s in first if "key" in s.lower() or "size" in s.lower() or "shape" in s.lower()),
                    first[0] if first else type(exc).__name__)
        raise CheckpointError(f"checkpoint {path} does not fit the model ({hint[:300]})") from exc
    if optimizer is None:
        set_model_state_dict(model, target["model"])
    else:
        try:
            set_state_dict(model, optimizer, model_state_dict=target["model"], optim_state_dict=target["optim"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"checkpoint {path}: optimizer state does not fit ({exc})") from exc
    state = read_state(path)
    set_rng_state(load_file(str(path / RNG_FILE)), state.get("rng", {}))
    return state

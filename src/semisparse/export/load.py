"""Rebuild the transformers model from an exported folder (``semisparse.load``, ``models.load_model``).

Packed: the model is built from the manifest's config without random init, the dense tensors are loaded, every
sparse layer is unpacked (de-quantized first) into its weight through ``layers.weight_matrix`` (so GPT-2's
transposed Conv1D needs no special case here), and a SLoRB branch is re-attached with the unpacked masks.
hf: a stock ``from_pretrained``. Both verify every file's sha256 first.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from semisparse import rundir
from semisparse.errors import UserError, first_line
from semisparse.export.format import FORMAT_NAMES, verify
from semisparse.export.pack import unpack_layer
from semisparse.export.packed import POSITIONS, SCALES, VALUES
from semisparse.export.quant import dequantize
from semisparse.export.source import quiet_transformers
from semisparse.export.writer import TORCH_DTYPES
from semisparse.layers import weight_matrix
from semisparse.masks import Pattern


def _config(manifest: dict):
    from transformers import CONFIG_MAPPING

    data = dict(manifest.get("model_config") or {})
    if data.get("model_type") not in CONFIG_MAPPING:
        raise UserError(f"the exported model type {data.get('model_type')!r} is unknown to this transformers")
    return CONFIG_MAPPING[data["model_type"]].from_dict(data)


def _skeleton(config, dtype: torch.dtype):
    """The model with no (wasted) random init: every weight is overwritten below."""
    from transformers import AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - other transformers versions: plain (slower) init
        no_init_weights = contextlib.nullcontext
    with no_init_weights():
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _unpack(tensors: dict, name: str, record: dict, pattern: Pattern, quant: str) -> tuple[torch.Tensor, torch.Tensor]:
    shape = tuple(record["shape"])
    values = tensors.pop(f"{name}.{VALUES}")
    positions = tensors.pop(f"{name}.{POSITIONS}")
    if quant != "none":
        values = dequantize(values, tensors.pop(f"{name}.{SCALES}"), quant, record["group_size"],
                            (shape[0], record["width"]))
    return unpack_layer(values, positions, pattern, shape)


def _load_packed(path: Path, manifest: dict, dtype: torch.dtype):
    from safetensors.torch import load_file

    from semisparse.train.sparse_linear import SLORB_S, SLORB_X, attach_slorb

    tensors = load_file(str(path / rundir.PACKED_WEIGHTS))
    pattern = Pattern.parse(manifest["pattern"])
    quant = manifest["quantization"]["scheme"]
    model = _skeleton(_config(manifest), dtype)
    modules = dict(model.named_modules())
    sparse = {}
    for name, record in manifest["layers"].items():
        if name not in modules:
            raise ValueError(f"the model has no layer {name}")
        sparse[name] = _unpack(tensors, name, record, pattern, quant)
    slorb = {k: tensors.pop(k) for k in list(tensors) if k.rpartition(".")[2] in (SLORB_S, SLORB_X)}
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tensors.items()}
    for alias, stored in manifest.get("tied", {}).items():
        state[alias] = state[stored]
    result = model.load_state_dict(state, strict=False)
    missing = set(result.missing_keys) - {f"{name}.weight" for name in sparse}
    if missing or result.unexpected_keys:
        raise ValueError(f"tensors do not match the model config (missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(result.unexpected_keys)[:3]})")
    with torch.no_grad():
        for name, (dense, _mask) in sparse.items():
            weight_matrix(modules[name]).copy_(dense.to(dtype))
    model.tie_weights()
    if slorb:
        attach_slorb(model, slorb, pattern, masks={name: mask for name, (_d, mask) in sparse.items()})
    return model


def load_export(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """(model, tokenizer, manifest) of an exported folder; ``dtype`` None: the export dtype."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    path = Path(path)
    manifest = verify(path)
    dtype = dtype or TORCH_DTYPES.get(manifest.get("dtype"), torch.float32)
    try:
        if manifest["format"] == FORMAT_NAMES["hf"]:
            with quiet_transformers():
                model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        else:
            model = _load_packed(path, manifest, dtype)
            if (path / "generation_config.json").is_file():
                model.generation_config = GenerationConfig.from_pretrained(path)
            model.config.name_or_path = str(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (KeyError, ValueError, TypeError, OSError) as exc:
        first = first_line(exc)
        raise UserError(f"cannot load the exported model {path}: {first}") from exc
    return model.to(device).eval(), tokenizer, manifest

"""Rebuild the transformers model from an exported folder (``semisparse.load``, ``models.load_model``).

Packed: the model is built from the manifest's config without random init, the dense tensors are loaded, every
sparse layer is unpacked (de-quantized first) into its weight through ``layers.weight_matrix`` (so GPT-2's
transposed Conv1D needs no special case here), and a SLoRB branch is re-attached with the unpacked masks.
hf: a stock ``from_pretrained``. Both verify every file's sha256 first. ``backend="cpu"`` then swaps an int8/int4
export's sparse layers for torch's weight-only CPU kernels where they measure faster (export/cpu_backend.py);
``backend="semi-structured"`` swaps a packed 2:4 export's layers for torch's semi-structured sparse CUDA kernels
where they measure faster and agree on a probe (export/cuda_backend.py).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from semisparse import rundir
from semisparse.errors import UserError, first_line
from semisparse.export.format import FORMAT_NAMES, verify
from semisparse.export.options import BACKENDS  # noqa: F401 - the choices, here too for benchmarks/gpu_suite.py
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


def _quantized(tensors: dict, name: str, record: dict):
    """The layer's stored codes, scales and positions, for the cpu backend (before ``_unpack`` pops them)."""
    from semisparse.export.cpu_backend import QuantizedLayer

    return QuantizedLayer(codes=tensors[f"{name}.{VALUES}"], scales=tensors[f"{name}.{SCALES}"],
                          positions=tensors[f"{name}.{POSITIONS}"], shape=tuple(record["shape"]),
                          width=record["width"], group_size=record["group_size"])


def _load_packed(path: Path, manifest: dict, dtype: torch.dtype, keep_quantized: bool = False):
    """The model; with ``keep_quantized`` (model, {layer: QuantizedLayer}) of a quantized export."""
    from safetensors.torch import load_file

    from semisparse.train.sparse_linear import SLORB_S, SLORB_X, attach_slorb

    tensors = load_file(str(path / rundir.PACKED_WEIGHTS))
    pattern = Pattern.parse(manifest["pattern"])
    quant = manifest["quantization"]["scheme"]
    model = _skeleton(_config(manifest), dtype)
    modules = dict(model.named_modules())
    sparse, quantized = {}, {}
    for name, record in manifest["layers"].items():
        if name not in modules:
            raise ValueError(f"the model has no layer {name}")
        if keep_quantized:
            quantized[name] = _quantized(tensors, name, record)
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
    return (model, quantized) if keep_quantized else model


def check_cpu_backend(path: Path, manifest: dict, device: torch.device) -> str:
    """The export's quantization scheme, when the cpu backend can run it; else a one-line UserError."""
    if torch.device(device).type != "cpu":
        raise UserError(f"--backend cpu runs on the CPU (got device {device}): use --device cpu")
    scheme = (manifest.get("quantization") or {}).get("scheme", "none")
    if manifest["format"] != FORMAT_NAMES["packed"] or scheme not in ("int8", "int4"):
        hf = manifest["format"] == FORMAT_NAMES["hf"]
        what = "an hf export" if hf else f"not quantized ({manifest.get('dtype')})"
        raise UserError(f"--backend cpu runs int8/int4 packed exports through torch's weight-only kernels; {path} is "
                        f"{what}: export it with --quant int8 or int4, or leave --backend out for the float path")
    return scheme


def check_semi_structured_backend(path: Path, manifest: dict) -> None:
    """A one-line UserError for an export the semi-structured backend cannot read (an hf folder: no layer list).

    Not an error: no CUDA, or a pattern other than 2:4; the backend then says why and runs the float path."""
    if manifest["format"] != FORMAT_NAMES["packed"]:
        raise UserError(f"--backend semi-structured runs a packed export's 2:4 layers; {path} is an hf export: "
                        f"export it with --format packed, or leave --backend out for the float path")


def load_export(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                backend: str | None = None, measure=None, lm_head: str = "float"):
    """(model, tokenizer, manifest) of an exported folder; ``dtype`` None: the export dtype.

    ``backend`` "cpu" (int8/int4 packed exports, on the CPU): sparse layers through torch's weight-only kernels
    where a short measurement (``measure``: a cpu_backend.Measure) finds them not slower; ``dtype`` None there means
    bf16 on a CPU with native bf16, else float32; ``lm_head`` "int8" also quantizes the (float) LM head at load and
    runs it through the int8 kernel where that measures not slower. The choice is printed and kept as
    ``model.semisparse_backend``.
    ``backend`` "semi-structured" (packed exports): 2:4 layers through torch's semi-structured CUDA kernels where a
    short measurement (``measure``: a cuda_backend.Measure) finds them faster and a probe finds them equal; ``dtype``
    None there means the export dtype (bf16 for a float32 export). Without CUDA or for a pattern other than 2:4 it
    prints one line saying why and runs the float path, the record saying the same."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from semisparse.export.options import check_backend, check_lm_head

    path = Path(path)
    backend = check_backend(backend)
    check_lm_head(lm_head, backend)
    manifest = verify(path)
    scheme = check_cpu_backend(path, manifest, device) if backend == "cpu" else None
    if scheme is not None:
        from semisparse.export.cpu_backend import activation_dtype, kernel_dtype

        kernel_dt = kernel_dtype(dtype)
        dtype, dtype_reason = activation_dtype(dtype)
    if backend == "semi-structured":
        from semisparse.export import cuda_backend

        check_semi_structured_backend(path, manifest)
        why_not = cuda_backend.unavailable(device, Pattern.parse(manifest["pattern"]))
        dtype, dtype_reason = cuda_backend.activation_dtype(dtype, manifest.get("dtype"), why_not is None)
    dtype = dtype or TORCH_DTYPES.get(manifest.get("dtype"), torch.float32)
    try:
        if manifest["format"] == FORMAT_NAMES["hf"]:
            with quiet_transformers():
                model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        elif scheme is not None:
            from semisparse.export.cpu_backend import apply_cpu_backend

            model, quantized = _load_packed(path, manifest, dtype, keep_quantized=True)
            model.semisparse_backend = apply_cpu_backend(model, quantized, Pattern.parse(manifest["pattern"]),
                                                         scheme, dtype, dtype_reason, measure, lm_head, kernel_dt)
        else:
            model = _load_packed(path, manifest, dtype)
        if manifest["format"] != FORMAT_NAMES["hf"]:  # what from_pretrained gives an hf folder, for every backend
            if (path / "generation_config.json").is_file():
                model.generation_config = GenerationConfig.from_pretrained(path)
            model.config.name_or_path = str(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (KeyError, ValueError, TypeError, OSError) as exc:
        first = first_line(exc)
        raise UserError(f"cannot load the exported model {path}: {first}") from exc
    model = model.to(device).eval()
    if backend == "semi-structured":  # on the device: the conversion runs there
        layers = {name: tuple(record["shape"]) for name, record in manifest["layers"].items()}
        model.semisparse_backend = cuda_backend.apply_semi_structured(model, layers, dtype, dtype_reason, why_not,
                                                                      measure)
    return model, tokenizer, manifest

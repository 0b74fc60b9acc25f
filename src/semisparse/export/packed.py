"""The packed tensors of a model and their byte accounting (written to PACKED_WEIGHTS by writer.py).

Tensor names in the file (``L`` a sparse layer's qualified name)::

    L.weight.values     [out, k] in the export dtype (k = in*N/M), or int8 [out, k] (int8), or
                        uint8 [ceil(out*k/2)] (int4, two codes per byte)
    L.weight.positions  uint8 [ceil(out*k*b/8)], b = ceil(log2 M) bits per kept value (pack.py)
    L.weight.scales     int8: [out]; int4: [out, k/g] in the export dtype (quantized layers only)
    L.slorb_S, L.slorb_X  the SLoRB branch (export dtype), when the run has one
    any other name      a tensor of the model's state dict, floating ones in the export dtype

A tensor stored under two names (tied embeddings) is written once; the manifest's ``tied`` maps the alias to it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from semisparse.export import quant as q
from semisparse.export.pack import compact_width, pack_layer, position_bits
from semisparse.export.source import Source
from semisparse.layers import weight_matrix

VALUES, POSITIONS, SCALES = "weight.values", "weight.positions", "weight.scales"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class PackedModel:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    layers: dict[str, dict] = field(default_factory=dict)  # per sparse layer: shape, width, group size, bytes
    tied: dict[str, str] = field(default_factory=dict)  # alias -> stored name
    sizes: dict = field(default_factory=dict)


def dense_state(model: torch.nn.Module, skip: set[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict minus ``skip``, each storage once: ({name: tensor}, {alias: name it shares storage with})."""
    tensors, tied, seen = {}, {}, {}
    for name, tensor in model.state_dict().items():
        if name in skip:
            continue
        key = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        if tensor.numel() and key in seen:
            tied[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = tensor
    return tensors, tied


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def pack_model(source: Source, dtype: torch.dtype, quant: str, group_size: int | None,
               quantized: dict[str, q.Quantized] | None = None) -> PackedModel:
    """Pack every sparse layer of ``source``; every other tensor as it is (floating ones cast to ``dtype``).

    ``quantized``: codes and scales already chosen per layer (GPTQ, export/gptq.py); else RTN here."""
    pattern = source.pattern
    # Group sizes first: a size that does not divide some layer is one error before any work.
    widths = {name: compact_width(weight_matrix(m).shape[1], pattern) for name, m in source.modules.items()}
    groups = {name: q.layer_group_size(name, w, group_size) for name, w in widths.items()} if quant == "int4" else {}
    out = PackedModel()
    sparse = {"count": 0, "weights": 0, "kept": 0, "values_bytes": 0, "positions_bytes": 0, "scales_bytes": 0}
    for name, module in source.modules.items():
        weight = weight_matrix(module)
        packed = pack_layer(weight, source.masks[name], pattern)
        scales = None
        if quant == "none":
            values = packed.values.to(dtype)
            g = None
        else:
            res = quantized[name] if quantized else q.quantize(packed.values, quant, groups.get(name), dtype)
            values, scales, g = res.codes, res.scales, res.group_size
        out.tensors[f"{name}.{VALUES}"] = values
        out.tensors[f"{name}.{POSITIONS}"] = packed.positions
        if scales is not None:
            out.tensors[f"{name}.{SCALES}"] = scales
        rec_bytes = {"values": _nbytes(values), "positions": _nbytes(packed.positions),
                     "scales": _nbytes(scales) if scales is not None else 0}
        out.layers[name] = {"shape": list(weight.shape), "width": widths[name], "group_size": g,
                            "bytes": rec_bytes}
        sparse["count"] += 1
        sparse["weights"] += weight.numel()
        sparse["kept"] += packed.values.numel()
        for part in ("values", "positions", "scales"):
            sparse[f"{part}_bytes"] += rec_bytes[part]
    sparse["bytes"] = sparse["values_bytes"] + sparse["positions_bytes"] + sparse["scales_bytes"]

    dense, out.tied = dense_state(source.model, {f"{name}.weight" for name in source.modules})
    dense_rec = {"count": 0, "entries": 0, "bytes": 0}
    for name, tensor in dense.items():
        t = tensor.to(dtype) if tensor.is_floating_point() else tensor
        out.tensors[name] = t.contiguous()
        dense_rec["count"] += 1
        dense_rec["entries"] += t.numel()
        dense_rec["bytes"] += _nbytes(t)
    slorb_rec = {"entries": 0, "bytes": 0}
    for name, tensor in source.slorb.items():
        t = tensor.to(dtype).contiguous()
        out.tensors[name] = t
        slorb_rec["entries"] += t.numel()
        slorb_rec["bytes"] += _nbytes(t)
    out.sizes = {"sparse_layers": sparse, "dense_tensors": dense_rec, "slorb": slorb_rec,
                 "position_bits": position_bits(pattern.m),
                 "tensor_bytes": sparse["bytes"] + dense_rec["bytes"] + slorb_rec["bytes"]}
    return out

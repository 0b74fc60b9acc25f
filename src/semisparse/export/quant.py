"""Weight-only symmetric round-to-nearest (RTN) quantization of a layer's kept values [out, k].

    int8  one scale per output row:               s = max|v_row| / 127,  q = clamp(round(v / s), -127, 127)
    int4  one scale per group of g along k:       s = max|v_group| / 7,  q = clamp(round(v / s), -7, 7)
          stored two per byte as q + 8 (row-major, low nibble first: pack.pack_bits)

The scale is rounded to the storage dtype *before* the codes are computed, so v ≈ q · s_stored holds with the very
scale the loader reads (error ≤ s_stored / 2 per element). An all-zero row/group gets s = 1 (all codes 0).
GPTQ (export/gptq.py) uses the same grid and scale rule, choosing codes with error compensation instead;
``encode`` stores its codes the way ``quantize`` does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from semisparse.errors import UserError
from semisparse.export.options import GROUP_SIZES
from semisparse.export.pack import pack_bits, unpack_bits

BITS = {"int8": 8, "int4": 4}
QMAX = {8: 127, 4: 7}
_INT4_OFFSET = 8


@dataclass
class Quantized:
    codes: torch.Tensor  # int8 [out, k] | uint8 [ceil(out * k / 2)] (int4, two per byte, row-major)
    scales: torch.Tensor  # [out] (int8) | [out, k/g] (int4), the storage dtype
    group_size: int  # k for int8


def default_group_size(width: int) -> int | None:
    """The largest of GROUP_SIZES dividing ``width`` (None if none does)."""
    return next((g for g in GROUP_SIZES if width % g == 0), None)


def layer_group_size(name: str, width: int, requested: int | None) -> int:
    """The int4 group size of one layer; a one-line UserError naming the layer when it does not divide."""
    if requested is None:
        g = default_group_size(width)
        if g is None:
            raise UserError(f"layer {name}: its compacted width {width} is not a multiple of any of "
                            f"{', '.join(map(str, GROUP_SIZES))}: give --group-size dividing {width}")
        return g
    if width % requested:
        raise UserError(f"layer {name}: --group-size {requested} does not divide its compacted width {width}")
    return requested


def quantize(values: torch.Tensor, scheme: str, group_size: int | None, scale_dtype: torch.dtype) -> Quantized:
    """RTN codes and scales of ``values`` [out, k] (see the module docstring); ``group_size`` for int4 only."""
    bits = BITS[scheme]
    qmax = QMAX[bits]
    out_f, width = values.shape
    g = width if bits == 8 else group_size
    if g is None or g <= 0 or width % g:
        raise ValueError(f"group size {g} does not divide the width {width}")
    v = values.detach().to(torch.float32).reshape(out_f, width // g, g)
    amax = v.abs().amax(-1, keepdim=True)
    scales = torch.where(amax > 0, amax / qmax, torch.ones_like(amax)).to(scale_dtype)
    s = scales.to(torch.float32)
    # A scale that underflows the storage dtype (|v| ~ 1e-9 in fp16) leaves its codes at 0 instead of dividing by 0.
    q = torch.where(s > 0, torch.round(v / torch.where(s > 0, s, 1.0)), 0.0).clamp(-qmax, qmax).reshape(out_f, width)
    scales = scales.reshape(out_f) if bits == 8 else scales.reshape(out_f, width // g)
    if bits == 8:
        codes = q.to(torch.int8)
    else:
        codes = pack_bits(q.to(torch.int64) + _INT4_OFFSET, 4)
    return Quantized(codes=codes.contiguous(), scales=scales.contiguous(), group_size=g)


def encode(q: torch.Tensor, scheme: str) -> torch.Tensor:
    """Integer codes ``q`` [out, k] (within ±QMAX) in ``quantize``'s storage: int8 [out, k] | packed uint8 (int4)."""
    if BITS[scheme] == 8:
        return q.to(torch.int8).contiguous()
    return pack_bits(q.to(torch.int64) + _INT4_OFFSET, 4)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, scheme: str, group_size: int,
               shape: tuple[int, int]) -> torch.Tensor:
    """float32 values [out, k] = q · s."""
    out_f, width = shape
    if BITS[scheme] == 8:
        q = codes.to(torch.float32)
    else:
        q = (unpack_bits(codes, 4, out_f * width) - _INT4_OFFSET).to(torch.float32)
    s = scales.to(torch.float32).reshape(out_f, -1, 1)
    return (q.reshape(out_f, width // group_size, group_size) * s).reshape(out_f, width)

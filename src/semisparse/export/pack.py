"""One sparse layer <-> its packed form (pure tensor functions, no files).

A layer's [out, in] weight under an N:M mask becomes

    values     [out, in*N/M]   the kept weights, row by row, groups in order, positions ascending in each group
    positions  uint8 [ceil(out * in*N/M * b / 8)]   each kept weight's index inside its group of M, b bits each
               (b = ceil(log2 M)), as one little-endian bit stream: code i occupies bits i*b .. i*b+b-1

Positions come from the mask, never from the non-zeros: a kept weight may be exactly 0.0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from semisparse.masks import Pattern, is_nm


def position_bits(m: int) -> int:
    """Bits per in-group position: ceil(log2 M) (at least 1)."""
    return max(1, (m - 1).bit_length())


def compact_width(in_features: int, pattern: Pattern) -> int:
    """Kept weights per row: in * N / M."""
    return in_features // pattern.m * pattern.n


def positions_nbytes(out_features: int, in_features: int, pattern: Pattern) -> int:
    return -(-out_features * compact_width(in_features, pattern) * position_bits(pattern.m) // 8)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes (< 2**bits, bits <= 8) -> uint8 bit stream of ceil(len * bits / 8) bytes."""
    if not 1 <= bits <= 8:
        raise ValueError(f"cannot pack {bits}-bit codes")
    flat = codes.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(f"codes do not fit in {bits} bits")
    stream = ((flat[:, None] >> torch.arange(bits)) & 1).reshape(-1)
    stream = torch.cat([stream, stream.new_zeros(-stream.numel() % 8)])
    return (stream.reshape(-1, 8) << torch.arange(8)).sum(-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: the first ``count`` codes (int64)."""
    if packed.dtype != torch.uint8 or packed.numel() * 8 < count * bits:
        raise ValueError(f"{packed.numel()} bytes cannot hold {count} codes of {bits} bits")
    stream = ((packed.reshape(-1).to(torch.int64)[:, None] >> torch.arange(8)) & 1).reshape(-1)
    return (stream[: count * bits].reshape(count, bits) << torch.arange(bits)).sum(-1)


@dataclass
class PackedLayer:
    values: torch.Tensor  # [out, in*N/M], the weight's dtype
    positions: torch.Tensor  # uint8 bit stream


def pack_layer(weight: torch.Tensor, mask: torch.Tensor, pattern: Pattern | str) -> PackedLayer:
    """The kept values and bit-packed positions of ``weight`` [out, in] under the N:M ``mask``."""
    pattern = Pattern.parse(pattern)
    if weight.dim() != 2 or mask.shape != weight.shape:
        raise ValueError(f"weight {tuple(weight.shape)} and mask {tuple(mask.shape)} must be one [out, in] shape")
    if not is_nm(mask, pattern):
        raise ValueError(f"mask is not {pattern}")
    out_f, in_f = weight.shape
    width = compact_width(in_f, pattern)
    weight, mask = weight.cpu(), mask.cpu()
    # Boolean indexing and nonzero() both walk row-major: value j of a row is the j-th True of its mask row.
    values = weight[mask].reshape(out_f, width)
    codes = mask.reshape(out_f, in_f // pattern.m, pattern.m).nonzero()[:, 2]
    return PackedLayer(values=values.contiguous(), positions=pack_bits(codes, position_bits(pattern.m)))


def unpack_layer(values: torch.Tensor, positions: torch.Tensor, pattern: Pattern | str,
                 shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(dense weight [out, in] with zeros where pruned, bool mask) from ``pack_layer``'s output.

    Raises ValueError when the positions are not a valid N:M layout (a corrupt file)."""
    pattern = Pattern.parse(pattern)
    out_f, in_f = shape
    groups, n, m = in_f // pattern.m, pattern.n, pattern.m
    if in_f % m or tuple(values.shape) != (out_f, groups * n):
        raise ValueError(f"values {tuple(values.shape)} do not fit a {pattern} layer of shape {tuple(shape)}")
    codes = unpack_bits(positions, position_bits(m), out_f * groups * n).reshape(out_f, groups, n)
    if bool((codes >= m).any()) or (n > 1 and not bool((codes[..., 1:] > codes[..., :-1]).all())):
        raise ValueError("positions are not ascending in-group indices below M")
    dense = torch.zeros(out_f, groups, m, dtype=values.dtype)
    dense.scatter_(-1, codes, values.reshape(out_f, groups, n))
    mask = torch.zeros(out_f, groups, m, dtype=torch.bool)
    mask.scatter_(-1, codes, True)
    return dense.reshape(out_f, in_f), mask.reshape(out_f, in_f)

"""GPTQ (Frantar et al. 2023) for the kept values of N:M layers: ``--quant-method gptq``.

Columns of the dense [out, in] weight are quantized in order; each column's rounding error, scaled by the upper
Cholesky factor of the dampened inverse Hessian (H = 2/n Σ x xᵀ of the layer's calibration inputs), is spread onto
the columns not yet quantized, with lazy block updates. Only kept weights get codes: a pruned entry's target is 0,
exactly as in SparseGPT's joint sparsify-and-quantize sweep. It may carry compensation from earlier columns until
its own column is reached; there it becomes exactly 0 and what it carried is passed on as error, like a rounding
error. So the output keeps the N:M pattern (and the packed format), and the compensation is the optimal (OBS) one.
Dropping the updates of pruned entries instead (masking them out) is not (the update is only optimal when every
not-yet-quantized entry may move): on random 2:4 layers it measured 0-7 % below RTN's output error, at times above
it, against 8-12 % below for this sweep.

The grid is RTN's (quant.py): int8 one scale per output row, from the kept values before any update (GPTQ's
per-channel scales); int4 one scale per group of g kept values, which for N:M with N dividing g spans g·M/N
dense columns in every row, computed (by quant.quantize, same rule and storage rounding) from the group's values as
updated when its first column is reached (GPTQ's default, non-static groups). Lazy blocks are whole groups, so
that moment sees every earlier column's compensation: the result equals the plain column-by-column algorithm.

Statistics, damping and the Cholesky factor are SparseGPT's (prune/sparsegpt.py); the model is calibrated block by
block by the pruning driver (prune/calibrate.py), each block's inputs coming from the already-quantized blocks.
"""

from __future__ import annotations

import re

import torch

from semisparse.errors import UserError
from semisparse.export import quant as q
from semisparse.layers import LayerFilter, find_blocks, weight_matrix
from semisparse.masks import Pattern
from semisparse.prune.sparsegpt import SparseGPT, dampened_inverse_cholesky

BLOCKSIZE = 128
PERCDAMP = 0.01


def gptq_quantize(weight: torch.Tensor, mask: torch.Tensor, hessian: torch.Tensor, pattern: Pattern, scheme: str,
                  group_size: int | None, scale_dtype: torch.dtype, blocksize: int = BLOCKSIZE,
                  percdamp: float = PERCDAMP, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, q.Quantized]:
    """GPTQ of the kept values of ``weight`` [out, in] under ``mask`` given H [in, in].

    Returns (the de-quantized dense weight, zeros where pruned, float32; the stored codes and scales of the kept
    values, as quant.quantize lays them out). Inputs are not modified."""
    bits = q.BITS[scheme]
    qmax = q.QMAX[bits]
    out_f, cols = weight.shape
    width = cols // pattern.m * pattern.n
    keep = mask.to(weight.device)
    keep_f = keep.to(dtype)
    W = weight.detach().to(dtype).clone() * keep_f
    Hinv = dampened_inverse_cholesky(hessian.detach().to(dtype).clone(), W, percdamp)
    if bits == 8:
        span, g = cols, width  # one scale per row, from the kept values before any compensation
        row_scales = q.quantize(W[keep].reshape(out_f, width).cpu(), scheme, None, scale_dtype).scales
        scales = row_scales.reshape(out_f, 1)
    else:
        if group_size is None or group_size % pattern.n or width % group_size:
            raise ValueError(f"int4 groups of {group_size} kept values must divide {width} and be a multiple of N")
        g = group_size
        span = g * pattern.m // pattern.n  # dense columns of one group, the same in every row
        scales = torch.empty(out_f, width // g, dtype=scale_dtype)
        blocksize = max(span, blocksize - blocksize % span)  # whole groups per lazy block
    codes = torch.zeros(out_f, cols, dtype=dtype, device=W.device)
    s = scales[:, :1].to(W.device, dtype)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        keep1 = keep[:, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if bits == 4 and col % span == 0:  # this group's scale, from its values as compensated so far
                group = W1[:, i : i + span][keep[:, col : col + span]].reshape(out_f, g).cpu()
                scales[:, col // span] = q.quantize(group, scheme, g, scale_dtype).scales.reshape(out_f)
                s = scales[:, col // span : col // span + 1].to(W.device, dtype)
            w = W1[:, i : i + 1]
            # quant.quantize's rounding; a scale that underflowed the storage dtype gives code 0.
            c = torch.where(s > 0, torch.round(w / torch.where(s > 0, s, 1.0)), 0.0).clamp(-qmax, qmax)
            c = c * keep1[:, i : i + 1]  # a pruned entry's code is 0, whatever it carries
            err = (w - c * s) / Hinv1[i, i]
            W1[:, i:] -= err @ Hinv1[i : i + 1, i:]
            codes[:, col] = c[:, 0]
            Err1[:, i] = err[:, 0]
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    kept_codes = codes[keep].reshape(out_f, width).cpu()
    scales = scales.reshape(out_f) if bits == 8 else scales  # quant.quantize's shapes: [out] | [out, k/g]
    result = q.Quantized(codes=q.encode(kept_codes, scheme), scales=scales.contiguous(), group_size=g)
    values = q.dequantize(result.codes, result.scales, scheme, g, (out_f, width))
    dense = torch.zeros(out_f, cols, dtype=torch.float32)
    dense[keep.cpu()] = values.reshape(-1)
    return dense, result


class GPTQCalibration(SparseGPT):
    """The pruning driver's method protocol, quantizing instead of pruning: SparseGPT's Hessian statistics; ``prune``
    replaces a layer's weight by its GPTQ de-quantized weight (so later blocks calibrate on the quantized model),
    keeps the codes in ``results`` and returns the layer's mask unchanged."""

    name = "gptq"

    def __init__(self, modules: dict, masks: dict, pattern: Pattern, scheme: str, groups: dict,
                 scale_dtype: torch.dtype, blocksize: int = BLOCKSIZE, percdamp: float = PERCDAMP):
        super().__init__(blocksize, percdamp)
        # The driver hands ``prune`` a layer's weight only: find the layer by its storage.
        self._names = {weight_matrix(m).data_ptr(): name for name, m in modules.items()}
        self.masks, self.pattern, self.scheme, self.groups, self.scale_dtype = masks, pattern, scheme, groups, scale_dtype
        self.results: dict[str, q.Quantized] = {}

    def prune(self, weight: torch.Tensor, stats: dict, pattern: Pattern) -> torch.Tensor:
        name = self._names[weight.data_ptr()]
        mask = self.masks[name]
        dense, self.results[name] = gptq_quantize(
            weight, mask, self.hessian(stats).to(weight.device), self.pattern, self.scheme, self.groups.get(name),
            self.scale_dtype, self.blocksize, self.percdamp)
        weight.copy_(dense.to(weight.device, weight.dtype))
        return mask


def check_inside_blocks(model: torch.nn.Module, names) -> None:
    """GPTQ calibrates the decoder blocks one by one: a sparse layer outside them is one line."""
    prefix = find_blocks(model)[0] + "."
    outside = [n for n in names if not n.startswith(prefix)]
    if outside:
        raise UserError(f"--quant-method gptq calibrates layers inside the decoder blocks only; not: "
                        f"{', '.join(outside)} (use --quant-method rtn)")


@torch.no_grad()
def gptq_model(source, scheme: str, groups: dict, scale_dtype: torch.dtype, windows: torch.Tensor,
               device: torch.device, progress: bool = True) -> dict[str, q.Quantized]:
    """GPTQ of every sparse layer of ``source`` (export/source.py) on calibration ``windows`` [nsamples, seqlen].

    Leaves the source model's sparse weights de-quantized (and the model on the CPU); returns {layer: codes}."""
    from semisparse.prune.calibrate import prune_model

    check_inside_blocks(source.model, source.modules)
    only_sparse = LayerFilter(include=[f"^{re.escape(n)}$" for n in source.modules], exclude=[])
    source.model.to(device)
    try:  # built after the move: it finds layers by their weights' storage
        method = GPTQCalibration(source.modules, source.masks, source.pattern, scheme, groups, scale_dtype)
        prune_model(source.model, method, source.pattern, windows, only_sparse, device=device, progress=progress)
    finally:
        source.model.to("cpu")
    return method.results

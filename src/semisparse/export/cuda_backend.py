"""``backend="semi-structured"``: an export's 2:4 layers through PyTorch's semi-structured sparse CUDA kernels.

Each chosen layer's weight ``[out, in]`` (de-quantized, in the activation dtype, zeros where pruned) goes through
``torch.sparse.to_sparse_semi_structured`` once at load (torch 2.13: cuSPARSELt, or CUTLASS when
``SparseSemiStructuredTensor._FORCE_CUTLASS`` is set), and the layer computes ``F.linear(x, W_sparse, b)``.

What torch takes (torch/sparse/semi_structured.py, 2.13):

- **dtypes**: fp16 and bf16 activations. The int8 kernels multiply int8 activations by int8 weights (cuSPARSELt's
  ``_mm`` raises for mixed dtypes), so there is no weight-only int8 path: an int8/int4 export is de-quantized to
  fp16/bf16 first, as the float path does, and its pruned zeros stay exactly 0.
- **weight shapes**: ``out`` and ``in`` multiples of the class's ``sparse_min_rows`` / ``sparse_min_cols`` for the
  dtype (cuSPARSELt fp16/bf16: 16 and 16; CUTLASS: 32 and 64); other layers stay dense.
- **the dense operand** (``tokens × in``): torch pads it itself. There is no ``_pad_dense_input`` in 2.13; the
  custom ops ``semi_structured::cusparselt_mm`` / ``cutlass_mm`` pad rows and columns to ``dense_min_rows`` /
  ``dense_min_cols`` (8 and 8 for fp16/bf16) and narrow the result back, so any token count runs (``in`` is
  already a multiple, the weight's constraint being stricter).

Per layer: a shape torch does not take, a SLoRB layer, a converted layer whose output on a probe input differs from
the dense layer's by more than ``PROBE_RTOL``, or a sparse matmul that does not measure faster than the dense one at
every measured token count keeps the dense layer. Layers of one shape share a timing; every layer is probed.
"""

from __future__ import annotations

import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from semisparse.errors import UserError, first_line
from semisparse.export.cpu_backend import Timer, layer_lines, median_seconds
from semisparse.layers import weight_matrix
from semisparse.masks import Pattern

NAME = "semi-structured"
#: Max |sparse − dense| / max |dense| on a probe input above this is a kernel or conversion fault. Both products
#: accumulate in float32 and round the output to the activation dtype (fp16 ulp ~1e-3, bf16 ~8e-3), so a 10x
#: margin; a wrong layout or metadata gives errors of order 1. Not measured on a GPU in this tree's tests.
PROBE_RTOL = {torch.float16: 1e-2, torch.bfloat16: 3e-2}
#: Decode at batch 1 and 8, and a 512-token prefill (bench's default).
DEFAULT_TOKENS = (1, 8, 512)
IMPL_NAMES = {"cusparselt": "cuSPARSELt", "cutlass": "CUTLASS"}

Converter = Callable[[torch.Tensor], torch.Tensor]


# ------------------------------------------------------------------------------------------ availability, dtype


def sparse_class() -> type:
    """The subclass ``to_sparse_semi_structured`` builds (its shape constraints are the ones that apply)."""
    base = torch.sparse.SparseSemiStructuredTensor
    return torch.sparse.SparseSemiStructuredTensorCUTLASS if base._FORCE_CUTLASS else \
        torch.sparse.SparseSemiStructuredTensorCUSPARSELT


def impl_name() -> str:
    return IMPL_NAMES.get(sparse_class().BACKEND, sparse_class().BACKEND)


def device_unavailable(device: str | torch.device) -> str | None:
    """Why this device cannot run the kernels (None: it can)."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"it needs a CUDA GPU (the device is {device.type})"
    if not torch.cuda.is_available():
        return "this torch has no CUDA"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 0):
        return f"2:4 sparse tensor cores need compute capability 8.0 (Ampere) or newer; this GPU is {major}.{minor}"
    if sparse_class().BACKEND == "cusparselt" and not torch.backends.cusparselt.is_available():
        return "this torch build has no cuSPARSELt (torch.backends.cusparselt.is_available() is False)"
    return None


def unavailable(device: str | torch.device, pattern: Pattern) -> str | None:
    """Why the backend cannot run this export here (None: it can); the pattern first, since no device fixes it."""
    if (pattern.n, pattern.m) != (2, 4):
        return f"the export's pattern is {pattern}; the semi-structured kernels run 2:4 only"
    return device_unavailable(device)


def activation_dtype(requested: torch.dtype | None, export_dtype: str | None, available: bool
                     ) -> tuple[torch.dtype, str]:
    """(dtype the model computes in, why): the export dtype where it is fp16/bf16 (or the backend runs dense)."""
    from semisparse.export.writer import TORCH_DTYPES

    if requested is not None:
        if requested not in PROBE_RTOL:
            raise UserError(f"the semi-structured backend computes in float16 or bfloat16, not {requested}")
        return requested, "asked for"
    stored = TORCH_DTYPES.get(export_dtype, torch.float32)
    if stored in PROBE_RTOL:
        return stored, "the export dtype"
    if not available:
        return stored, "the export dtype (the backend is unavailable)"
    return torch.bfloat16, f"the export is {export_dtype}; the sparse kernels take fp16 or bf16 (bf16 keeps its range)"


def unsupported(shape: tuple[int, int], dtype: torch.dtype) -> str | None:
    """Why torch's kernels do not take a weight of this shape and dtype (None: they do)."""
    constraints = sparse_class()._DTYPE_SHAPE_CONSTRAINTS.get(dtype)
    if constraints is None:
        return f"{impl_name()} has no {dtype} kernel"
    rows, cols = constraints.sparse_min_rows, constraints.sparse_min_cols
    need = f"({impl_name()}'s {str(dtype).removeprefix('torch.')} kernels need multiples of {rows} and {cols})"
    if shape[0] % rows:
        return f"out_features {shape[0]} is not a multiple of {rows} {need}"
    if shape[1] % cols:
        return f"in_features {shape[1]} is not a multiple of {cols} {need}"
    return None


# ------------------------------------------------------------------------------------------ the layer


def to_semi_structured(weight: torch.Tensor) -> torch.Tensor:
    """torch's conversion, without its once-per-process "prototype stage" warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*SparseSemiStructuredTensor is in prototype stage.*")
        return torch.sparse.to_sparse_semi_structured(weight)


class SemiStructuredLinear(nn.Module):
    """y = x Wᵀ + b with W a converted (compressed 2:4) weight; x of any leading shape."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, out_features: int, in_features: int):
        super().__init__()
        # a plain attribute, not a parameter: Module.to would copy it, and torch's subclass only moves to the CPU
        self.sparse_weight = weight
        self.out_features, self.in_features = out_features, in_features
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        # 2-D and contiguous: torch's semi-structured linear views the input as [-1, in]
        y = F.linear(x.reshape(-1, self.in_features).contiguous(), self.sparse_weight, self.bias)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, 2:4 semi-structured"


def sparse_layer(module: nn.Module, convert: Converter) -> SemiStructuredLinear:
    weight = weight_matrix(module).detach().contiguous()  # [out, in] (a copy for GPT-2's transposed Conv1D)
    bias = getattr(module, "bias", None)
    bias = None if bias is None else bias.detach().clone()
    return SemiStructuredLinear(convert(weight), bias, *weight.shape)


# ------------------------------------------------------------------------------------------ the choice


def cuda_median_seconds(path: str, shape: tuple[int, int], tokens: int, fn: Callable[[], object],
                        budget_s: float = 0.05, min_reps: int = 5, max_reps: int = 100, calls: int = 10) -> float:
    """Median seconds a call of ``fn``: CUDA events around ``calls`` back-to-back calls (as a model's layers run, so
    launch overhead counts as it does there), 3 warm-ups first. Without CUDA: cpu_backend's wall-time median."""
    if not torch.cuda.is_available():
        return median_seconds(path, shape, tokens, fn)
    for _ in range(3):  # cuSPARSELt plans its algorithm on the first call
        fn()
    torch.cuda.synchronize()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or (len(times) < max_reps and time.perf_counter() - start < budget_s):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end) / 1e3 / calls)
    return statistics.median(times)


@dataclass
class Measure:
    """How the per-layer choice is made: token counts per call, the timer (``timer(path, shape, tokens, fn) ->
    seconds``, path "kernel" or "float", as cpu_backend's), the converter standing in for
    ``to_sparse_semi_structured`` (tests), where the choice is printed (None: silent) and the probe's seed."""

    tokens: tuple[int, ...] = DEFAULT_TOKENS
    timer: Timer = cuda_median_seconds
    convert: Converter = field(default=to_semi_structured)
    say: Callable[[str], None] | None = print
    seed: int = 0

    def __post_init__(self):
        if not self.tokens or any(int(t) <= 0 for t in self.tokens):
            raise UserError(f"the measured token counts must be positive (got {tuple(self.tokens)})")


def _probe_error(sparse: nn.Module, module: nn.Module, x: torch.Tensor) -> float:
    got, want = sparse(x).float(), module(x).float()
    if got.shape != want.shape or not bool(torch.isfinite(got).all()):
        return float("inf")
    return float((got - want).abs().max()) / max(float(want.abs().max()), 1e-30)


def _probe_input(shape: tuple[int, int], module: nn.Module, dtype: torch.dtype, measure: Measure) -> torch.Tensor:
    gen = torch.Generator().manual_seed(measure.seed)
    device = weight_matrix(module).device
    return torch.randn(max(measure.tokens), shape[1], generator=gen).to(device=device, dtype=dtype)


def _time_shape(sparse: nn.Module, module: nn.Module, shape: tuple[int, int], x: torch.Tensor,
                measure: Measure) -> tuple[str, str, dict]:
    """(path, reason, timings µs) for one shape: the kernel only where strictly faster at every token count."""
    timings, slower = {}, []
    for tokens in measure.tokens:
        xt = x[:tokens].contiguous()
        k = measure.timer("kernel", shape, tokens, lambda: sparse(xt))
        f = measure.timer("float", shape, tokens, lambda: module(xt))
        timings[str(tokens)] = {"kernel_us": round(k * 1e6, 2), "float_us": round(f * 1e6, 2)}
        if not k < f:
            slower.append(str(tokens))
    if slower:
        return "float", f"the sparse matmul measured not faster than the dense one at {', '.join(slower)} " \
                        f"token(s)", timings
    return "kernel", "measured faster than the dense matmul", timings


def _choose(module: nn.Module, shape: tuple[int, int], dtype: torch.dtype, measure: Measure,
            by_shape: dict) -> tuple[dict, nn.Module | None]:
    """(record, the sparse module if chosen) for one layer."""
    from semisparse.train.sparse_linear import SparseLinear

    reason = "it carries a SLoRB branch" if isinstance(module, SparseLinear) else unsupported(shape, dtype)
    if reason is not None:
        return {"path": "float", "reason": reason}, None
    try:
        sparse = sparse_layer(module, measure.convert)
        x = _probe_input(shape, module, dtype, measure)
        error = _probe_error(sparse, module, x)
    except (RuntimeError, NotImplementedError, ValueError) as exc:  # torch refuses the weight or the call
        return {"path": "float", "reason": f"the sparse kernel failed: {first_line(exc)}"}, None
    if not error <= PROBE_RTOL[dtype]:
        return {"path": "float", "reason": f"its output differs from the dense layer (relative error {error:.1e}, "
                                           f"tolerance {PROBE_RTOL[dtype]:.0e})"}, None
    key = (shape, getattr(module, "bias", None) is not None)
    if key not in by_shape:
        try:
            by_shape[key] = _time_shape(sparse, module, shape, x, measure)
        except (RuntimeError, NotImplementedError, ValueError) as exc:  # a token count the probe did not use
            by_shape[key] = ("float", f"the sparse kernel failed while timed: {first_line(exc)}", {})
    path, why, timings = by_shape[key]
    record = {"path": path, "reason": why, "probe_error": float(f"{error:.2e}"), "timings": timings}
    return record, (sparse if path == "kernel" else None)


def apply_semi_structured(model: nn.Module, layers: dict[str, tuple[int, int]], dtype: torch.dtype,
                          dtype_reason: str, why_not: str | None = None, measure: Measure | None = None) -> dict:
    """Swap each sparse layer of ``model`` (already on its device, in ``dtype``) for its semi-structured form where
    chosen; ``why_not`` (the backend is unavailable) keeps every layer dense. Returns the choice, also printed."""
    measure = measure or Measure()
    by_shape: dict[tuple, tuple[str, str, dict]] = {}
    report_layers: dict[str, dict] = {}
    with torch.no_grad():  # not inference_mode: the converted weights must stay usable outside it
        for name, shape in layers.items():
            shape = tuple(shape)
            if why_not is not None:
                report_layers[name] = {"shape": list(shape), "path": "float", "reason": "the backend is unavailable"}
                continue
            record, sparse = _choose(model.get_submodule(name), shape, dtype, measure, by_shape)
            report_layers[name] = {"shape": list(shape), **record}
            if sparse is not None:
                model.set_submodule(name, sparse)
    chosen = sum(r["path"] == "kernel" for r in report_layers.values())
    report = {"backend": NAME, "available": why_not is None, "unavailable_reason": why_not,
              "impl": None if why_not else _impl(measure.convert),
              "activation_dtype": str(dtype).removeprefix("torch."), "activation_dtype_reason": dtype_reason, "measured_tokens": [int(t) for t in measure.tokens],
              "probe_rtol": PROBE_RTOL.get(dtype), "torch": torch.__version__, "kernel_layers": chosen,
              "float_layers": len(report_layers) - chosen, "layers": report_layers}
    if measure.say is not None:
        for line in describe(report):
            measure.say(line)
    return report


def _impl(convert: Converter) -> str:
    """Whose kernels the record names: torch's class, or an injected converter (tests) by its name."""
    if convert is to_semi_structured:
        return impl_name()
    return f"the injected converter {getattr(convert, '__name__', type(convert).__name__)}"


def describe(report: dict) -> list[str]:
    """The choice as a few lines (one per distinct shape, path and reason); unavailable: one line saying why."""
    if not report["available"]:
        return [f"{NAME} backend unavailable: {report['unavailable_reason']}; running the dense float path "
                f"({report['activation_dtype']})"]
    total = report["kernel_layers"] + report["float_layers"]
    lines = [f"{NAME} backend: {report['kernel_layers']} of {total} sparse layers through {report['impl']} (2:4), "
             f"activations {report['activation_dtype']} ({report['activation_dtype_reason']})"]
    return lines + layer_lines(report)

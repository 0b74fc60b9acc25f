"""``backend="cpu"``: an int8/int4 packed export's sparse layers through torch's weight-only CPU kernels.

    int8  torch._weight_int8pack_mm(x [T, in], w int8 [out, in], scales [out])                 y = x (w·s)ᵀ
    int4  torch._convert_weight_to_int4pack_for_cpu(codes int32 [out, in] in 0..15, 1) -> uint8 [out, in/2]
          torch._weight_int4pack_mm_for_cpu(x [T, in], packed, G, scale_zeros [in/G, out, 2])  w = (code − 8)·s + z

These are *dense* weight-only kernels: the kept values' codes are laid out densely at load, the pruned positions
holding code 0 (int8) or 8 (int4, i.e. 0), so each weight costs 8 or 4 bits and the 2:4 pattern buys no speed
here; the speed comes from moving 1/4 or 1/8 of fp32's bytes per token. Our codes map exactly: int8 is per output
channel like the kernel; int4 groups g kept values along the compacted input, which span g·M/N dense columns, so
the kernel's group G (32, 64, 128 or 256) is the largest dividing g·M/N and each scale is repeated; z = 0.

Per layer: a shape the kernel does not take (below), a SLoRB layer, a kernel output that differs from the float
path on a probe input, or a kernel that measures slower than the float path at any of the measured token counts
keeps the float layer (the de-quantized weight, in the activation dtype). Layers of one shape share a measurement.

The kernels compute in bf16 by default, also in a float32 model (a CPU without native bf16): there they take each
layer's input cast to bf16 and hand back float32. Their float32-activation path measured 3-40x slower than a plain
float32 matmul on every CPU here (AVX-512 BF16 and AVX2-only alike), while with bf16 activations they beat it at
decode sizes even on an AVX2-only CPU whose bf16 matmuls are ~100x slower than float32 (BENCHMARKS.md, "CPU
inference"). A dtype asked for explicitly is used for both.

``lm_head="int8"``: the LM head, stored in float (never pruned), is quantized at load with export/quant.py's int8
rule (round to nearest, one scale per output row) and runs through the int8 kernel under the same probe (against
its own de-quantized weight) and timing (against the float head it replaces). A tied input embedding keeps its
float weight: only the output projection changes.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from semisparse.export.pack import unpack_bits, unpack_layer
from semisparse.masks import Pattern

#: qGroupSize values _weight_int4pack_mm_for_cpu accepts (torch 2.13), largest first.
INT4_KERNEL_GROUPS = (256, 128, 64, 32)
#: The kernel's output against the float path on a probe input: max |difference| / max |float| above this is a
#: kernel fault (torch 2.13's bf16 int8 kernel returns garbage for some widths), and the layer stays float.
#: Measured agreement: ~1e-6 in float32, ~3e-3 in bf16.
PROBE_RTOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}
ACTIVATION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ------------------------------------------------------------------------------------------ activation dtype


def activation_dtype(requested: torch.dtype | None) -> tuple[torch.dtype, str]:
    """(dtype the model computes in, why): bf16 where the CPU has native bf16 matmuls, else float32."""
    from semisparse.devices import native_bf16_cpu
    from semisparse.errors import UserError

    if requested is not None:
        if requested not in PROBE_RTOL:
            raise UserError(f"the cpu backend computes in float32 or bfloat16, not {requested}")
        return requested, "asked for"
    feature = native_bf16_cpu()
    if feature is not None:
        return torch.bfloat16, f"this CPU has {feature} (native bf16 matmuls)"
    return torch.float32, "this CPU has no native bf16 (no AVX-512 BF16 or AMX), where bf16 is slower than float32"


def kernel_dtype(requested: torch.dtype | None) -> torch.dtype:
    """The dtype the weight-only kernels compute in: the one asked for, else bf16 whatever the model's dtype (the
    module docstring says why)."""
    return requested if requested is not None else torch.bfloat16


# ------------------------------------------------------------------------------------------ shapes and layouts


@dataclass
class QuantizedLayer:
    """One sparse layer as stored in the packed file (export/packed.py)."""

    codes: torch.Tensor  # int8 [out, k] | uint8 int4 stream
    scales: torch.Tensor  # [out] | [out, k/g]
    positions: torch.Tensor  # uint8 bit stream
    shape: tuple[int, int]  # [out, in]
    width: int  # k = in·N/M
    group_size: int  # g (k for int8)


def int4_kernel_group(group_size: int, pattern: Pattern) -> int | None:
    """The kernel's group G for a compacted group of ``group_size`` kept values (None: no G fits)."""
    if group_size % pattern.n:
        return None  # an M-block's kept values would straddle two scales
    dense = group_size * pattern.m // pattern.n
    return next((g for g in INT4_KERNEL_GROUPS if dense % g == 0), None)


def int8_unsupported(in_features: int, dtype: torch.dtype) -> str | None:
    """Why the int8 kernel cannot take this input width (None: it can)."""
    if dtype == torch.bfloat16 and in_features % 16:
        # measured on torch 2.13: wrong results or a segfault, so never call it (the probe cannot catch a crash)
        return f"in_features {in_features} is not a multiple of 16 (the bf16 int8 kernel needs it)"
    return None


def unsupported(scheme: str, layer: QuantizedLayer, pattern: Pattern, dtype: torch.dtype) -> str | None:
    """Why the kernel cannot run this layer (None: it can)."""
    out_f, in_f = layer.shape
    if scheme == "int8":
        return int8_unsupported(in_f, dtype)
    if out_f % 16:
        return f"out_features {out_f} is not a multiple of 16 (the int4 packing needs it)"
    if int4_kernel_group(layer.group_size, pattern) is None:
        return (f"its int4 group of {layer.group_size} kept values spans no multiple of "
                f"{', '.join(map(str, sorted(INT4_KERNEL_GROUPS)))} dense columns (the kernel's group sizes)")
    return None


class WeightOnlyLinear(nn.Module):
    """y = x Wᵀ + b through a weight-only kernel; x of any leading shape, cast to the kernel's dtype, y in x's."""

    def __init__(self, scheme: str, out_features: int, in_features: int, bias: torch.Tensor | None,
                 tensors: dict[str, torch.Tensor], group: int | None = None):
        super().__init__()
        self.scheme, self.out_features, self.in_features, self.group = scheme, out_features, in_features, group
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(self.scales_dtype).contiguous()
        if self.scheme == "int8":
            y = torch._weight_int8pack_mm(x2, self.weight_int8, self.scales)
        else:
            y = torch._weight_int4pack_mm_for_cpu(x2, self.weight_int4, self.group, self.scale_zeros)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features).to(x.dtype)

    @property
    def scales_dtype(self) -> torch.dtype:
        return (self.scales if self.scheme == "int8" else self.scale_zeros).dtype

    def extra_repr(self) -> str:
        group = f", group={self.group}" if self.group else ""
        return f"{self.scheme}, in_features={self.in_features}, out_features={self.out_features}{group}"


def kernel_layer(scheme: str, layer: QuantizedLayer, pattern: Pattern, dtype: torch.dtype,
                 bias: torch.Tensor | None) -> WeightOnlyLinear:
    """The kernel module of one layer: its codes laid out densely (zeros where pruned), packed once."""
    out_f, in_f = layer.shape
    bias = None if bias is None else bias.detach().to(dtype).clone()
    if scheme == "int8":
        dense, _ = unpack_layer(layer.codes, layer.positions, pattern, layer.shape)  # int8, 0 where pruned
        tensors = {"weight_int8": dense.contiguous(), "scales": layer.scales.to(dtype).contiguous()}
        return WeightOnlyLinear(scheme, out_f, in_f, bias, tensors)
    signed = unpack_bits(layer.codes, 4, out_f * layer.width).reshape(out_f, layer.width).to(torch.int32) - 8
    dense, _ = unpack_layer(signed, layer.positions, pattern, layer.shape)  # 0 where pruned
    group = int4_kernel_group(layer.group_size, pattern)
    repeat = layer.group_size * pattern.m // pattern.n // group
    scales = layer.scales.to(torch.float32).reshape(out_f, -1).repeat_interleave(repeat, dim=1).t()  # [in/G, out]
    scale_zeros = torch.stack([scales, torch.zeros_like(scales)], dim=-1).to(dtype).contiguous()
    packed = torch._convert_weight_to_int4pack_for_cpu((dense + 8).contiguous(), 1)
    return WeightOnlyLinear(scheme, out_f, in_f, bias, {"weight_int4": packed, "scale_zeros": scale_zeros}, group)


# ------------------------------------------------------------------------------------------ the choice


Timer = Callable[[str, tuple[int, int], int, Callable[[], object]], float]


def median_seconds(path: str, shape: tuple[int, int], tokens: int, fn: Callable[[], object],
                   budget_s: float = 0.03, min_reps: int = 5, max_reps: int = 200) -> float:
    """Median wall time of ``fn`` (two warm-up calls, then at least ``min_reps`` within about ``budget_s``)."""
    fn(), fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or (len(times) < max_reps and time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@dataclass
class Measure:
    """How the per-layer choice is measured: token counts per call (decode at batch 1 and 8 by default), the timer
    (injectable for tests: ``timer(path, shape, tokens, fn) -> seconds``, path "kernel" or "float") and where the
    choice is printed (None: silent)."""

    tokens: tuple[int, ...] = (1, 8)
    timer: Timer = median_seconds
    say: Callable[[str], None] | None = print
    seed: int = 0


def _probe_error(kernel: nn.Module, module: nn.Module, x: torch.Tensor) -> float:
    got, want = kernel(x).float(), module(x).float()
    if not bool(torch.isfinite(got).all()):
        return float("inf")
    return float((got - want).abs().max()) / max(float(want.abs().max()), 1e-30)


def _measure_shape(kernel: nn.Module, module: nn.Module, shape: tuple[int, int], dtype: torch.dtype,
                   measure: Measure, same: Callable[[torch.Tensor], torch.Tensor] | None = None
                   ) -> tuple[str, str, dict]:
    """(path, reason, timings µs) for one shape, the first layer of that shape standing for all, with inputs in the
    model's ``dtype``. The probe compares the kernel with ``same`` (the float path of the very same weights;
    default ``module``) within its own dtype's tolerance, the timing with ``module`` (the layer it would replace)."""
    gen = torch.Generator().manual_seed(measure.seed)
    x = torch.randn(max(measure.tokens), shape[1], generator=gen).to(dtype)
    error = _probe_error(kernel, same or module, x)
    if not error <= PROBE_RTOL[kernel.scales_dtype]:
        return "float", f"the kernel's output differs from the float path (relative error {error:.1e})", {}
    timings, slower = {}, []
    for tokens in measure.tokens:
        xt = x[:tokens].contiguous()
        k = measure.timer("kernel", shape, tokens, lambda: kernel(xt))
        f = measure.timer("float", shape, tokens, lambda: module(xt))
        timings[str(tokens)] = {"kernel_us": round(k * 1e6, 2), "float_us": round(f * 1e6, 2)}
        if k > f:
            slower.append(str(tokens))
    if slower:
        return "float", f"the kernel measured slower than the float path at {', '.join(slower)} token(s)", timings
    return "kernel", "measured not slower than the float path", timings


def lm_head_kernel(head: nn.Linear, dtype: torch.dtype) -> tuple[WeightOnlyLinear, torch.Tensor]:
    """The LM head through the int8 kernel, and its de-quantized weight (the float path of the same codes)."""
    from semisparse.export.quant import quantize

    weight = head.weight.detach()
    q = quantize(weight, "int8", None, torch.float32)
    bias = None if head.bias is None else head.bias.detach().to(dtype).clone()
    kernel = WeightOnlyLinear("int8", weight.shape[0], weight.shape[1], bias,
                              {"weight_int8": q.codes, "scales": q.scales.to(dtype).contiguous()})
    return kernel, (q.codes.float() * q.scales[:, None]).to(dtype)


def _apply_lm_head(model: nn.Module, dtype: torch.dtype, kernel_dt: torch.dtype, measure: Measure) -> dict:
    """Swap the LM head for the int8 kernel (computing in ``kernel_dt``) where the probe and the timing allow; the
    record of that choice."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        return {"path": "float", "reason": f"the output layer is a {type(head).__name__}, not a linear layer"}
    shape = tuple(head.weight.shape)
    record = {"shape": list(shape), "scheme": "int8 (quantized at load: round to nearest, one scale per row)"}
    reason = int8_unsupported(shape[1], kernel_dt)
    if reason is not None:
        return {**record, "path": "float", "reason": reason}
    kernel, weight = lm_head_kernel(head, kernel_dt)
    weight, bias = weight.to(dtype), None if kernel.bias is None else kernel.bias.to(dtype)
    path, reason, timings = _measure_shape(kernel, head, shape, dtype, measure,
                                           same=lambda x: torch.nn.functional.linear(x, weight, bias))
    if path == "kernel":
        model.set_output_embeddings(kernel)  # a tied input embedding keeps its own float weight
        model.config.tie_word_embeddings = False  # so nothing re-ties a float weight over the kernel
    return {**record, "path": path, "reason": reason.replace("float path", "float head"), "timings": timings}


def apply_cpu_backend(model: nn.Module, layers: dict[str, QuantizedLayer], pattern: Pattern, scheme: str,
                      dtype: torch.dtype, dtype_reason: str, measure: Measure | None = None,
                      lm_head: str = "float", kernel_dt: torch.dtype | None = None) -> dict:
    """Swap each sparse layer of ``model`` (already in ``dtype``, de-quantized) for its kernel (computing in
    ``kernel_dt``, default ``dtype``) where chosen, and with ``lm_head="int8"`` the LM head too; returns the choice
    (also printed through ``measure.say``): per layer path, reason, kernel group and timings."""
    from semisparse.train.sparse_linear import SparseLinear

    measure = measure or Measure()
    kernel_dt = kernel_dt or dtype
    by_shape: dict[tuple, tuple[str, str, dict]] = {}
    report_layers: dict[str, dict] = {}
    with torch.inference_mode():
        for name, layer in layers.items():
            module = model.get_submodule(name)
            record = {"shape": list(layer.shape), "scheme": scheme}
            reason = ("it carries a SLoRB branch" if isinstance(module, SparseLinear)
                      else unsupported(scheme, layer, pattern, kernel_dt))
            if reason is not None:
                report_layers[name] = {**record, "path": "float", "reason": reason}
                continue
            bias = getattr(module, "bias", None)
            kernel = kernel_layer(scheme, layer, pattern, kernel_dt, bias)
            key = (layer.shape, kernel.group, bias is not None)
            if key not in by_shape:
                by_shape[key] = _measure_shape(kernel, module, layer.shape, dtype, measure)
            path, why, timings = by_shape[key]
            report_layers[name] = {**record, "path": path, "reason": why, "kernel_group": kernel.group,
                                   "timings": timings}
            if path == "kernel":
                model.set_submodule(name, kernel)
        head = _apply_lm_head(model, dtype, kernel_dt, measure) if lm_head == "int8" else None
    chosen = sum(r["path"] == "kernel" for r in report_layers.values())
    report = {"backend": "cpu", "scheme": scheme, "activation_dtype": str(dtype).removeprefix("torch."),
              "activation_dtype_reason": dtype_reason, "kernel_dtype": str(kernel_dt).removeprefix("torch."),
              "measured_tokens": list(measure.tokens),
              "torch": torch.__version__, "kernel_layers": chosen, "float_layers": len(report_layers) - chosen,
              "layers": report_layers, "lm_head": head or {"path": "float", "reason": "as exported (lm_head float)"}}
    if measure.say is not None:
        for line in describe(report):
            measure.say(line)
    return report


def describe(report: dict) -> list[str]:
    """The choice as a few lines: one per distinct (shape [out, in], path, reason)."""
    kernels = report.get("kernel_dtype", report["activation_dtype"])
    inside = f", the kernels in {kernels}" if kernels != report["activation_dtype"] else ""
    lines = [f"cpu backend: {report['kernel_layers']} of {report['kernel_layers'] + report['float_layers']} sparse "
             f"layers through the {report['scheme']} kernel, activations {report['activation_dtype']} "
             f"({report['activation_dtype_reason']}){inside}"]
    head = report.get("lm_head") or {}
    if head.get("scheme"):  # asked for: say what became of it
        lines.append(f"  lm_head {head.get('shape')}: {head['path']}: {head['reason']}")
    return lines + layer_lines(report)


def layer_lines(report: dict) -> list[str]:
    """One line per distinct (shape [out, in], path, reason, timings) of a backend's per-layer choice (both
    backends' records have this shape)."""
    lines = []
    seen: dict[tuple, list[str]] = {}
    for name, r in report["layers"].items():
        seen.setdefault((tuple(r["shape"]), r["path"], r["reason"], str(r.get("timings", ""))), []).append(name)
    for (shape, path, reason, _), names in seen.items():
        timings = report["layers"][names[0]].get("timings") or {}
        times = "; ".join(f"{t} tok {v['kernel_us']:.0f} vs {v['float_us']:.0f} µs" for t, v in timings.items())
        count = f"{len(names)} layer{'s' if len(names) > 1 else ''}"
        lines.append(f"  [{shape[0]}, {shape[1]}] ({count}): {path}: {reason}" + (f" [{times}]" if times else ""))
    return lines

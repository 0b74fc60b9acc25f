"""Where a model runs: ``auto`` (the default everywhere) is the first CUDA GPU when there is one, else the CPU."""

from __future__ import annotations

import torch

from semisparse.errors import UserError

AUTO = "auto"


def resolve_device(spec: str | torch.device | None = AUTO) -> torch.device:
    """``auto``/None -> cuda if available else cpu; ``cpu``, ``cuda``, ``cuda:1`` as given, checked."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    if spec is None or spec == AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UserError(f"unknown device {spec!r} (auto, cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {spec!r} requested but CUDA is not available (use --device auto or cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"device {spec!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device


def native_bf16_cpu() -> str | None:
    """The CPU feature that runs bf16 matmuls natively (AMX or AVX-512 BF16), from torch's own CPU report; None on
    CPUs without one (AVX2 only), where bf16 is emulated and slower than float32."""
    import torch.cpu

    probes = (("AMX", "_is_amx_tile_supported"), ("AVX-512 BF16", "_is_avx512_bf16_supported"))
    for name, probe in probes:
        check = getattr(torch.cpu, probe, None)
        if check is not None and check():
            return name
    return None


def matmul_seconds(n: int, dtype: torch.dtype, reps: int = 3) -> float:
    """Best of ``reps`` wall times of an n³ CPU matmul in ``dtype``, after one warm-up."""
    import time

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return min(times)


def bf16_matmul_slowdown(n: int = 256, reps: int = 3) -> float:
    """How many times longer an n³ bf16 matmul takes than a float32 one on this CPU (n = 256 costs ~30 ms where bf16
    is emulated). Below 1 where bf16 is native."""
    return matmul_seconds(n, torch.bfloat16, reps) / max(matmul_seconds(n, torch.float32, reps), 1e-9)


def precision_warning(precision: str, device: torch.device) -> str | None:
    """A line for bf16 asked for on a CPU that has no native bf16: there autocast's matmuls are emulated, and how
    much slower depends on the CPU (2.7x on an AVX-512 Xeon, ~90x on an AVX2-only EPYC), so it is measured."""
    if precision != "bf16" or device.type != "cpu" or native_bf16_cpu() is not None:
        return None
    slowdown = bf16_matmul_slowdown()
    if slowdown < 1.2:
        return None
    return (f"warning: bf16 on a CPU without native bf16 (no AVX-512 BF16 or AMX): a bf16 matmul takes "
            f"{slowdown:.1f}x as long as float32 here; train.precision auto (or fp32) trains faster")


def resolve_precision(requested: str, device: torch.device) -> tuple[str, str]:
    """``(precision, reason)`` for ``train.precision``: ``fp32``/``bf16`` as asked; ``auto`` = bf16 autocast on CUDA
    (when the GPU has bf16) and on a CPU with native bf16 matmuls, else fp32."""
    if requested != AUTO:
        return requested, f"train.precision: {requested} in the recipe"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", f"auto: {torch.cuda.get_device_name(device)} has bf16"
        return "fp32", f"auto: {torch.cuda.get_device_name(device)} has no bf16"
    if device.type == "cpu":
        feature = native_bf16_cpu()
        if feature is not None:
            return "bf16", f"auto: this CPU has {feature} (native bf16 matmuls)"
        return "fp32", "auto: this CPU has no native bf16 (no AVX-512 BF16 or AMX), where bf16 is slower than fp32"
    return "fp32", f"auto: fp32 on {device.type}"

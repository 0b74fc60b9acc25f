"""The machine a benchmark ran on: CPU model and the flags that decide CPU speed (AVX2, AVX-512, bf16, AMX), or the
GPU; torch and its threads. Every timing prints this and stores it with its numbers."""

from __future__ import annotations

import os
import platform
import subprocess

FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")


def _lscpu() -> dict[str, str]:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in text.splitlines()) if v}


def describe() -> dict:
    import torch

    info = _lscpu()
    flags = set(info.get("Flags", "").split())
    out = {
        "cpu": info.get("Model name") or platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "cpu_flags": [f for f in FLAGS if f in flags],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        out.update(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda)
    return out


def line(info: dict | None = None) -> str:
    info = info or describe()
    flags = " ".join(info["cpu_flags"]) or "none of " + " ".join(FLAGS)
    gpu = f", GPU {info['gpu']} (CUDA {info['cuda']})" if "gpu" in info else ""
    return (f"{info['cpu']}, {info['cores']} cores [{flags}], torch {info['torch']} ({info['torch_threads']} threads, "
            f"{info['torch_cpu_capability']}){gpu}")

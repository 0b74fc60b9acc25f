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

"""``semisparse bench OUT --device cpu``: an exported folder against dense float32 and bf16, in one run.

For each model: load time, prefill tokens/s (one forward of 1 × ``prefill_tokens``), decode tokens/s with the KV
cache at each batch size (``generate``, greedy, ``new_tokens`` new tokens after a short prompt: batch × new tokens
over the wall time of the call, whose prompt prefill is about one decode step), the process's peak RSS while that
model was loaded and run (Linux: the high-water mark is reset before each model; the RSS before its load, mostly
torch and transformers, is recorded beside it), and bytes on disk. The machine (CPU model, the flags that decide
the kernels), the thread count and the package versions go into the record too, and the cpu backend's choice.

The dense models are the export loaded without a backend at float32 and bf16: every layer a dense matmul of the
dense model's shapes (its zeros stored), so they run as fast as the dense model does; their bytes on disk are
what a dense checkpoint's weights take at that dtype. Inputs are random token ids (speed does not depend on them).
"""

from __future__ import annotations

import gc
import platform
import re
import shutil
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from semisparse.errors import UserError

#: torch.cpu.get_capabilities() flags that decide which CPU kernels run fast.
CPU_FLAGS = ("avx2", "avx512_f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")


@dataclass
class BenchSettings:
    prefill_tokens: int = 512
    new_tokens: int = 128
    batches: tuple[int, ...] = (1, 8)
    prompt_tokens: int = 8
    repeats: int = 3  # prefill: median of this many forwards; decode: median of this many generate calls

    def check(self) -> None:
        for name in ("prefill_tokens", "new_tokens", "prompt_tokens", "repeats"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive (got {getattr(self, name)})")
        if not self.batches or any(b <= 0 for b in self.batches):
            raise UserError(f"--batch sizes must be positive (got {list(self.batches)})")


# ------------------------------------------------------------------------------------------ the machine


def cpu_name() -> str:
    """lscpu's model name, else /proc/cpuinfo's, else platform.processor()."""
    sources = []
    if shutil.which("lscpu"):
        try:
            sources.append(subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout)
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        sources.append(Path("/proc/cpuinfo").read_text())
    except OSError:
        pass
    for text in sources:
        match = re.search(r"^\s*model name\s*:\s*(.+)$", text, re.MULTILINE | re.IGNORECASE)
        if match:
            return match.group(1).strip()
    return platform.processor() or platform.machine()


def machine() -> dict:
    from semisparse.devices import native_bf16_cpu

    caps = dict(torch.cpu.get_capabilities()) if hasattr(torch.cpu, "get_capabilities") else {}
    return {"cpu": cpu_name(), "architecture": platform.machine(),
            "flags": {flag: bool(caps.get(flag, False)) for flag in CPU_FLAGS},
            "native_bf16": native_bf16_cpu(), "logical_cores": caps.get("num_logical_cores"),
            "torch_threads": torch.get_num_threads(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}


# ------------------------------------------------------------------------------------------ memory


def _reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark of this process's RSS (Linux: clear_refs 5); False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _status_bytes(field: str) -> int | None:
    """A ``/proc/self/status`` memory field (VmHWM: peak RSS, VmRSS: current) in bytes; None where there is none."""
    try:
        match = re.search(rf"^{field}:\s*(\d+)\s*kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def _peak_rss_bytes() -> int:
    peak = _status_bytes("VmHWM")
    if peak is not None:
        return peak
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports kB


# ------------------------------------------------------------------------------------------ timings


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _prefill_tokens_per_s(model, settings: BenchSettings, gen: torch.Generator) -> tuple[int, float]:
    vocab = model.config.vocab_size
    tokens = min(settings.prefill_tokens, getattr(model.config, "max_position_embeddings", None) or 1 << 30)
    ids = torch.randint(0, vocab, (1, tokens), generator=gen)
    with torch.inference_mode():
        model(ids[:, : min(tokens, 16)], use_cache=False)  # warm-up
        seconds = _median_seconds(lambda: model(ids, use_cache=False), settings.repeats)
    return tokens, tokens / seconds


def _decode_tokens_per_s(model, batch: int, settings: BenchSettings, gen: torch.Generator) -> float:
    from semisparse.export.source import quiet_transformers

    ids = torch.randint(0, model.config.vocab_size, (batch, settings.prompt_tokens), generator=gen)
    pad = model.generation_config.pad_token_id
    pad = pad if pad is not None else (model.generation_config.eos_token_id or 0)
    if isinstance(pad, list):
        pad = pad[0]
    kwargs = dict(do_sample=False, use_cache=True, pad_token_id=pad, attention_mask=torch.ones_like(ids),
                  temperature=None, top_p=None, top_k=None)

    def generate(n: int):
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)
        if out.shape[1] != settings.prompt_tokens + n:
            raise RuntimeError(f"generate returned {out.shape[1] - settings.prompt_tokens} new tokens, not {n}")

    with torch.inference_mode(), quiet_transformers():
        generate(2)  # warm-up
        seconds = _median_seconds(lambda: generate(settings.new_tokens), settings.repeats)
    return batch * settings.new_tokens / seconds


def _dense_bytes(model, dtype: torch.dtype) -> int:
    """Bytes of the model's distinct parameters at ``dtype`` (a dense checkpoint's weights)."""
    seen = {p.data_ptr(): p.numel() for p in model.parameters()}
    return sum(seen.values()) * torch.finfo(dtype).bits // 8


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _run_one(label: str, load: Callable[[], object], settings: BenchSettings, say) -> tuple[dict, object]:
    gc.collect()
    isolated = _reset_peak_rss()
    rss_before = _status_bytes("VmRSS")
    t0 = time.perf_counter()
    model = load()
    load_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(0)
    tokens, prefill = _prefill_tokens_per_s(model, settings, gen)
    decode = {str(b): _decode_tokens_per_s(model, b, settings, gen) for b in settings.batches}
    record = {"dtype": str(model.dtype).removeprefix("torch."), "load_seconds": load_s, "prefill_tokens": tokens,
              "prefill_tokens_per_s": prefill, "decode_tokens_per_s": decode, "peak_rss_bytes": _peak_rss_bytes(),
              "peak_rss_this_model_only": isolated, "rss_before_load_bytes": rss_before}
    say(f"{label}: prefill {prefill:,.0f} tok/s, decode " +
        ", ".join(f"batch {b} {v:,.1f} tok/s" for b, v in decode.items()) +
        f", peak RSS {record['peak_rss_bytes'] / 2**20:,.0f} MiB")
    return record, model


def _ratios(models: dict) -> dict:
    export = models["export"]
    out = {}
    for base in ("dense-fp32", "dense-bf16"):
        ref = models[base]
        out[f"export/{base}"] = {
            "prefill": export["prefill_tokens_per_s"] / ref["prefill_tokens_per_s"],
            **{f"decode_batch_{b}": v / ref["decode_tokens_per_s"][b]
               for b, v in export["decode_tokens_per_s"].items()},
            "peak_rss": export["peak_rss_bytes"] / ref["peak_rss_bytes"],
            "bytes_on_disk": export["bytes_on_disk"] / ref["bytes_on_disk"],
        }
    return out


def _import_model_code(manifest: dict) -> None:
    """Import the model's transformers code now, so the first load time does not include it."""
    from transformers import AutoModelForCausalLM, CONFIG_MAPPING

    try:
        config = CONFIG_MAPPING[manifest["model_config"]["model_type"]]
        AutoModelForCausalLM._model_mapping[config]
    except (KeyError, TypeError, AttributeError):  # an hf export or another transformers: the load will tell
        pass


def default_json(export: Path) -> Path:
    from semisparse.rundir import model_slug

    return Path(f"bench-{model_slug(export.resolve().name)}.json")


def bench(export: str | Path, device: str = "cpu", backend: str | None = None, json: str | Path | None = None,
          settings: BenchSettings | None = None, say: Callable[[str], None] = print, lm_head: str = "float") -> dict:
    """The record (module docstring), also written atomically to ``json`` (default ./bench-<folder>.json).

    ``backend`` None: cpu for an int8/int4 packed export, else none (the float path in the export dtype);
    ``lm_head`` "int8": the export's LM head through the int8 kernel too (cpu backend)."""
    from semisparse import rundir
    from semisparse.devices import resolve_device
    from semisparse.export.format import read_manifest
    from semisparse.export.load import load_export
    from semisparse.export.options import check_backend, check_lm_head
    from semisparse.models import package_versions

    export = Path(export)
    settings = settings or BenchSettings()
    settings.check()
    if resolve_device(device).type != "cpu":
        raise UserError(f"bench runs on the CPU for now (got --device {device}); a CUDA bench is not implemented yet")
    manifest = read_manifest(export)  # one line for a folder that is not an export, before anything is loaded
    quantized = (manifest.get("quantization") or {}).get("scheme") in ("int8", "int4")
    backend = check_backend(backend if backend is not None else ("cpu" if quantized else "none"))
    check_lm_head(lm_head, backend)
    if backend == "cpu":
        from semisparse.export.load import check_cpu_backend

        check_cpu_backend(export, manifest, torch.device("cpu"))  # before the dense models' timings, not after
    elif backend == "semi-structured":
        from semisparse.export.load import check_semi_structured_backend

        check_semi_structured_backend(export, manifest)  # on the CPU it then says it is unavailable and runs dense
    json_path = Path(json) if json is not None else default_json(export)
    if json_path.is_dir():
        raise UserError(f"--json {json_path} is a folder: give a file name")

    info = {"machine": machine(), "versions": package_versions()}
    flags = ", ".join(f for f, on in info["machine"]["flags"].items() if on) or "none of " + ", ".join(CPU_FLAGS)
    say(f"bench on {info['machine']['cpu']} ({flags}; {torch.get_num_threads()} threads), torch "
        f"{info['versions'].get('torch')}, transformers {info['versions'].get('transformers')}")
    _import_model_code(manifest)
    models: dict[str, dict] = {}
    for label, dtype in (("dense-fp32", torch.float32), ("dense-bf16", torch.bfloat16)):
        models[label], model = _run_one(label, lambda d=dtype: load_export(export, "cpu", d)[0], settings, say)
        models[label]["bytes_on_disk"] = _dense_bytes(model, dtype)
        del model
    from semisparse.export import cpu_backend, cuda_backend

    measure = (cuda_backend if backend == "semi-structured" else cpu_backend).Measure(say=say)
    models["export"], model = _run_one(
        f"export ({backend} backend)",
        lambda: load_export(export, "cpu", None, backend=backend, measure=measure, lm_head=lm_head)[0], settings, say)
    models["export"].update(bytes_on_disk=_folder_bytes(export), backend=backend,
                            quantization=manifest["quantization"]["scheme"], export_dtype=manifest.get("dtype"))
    choice = getattr(model, "semisparse_backend", None)
    del model
    import datetime as _dt

    record = {"export": str(export), "device": "cpu", "backend": backend, "lm_head": lm_head,
              "settings": asdict(settings), **info,
              "models": models, "ratios": _ratios(models), "backend_choice": choice,
              "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    record["settings"]["batches"] = list(settings.batches)
    rundir.atomic_write_json(json_path, record)
    return {**record, "json": str(json_path)}

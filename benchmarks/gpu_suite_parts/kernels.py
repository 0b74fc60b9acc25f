"""Part 2: 2:4 semi-structured kernels against dense matmuls, at the layer shapes of SmolLM2-135M and LLaMA-2-7B.

One row per (dtype, layer shape, token shape, implementation). Implementations:
  dense               fp16/bf16: F.linear(x, W);  int8: torch._int_mm(x, Wᵀ) (int32 out);
                      fp8: torch._scaled_mm(x8, W8ᵀ, per-tensor scales, bf16 out)
  sparse_cutlass      the same op on torch.sparse.to_sparse_semi_structured(W) with _FORCE_CUTLASS = True
  sparse_cusparselt   ... with _FORCE_CUTLASS = False (cuSPARSELt); fp8: torch._scaled_mm(W8_sparse, x8ᵀ)
W is a random [out, in] matrix pruned 2:4 by semisparse.masks.nm_mask (magnitude); x random. Latency: median over
repeats, one CUDA event pair per call, after warm-up. Errors (shape or dtype constraints, missing kernels) are
recorded per row, never fatal. Then the exported model end to end, when semisparse.export can do it.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import time

from gpu_suite_parts.common import SKIP_CUDA, Suite, error_record, free_memory, median, time_calls

SHAPES = {  # (model, layers, out, in)
    "SmolLM2-135M": [("q_proj,o_proj", 576, 576), ("k_proj,v_proj", 192, 576), ("gate_proj,up_proj", 1536, 576),
                     ("down_proj", 576, 1536)],
    "LLaMA-2-7B": [("q,k,v,o_proj", 4096, 4096), ("gate_proj,up_proj", 11008, 4096), ("down_proj", 4096, 11008)],
}
TOKENS = [("prefill", (2048,)), ("prefill", (8, 512)), ("decode", (1,)), ("decode", (16,)), ("decode", (64,))]
SMOKE_TOKENS = [("prefill", (128,)), ("prefill", (2, 64)), ("decode", (1,)), ("decode", (16,)), ("decode", (64,))]
DTYPES = ("bf16", "fp16", "int8", "fp8")
IMPLS = ("dense", "sparse_cutlass", "sparse_cusparselt")
FP8_NOTE = ("sparse fp8 exists only through cuSPARSELt (torch._scaled_mm on a SparseSemiStructuredTensorCUSPARSELT, "
            "per-tensor scales folded into alpha); the CUTLASS backend has no fp8 (its rows record the error)")


def capabilities(device: str) -> dict:
    import torch

    caps = {"cuda": device == "cuda", "sm": None}
    caps["to_sparse_semi_structured"] = hasattr(torch.sparse, "to_sparse_semi_structured")
    caps["force_cutlass_flag"] = hasattr(getattr(torch.sparse, "SparseSemiStructuredTensor", None), "_FORCE_CUTLASS")
    cslt = getattr(torch.backends, "cusparselt", None)
    caps["cusparselt"] = bool(cslt is not None and cslt.is_available())
    caps["int_mm"] = hasattr(torch, "_int_mm")
    caps["scaled_mm"] = hasattr(torch, "_scaled_mm") and hasattr(torch, "float8_e4m3fn")
    if device == "cuda":
        caps["sm"] = list(torch.cuda.get_device_capability(0))
    return caps


def why_skipped(dtype: str, impl: str, caps: dict) -> str | None:
    """The reason a row cannot run here, or None."""
    if not caps["cuda"] and (impl != "dense" or dtype in ("int8", "fp8")):
        return SKIP_CUDA
    sm = tuple(caps["sm"] or (0, 0))
    if impl != "dense":
        if not caps["to_sparse_semi_structured"]:
            return "skipped: this torch has no torch.sparse.to_sparse_semi_structured"
        if sm < (8, 0):
            return f"skipped: semi-structured kernels need sm80+, this GPU is sm{sm[0]}{sm[1]}"
        if impl == "sparse_cutlass" and not caps["force_cutlass_flag"]:
            return "skipped: this torch has no SparseSemiStructuredTensor._FORCE_CUTLASS"
        if impl == "sparse_cusparselt" and not caps["cusparselt"]:
            return "skipped: cuSPARSELt is not available in this torch build"
    if dtype == "int8" and impl == "dense" and not caps["int_mm"]:
        return "skipped: this torch has no torch._int_mm"
    if dtype == "fp8":
        if not caps["scaled_mm"]:
            return "skipped: this torch has no torch._scaled_mm / float8_e4m3fn"
        if caps["cuda"] and sm < (8, 9):
            return f"skipped: fp8 matmuls need sm89+, this GPU is sm{sm[0]}{sm[1]}"
    return None


def _pruned(out_f: int, in_f: int, device: str, cache: dict):
    """A random [out, in] fp32 weight, 2:4 magnitude-pruned by semisparse.masks.nm_mask, made on the device once
    per shape (a 11008 x 4096 mask costs seconds on a CPU)."""
    import torch

    from semisparse.masks import nm_mask

    key = (out_f, in_f)
    if key not in cache:
        gen = torch.Generator(device=device).manual_seed(out_f * 7 + in_f)
        w = torch.randn(out_f, in_f, generator=gen, device=device)
        cache[key] = w * nm_mask(w.abs(), "2:4")
    return cache[key]


def _cast(t, dtype: str, int_scale: float):
    import torch

    if dtype == "int8":
        return (t * int_scale).round().clamp(-127, 127).to(torch.int8)
    if dtype == "fp8":
        return t.to(torch.float8_e4m3fn)
    return t.to(torch.bfloat16 if dtype == "bf16" else torch.float16)


def _inputs(dtype: str, shape: tuple, in_f: int, device: str):
    import torch

    gen = torch.Generator(device=device).manual_seed(sum(shape) + in_f)
    return _cast(torch.randn(*shape, in_f, generator=gen, device=device), dtype, 20)


def _sparse(w, impl: str):
    import torch

    cls = torch.sparse.SparseSemiStructuredTensor
    saved = cls._FORCE_CUTLASS
    cls._FORCE_CUTLASS = impl == "sparse_cutlass"
    try:
        return torch.sparse.to_sparse_semi_structured(w)
    finally:
        cls._FORCE_CUTLASS = saved


def _op(dtype: str, impl: str, w, x):
    """The callable timed for a row; its output is [tokens..., out] (sparse fp8: [out, tokens], transposed back)."""
    import torch
    import torch.nn.functional as F

    if dtype == "fp8":
        one = torch.ones((), device=x.device, dtype=torch.float32)
        x2 = x.reshape(-1, x.shape[-1])

        def scaled(a, b):
            out = torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
            return out[0] if isinstance(out, tuple) else out  # older torch returned (out, amax)

        if impl == "dense":
            return lambda: scaled(x2, w.t())
        return lambda: scaled(w, x2.t()).t()
    if dtype == "int8" and impl == "dense":
        x2 = x.reshape(-1, x.shape[-1])
        return lambda: torch._int_mm(x2, w.t())
    return lambda: F.linear(x, w)


def _rel_err(y, ref) -> float:
    y, ref = y.float().reshape(-1, y.shape[-1]), ref.float().reshape(-1, ref.shape[-1])
    if y.shape != ref.shape:
        raise ValueError(f"output shape {tuple(y.shape)} != dense {tuple(ref.shape)}")
    return float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-6))


def run(suite: Suite, part: dict, deadline: float) -> None:
    import torch

    device = suite.device
    caps = capabilities(device)
    tokens = SMOKE_TOKENS if suite.smoke else TOKENS
    shapes = {"SmolLM2-135M": SHAPES["SmolLM2-135M"]} if suite.smoke else SHAPES
    warmup, target_s, min_reps, max_reps = (1, 0.0, 3, 3) if suite.smoke else (3, 0.05, 10, 200)
    part["settings"] = {
        "shapes_out_x_in": {m: [list(s) for s in v] for m, v in shapes.items()},
        "tokens": [{"phase": p, "input_shape": list(s)} for p, s in tokens], "dtypes": list(DTYPES),
        "impls": list(IMPLS), "warmup": warmup,
        "repeats": f"{min_reps}..{max_reps}, sized so one row takes ~{target_s} s",
        "timing": "CUDA events per call, median" if device == "cuda" else "perf_counter per call, median (CPU)",
        "weights": "random, 2:4 magnitude-pruned (semisparse.masks.nm_mask); int8 scaled x40, x x20",
        "smoke": "SmolLM2 shapes only, small token counts" if suite.smoke else None,
        "fp8_note": FP8_NOTE,
    }
    part["capabilities"] = caps
    rows: list[dict] = []
    part["rows"] = rows
    planned = sum(len(v) for v in shapes.values()) * len(tokens) * len(DTYPES) * len(IMPLS)
    cut = False
    last_row_s = 0.0
    pruned: dict = {}  # (out, in) -> the fp32 2:4 weight, shared by every dtype and implementation
    for dtype in DTYPES:
        for model, layer_shapes in shapes.items():
            for layers, out_f, in_f in layer_shapes:
                if cut:
                    break
                base = {"model": model, "layers": layers, "out": out_f, "in": in_f, "dtype": dtype}
                weights: dict = {}
                for impl in IMPLS:  # build each weight once per shape
                    reason = why_skipped(dtype, impl, caps)
                    if reason:
                        weights[impl] = reason
                        continue
                    try:
                        w = _cast(_pruned(out_f, in_f, device, pruned), dtype, 40)
                        weights[impl] = w if impl == "dense" else _sparse(w, impl)
                    except Exception as exc:  # noqa: BLE001 - a shape/dtype constraint is a finding
                        weights[impl] = exc
                for phase, shape in tokens:
                    if time.monotonic() + 2 * last_row_s + 0.05 > deadline:
                        cut = True
                        break
                    t_row = time.monotonic()
                    x = _inputs(dtype, shape, in_f, device)
                    ref = None
                    dense_ms = None
                    for impl in IMPLS:
                        row = {**base, "phase": phase, "input_shape": [*shape, in_f],
                               "tokens": int(torch.tensor(shape).prod()), "impl": impl}
                        rows.append(row)
                        w = weights[impl]
                        if isinstance(w, str):
                            row.update(status="skipped", reason=w)
                            continue
                        if isinstance(w, Exception):
                            row.update(status="error", error=f"{type(w).__name__}: {w}"[:500],
                                       where="to_sparse_semi_structured")
                            continue
                        try:
                            fn = _op(dtype, impl, w, x)
                            y = fn()  # first call: shape/dtype errors surface here
                            if device == "cuda":
                                torch.cuda.synchronize()
                            probe = time_calls(fn, device, 0, 1)[0]
                            reps = min_reps if target_s == 0 else int(min(max(target_s / max(probe, 1e-6), min_reps),
                                                                              max_reps))
                            times = time_calls(fn, device, warmup, reps)
                            row.update(status="ok", median_ms=median(times) * 1e3, min_ms=min(times) * 1e3,
                                       reps=reps, out_dtype=str(y.dtype).replace("torch.", ""))
                            if impl == "dense":
                                ref, dense_ms = y, row["median_ms"]
                            else:
                                if dense_ms:
                                    row["ratio_vs_dense"] = row["median_ms"] / dense_ms
                                if ref is not None and ref.dtype == y.dtype:
                                    row["max_rel_err_vs_dense"] = _rel_err(y, ref)
                                elif ref is not None:  # e.g. int8: dense _int_mm gives int32, sparse may not
                                    row["dense_out_dtype"] = str(ref.dtype).replace("torch.", "")
                        except Exception as exc:  # noqa: BLE001
                            row.update(status="error", error=f"{type(exc).__name__}: {exc}"[:500])
                    del x, ref
                    last_row_s = time.monotonic() - t_row
                del weights
            free_memory()
        suite.save()
    del pruned
    done = len(rows)
    part["rows_planned"] = planned
    part["rows_not_run"] = planned - done
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "error", "skipped")}
    part["counts"] = counts
    if cut:
        part["status"] = "cut"
        part["reason"] = f"cut: out of time after {done} of {planned} rows"
        suite.note_cut("2_kernels", part["reason"])
    else:
        part["status"] = "ok"
    suite.save()
    part["export_e2e"] = {"status": "skipped", "reason": "skipped: budget (no time left)"}
    if time.monotonic() < deadline - (1 if suite.smoke else 10):
        try:
            part["export_e2e"] = export_e2e(suite, deadline)
        except Exception as exc:  # noqa: BLE001
            part["export_e2e"] = error_record(exc)
        finally:
            free_memory()
    elif part["status"] != "cut":
        suite.note_cut("2_kernels/export_e2e", part["export_e2e"]["reason"])


# ------------------------------------------------------------------------------------------------ export, e2e


def _first_callable(candidates: list[tuple[str, str]]):
    """The first ``module:attribute`` that imports and is callable, with its dotted name."""
    for module, attr in candidates:
        try:
            obj = getattr(importlib.import_module(module), attr, None)
        except ImportError:
            continue
        if callable(obj) and not inspect.ismodule(obj):
            return obj, f"{module}.{attr}"
    return None, None


def export_capability() -> dict:
    """What semisparse.export offers: {"load", "export", "backend", "why"} (why: the skip reason, "" if usable).

    Needed: a load function (``semisparse.export.load`` or ``semisparse.export.load.load_export``) that takes a
    semi-structured ``backend`` (its annotation's choices, or a BACKENDS tuple in the package / its load module)."""
    if importlib.util.find_spec("semisparse.export") is None:
        return {"why": "skipped: src/semisparse/export does not exist in this tree"}
    load, load_name = _first_callable([("semisparse.export", "load"), ("semisparse.export.load", "load_export"),
                                       ("semisparse.export.load", "load")])
    export, export_name = _first_callable([("semisparse.export", "export"), ("semisparse.export", "export_run"),
                                           ("semisparse.export.writer", "export_run")])
    info = {"load": load_name, "export": export_name, "backend": None}
    if load is None:
        return {**info, "why": "skipped: semisparse.export has no load function"}
    names: list[str] = []
    for module in ("semisparse.export", "semisparse.export.load"):
        try:
            names += [str(b) for b in (getattr(importlib.import_module(module), "BACKENDS", None) or ())]
        except ImportError:
            pass
    try:
        param = inspect.signature(load).parameters.get("backend")
    except (TypeError, ValueError):
        param = None
    if param is not None and getattr(param.annotation, "__args__", None):
        names += [str(a) for a in param.annotation.__args__]
    semi = [n for n in names if "semi" in n.lower() or "cusparselt" in n.lower() or "2:4" in n]
    info["backends_seen"] = names
    if param is None or not semi:
        return {**info, "why": f"skipped: {load_name} has no semi-structured backend (no `backend` parameter "
                               f"with a semi-structured choice; backends seen: {names or 'none'})"}
    if export is None:
        return {**info, "why": "skipped: semisparse.export has no export function to write the checkpoint"}
    return {**info, "backend": semi[0], "dense_backend": next((n for n in names if n.lower() == "dense"), None),
            "why": "", "_load": load, "_export": export}


def export_e2e(suite: Suite, deadline: float) -> dict:
    """The exported model end to end: prefill latency and decode tokens/s, semi-structured backend vs dense.

    Written before semisparse.export had a semi-structured backend: the calls follow its API as far as it exists
    (export_run(run_dir, out), load_export(path, device=..., backend=...) -> model or (model, tokenizer, ...)),
    and any mismatch is recorded as an error, not raised."""
    cap = export_capability()
    public = {k: v for k, v in cap.items() if not k.startswith("_") and k != "why"}
    if cap["why"]:
        return {"status": "skipped", "reason": cap["why"], **public}
    if suite.device != "cuda":
        return {"status": "skipped", "reason": SKIP_CUDA, **public}
    import torch

    from semisparse import api

    pruned = suite.work / "part2-e2e-pruned"
    api.prune(model=suite.model, method="magnitude", out=pruned, device=suite.device, overwrite=True, progress=False)
    packed = suite.work / "part2-e2e-packed"
    export, load, backend = cap["_export"], cap["_load"], cap["backend"]
    if "overwrite" in inspect.signature(export).parameters:
        export(str(pruned), str(packed), overwrite=True)
    else:
        export(str(pruned), str(packed))
    out: dict = {"status": "ok", **public, "source": "magnitude 2:4 prune of the model",
                 "how": "forward latency (median, CUDA events) on random tokens; greedy decode of 64 new tokens"}
    dense_kw = {"backend": cap["dense_backend"]} if cap["dense_backend"] else {}
    for label, kwargs in (("dense", dense_kw), ("semi_structured", {"backend": backend})):
        if time.monotonic() > deadline:
            out["status"] = "cut"
            break
        try:
            model = load(str(packed), device=suite.device, **kwargs)
            model = model[0] if isinstance(model, tuple) else model
            vocab = model.config.vocab_size
            res = {}
            with torch.no_grad():
                for name, shape in (("prefill_1x2048", (1, 2048)), ("prefill_8x512", (8, 512))):
                    ids = torch.randint(0, vocab, shape, device=suite.device)
                    res[f"{name}_ms"] = median(time_calls(functools.partial(model, ids), "cuda", 2, 5)) * 1e3
                prompt = torch.randint(0, vocab, (1, 16), device=suite.device)
                t = time.perf_counter()
                gen = model.generate(prompt, max_new_tokens=64, do_sample=False, min_new_tokens=64)
                torch.cuda.synchronize()
                res["decode_tokens_per_s"] = (gen.shape[1] - 16) / (time.perf_counter() - t)
            out[label] = res
            del model
        except Exception as exc:  # noqa: BLE001
            out[label] = error_record(exc)
        free_memory()
    return out

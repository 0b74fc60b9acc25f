"""``export_run``: a run directory -> an exported folder, checked first, then written in one atomic folder write
(--format gguf: one file, export/gguf_writer.py)."""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

import torch

from semisparse import rundir
from semisparse.errors import UserError
from semisparse.export.format import FORMAT_NAMES, FORMAT_VERSION, write_manifest
from semisparse.export.options import check_options, check_quant_method
from semisparse.export.quant import BITS

TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _check_out(run_dir: Path, out: Path, overwrite: bool) -> None:
    src, dst = run_dir.resolve(), out.resolve()
    if dst == src or dst in src.parents:
        raise UserError(f"--out {out} would replace the run directory {run_dir} it exports: choose another folder")
    if src in dst.parents:
        raise UserError(f"--out {out} is inside the run directory {run_dir}: choose a folder outside it")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"output directory {out} exists and is not empty (pass --overwrite to replace it)")


def _quantization(quant: str, group_size: int | None, method: str = "rtn", calibration: dict | None = None) -> dict:
    if quant == "none":
        return {"scheme": "none", "bits": None, "group_size": None}
    record = {"scheme": quant, "method": method, "symmetric": True, "bits": BITS[quant],
              "group_size": group_size if quant == "int4" else None,  # int4 None: per layer, see layers.*.group_size
              "axis": "output channel" if quant == "int8" else "compacted input"}
    if method == "gptq":
        from semisparse.export.gptq import BLOCKSIZE, PERCDAMP

        record.update(calibration=calibration, damping=PERCDAMP, blocksize=BLOCKSIZE)
    return record


def _calibration_windows(source, text, nsamples: int, seqlen: int) -> tuple:
    """GPTQ's calibration windows (seed 0, as `semisparse prune` draws them) and their record; ``seqlen`` capped at
    the model's context and at what the text gives."""
    from semisparse import data

    stream = data.token_stream(source.tokenizer, text.docs)
    seqlen = min(data.effective_seqlen(source.model, seqlen), max(2, stream.numel() - 1))
    windows = data.calibration_windows(stream, nsamples, seqlen, seed=0)
    return windows, {**text.describe(), "nsamples": nsamples, "seqlen": seqlen, "sampler": "random", "seed": 0,
                     "stream_tokens": int(stream.numel())}


def refuse_unmerged_slorb(run_dir: Path, holder: str) -> None:
    """The one-line refusal of a SLoRB run for a format whose model (``holder``) cannot hold the branch."""
    raise UserError(f"{run_dir} has a SLoRB branch ({rundir.SLORB_FILE}), which {holder} "
                    "cannot hold: pass --merge-slorb to fold it into dense weights (no longer N:M), "
                    "or use --format packed, which keeps it")


def export_run(run_dir: str | Path, out: str | Path, format: str = "packed", dtype: str = "fp16",  # noqa: A002
               quant: str = "none", group_size: int | None = None, merge_slorb: bool = False,
               overwrite: bool = False, quant_method: str = "rtn", calib: str | None = None,
               nsamples: int | None = None, seqlen: int | None = None, device: str = "auto",
               progress: bool = True) -> dict:
    """Export ``run_dir`` into ``out`` (docs/export.md); returns the manifest, with ``out`` added.

    ``quant_method`` gptq: calibrated on ``calib`` (DATA; default "default"), ``nsamples`` (128) windows of
    ``seqlen`` (2048) tokens, on ``device`` (only the calibration runs there)."""
    from semisparse.export.source import check_run_dir, read_source
    from semisparse.models import package_versions

    run_dir, out = Path(run_dir), Path(out)
    check_options(format, dtype, quant, group_size, merge_slorb)
    check_quant_method(quant_method, format, quant, calib, nsamples, seqlen)
    check_run_dir(run_dir)
    if format == "gguf":  # one file, not a folder: its own output checks and writer
        from semisparse.export.gguf_writer import export_gguf

        return export_gguf(run_dir, out, dtype, quant, merge_slorb, overwrite)
    _check_out(run_dir, out, overwrite)
    has_slorb = (run_dir / rundir.SLORB_FILE).is_file()
    if format == "hf" and has_slorb and not merge_slorb:
        refuse_unmerged_slorb(run_dir, "a stock transformers model")
    if quant_method == "gptq" and has_slorb:
        raise UserError(f"{run_dir} has a SLoRB branch ({rundir.SLORB_FILE}): --quant-method gptq does not "
                        "calibrate with it yet: use --quant-method rtn")
    if quant == "int4":  # group sizes from the masks' shapes: a bad one fails before the model loads
        from semisparse.export.pack import compact_width
        from semisparse.export.quant import layer_group_size
        from semisparse.masks import Pattern

        pattern = Pattern.parse(rundir.read_run_meta(run_dir).get("pattern") or "2:4")
        for name, mask in rundir.load_masks(run_dir).items():
            g = layer_group_size(name, compact_width(mask.shape[-1], pattern), group_size)
            if quant_method == "gptq" and g % pattern.n:  # else a group's dense columns differ from row to row
                raise UserError(f"layer {name}: --quant-method gptq needs int4 groups of a multiple of N={pattern.n} "
                                f"kept values (group size {g}): give --group-size")
    calibration = None
    if quant_method == "gptq":  # read the text before the (slow) model load, so a bad DATA fails at once
        from semisparse import data
        from semisparse.devices import resolve_device

        text = data.load_text(calib or "default", split="train")
        calib_device = resolve_device(device)
    source = read_source(run_dir)
    quantized = None
    if quant_method == "gptq":
        from semisparse.export.gptq import gptq_model
        from semisparse.export.pack import compact_width
        from semisparse.export.quant import layer_group_size

        windows, calibration = _calibration_windows(source, text, nsamples or 128, seqlen or 2048)
        groups = {} if quant != "int4" else {
            name: layer_group_size(name, compact_width(mask.shape[-1], source.pattern), group_size)
            for name, mask in source.masks.items()}
        quantized = gptq_model(source, quant, groups, TORCH_DTYPES[dtype], windows, calib_device, progress)
    torch_dtype = TORCH_DTYPES[dtype]
    manifest: dict = {
        "format": FORMAT_NAMES[format], "format_version": FORMAT_VERSION,
        "options": {"format": format, "dtype": dtype, "quant": quant, "group_size": group_size,
                    "merge_slorb": merge_slorb},
        "pattern": str(source.pattern), "nm": True, "dtype": dtype,
        "quantization": _quantization(quant, group_size, quant_method, calibration),
        "slorb": None,
    }
    if quant_method != "rtn":  # only then: an rtn manifest's options stay what the pipeline compares
        manifest["options"].update(quant_method=quant_method, calib=calib or "default", nsamples=nsamples or 128,
                                   seqlen=seqlen or 2048)
    slorb_layers = sorted({key.rpartition(".")[0] for key in source.slorb})
    if format == "packed":
        from safetensors.torch import save_file

        from semisparse.export.packed import pack_model

        packed = pack_model(source, torch_dtype, quant, group_size, quantized)  # every check happens before writing
        manifest.update(layers=packed.layers, tied=packed.tied, sizes=packed.sizes)
        if slorb_layers:
            manifest["slorb"] = {"layers": len(slorb_layers), "merged": False}
    else:
        from semisparse.export.hf import merge_slorb as merge, write_hf

        if slorb_layers:
            manifest["slorb"] = {"layers": len(merge(source)), "merged": True}
            manifest["nm"] = False
    manifest.update(
        model_config=json.loads(source.model.config.to_json_string(use_diff=False)),
        source={"run_dir": str(run_dir.resolve()), "meta": source.meta},
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        versions=package_versions(),
    )
    with rundir.atomic_dir(out, replace=True) as stage:
        if format == "packed":
            save_file(packed.tensors, str(stage / rundir.PACKED_WEIGHTS), metadata={"format": FORMAT_NAMES[format]})
            source.tokenizer.save_pretrained(stage)
            if getattr(source.model, "generation_config", None) is not None:
                source.model.generation_config.save_pretrained(stage)
        else:
            write_hf(source, stage, torch_dtype)
        manifest = write_manifest(stage, manifest)
    return {**manifest, "out": str(out)}

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
from semisparse.export.options import check_options
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


def _quantization(quant: str, group_size: int | None) -> dict:
    if quant == "none":
        return {"scheme": "none", "bits": None, "group_size": None}
    return {"scheme": quant, "method": "rtn", "symmetric": True, "bits": BITS[quant],
            "group_size": group_size if quant == "int4" else None,  # int4 None: per layer, see layers.*.group_size
            "axis": "output channel" if quant == "int8" else "compacted input"}


def refuse_unmerged_slorb(run_dir: Path, holder: str) -> None:
    """The one-line refusal of a SLoRB run for a format whose model (``holder``) cannot hold the branch."""
    raise UserError(f"{run_dir} has a SLoRB branch ({rundir.SLORB_FILE}), which {holder} "
                    "cannot hold: pass --merge-slorb to fold it into dense weights (no longer N:M), "
                    "or use --format packed, which keeps it")


def export_run(run_dir: str | Path, out: str | Path, format: str = "packed", dtype: str = "fp16",  # noqa: A002
               quant: str = "none", group_size: int | None = None, merge_slorb: bool = False,
               overwrite: bool = False) -> dict:
    """Export ``run_dir`` into ``out`` (docs/export.md); returns the manifest, with ``out`` added."""
    from semisparse.export.source import check_run_dir, read_source
    from semisparse.models import package_versions

    run_dir, out = Path(run_dir), Path(out)
    check_options(format, dtype, quant, group_size, merge_slorb)
    check_run_dir(run_dir)
    if format == "gguf":  # one file, not a folder: its own output checks and writer
        from semisparse.export.gguf_writer import export_gguf

        return export_gguf(run_dir, out, dtype, quant, merge_slorb, overwrite)
    _check_out(run_dir, out, overwrite)
    has_slorb = (run_dir / rundir.SLORB_FILE).is_file()
    if format == "hf" and has_slorb and not merge_slorb:
        refuse_unmerged_slorb(run_dir, "a stock transformers model")
    if quant == "int4":  # group sizes from the masks' shapes: a bad one fails before the model loads
        from semisparse.export.pack import compact_width
        from semisparse.export.quant import layer_group_size
        from semisparse.masks import Pattern

        pattern = Pattern.parse(rundir.read_run_meta(run_dir).get("pattern") or "2:4")
        for name, mask in rundir.load_masks(run_dir).items():
            layer_group_size(name, compact_width(mask.shape[-1], pattern), group_size)
    source = read_source(run_dir)
    torch_dtype = TORCH_DTYPES[dtype]
    manifest: dict = {
        "format": FORMAT_NAMES[format], "format_version": FORMAT_VERSION,
        "options": {"format": format, "dtype": dtype, "quant": quant, "group_size": group_size,
                    "merge_slorb": merge_slorb},
        "pattern": str(source.pattern), "nm": True, "dtype": dtype,
        "quantization": _quantization(quant, group_size),
        "slorb": None,
    }
    slorb_layers = sorted({key.rpartition(".")[0] for key in source.slorb})
    if format == "packed":
        from safetensors.torch import save_file

        from semisparse.export.packed import pack_model

        packed = pack_model(source, torch_dtype, quant, group_size)  # every layer check happens before writing
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

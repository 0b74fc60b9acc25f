"""The manifest of an exported folder (``export.json``): what the files are and how to check them.

    format, format_version   "semisparse-packed" | "semisparse-hf", an integer bumped on incompatible changes
    options                  what was asked: format, dtype, quant, group_size, merge_slorb
    pattern, nm              the N:M pattern; nm false once SLoRB is merged into dense weights
    dtype                    export dtype of floating tensors (fp16 | bf16 | fp32)
    quantization             scheme (none | int8 | int4), method (rtn), bits, group_size, symmetric, axis
    layers                   packed only: per sparse layer shape [out, in], compacted width, group size, bytes
    tied                     packed only: alias -> stored tensor name (tied embeddings)
    slorb                    null, or {layers, merged}
    sizes                    packed only: byte accounting (docs/export.md)
    model_config             the transformers config (config.to_dict())
    source                   the run directory exported: its path and semisparse.json
    files                    every other file of the folder: {name: {bytes, sha256}}

The manifest is written last; reading one checks the format name and version, verifying also every file's size
and sha256, so a truncated or edited file is one clear error.
"""

from __future__ import annotations

from pathlib import Path

from semisparse import rundir
from semisparse.errors import UserError

FORMAT_NAMES = {"packed": "semisparse-packed", "hf": "semisparse-hf"}
FORMAT_VERSION = 1


def is_export_dir(path: str | Path) -> bool:
    return (Path(path) / rundir.EXPORT_MANIFEST).is_file()


def file_records(folder: Path) -> dict[str, dict]:
    """{relative name: {bytes, sha256}} of every file under ``folder`` except the manifest."""
    out = {}
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        if name != rundir.EXPORT_MANIFEST:
            out[name] = {"bytes": path.stat().st_size, "sha256": rundir.sha256_file(path)}
    return out


def write_manifest(folder: Path, manifest: dict) -> dict:
    """Add the file records of ``folder`` and write the manifest into it (the folder is a staging folder)."""
    manifest = {**manifest, "files": file_records(folder)}
    rundir.atomic_write_json(Path(folder) / rundir.EXPORT_MANIFEST, manifest)
    return manifest


def read_manifest(folder: str | Path) -> dict:
    """The manifest, its format name and version checked (no file hashes: see ``verify``)."""
    folder = Path(folder)
    path = folder / rundir.EXPORT_MANIFEST
    if not path.is_file():
        raise UserError(f"{folder} is not an exported folder (no {rundir.EXPORT_MANIFEST})")
    manifest = rundir.read_json(path)
    name, version = manifest.get("format"), manifest.get("format_version")
    if name not in FORMAT_NAMES.values():
        raise UserError(f"{path}: unknown format {name!r} (this semisparse reads {', '.join(FORMAT_NAMES.values())})")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise UserError(f"{path}: format_version {version!r} is not a positive integer")
    if version > FORMAT_VERSION:
        raise UserError(f"{folder} was exported in {name} version {version}, newer than this semisparse reads "
                        f"(up to {FORMAT_VERSION}): upgrade semisparse")
    if not isinstance(manifest.get("files"), dict):
        raise UserError(f"{path}: no file list")
    return manifest


def verify(folder: str | Path) -> dict:
    """``read_manifest`` plus every listed file present with its recorded size and sha256; returns the manifest."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    for name, record in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            raise UserError(f"{path} is missing: the exported folder is incomplete, export it again")
        if path.stat().st_size != record.get("bytes") or rundir.sha256_file(path) != record.get("sha256"):
            raise UserError(f"{path} is truncated or was changed after export (size or sha256 differs from "
                            f"{rundir.EXPORT_MANIFEST}): export it again")
    return manifest

"""The run directory being exported: read it and check it before anything is written.

The model is loaded as a stock transformers model in float32 (no SLoRB wrapper): the SLoRB tensors are exported
as they are stored. Every check that can fail runs here, so a bad run directory writes nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from semisparse import rundir
from semisparse.errors import UserError, first_line
from semisparse.layers import is_linear, weight_matrix
from semisparse.masks import Pattern, is_nm


@dataclass
class Source:
    path: Path
    model: nn.Module  # stock transformers model, float32, eval mode
    tokenizer: object
    meta: dict  # semisparse.json
    pattern: Pattern
    masks: dict[str, torch.Tensor]  # layer name -> bool [out, in]
    modules: dict[str, nn.Module]  # layer name -> its linear module
    slorb: dict[str, torch.Tensor]  # "<layer>.slorb_S" / "<layer>.slorb_X" ({} without SLoRB)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No transformers progress bars (loading/writing shards): an export's output, or its error, is one line."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def check_run_dir(path: Path) -> None:
    """A semisparse run directory with masks, else a one-line UserError (a dense model has no masks)."""
    if not path.is_dir():
        raise UserError(f"run directory {path} does not exist")
    if (path / rundir.EXPORT_MANIFEST).is_file():
        raise UserError(f"{path} is an exported folder, not a run directory: export the run directory it came from")
    if not rundir.is_model_dir(path):
        raise UserError(f"{path} is not a run directory (no {rundir.MODEL_CONFIG})")
    if not (path / rundir.MASKS_FILE).is_file():
        raise UserError(f"{path} has no {rundir.MASKS_FILE}: it is a dense model, not a sparse run directory "
                        "(prune or train it first)")
    if not (path / rundir.RUN_META).is_file():
        raise UserError(f"{path} has no {rundir.RUN_META}: not a complete semisparse run directory")


def _check_layer(name: str, module: nn.Module | None, mask: torch.Tensor, pattern: Pattern) -> None:
    if module is None or not is_linear(module):
        raise UserError(f"{rundir.MASKS_FILE} has a mask for {name}, which is not a linear layer of the model")
    weight = weight_matrix(module)
    if mask.dtype != torch.bool or mask.shape != weight.shape or not is_nm(mask, pattern):
        raise UserError(f"the mask of layer {name} is not a {pattern} bool mask of its weight's shape "
                        f"{tuple(weight.shape)}")
    if not bool(torch.isfinite(weight).all()):
        raise UserError(f"layer {name} has non-finite weights")
    # The run directory stores W ⊙ M; a non-zero where the mask prunes would be silently dropped by packing.
    if bool((weight[~mask] != 0).any()):
        raise UserError(f"layer {name} has non-zero weights where its mask prunes them: the run directory is "
                        "inconsistent")


def read_source(path: str | Path) -> Source:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    check_run_dir(path)
    meta = rundir.read_run_meta(path)
    pattern = Pattern.parse(meta.get("pattern") or "2:4")
    masks = rundir.load_masks(path)
    if not masks:
        raise UserError(f"{path / rundir.MASKS_FILE} holds no masks: nothing is sparse")
    slorb = {}
    if (path / rundir.SLORB_FILE).is_file():
        try:
            slorb = load_file(str(path / rundir.SLORB_FILE))
        except Exception as exc:  # safetensors raises its own error types on corrupt files
            raise UserError(f"cannot read {path / rundir.SLORB_FILE}: {exc}") from exc
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        first = first_line(exc)
        raise UserError(f"cannot load the model of {path}: {first}") from exc
    model.eval()
    all_modules = dict(model.named_modules())
    modules = {name: all_modules.get(name) for name in masks}
    for name, mask in masks.items():
        _check_layer(name, modules[name], mask, pattern)
    for key in slorb:
        layer = key.rpartition(".")[0]
        if layer not in masks:
            raise UserError(f"{rundir.SLORB_FILE} has {key} for a layer without a mask")
    return Source(path=path, model=model, tokenizer=tokenizer, meta=meta, pattern=pattern, masks=masks,
                  modules=modules, slorb=slorb)

"""One-shot pruning driver: calibration tokens run through the model block by block.

As in SparseGPT and Wanda: the inputs of the first decoder block are captured once; then, for each block,
the selected layers' input statistics are gathered over all calibration samples, the layers are pruned, and
the block is run again so that its *pruned* outputs become the next block's inputs. Only two
[nsamples, seqlen, hidden] buffers and one block's statistics are held at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from semisparse.errors import UserError
from semisparse.layers import LayerFilter, find_blocks, in_features, layer_input, select_layers, weight_matrix
from semisparse.masks import Pattern


class PruningMethod(Protocol):
    """A pruning criterion: statistics over layer inputs, then a mask (it may also update the weight)."""

    name: str
    needs_calibration: bool

    def new_stats(self, in_features: int, device: torch.device | None = None) -> object: ...

    def observe(self, stats: object, x: torch.Tensor) -> None: ...

    def prune(self, weight: torch.Tensor, stats: object, pattern: Pattern) -> torch.Tensor: ...


@dataclass
class PruneResult:
    masks: dict[str, torch.Tensor]  # layer name -> bool [out, in]
    skipped: dict[str, str] = field(default_factory=dict)  # layer name -> reason


def _check_widths(layers: dict[str, nn.Module], pattern: Pattern, skip_indivisible: bool) -> dict[str, str]:
    skipped = {}
    for name, module in layers.items():
        width = in_features(module)
        if width % pattern.m:
            if not skip_indivisible:
                raise UserError(
                    f"layer {name} has input width {width}, not a multiple of M={pattern.m} "
                    "(pass --skip-indivisible to leave such layers dense)"
                )
            skipped[name] = f"input width {width} is not a multiple of {pattern.m}"
    return skipped


class _StopForward(Exception):
    pass


def _capture_block_inputs(model: nn.Module, first_block: nn.Module, windows: torch.Tensor, device) -> tuple:
    """Run the embeddings once per sample and keep what the first block receives."""
    hidden: list[torch.Tensor] = []
    call: dict = {}

    def hook(module, args, kwargs):
        if args:
            hidden.append(args[0].detach().cpu())
            call["args_tail"] = args[1:]
        else:
            hidden.append(kwargs["hidden_states"].detach().cpu())
            call["args_tail"] = ()
        # Every window has the same length and no padding, so the first call's extra arguments
        # (rotary embeddings, causal mask, positions) serve all samples.
        if "kwargs" not in call:
            call["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _StopForward

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for row in windows:
            try:
                model(row.unsqueeze(0).to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return torch.cat(hidden), call["args_tail"], call["kwargs"]


def _run_block(block: nn.Module, x: torch.Tensor, args_tail: tuple, kwargs: dict, device) -> torch.Tensor:
    out = block(x.to(device), *args_tail, **kwargs)
    return (out[0] if isinstance(out, (tuple, list)) else out).detach().cpu()


@torch.no_grad()
def prune_model(
    model: nn.Module,
    method: PruningMethod,
    pattern: Pattern,
    windows: torch.Tensor | None = None,
    layer_filter: LayerFilter | None = None,
    skip_indivisible: bool = False,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> PruneResult:
    """Prune the selected layers of ``model`` in place; ``windows`` [nsamples, seqlen] are calibration tokens."""
    layers = select_layers(model, layer_filter)
    if not layers:
        raise UserError("the layer filter selects no linear layer")
    skipped = _check_widths(layers, pattern, skip_indivisible)
    todo = {name: mod for name, mod in layers.items() if name not in skipped}
    masks: dict[str, torch.Tensor] = {}

    if not method.needs_calibration:
        for name, module in tqdm(todo.items(), desc=f"{method.name} {pattern}", disable=not progress):
            masks[name] = method.prune(weight_matrix(module), None, pattern).cpu()
        return PruneResult(masks, skipped)

    if windows is None:
        raise UserError(f"{method.name} needs calibration data")
    blocks_name, blocks = find_blocks(model)
    outside = [n for n in todo if not n.startswith(blocks_name + ".")]
    if outside:
        raise UserError(f"{method.name} prunes layers inside the decoder blocks only; not: {', '.join(outside)}")

    hidden, args_tail, kwargs = _capture_block_inputs(model, blocks[0], windows, device)
    for index, block in enumerate(tqdm(blocks, desc=f"{method.name} {pattern} (blocks)", disable=not progress)):
        prefix = f"{blocks_name}.{index}."
        block_layers = {n: m for n, m in todo.items() if n.startswith(prefix)}
        stats: dict[str, object] = {}
        # Layers fed the very same tensor (q/k/v, gate/up) share one set of statistics.
        owner: dict[str, str] = {}
        seen: list[tuple[torch.Tensor, str]] = []

        def make_hook(name: str):
            def hook(module, inputs, output):
                x = inputs[0]
                if name not in owner:
                    owner[name] = next((n for t, n in seen if t is x), name)
                    seen.append((x, name))
                if owner[name] == name:
                    if name not in stats:
                        stats[name] = method.new_stats(in_features(module), x.device)  # summed where x lives
                    method.observe(stats[name], layer_input(module, x))

            return hook

        handles = [m.register_forward_hook(make_hook(n)) for n, m in block_layers.items()]
        try:
            for sample in hidden:
                seen.clear()
                _run_block(block, sample.unsqueeze(0), args_tail, kwargs, device)
        finally:
            for h in handles:
                h.remove()
        for name, module in block_layers.items():
            masks[name] = method.prune(weight_matrix(module), stats[owner[name]], pattern).cpu()
        stats.clear()  # free this block's statistics before the next block
        hidden = torch.cat([_run_block(block, s.unsqueeze(0), args_tail, kwargs, device) for s in hidden])
    return PruneResult(masks, skipped)

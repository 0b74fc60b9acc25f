"""Which layers become sparse: a filter over module types and names, and a uniform [out, in] weight view.

Works for any transformers causal LM whose decoder blocks live in one ``nn.ModuleList`` (Llama, Mistral, Qwen2:
``model.layers``; GPT-2: ``transformer.h``) and whose projections are ``nn.Linear`` or GPT-2's ``Conv1D``
(weight stored transposed as [in, out]). No per-family code: the algorithms only ever see ``weight_matrix``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

try:  # transformers' GPT-2 style layer; optional so the module imports without transformers
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = None  # type: ignore[assignment,misc]

LINEAR_TYPES: tuple[type, ...] = (nn.Linear,) + ((Conv1D,) if Conv1D is not None else ())


@dataclass
class LayerFilter:
    """Select linear layers by type and by regular expressions on their qualified names.

    A layer is selected when it is a linear type, lies inside the decoder blocks (unless ``blocks_only`` is
    False), matches at least one ``include`` pattern (all, when empty) and no ``exclude`` pattern.
    """

    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=lambda: [r"(^|\.)lm_head$", r"embed", r"(^|\.)wte$", r"(^|\.)wpe$"])
    blocks_only: bool = True

    def matches(self, name: str) -> bool:
        if self.include and not any(re.search(p, name) for p in self.include):
            return False
        return not any(re.search(p, name) for p in self.exclude)


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks: the longest ``nn.ModuleList`` of the model (ties: the first found)."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    if best is None:
        raise ValueError(f"cannot find the decoder blocks (an nn.ModuleList) in {type(model).__name__}")
    return best


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, LINEAR_TYPES)


def select_layers(model: nn.Module, layer_filter: LayerFilter | None = None) -> dict[str, nn.Module]:
    """Qualified name -> linear module, in model order, for the layers the filter selects."""
    layer_filter = layer_filter or LayerFilter()
    prefix = find_blocks(model)[0] + "." if layer_filter.blocks_only else ""
    return {
        name: module
        for name, module in model.named_modules()
        if is_linear(module) and name.startswith(prefix) and layer_filter.matches(name)
    }


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The layer's weight as an [out_features, in_features] view (shares storage: in-place edits stick)."""
    if Conv1D is not None and isinstance(module, Conv1D):
        return module.weight.data.t()
    if isinstance(module, nn.Linear):
        return module.weight.data
    raise TypeError(f"not a linear layer: {type(module).__name__}")


def in_features(module: nn.Module) -> int:
    return weight_matrix(module).shape[1]


def layer_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Flatten a layer's input to [tokens, in_features] (the columns the N:M groups run over)."""
    return x.reshape(-1, x.shape[-1])

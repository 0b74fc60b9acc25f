"""SparseLinear: a dense master weight used through an N:M mask, with an optional SLoRB branch (AST.md §1, §4).

``sparsify`` swaps the selected linear layers of a model for ``SparseLinear`` in place; ``densify`` swaps them back
for the stock classes (``nn.Linear`` / GPT-2 ``Conv1D``) holding exactly ``W ⊙ M``, so that a stock transformers
model can be saved. SLoRB cannot live in a stock model: ``densify`` hands its tensors back and ``attach_slorb``
re-adds the branch after loading.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from semisparse.layers import Conv1D, LayerFilter, select_layers, weight_matrix
from semisparse.masks import Pattern, is_nm, nm_mask

SLORB_S = "slorb_S"
SLORB_X = "slorb_X"
WEIGHT_SCALE = "weight_scale"


class _MaskedWeight(torch.autograd.Function):
    """``W ⊙ M`` forward, identity backward: the straight-through estimator of AST.md §1.

    Every dense weight, pruned ones included, receives ``dL/dW̃``, so a pruned weight whose gradient pushes it up can
    win its group back at the next mask recompute. ``dtype``: the compute dtype (autocast's); the weight is cast
    first and masked in that dtype, one pass over half the bytes instead of masking in float32 and casting after.
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:  # type: ignore[override]
        ctx.weight_dtype = weight.dtype
        return _masked(weight, mask, dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        return grad.to(ctx.weight_dtype), None, None


class _LinearFromMaster(torch.autograd.Function):
    """``x @ W̃ᵀ + b`` with W̃ = (W scaled by A) ⊙ M, built from the master tensors and rebuilt in backward.

    ``scale`` (CAST's per-row weight scale A, or None) and ``mask`` (None: the dense forward of CAST) are optional.
    The gradient reaches W straight through the mask (AST.md §1), then through the scale: dW = G·A, dA = Σ_block G·W,
    G = gradᵀx. Autograd keeps x and the tensors that exist anyway (W, A, M: a parameter, a parameter, a buffer),
    never W̃: autograd's own ``F.linear`` would keep W̃ (or autocast's cast of it) from each layer's forward to its
    backward, as many bytes as the model in the compute dtype (docs/distributed.md, memory per GPU); rebuilding it
    is one elementwise pass. Everything is computed in ``dtype`` (autocast's, or W's own), as autocast's
    ``F.linear`` would; the scale's products stay in W's dtype, as autograd's would."""

    @staticmethod
    def forward(ctx, x, weight, scale, mask, bias, dtype):  # type: ignore[override]
        x_c = x.to(dtype)
        bias_c = bias.to(dtype) if bias is not None else None
        out = F.linear(x_c, _effective(weight, scale, mask, dtype), bias_c)
        ctx.save_for_backward(x_c, weight, scale, mask)
        ctx.dtypes = (x.dtype, weight.dtype, bias.dtype if bias is not None else None, dtype)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x_c, weight, scale, mask = ctx.saved_tensors
        x_dtype, weight_dtype, bias_dtype, dtype = ctx.dtypes
        grad = grad.to(dtype)
        grad_x = grad_w = grad_scale = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad.matmul(_effective(weight, scale, mask, dtype)).to(x_dtype)
        g2, x2 = grad.reshape(-1, grad.shape[-1]), x_c.reshape(-1, x_c.shape[-1])
        if ctx.needs_input_grad[1] or (scale is not None and ctx.needs_input_grad[2]):
            g_eff = g2.t().mm(x2).to(weight_dtype)  # dL/dW̃, handed straight through the mask
            if ctx.needs_input_grad[1]:
                grad_w = _scaled(g_eff, scale)  # dW = G·A, entry by entry as in the forward
            if scale is not None and ctx.needs_input_grad[2]:
                grad_scale = (g_eff * weight).view(*scale.shape, -1).sum(-1)  # dA = block sums of G·W
        if bias_dtype is not None and ctx.needs_input_grad[4]:
            grad_b = g2.sum(0).to(bias_dtype)
        return grad_x, grad_w, grad_scale, None, grad_b, None


def _effective(weight: torch.Tensor, scale: torch.Tensor | None, mask: torch.Tensor | None,
               dtype: torch.dtype) -> torch.Tensor:
    """W̃ in ``dtype``: W times its scale (in W's dtype), then masked."""
    weight = _scaled(weight, scale)
    if mask is None:
        return weight.to(dtype)
    return _masked(weight, mask, dtype)


def _scaled(weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """W with entry (r, c) multiplied by A[r, c // (in / n)], A [out, n] (CAST.md §3); W itself without a scale."""
    if scale is None:
        return weight
    out_f, in_f = weight.shape
    return (weight.view(out_f, scale.shape[1], in_f // scale.shape[1]) * scale.unsqueeze(-1)).view(out_f, in_f)


def _masked(weight: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Cast first, then mask in the compute dtype: one pass over half the bytes when autocast is on.
    return weight * mask if dtype == weight.dtype else weight.to(dtype).mul_(mask)


def block_indicator(rank: int, k: int, *, dtype: torch.dtype | None = None, device=None) -> torch.Tensor:
    """X of SLoRB at init: [rank, rank*k] with x_ij = 1 iff i*k <= j < (i+1)*k (row i sums input group i)."""
    return torch.eye(rank, dtype=dtype, device=device).repeat_interleave(k, dim=1)


class SparseLinear(nn.Module):
    """A linear layer whose forward uses ``W ⊙ M`` (M an N:M bool mask) while the dense W stays trainable.

    ``weight`` is always [out, in], also when wrapping a GPT-2 ``Conv1D`` (stored [in, out]); ``conv1d`` remembers the
    original layout so ``to_dense`` can restore it. ``mask`` is a bool buffer that ``recompute_mask``/``set_mask``
    update *in place*, so references to it (e.g. the optimizer's mask mapping) stay valid. Before FSDP2 wraps the
    model, ``shard_masks_with_weights`` makes it a frozen bool parameter, sharded by output rows like the weight.
    """

    mask: torch.Tensor

    def __init__(
        self,
        weight: nn.Parameter,
        bias: nn.Parameter | None,
        pattern: Pattern | str,
        mask: torch.Tensor | None = None,
        *,
        conv1d: bool = False,
    ) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"SparseLinear needs a 2-D [out, in] weight, got shape {tuple(weight.shape)}")
        self.pattern = Pattern.parse(pattern)
        if weight.shape[1] % self.pattern.m:
            raise ValueError(
                f"in_features={weight.shape[1]} is not a multiple of M={self.pattern.m} (pattern {self.pattern})"
            )
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)
        self.bias = bias
        self.conv1d = conv1d
        self.register_buffer("mask", torch.zeros(weight.shape, dtype=torch.bool, device=weight.device))
        if weight.is_meta:
            pass  # a skeleton (models.load_skeleton): no values to compute a mask from or check one against
        elif mask is None:
            self.recompute_mask()
        else:
            self.set_mask(mask)
        # SLoRB branch (AST.md §4): absent until add_slorb / set_slorb.
        self.slorb_S: nn.Parameter | None = None
        self.slorb_X: torch.Tensor | None = None
        # CAST (CAST.md §1, §3): a learned per-row, per-input-block scale, and the dense forward.
        self.weight_scale: nn.Parameter | None = None
        self.dense_forward = False

    # ----------------------------------------------------------------------------------------------- construction

    @classmethod
    def from_dense(
        cls, module: nn.Module, pattern: Pattern | str, mask: torch.Tensor | None = None
    ) -> "SparseLinear":
        """Wrap an ``nn.Linear`` (its weight Parameter is reused, no copy) or a GPT-2 ``Conv1D`` (transposed copy)."""
        if Conv1D is not None and isinstance(module, Conv1D):
            weight = nn.Parameter(weight_matrix(module).contiguous(), requires_grad=module.weight.requires_grad)
            layer = cls(weight, module.bias, pattern, mask, conv1d=True)
        elif isinstance(module, nn.Linear):
            layer = cls(module.weight, module.bias, pattern, mask)
        else:
            raise TypeError(f"not a linear layer: {type(module).__name__}")
        layer.train(module.training)
        return layer

    def to_dense(self) -> nn.Module:
        """A stock ``nn.Linear``/``Conv1D`` holding exactly ``W ⊙ M`` (pruned entries stored as zeros; a weight scale
        folded in first), no SLoRB."""
        with torch.no_grad():
            masked = self.scaled_weight() * self.mask
        out_f, in_f = masked.shape
        # Build on the meta device: the constructors' random init would be wasted work on large layers.
        with torch.device("meta"):
            module: nn.Module = (
                Conv1D(out_f, in_f) if self.conv1d else nn.Linear(in_f, out_f, bias=self.bias is not None)
            )
        data = masked.t().contiguous() if self.conv1d else masked
        module.weight = nn.Parameter(data, requires_grad=self.weight.requires_grad)
        if self.bias is not None:
            module.bias = self.bias
        elif self.conv1d:  # Conv1D always has a bias: a missing one is a zero bias
            module.bias = nn.Parameter(torch.zeros(out_f, dtype=masked.dtype, device=masked.device))
        module.train(self.training)
        return module

    # ------------------------------------------------------------------------------------------------------- mask

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def set_mask(self, mask: torch.Tensor) -> None:
        """Replace the mask (in place). It must be bool, shaped like the weight and exactly N:M."""
        if mask.dtype != torch.bool:
            # An int mask is the reference code's bug (AST.md §2): `~` on ints is a bitwise NOT, not a logical one.
            raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
        if mask.shape != self.weight.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} != weight shape {tuple(self.weight.shape)}")
        if not is_nm(mask, self.pattern):
            raise ValueError(
                f"mask is not {self.pattern}: some group of {self.pattern.m} does not keep exactly {self.pattern.n}"
            )
        self.mask.copy_(mask)

    @torch.no_grad()
    def recompute_mask(self) -> torch.Tensor:
        """Magnitude N:M mask of the current dense weight; stored in place and returned (as a separate tensor).

        Sharded by FSDP2 (weight and mask split by output rows, ``shard_masks_with_weights``): each process computes
        and stores the mask of its own rows (groups run along the input dimension: nothing is gathered) and returns
        those rows."""
        from torch.distributed.tensor import DTensor

        weight = self.weight.detach()
        if isinstance(weight, DTensor):
            if not isinstance(self.mask, DTensor):
                raise RuntimeError("the weight is sharded but its mask is not: call shard_masks_with_weights(model) "
                                   "before fully_shard")
            rows = nm_mask(weight.to_local().abs(), self.pattern)
            self.mask.to_local().copy_(rows)
            return rows
        new = nm_mask(weight.abs(), self.pattern)
        self.mask.copy_(new)
        return new

    def compute_dtype(self) -> torch.dtype:
        """Autocast's dtype when autocast is on (a floating weight only: autocast leaves other dtypes alone), else W's."""
        device_type = self.weight.device.type
        if self.weight.is_floating_point() and torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
        return self.weight.dtype

    def masked_weight(self) -> torch.Tensor:
        """``W ⊙ M`` (W scaled first, when the layer has a weight scale) with the straight-through gradient to W, in
        the compute dtype."""
        return _MaskedWeight.apply(self.scaled_weight(), self.mask, self.compute_dtype())

    @torch.no_grad()
    def pruned_abs_max(self) -> float:
        """The largest |weight| (scaled) among the pruned entries: what a hard prune with the current mask cuts.
        Sharded by FSDP2: over this process's rows (the trainer takes the maximum over processes)."""
        from torch.distributed.tensor import DTensor

        from semisparse.train.optim import local_rows

        if isinstance(self.weight, DTensor):
            weight, mask = self.weight.to_local().detach(), local_rows(self.weight, self.mask)
            if self.weight_scale is not None:
                weight = _scaled(weight, self.weight_scale.to_local().detach())
        else:
            weight, mask = self.scaled_weight().detach(), self.mask
        pruned = weight.abs().masked_fill(mask, 0)
        return float(pruned.max()) if pruned.numel() else 0.0

    # ----------------------------------------------------------------------------------------------- weight scale

    def scaled_weight(self) -> torch.Tensor:
        """W with entry (r, c) multiplied by A[r, c // (in / n)] (CAST.md §3); W itself without a scale."""
        return _scaled(self.weight, self.weight_scale)

    def add_weight_scale(self, n: int) -> None:
        """A trainable scale A [out, n], initialised to 1: row r's input columns in n contiguous blocks, one factor
        each. Every block must hold whole groups of M, so that a group shares one factor and the mask is unchanged."""
        if n < 1 or self.in_features % (n * self.pattern.m):
            raise ValueError(
                f"a weight scale with n={n} blocks needs in_features={self.in_features} to be a multiple of "
                f"n x M = {n * self.pattern.m}"
            )
        self.weight_scale = nn.Parameter(torch.ones(self.out_features, n, dtype=self.weight.dtype,
                                                    device=self.weight.device))

    # ------------------------------------------------------------------------------------------------------ SLoRB

    @property
    def has_slorb(self) -> bool:
        return self.slorb_S is not None

    @torch.no_grad()
    def add_slorb(self, k: int, train_x: bool = True) -> None:
        """Add SLoRB with group size k, "mean" init from the current mask: X = block indicator, S_ij = mean over
        input group j of the pruned weights of row i (zeros counted), so each group's weight sum is preserved."""
        if k <= 0 or self.in_features % k:
            raise ValueError(f"SLoRB group size k={k} must be a positive divisor of in_features={self.in_features}")
        rank = self.in_features // k
        pruned = self.weight.detach().masked_fill(self.mask, 0)
        s = pruned.reshape(self.out_features, rank, k).sum(-1) / k
        x = block_indicator(rank, k, dtype=self.weight.dtype, device=self.weight.device)
        self.set_slorb(s, x, train_x)

    def set_slorb(self, s: torch.Tensor, x: torch.Tensor, train_x: bool = True) -> None:
        """Install (or replace) the SLoRB tensors: S [out, r] always trainable; X [r, in] a Parameter iff train_x,
        else a buffer (frozen, not seen by optimizers built from ``parameters()``)."""
        fits = s.dim() == 2 and x.dim() == 2 and s.shape[1] == x.shape[0]
        if not (fits and s.shape[0] == self.out_features and x.shape[1] == self.in_features):
            raise ValueError(
                f"SLoRB shapes S {tuple(s.shape)}, X {tuple(x.shape)} do not fit a layer of "
                f"[out, in] = [{self.out_features}, {self.in_features}] (need S [out, r], X [r, in])"
            )
        # Drop any previous X first: it may be registered as the other kind (parameter vs buffer).
        for name in (SLORB_S, SLORB_X):
            self._parameters.pop(name, None)
            self._buffers.pop(name, None)
            self.__dict__.pop(name, None)
        like = dict(dtype=self.weight.dtype, device=self.weight.device)
        self.slorb_S = nn.Parameter(s.detach().to(**like).clone())
        x = x.detach().to(**like).clone()
        if train_x:
            self.slorb_X = nn.Parameter(x)
        else:
            self.register_buffer(SLORB_X, x)

    def remove_slorb(self) -> None:
        for name in (SLORB_S, SLORB_X):
            self._parameters.pop(name, None)
            self._buffers.pop(name, None)
        self.slorb_S = None
        self.slorb_X = None

    def slorb_tensors(self) -> dict[str, torch.Tensor]:
        """{"slorb_S": S, "slorb_X": X} detached, or {} without SLoRB."""
        if self.slorb_S is None or self.slorb_X is None:
            return {}
        return {SLORB_S: self.slorb_S.detach(), SLORB_X: self.slorb_X.detach()}

    # ---------------------------------------------------------------------------------------------------- forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.is_floating_point():
            # Dense forward (CAST): every weight takes part; the mask only steers the decay and the final prune.
            mask = None if self.dense_forward else self.mask
            y = _LinearFromMaster.apply(x, self.weight, self.weight_scale, mask, self.bias, self.compute_dtype())
        else:  # autocast and the straight-through function are for floating weights only
            y = F.linear(x, self.scaled_weight() if self.dense_forward else self.masked_weight(), self.bias)
        if self.slorb_S is not None and self.slorb_X is not None:
            # Kept as a separate two-GEMM branch: merging S·X into W would break N:M.
            y = y + F.linear(F.linear(x, self.slorb_X), self.slorb_S)
        return y

    def extra_repr(self) -> str:
        slorb = f", slorb_rank={self.slorb_S.shape[1]}" if self.slorb_S is not None else ""
        layout = ", conv1d" if self.conv1d else ""
        scale = f", weight_scale_blocks={self.weight_scale.shape[1]}" if self.weight_scale is not None else ""
        forward = ", dense_forward" if self.dense_forward else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"pattern={self.pattern}{layout}{slorb}{scale}{forward}"
        )


# ------------------------------------------------------------------------------------------------- model level


def sparse_layers(model: nn.Module) -> dict[str, SparseLinear]:
    """Qualified name -> SparseLinear, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, SparseLinear)}


@contextlib.contextmanager
def masked_forward(layers: Mapping[str, SparseLinear]) -> Iterator[None]:
    """Run dense-forward layers (CAST) through their masks for a while: the model as a hard prune now would make it."""
    dense = {name: layer.dense_forward for name, layer in layers.items()}
    for layer in layers.values():
        layer.dense_forward = False
    try:
        yield
    finally:
        for name, layer in layers.items():
            layer.dense_forward = dense[name]


def shard_masks_with_weights(model: nn.Module) -> None:
    """Make every SparseLinear's mask a frozen bool parameter, before ``fully_shard``: FSDP2 shards parameters and
    leaves buffers whole, so a mask buffer would be a full copy in every process (1 byte per sparse weight: 6.5 GB
    a GPU for LLaMA-2-7B). As a parameter it is split by output rows like its weight, each process keeps its rows
    (1/world of it), and FSDP2 gathers it with the weight for the forward and the backward (1 byte per sparse
    weight more on each all-gather). State-dict keys are unchanged."""
    for layer in sparse_layers(model).values():
        if not isinstance(layer.mask, nn.Parameter):
            layer.mask = nn.Parameter(layer.mask, requires_grad=False)  # replaces the buffer of that name


def param_masks(model: nn.Module) -> dict[nn.Parameter, torch.Tensor]:
    """{dense weight: its live mask}: the mapping the masked optimizer needs (a buffer; under FSDP2 a frozen
    parameter sharded like the weight). Masks are updated in place by ``recompute_mask``, so this mapping never goes
    stale."""
    return {layer.weight: layer.mask for layer in sparse_layers(model).values()}


def sparsify(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor] | None,
    pattern: Pattern | str,
    layer_filter: LayerFilter | None = None,
    slorb_k: int | None = None,
    train_x: bool = True,
    weight_scale_n: int | None = None,
    dense_forward: bool = False,
) -> dict[str, SparseLinear]:
    """Replace every selected linear layer by a SparseLinear, in place.

    ``masks`` ([out, in] bool, keyed by qualified layer name) must cover exactly the selected layers; None means
    magnitude masks of the current weights. ``slorb_k`` adds a SLoRB branch (mean init) to every layer,
    ``weight_scale_n`` a weight scale of that many blocks, ``dense_forward`` makes the forward use the dense weight
    (CAST). Build the optimizer *after* this call: GPT-2 ``Conv1D`` weights become new (transposed) Parameters.
    """
    pattern = Pattern.parse(pattern)
    if sparse_layers(model):
        raise ValueError("model already contains SparseLinear layers: call densify() first")
    selected = select_layers(model, layer_filter)
    if not selected:
        raise ValueError("no linear layer selected: check the layer filter")
    for name, module in selected.items():
        if weight_matrix(module).shape[1] % pattern.m:
            raise ValueError(
                f"layer {name}: in_features={weight_matrix(module).shape[1]} is not a multiple of M={pattern.m}, "
                f"so it cannot be {pattern} sparse (exclude it with the layer filter)"
            )
        if weight_scale_n is not None and weight_matrix(module).shape[1] % (weight_scale_n * pattern.m):
            raise ValueError(
                f"layer {name}: in_features={weight_matrix(module).shape[1]} is not a multiple of "
                f"scale.blocks x M = {weight_scale_n * pattern.m}, so a weight scale of {weight_scale_n} blocks would "
                "split a group of M"
            )
    if masks is not None:
        missing = [n for n in selected if n not in masks]
        unused = [n for n in masks if n not in selected]
        if missing or unused:
            raise ValueError(f"masks do not match the selected layers: missing {missing}, not selected {unused}")

    wrapped: dict[str, SparseLinear] = {}
    for name, module in selected.items():
        mask = None
        if masks is not None:
            mask = masks[name].to(weight_matrix(module).device)
        try:
            layer = SparseLinear.from_dense(module, pattern, mask)
        except (ValueError, TypeError) as err:
            raise type(err)(f"layer {name}: {err}") from err
        if slorb_k is not None:
            try:
                layer.add_slorb(slorb_k, train_x)
            except ValueError as err:
                raise ValueError(f"layer {name}: {err}") from err
        if weight_scale_n is not None:
            try:
                layer.add_weight_scale(weight_scale_n)
            except ValueError as err:
                raise ValueError(f"layer {name}: {err}") from err
        layer.dense_forward = dense_forward
        model.set_submodule(name, layer)
        wrapped[name] = layer
    return wrapped


def densify(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Inverse of ``sparsify``: put back stock layers holding exactly ``W ⊙ M``.

    Returns (masks {name: [out, in] bool}, slorb {"<name>.slorb_S"/"<name>.slorb_X": tensor}); the SLoRB branch is
    no longer in the model's forward after this, re-add it with ``attach_slorb``.
    """
    masks: dict[str, torch.Tensor] = {}
    slorb: dict[str, torch.Tensor] = {}
    for name, layer in sparse_layers(model).items():
        masks[name] = layer.mask.detach().clone()
        for key, tensor in layer.slorb_tensors().items():
            slorb[f"{name}.{key}"] = tensor.clone()
        model.set_submodule(name, layer.to_dense())
    return masks, slorb


def attach_slorb(
    model: nn.Module,
    slorb_tensors: Mapping[str, torch.Tensor],
    pattern: Pattern | str = "2:4",
    masks: Mapping[str, torch.Tensor] | None = None,
    train_x: bool = False,
) -> dict[str, SparseLinear]:
    """Re-add saved SLoRB branches ("<name>.slorb_S" / "<name>.slorb_X") to a model, e.g. right after loading.

    A layer that is already a SparseLinear just gets S and X. A stock layer is wrapped in a SparseLinear first, with
    its mask from ``masks`` or, when None, the magnitude mask of its stored weights, which is exact for weights that
    already are N:M sparse (checked: anything else raises rather than silently pruning more). ``train_x`` False
    (loading for evaluation) stores X as a buffer.
    """
    pattern = Pattern.parse(pattern)
    by_layer: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in slorb_tensors.items():
        name, _, kind = key.rpartition(".")
        if kind not in (SLORB_S, SLORB_X) or not name:
            raise ValueError(
                f"unexpected SLoRB tensor name {key!r}: expected '<layer>.{SLORB_S}' or '<layer>.{SLORB_X}'"
            )
        by_layer.setdefault(name, {})[kind] = tensor
    modules = dict(model.named_modules())
    attached: dict[str, SparseLinear] = {}
    for name, parts in by_layer.items():
        if set(parts) != {SLORB_S, SLORB_X}:
            raise ValueError(f"layer {name}: SLoRB needs both {SLORB_S} and {SLORB_X}, got {sorted(parts)}")
        module = modules.get(name)
        if module is None:
            raise ValueError(f"SLoRB tensors for {name!r}, but the model has no such layer")
        if not isinstance(module, SparseLinear):
            mask = None
            if masks is not None:
                if name not in masks:
                    raise ValueError(f"layer {name}: no mask given")
                mask = masks[name].to(weight_matrix(module).device)
            try:
                layer = SparseLinear.from_dense(module, pattern, mask)
            except (ValueError, TypeError) as err:
                raise type(err)(f"layer {name}: {err}") from err
            if not torch.equal(layer.masked_weight().detach(), layer.weight.detach()):
                raise ValueError(
                    f"layer {name}: stored weights are not {pattern} sparse under the "
                    f"{'given' if masks is not None else 'magnitude'} mask; pass the right pattern or masks"
                )
            model.set_submodule(name, layer)
            module = layer
        try:
            module.set_slorb(parts[SLORB_S], parts[SLORB_X], train_x)
        except ValueError as err:
            raise ValueError(f"layer {name}: {err}") from err
        attached[name] = module
    return attached


def slorb_parameter_count(model: nn.Module) -> int:
    """Entries of all SLoRB branches: S always; X unless it is a frozen block indicator (at inference that is a
    plain group sum with no weights, AST.md §4). A trainable X counts even at init, as in the paper's Table 2."""
    total = 0
    for layer in sparse_layers(model).values():
        if layer.slorb_S is None or layer.slorb_X is None:
            continue
        total += layer.slorb_S.numel()
        x = layer.slorb_X
        rank, in_f = x.shape
        frozen_indicator = (
            not x.requires_grad
            and in_f % rank == 0
            and torch.equal(x, block_indicator(rank, in_f // rank, dtype=x.dtype, device=x.device))
        )
        if not frozen_indicator:
            total += x.numel()
    return total

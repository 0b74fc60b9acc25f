"""Run under torchrun (2 CPU processes, gloo): the masked optimizers and the mask recompute on FSDP2-sharded
SparseLinear weights and masks equal a one-process run on the full weights, and each process holds only its rows
of every mask and of the initial masks M0. Rank 0 writes "OK" and the compared tensor count to the file named by
argv[1], or raises."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny import make_llama  # noqa: E402

from semisparse.train.optim import AdamS, MaskedAdamW, set_adams_alpha  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from semisparse.rundir import read_mask_file  # noqa: E402
from semisparse.train.setup import local_initial_masks  # noqa: E402
from semisparse.train.sparse_linear import (  # noqa: E402
    param_masks,
    shard_masks_with_weights,
    sparse_layers,
    sparsify,
)


def build(optimizer: str, shard: bool):
    torch.manual_seed(0)
    net = make_llama(hidden=64, layers=2)
    sparsify(net, None, "2:4")
    if shard:
        shard_masks_with_weights(net)
        for block in net.model.layers:
            fully_shard(block)
        fully_shard(net)
    masks = param_masks(net)
    kw = dict(lr=3e-3, weight_decay=0.1, srste_lambda=5e-2, masks=masks)
    opt = MaskedAdamW(net.parameters(), **kw) if optimizer == "masked_adamw" else AdamS(net.parameters(), **kw)
    return net, opt


def train(net, opt, steps: int):
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        ids = torch.randint(0, 100, (2, 16), generator=gen)  # the same batch on every rank: the mean gradient
        loss = net(input_ids=ids).logits.float().pow(2).mean()  # equals the one-process gradient
        opt.zero_grad()
        loss.backward()
        if isinstance(opt, AdamS):
            set_adams_alpha(opt, min(1.0, (step + 1) / steps))
        opt.step()
        if step % 2 == 1:
            for layer in sparse_layers(net).values():
                layer.recompute_mask()


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    compared = 0
    for optimizer in ("masked_adamw", "adams"):
        sharded, opt = build(optimizer, shard=True)
        train(sharded, opt, steps=4)
        full = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True))
        local = sparse_layers(sharded)
        for name, layer in local.items():  # this process's rows only, and the same rows as its weight's
            rows = layer.mask.to_local()
            assert rows.dtype == torch.bool and rows.shape == layer.weight.to_local().shape, name
            assert 2 * rows.shape[0] == layer.mask.shape[0], (name, rows.shape, layer.mask.shape)
        gathered = {name: layer.mask.full_tensor() for name, layer in local.items()}  # every process takes part
        # M0 as the trainer keeps it: this process's rows, copied, and the rows of the full mask its weight holds
        initial = local_initial_masks(local, gathered)
        for name, layer in local.items():
            start = rank * layer.weight.to_local().shape[0]
            assert torch.equal(initial[name], gathered[name][start:start + initial[name].shape[0]]), name
            assert 2 * initial[name].shape[0] == gathered[name].shape[0], name
            assert initial[name].untyped_storage().nbytes() == initial[name].numel(), name  # not a view of M0
            compared += 1
        # ... and the same rows read from M0's file by a process that holds only M0's shapes
        m0_file = Path(sys.argv[1]).with_name(f"m0-{optimizer}-rank{rank}.safetensors")
        save_file({f"m0.{name}": mask for name, mask in gathered.items()}, str(m0_file))
        shapes = read_mask_file((m0_file, "m0."), shapes_only=True)
        assert all(shapes[n].is_meta and shapes[n].shape == gathered[n].shape for n in gathered)
        from_file = local_initial_masks(local, shapes, source=(m0_file, "m0."))
        assert from_file.keys() == initial.keys()
        for name in initial:
            assert from_file[name].dtype == torch.bool and torch.equal(from_file[name], initial[name]), name
            compared += 1
        if rank == 0:
            ref, ref_opt = build(optimizer, shard=False)
            train(ref, ref_opt, steps=4)
            for name, tensor in ref.state_dict().items():
                assert torch.allclose(full[name], tensor, atol=1e-6, rtol=1e-5), (optimizer, name)
                compared += 1
            for name, layer in sparse_layers(ref).items():
                assert torch.equal(gathered[name], layer.mask), (optimizer, name)
                compared += 1
    if rank == 0:
        Path(sys.argv[1]).write_text(f"OK {compared}\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

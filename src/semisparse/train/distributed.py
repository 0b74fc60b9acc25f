"""Many processes for the trainer through PyTorch's own stack: the process group torchrun describes, FSDP2
``fully_shard`` on each decoder block and the root, and the few reductions the loop needs.

One process (no torchrun) is the same code with ``world == 1``: nothing is wrapped, every reduction is the identity.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from semisparse.devices import resolve_device
from semisparse.errors import UserError
from semisparse.layers import find_blocks

#: The student's training forward (hidden states + loss), registered with FSDP2 so its hooks gather the root's
#: parameters (embeddings, final norm, LM head) for it as they do for ``forward``.
TRAIN_LOSS_METHOD = "semisparse_train_loss"


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    started_here: bool = False  # this process group is ours to destroy
    force: bool = False  # FSDP2 for one process too (fsdp.always)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.world > 1 or self.force


def launched_world_size() -> int:
    """The number of processes torchrun (or any launcher setting WORLD_SIZE) started."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1") or 1)
    except ValueError:
        raise UserError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number") from None


def start(device_spec: str, timeout_s: int, always: bool = False) -> tuple[Dist, torch.device]:
    """Join the process group of a torchrun launch (NCCL on CUDA, gloo on CPU) and pick this process's device.
    ``always``: a process group and FSDP2 also for a single process (torchrun --nproc-per-node 1)."""
    world = launched_world_size()
    if dist.is_available() and dist.is_initialized():  # the caller set it up
        return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")),
                    force=always), _local_device(device_spec)
    if world <= 1 and not always:
        return Dist(), resolve_device(device_spec)
    if world <= 1 and "MASTER_ADDR" not in os.environ:
        raise UserError("fsdp.always wraps one process with FSDP2 under torchrun, which sets up the process group: "
                        "start it with `torchrun --nproc-per-node 1 -m semisparse train ...`")
    if not dist.is_available():
        raise UserError("this torch build has no torch.distributed: run one process")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _local_device(device_spec)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=_dt.timedelta(seconds=timeout_s),
                            device_id=device if device.type == "cuda" else None)
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, started_here=True, force=always), device


def _local_device(device_spec: str) -> torch.device:
    device = resolve_device(device_spec)
    if device.type != "cuda":
        return device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    visible = torch.cuda.device_count()
    if local_rank >= visible:
        raise UserError(f"process {local_rank} of this node has no GPU: --nproc-per-node is more than the {visible} "
                        "visible CUDA device(s)")
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return device


def stop(d: Dist) -> None:
    if d.started_here and dist.is_initialized():
        dist.destroy_process_group()


def check_options(fsdp_cfg, device: torch.device) -> None:
    """FSDP options that cannot work on this device: one line, before any model loads."""
    if fsdp_cfg.offload and device.type != "cuda":
        raise UserError(f"fsdp.offload moves parameters from the GPU to CPU memory: it needs CUDA, this run is on "
                        f"{device.type}")


def shard(net: nn.Module, fsdp_cfg, device: torch.device, precision: str, train_method: str | None = None) -> None:
    """FSDP2 on each decoder block, then the root (which holds the embeddings, final norm and LM head). Parameters
    are split along dim 0 (output rows), and so are the sparse layers' masks (shard_masks_with_weights): N:M groups
    run along the input dimension, so each process's rows hold whole groups and their masks are recomputed and used
    without gathering (SparseLinear.recompute_mask, optim.local_rows)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    from semisparse.train.sparse_linear import shard_masks_with_weights

    kwargs = {}
    if device.type == "cuda" and precision == "bf16":  # bf16 compute and all-gathers, float32 gradient reductions
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if fsdp_cfg.offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    shard_masks_with_weights(net)
    _, blocks = find_blocks(net)
    for block in blocks:
        fully_shard(block, reshard_after_forward=fsdp_cfg.reshard_after_forward, **kwargs)
    fully_shard(net, **kwargs)
    if train_method is not None:
        register_fsdp_forward_method(net, train_method)


def fill_from_rank0(d: Dist, module: nn.Module, state: dict[str, torch.Tensor] | None, device: torch.device,
                    values: bool = True) -> None:
    """Give every process rank 0's values of ``module``, which the other processes built on the meta device
    (models.load_skeleton): so only rank 0 reads the weights into memory, not each of the W processes. ``state``:
    rank 0's whole state dict (the module as it was before ``fully_shard``, or the module itself if it is not
    sharded), None elsewhere. Every process calls this once ``module`` is wrapped (or not) as it will train.

    torch's own path: ``to_empty`` on the device, then ``set_model_state_dict(broadcast_from_rank0=True)`` sends one
    tensor at a time and each process keeps its shard; buffers outside the state dict (rotary frequencies) are
    broadcast after it. ``values=False``: the buffers only (a checkpoint is about to load every value)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if any(t.is_meta for t in itertools.chain(module.parameters(), module.buffers())):
        module.to_empty(device=device)
    if values:
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(module, state if d.is_main else {}, options=options)
    persistent = set(module.state_dict().keys())
    for name, buffer in module.named_buffers():
        if name not in persistent:
            dist.broadcast(buffer, src=0)


def mean(d: Dist, values: list[float], device: torch.device) -> list[float]:
    """Each value averaged over the processes (losses of equal-sized micro-batches)."""
    if not d.sharded:
        return values
    return [v / d.world for v in total(d, values, device)]


def total(d: Dist, values: list[float], device: torch.device) -> list[float]:
    """Each value summed over the processes (counts over each process's rows)."""
    if not d.sharded:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def maximum(d: Dist, value: float, device: torch.device) -> float:
    if not d.sharded:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def barrier(d: Dist) -> None:
    if d.sharded:
        dist.barrier()


def broadcast(d: Dist, obj):
    """Rank 0's ``obj`` on every process (a path, a decision)."""
    if not d.sharded:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def full_state_dict(net: nn.Module, d: Dist) -> dict[str, torch.Tensor]:
    """The whole model's state on rank 0's CPU (gathered from the shards; every process must call this); {} on the
    other ranks. One process: the state dict as it is."""
    if not d.sharded:
        return net.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (a reduction such as the global grad norm), else the tensor."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t

"""Training batches from one token stream: fixed-length sequences in a seeded order, sharded by rank, resumable.

The stream (``data.token_stream``: every document followed by EOS) is cut into ``n = (len − 1) // seq_len``
non-overlapping sequences; sequence i is ``stream[i·seq_len : (i+1)·seq_len + 1]`` (seq_len inputs and their
seq_len next-token targets; the last token is shared with the next sequence's first input). Epoch e visits the
sequences in the order ``randperm(n)`` seeded by (seed, e), so the order depends on nothing but the seed.

The global sample counter ``position`` counts sequences consumed by *all* processes. Every micro-step consumes
``batch_size · world_size`` of them and rank r takes the r-th block of ``batch_size``: the ranks read disjoint
samples and, with ``position`` in the checkpoint, a resumed run reads exactly the batches it would have read.
"""

from __future__ import annotations

import hashlib

import torch

from semisparse.errors import UserError


def dist_info() -> tuple[int, int]:
    """(rank, world_size) from torch.distributed when it is initialised, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def fingerprint(stream: torch.Tensor) -> str:
    """sha256 of the token ids: a resumed run must train on the very same stream."""
    return hashlib.sha256(stream.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


class TokenBatches:
    """Micro-batches ``(inputs, targets)``, each [batch_size, seq_len] long tensors, for one rank."""

    def __init__(
        self, stream: torch.Tensor, seq_len: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        if stream.dim() != 1:
            raise ValueError("the token stream must be 1-D")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.n_sequences = (stream.numel() - 1) // seq_len
        if self.n_sequences < 1:
            raise UserError(
                f"the training text has {stream.numel()} tokens, fewer than one sequence of {seq_len} (+1) tokens"
            )
        self.stream = stream
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.position = 0  # global sequences consumed, all ranks together
        self.fingerprint = fingerprint(stream)
        self._order_epoch = -1
        self._order = torch.empty(0, dtype=torch.long)

    @property
    def epoch(self) -> int:
        return self.position // self.n_sequences

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        if epoch != self._order_epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = torch.randperm(self.n_sequences, generator=gen)
            self._order_epoch = epoch
        return self._order

    def sequence(self, index: int) -> torch.Tensor:
        """Global sample ``index`` (across epochs): seq_len + 1 tokens."""
        epoch, i = divmod(index, self.n_sequences)
        start = int(self._epoch_order(epoch)[i]) * self.seq_len
        return self.stream[start : start + self.seq_len + 1]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        first = self.position + self.rank * self.batch_size
        rows = torch.stack([self.sequence(first + b) for b in range(self.batch_size)])
        self.position += self.batch_size * self.world_size
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    def state_dict(self) -> dict:
        return {
            "position": self.position,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "seed": self.seed,
            "n_sequences": self.n_sequences,
            "fingerprint": self.fingerprint,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("seq_len", "batch_size", "world_size", "seed", "n_sequences", "fingerprint"):
            if state.get(key) != getattr(self, key):
                raise UserError(
                    f"cannot resume: the training data differ from the checkpoint's ({key}: "
                    f"{state.get(key)!r} in the checkpoint, {getattr(self, key)!r} now)"
                )
        self.position = int(state["position"])

"""Training batches: fixed-length sequences in a seeded order, sharded by rank, resumable.

A *token array* is the training text as one token stream (``data.token_stream``: every document followed by EOS):
an in-memory tensor, or token shards on disk (``semisparse.shards.ShardSet``, read lazily). It is cut into
``n = (len − 1) // seq_len`` non-overlapping sequences; sequence i is ``tokens[i·seq_len : (i+1)·seq_len + 1]``
(seq_len inputs and their seq_len next-token targets; the last token is shared with the next sequence's first
input). Epoch e visits the sequences in the order ``randperm(n)`` seeded by (seed, e), so the order depends on
nothing but the seed.

A *mixture* of several token arrays with weights assigns global samples to sources in blocks of ``MIX_BLOCK``:
each block holds every source's share (largest-remainder rounding of its weight) in a seeded random order, so the
proportions are exact over every block and any sample is found without replaying the ones before it. Each source
keeps its own epochs (reshuffled per epoch, seeded per source) and reports how many it went through.

The global sample counter ``position`` counts sequences consumed by *all* processes. Every micro-step consumes
``batch_size · world_size`` of them and rank r takes the r-th block of ``batch_size``: the ranks read disjoint
samples and, with ``position`` in the checkpoint, a resumed run reads exactly the batches it would have read.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Protocol, Sequence

import torch

from semisparse.errors import UserError

#: Samples per mixture block: a weight is honoured to 1 / MIX_BLOCK.
MIX_BLOCK = 4096


def fingerprint(stream: torch.Tensor) -> str:
    """sha256 of the token ids (as int64): a resumed run must train on the very same stream."""
    return hashlib.sha256(stream.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def _derived_seed(*parts) -> int:
    return int(hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()[:15], 16)


class TokenArray(Protocol):
    """A token stream that need not be in memory: its length, a slice as int64, and a content fingerprint."""

    fingerprint: str

    def __len__(self) -> int: ...

    def read(self, start: int, stop: int) -> torch.Tensor: ...


class TensorTokens:
    """An in-memory token stream as a TokenArray."""

    def __init__(self, stream: torch.Tensor) -> None:
        if stream.dim() != 1:
            raise ValueError("the token stream must be 1-D")
        self.stream = stream
        self.fingerprint = fingerprint(stream)

    def __len__(self) -> int:
        return self.stream.numel()

    def read(self, start: int, stop: int) -> torch.Tensor:
        return self.stream[start:stop]


def as_token_array(data) -> TokenArray:
    return TensorTokens(data) if isinstance(data, torch.Tensor) else data


class EpochOrder:
    """The sequences of one token array, visited epoch after epoch, each epoch in its own seeded random order."""

    def __init__(self, tokens: TokenArray, seq_len: int, seed: int, salt: str | None = None) -> None:
        self.tokens = tokens
        self.seq_len = seq_len
        self.n_sequences = (len(tokens) - 1) // seq_len
        if self.n_sequences < 1:
            raise UserError(
                f"the training text has {len(tokens)} tokens, fewer than one sequence of {seq_len} (+1) tokens"
            )
        self.seed = seed
        self.salt = salt  # None: the single-source order of earlier versions (old checkpoints resume on it)
        self._order_epoch = -1
        self._order = torch.empty(0, dtype=torch.long)

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        if epoch != self._order_epoch:
            seed = self.seed * 1_000_003 + epoch if self.salt is None else _derived_seed(self.seed, self.salt, epoch)
            self._order = torch.randperm(self.n_sequences, generator=torch.Generator().manual_seed(seed))
            self._order_epoch = epoch
        return self._order

    def sample(self, index: int) -> torch.Tensor:
        """Sample ``index`` of this source (across its epochs): seq_len + 1 tokens."""
        epoch, i = divmod(index, self.n_sequences)
        start = int(self._epoch_order(epoch)[i]) * self.seq_len
        return self.tokens.read(start, start + self.seq_len + 1)


def mixture_counts(weights: Sequence[float], block: int = MIX_BLOCK) -> list[int]:
    """Samples per block for each weight: largest-remainder rounding of its share of ``block``."""
    if any(not math.isfinite(w) or w < 0 for w in weights) or not sum(weights) > 0:
        raise UserError(f"mixture weights must be >= 0 and sum to a positive number (got {list(weights)})")
    total = sum(weights)
    exact = [w / total * block for w in weights]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda k: (-(exact[k] - counts[k]), k))
    for k in by_remainder[: block - sum(counts)]:
        counts[k] += 1
    for w, c in zip(weights, counts):
        if w > 0 and c == 0:
            raise UserError(f"mixture weight {w} is too small: under one sequence in {block} (sum {total})")
    return counts


class Mixture:
    """Global sample index -> (source, that source's sample index), in seeded blocks of exact proportions."""

    def __init__(self, orders: list[EpochOrder], weights: Sequence[float], seed: int, block: int = MIX_BLOCK) -> None:
        if len(orders) != len(weights) or not orders:
            raise ValueError("one weight per source")
        self.orders = orders
        self.counts = mixture_counts(weights, block)
        self.block = block
        self.seed = seed
        self._block_index = -1
        self._kinds = self._locals = torch.empty(0, dtype=torch.long)

    def _schedule(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Block b: the source of each slot, and each slot's rank among its source's slots in the block."""
        if b != self._block_index:
            kinds = torch.repeat_interleave(torch.arange(len(self.counts)), torch.tensor(self.counts))
            gen = torch.Generator().manual_seed(_derived_seed(self.seed, "mix", b))
            kinds = kinds[torch.randperm(self.block, generator=gen)]
            onehot = torch.nn.functional.one_hot(kinds, len(self.counts))
            self._locals = (onehot.cumsum(0) - 1).gather(1, kinds[:, None])[:, 0]
            self._kinds, self._block_index = kinds, b
        return self._kinds, self._locals

    def sample(self, index: int) -> torch.Tensor:
        b, j = divmod(index, self.block)
        kinds, local = self._schedule(b)
        k = int(kinds[j])
        return self.orders[k].sample(b * self.counts[k] + int(local[j]))

    def consumed(self, position: int) -> list[int]:
        """Samples each source has given when the first ``position`` global samples are consumed."""
        b, j = divmod(position, self.block)
        kinds, _ = self._schedule(b)
        head = torch.bincount(kinds[:j], minlength=len(self.counts)).tolist()
        return [b * c + h for c, h in zip(self.counts, head)]


class TokenBatches:
    """Micro-batches ``(inputs, targets)``, each [batch_size, seq_len] long tensors, for one rank.

    ``data``: a 1-D token tensor or a TokenArray (shards), or a list of them with ``weights`` (a mixture).
    """

    def __init__(
        self, data, seq_len: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
        weights: Sequence[float] | None = None,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if weights is None:
            self.sources = [as_token_array(data)]
            self.orders = [EpochOrder(self.sources[0], seq_len, seed)]
            self.mixture = None
            self.fingerprint = self.sources[0].fingerprint
        else:
            self.sources = [as_token_array(d) for d in data]
            self.orders = [EpochOrder(t, seq_len, seed, salt=f"source{k}") for k, t in enumerate(self.sources)]
            self.mixture = Mixture(self.orders, list(weights), seed)
            ident = [[t.fingerprint, c] for t, c in zip(self.sources, self.mixture.counts)]
            self.fingerprint = hashlib.sha256(json.dumps([MIX_BLOCK, ident]).encode()).hexdigest()
        self.n_sequences = sum(o.n_sequences for o in self.orders)
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.position = 0  # global sequences consumed, all ranks together

    @property
    def epoch(self) -> int:
        return self.position // self.n_sequences

    def sequence(self, index: int) -> torch.Tensor:
        """Global sample ``index`` (across epochs): seq_len + 1 tokens."""
        if self.mixture is not None:
            return self.mixture.sample(index)
        return self.orders[0].sample(index)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        first = self.position + self.rank * self.batch_size
        rows = torch.stack([self.sequence(first + b) for b in range(self.batch_size)])
        self.position += self.batch_size * self.world_size
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    def epochs(self) -> list[float]:
        """Epochs each source has gone through so far (all ranks together), fractions included."""
        used = [self.position] if self.mixture is None else self.mixture.consumed(self.position)
        return [n / o.n_sequences for n, o in zip(used, self.orders)]

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
        # world_size may differ: the position counts global sequences, so another process count resumes at the
        # same place (the trainer keeps the global batch fixed)
        for key in ("seq_len", "batch_size", "seed", "n_sequences", "fingerprint"):
            if state.get(key) != getattr(self, key):
                raise UserError(
                    f"cannot resume: the training data differ from the checkpoint's ({key}: "
                    f"{state.get(key)!r} in the checkpoint, {getattr(self, key)!r} now)"
                )
        self.position = int(state["position"])

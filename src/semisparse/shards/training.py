"""What `train` reads: one text source (tokenized on the fly, as before), a token-shard folder (read lazily), or a
weighted mixture of either (``data.sources``). Opened in two steps so a bad DATA fails before the model loads:
``open_training_data`` checks the specs and the shards' indexes and sizes; ``prepare`` checks the tokenizer and
tokenizes the text sources."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from semisparse import data as data_mod
from semisparse.errors import UserError
from semisparse.shards.format import ShardSet, is_shard_dir
from semisparse.train.stream import TensorTokens, TokenBatches

#: Calibration windows of shards are drawn from their first tokens: this many at least, 4x what the windows need.
CALIB_TOKENS = 1 << 20


@dataclass
class _Source:
    spec: str
    weight: float
    text: data_mod.TextSource | None = None
    shards: ShardSet | None = None
    tokens: TensorTokens | ShardSet | None = None  # after prepare()

    def describe(self) -> dict:
        if self.shards is not None:
            return self.shards.describe()
        return {**self.text.describe(), "tokens": len(self.tokens) if self.tokens is not None else None}


class TrainingData:
    def __init__(self, sources: list[_Source], mixture: bool) -> None:
        self.sources = sources
        self.mixture = mixture

    @property
    def docs(self) -> list[str] | None:
        """The documents of a single text source (the reference calibration sampler redraws from them)."""
        return None if self.mixture or self.sources[0].text is None else self.sources[0].text.docs

    @property
    def eval_spec(self) -> str:
        """Default held-out text: that of data.train, or of the text a shard folder was made from (first source)."""
        first = self.sources[0]
        return first.shards.index["args"]["data"] if first.shards is not None else first.spec

    def prepare(self, tokenizer, model: str) -> None:
        for s in self.sources:
            if s.shards is not None:
                s.shards.check_tokenizer(tokenizer, model)
                s.tokens = s.shards
            else:
                s.tokens = TensorTokens(data_mod.token_stream(tokenizer, s.text.docs))

    def calibration_stream(self, need: int) -> torch.Tensor:
        """Tokens to draw one-shot calibration windows from: a single text source's whole stream (as before);
        else the first tokens of each source, in proportion to its weight."""
        if not self.mixture and self.sources[0].shards is None:
            return self.sources[0].tokens.stream
        budget = max(4 * need, CALIB_TOKENS)
        total = sum(s.weight for s in self.sources)
        parts = [s.tokens.read(0, max(2, round(budget * s.weight / total))) for s in self.sources if s.weight > 0]
        return torch.cat(parts)

    def batches(self, seq_len: int, batch_size: int, seed: int, rank: int, world: int) -> TokenBatches:
        if not self.mixture:
            return TokenBatches(self.sources[0].tokens, seq_len, batch_size, seed, rank, world)
        return TokenBatches([s.tokens for s in self.sources], seq_len, batch_size, seed, rank, world,
                            weights=[s.weight for s in self.sources])

    def describe(self, batches: TokenBatches) -> dict:
        """The "data" record of semisparse.json: what was read and how many epochs of each."""
        epochs = batches.epochs()
        if not self.mixture:
            s = self.sources[0]
            record = s.text.describe() if s.text is not None else s.shards.describe()
            return {**record, "stream_tokens": len(s.tokens), "sequences": batches.n_sequences, "epochs": epochs[0]}
        total = sum(s.weight for s in self.sources)
        parts = [{**s.describe(), "weight": s.weight, "share": s.weight / total, "sequences": o.n_sequences,
                  "epochs": e} for s, o, e in zip(self.sources, batches.orders, epochs)]
        return {"data": "mixture", "split": "train", "sources": parts, "sequences": batches.n_sequences,
                "stream_tokens": sum(len(s.tokens) for s in self.sources)}


def _open(spec: str, weight: float, field: str) -> _Source:
    if is_shard_dir(spec):
        return _Source(spec, weight, shards=ShardSet(spec))
    return _Source(spec, weight, text=data_mod.load_text(spec, "train", field))


def open_training_data(data_cfg, init_cfg=None) -> TrainingData:
    """``data_cfg``: the recipe's DataConfig. ``init_cfg`` (InitConfig): the reference calibration sampler needs
    documents, which only a single text source has; refused here, before the model loads."""
    if data_cfg.sources:
        if not sum(s.weight for s in data_cfg.sources) > 0:
            raise UserError("data.sources: the weights must sum to a positive number")
        opened = TrainingData([_open(s.path, s.weight, data_cfg.text_field) for s in data_cfg.sources], True)
    else:
        opened = TrainingData([_open(data_cfg.train, 1.0, data_cfg.text_field)], False)
    if init_cfg is not None and init_cfg.calib_sampler == "reference" and opened.docs is None:
        from semisparse.config import INIT_METHODS
        from semisparse.prune import get_method

        if init_cfg.source in INIT_METHODS and get_method(init_cfg.source).needs_calibration:
            raise UserError("init.calib_sampler reference draws from documents: it needs data.train to be text, "
                            "not token shards or a mixture (use the random sampler)")
    return opened

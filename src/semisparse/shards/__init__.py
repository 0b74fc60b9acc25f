"""Token shards: text sources tokenized once into memory-mapped binary files, for training past what fits in
memory (docs/data.md). ``tokenize_to_shards`` writes a shard folder, ``ShardSet`` reads one lazily, and
``open_training_data`` is what ``train`` reads: text, shards, or a weighted mixture. ``generate_to_shards`` writes a
shard folder of text sampled from a model (``semisparse generate``)."""

from semisparse.shards.format import INDEX_FILE, ShardSet, is_shard_dir, token_dtype, tokenizer_fingerprint
from semisparse.shards.generate import Sampling, generate_to_shards
from semisparse.shards.training import TrainingData, open_training_data
from semisparse.shards.writer import DEFAULT_SHARD_TOKENS, load_tokenizer, tokenize_to_shards

__all__ = [
    "DEFAULT_SHARD_TOKENS", "INDEX_FILE", "Sampling", "ShardSet", "TrainingData", "generate_to_shards", "is_shard_dir",
    "load_tokenizer", "open_training_data", "token_dtype", "tokenize_to_shards", "tokenizer_fingerprint",
]

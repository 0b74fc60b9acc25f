"""Weighted mixtures of training sources (``data.sources``): proportions, determinism, rank sharding, per-source
epochs and reshuffles, exact resume, bad weights, and a mixture of shards and text through `train`."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
import yaml

from semisparse.config import load_recipe
from semisparse.errors import UserError
from semisparse.shards import tokenize_to_shards
from semisparse.train.stream import MIX_BLOCK, TokenBatches, mixture_counts

SEQ = 4


def sources(*n_sequences: int) -> list[torch.Tensor]:
    """Source k holds tokens k·10⁶ + 0, 1, 2, ...: a row's first token says its source and its sequence."""
    return [k * 1_000_000 + torch.arange(n * SEQ + 1) for k, n in enumerate(n_sequences)]


def origin(row: torch.Tensor) -> tuple[int, int]:
    first = int(row[0])
    return first // 1_000_000, (first % 1_000_000) // SEQ


def draw(batches: TokenBatches, steps: int) -> list[tuple[int, int]]:
    return [origin(row) for _ in range(steps) for row in batches.next_batch()[0]]


def test_proportions_follow_the_weights_and_the_draw_is_deterministic():
    data = sources(500, 300, 200)
    weights = [0.5, 0.3, 0.2]
    mixed = TokenBatches(data, SEQ, 8, seed=7, weights=weights)
    seen = draw(mixed, 1000)  # 8000 samples, about two mixing blocks
    counts = Counter(k for k, _ in seen)
    for k, w in enumerate(weights):
        assert counts[k] / len(seen) == pytest.approx(w, abs=0.01), counts
    assert draw(TokenBatches(data, SEQ, 8, seed=7, weights=weights), 1000) == seen
    assert draw(TokenBatches(data, SEQ, 8, seed=8, weights=weights), 1000) != seen
    # proportions hold at every scale, not only on average: any window of 400 samples stays near the weights
    for start in range(0, len(seen) - 400, 400):
        window = Counter(k for k, _ in seen[start:start + 400])
        assert all(abs(window[k] / 400 - w) < 0.08 for k, w in enumerate(weights)), window
    # the reported per-source counts are what was drawn
    used = mixed.mixture.consumed(mixed.position)
    assert used == [counts[k] for k in range(3)]
    assert mixed.epochs() == pytest.approx([counts[k] / n for k, n in enumerate((500, 300, 200))])


def test_block_counts_are_the_largest_remainder_shares():
    assert mixture_counts([0.7, 0.3], 10) == [7, 3]
    assert mixture_counts([1, 1, 1], 10) == [4, 3, 3]  # remainders tie: the lower index first
    assert sum(mixture_counts([0.123, 0.456, 0.421])) == MIX_BLOCK
    assert mixture_counts([2, 0, 2], 8) == [4, 0, 4]


def test_each_source_is_reshuffled_per_epoch_and_its_epochs_are_reported():
    data = sources(10, 40)  # a small source that runs through many epochs, a large one that does not
    mixed = TokenBatches(data, SEQ, 5, seed=3, weights=[1, 1])
    seen = draw(mixed, 20)
    small = [i for k, i in seen if k == 0]
    epochs = [small[e * 10:(e + 1) * 10] for e in range(len(small) // 10)]
    assert len(epochs) >= 4 and all(sorted(e) == list(range(10)) for e in epochs)  # every epoch visits all once
    assert len({tuple(e) for e in epochs}) == len(epochs)  # in a new order each time
    large = [i for k, i in seen if k == 1]
    assert sorted(large[:40]) == list(range(40)) and len(large) < 80
    assert mixed.epochs() == pytest.approx([len(small) / 10, len(large) / 40])


def test_ranks_are_disjoint_and_together_read_the_one_process_stream():
    data = sources(50, 30)
    one = TokenBatches(data, SEQ, 3, seed=1, weights=[0.6, 0.4])
    ranks = [TokenBatches(data, SEQ, 3, seed=1, rank=r, world_size=2, weights=[0.6, 0.4]) for r in range(2)]
    single = draw(one, 20)
    per_rank = [[], []]
    for _ in range(10):
        for r, tb in enumerate(ranks):
            per_rank[r].append(draw(tb, 1))
    interleaved = [x for step in zip(*per_rank) for part in step for x in part]
    assert interleaved == single
    flat = [set(x for part in per_rank[r] for x in part) for r in range(2)]
    assert not flat[0] & flat[1]  # within the first epoch of both sources, no sample is read twice


def test_resume_continues_with_the_exact_next_batch():
    data = sources(50, 30)
    full = TokenBatches(data, SEQ, 4, seed=2, weights=[3, 1])
    states, batches = [], []
    for _ in range(60):  # past both sources' first epochs
        states.append(full.state_dict())
        batches.append(full.next_batch())
    for k in (0, 7, 31, 59):
        resumed = TokenBatches(data, SEQ, 4, seed=2, weights=[3, 1])
        resumed.load_state_dict(states[k])
        x, y = resumed.next_batch()
        assert torch.equal(x, batches[k][0]) and torch.equal(y, batches[k][1])
    with pytest.raises(UserError, match="training data differ.*fingerprint"):
        TokenBatches(data, SEQ, 4, seed=2, weights=[1, 1]).load_state_dict(states[5])


@pytest.mark.parametrize("weights, message", [
    ([0, 0], "sum to a positive number"),
    ([1, -1], ">= 0"),
    ([1, float("nan")], ">= 0"),
    ([1, 1e-9], "too small"),
])
def test_bad_weights_are_refused(weights, message):
    with pytest.raises(UserError, match=message):
        TokenBatches(sources(5, 5), SEQ, 2, seed=0, weights=weights)


def _mixture_recipe(tmp_path, entries, **extra) -> str:
    recipe = yaml.safe_load(open(load_recipe("naive-ce")[1]["path"]).read())
    recipe.setdefault("data", {})["sources"] = entries
    recipe["data"].update(extra)
    path = tmp_path / "mix.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def test_recipe_weights_must_sum_to_a_positive_number(tmp_path, tiny_dir, text, cli):
    path = _mixture_recipe(tmp_path, [{"path": str(text), "weight": 0}, {"path": str(text), "weight": 0.0}])
    r = cli("train", tiny_dir, "--out", tmp_path / "run", "--recipe", path, "--tokens", 64, "--no-progress")
    assert r.returncode == 2 and "data.sources: the weights must sum to a positive number" in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()
    with pytest.raises(UserError, match="data.train or data.sources, not both"):
        load_recipe(_mixture_recipe(tmp_path, [{"path": str(text)}], train=str(text)))


def test_train_on_a_mixture_of_shards_and_text(tmp_path, tiny_dir, text, cli):
    shards = tmp_path / "shards"
    tokenize_to_shards(str(text), shards, model=str(tiny_dir), shard_tokens=300, progress=False)
    path = _mixture_recipe(tmp_path, [{"path": str(shards), "weight": 0.7}, {"path": str(text), "weight": 0.3}])
    r = cli("train", tiny_dir, "--out", tmp_path / "run", "--recipe", path, "--tokens", 3 * 4 * 16, "--seqlen", 16,
            "--batch-size", 4, "--set", "eval.at_start=false", "--set", "eval.at_end=false",
            "--set", "log.plots=false", "--set", "checkpoint.every=0", "--no-progress", "--init", "sparsegpt",
            "--set", "init.calib_samples=4")  # calibration windows from the first tokens of both sources
    assert r.returncode == 0, r.stderr
    record = json.loads((tmp_path / "run" / "semisparse.json").read_text())["data"]
    assert record["data"] == "mixture" and [s["weight"] for s in record["sources"]] == [0.7, 0.3]
    assert record["sources"][0]["split"] == "shards" and record["sources"][1]["split"] == "file"
    # 12 sequences drawn; each source's epochs are its draws over its sequences, and the draws add up
    draws = [s["epochs"] * s["sequences"] for s in record["sources"]]
    assert sum(draws) == pytest.approx(12) and all(d == pytest.approx(round(d)) for d in draws)
    assert record["sources"][0]["sequences"] == record["sources"][1]["sequences"]  # the same text, twice

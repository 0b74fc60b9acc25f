import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from semisparse.errors import UserError
from semisparse.masks import Pattern, flip_count, is_nm, nm_mask


@st.composite
def pattern_and_scores(draw):
    m = draw(st.integers(2, 8))
    n = draw(st.integers(1, m - 1))
    rows = draw(st.integers(1, 6))
    groups = draw(st.integers(1, 5))
    # Few distinct values so ties are frequent.
    values = draw(st.lists(st.integers(-3, 3), min_size=rows * groups * m, max_size=rows * groups * m))
    scores = torch.tensor(values, dtype=torch.float32).reshape(rows, groups * m)
    return Pattern(n, m), scores


@settings(max_examples=200, deadline=None)
@given(pattern_and_scores())
def test_mask_invariants(case):
    pattern, scores = case
    mask = nm_mask(scores, pattern)
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    groups_mask = mask.reshape(scores.shape[0], -1, pattern.m)
    groups_scores = scores.reshape(scores.shape[0], -1, pattern.m)
    assert (groups_mask.sum(-1) == pattern.n).all()  # exactly N kept per group, ties included
    assert is_nm(mask, pattern)
    # Every kept score is >= every pruned score of the same group.
    kept_min = torch.where(groups_mask, groups_scores, torch.inf).amin(-1)
    pruned_max = torch.where(~groups_mask, groups_scores, -torch.inf).amax(-1)
    assert (kept_min >= pruned_max).all()
    # Ties go to the lower index: among equal scores at the kept/pruned boundary, kept indices come first.
    for r in range(groups_scores.shape[0]):
        for g in range(groups_scores.shape[1]):
            s, k = groups_scores[r, g], groups_mask[r, g]
            order = sorted(range(pattern.m), key=lambda j: (-float(s[j]), j))
            assert [bool(k[j]) for j in order] == [True] * pattern.n + [False] * (pattern.m - pattern.n)
    assert torch.equal(nm_mask(scores, pattern), mask)  # deterministic


def test_mask_against_topk_without_ties():
    torch.manual_seed(0)
    scores = torch.randn(16, 64)
    mask = nm_mask(scores, "2:4")
    idx = scores.view(16, 16, 4).topk(2, dim=-1).indices
    ref = torch.zeros(16, 16, 4, dtype=torch.bool).scatter_(-1, idx, True).view(16, 64)
    assert torch.equal(mask, ref)


def test_batched_leading_dims():
    scores = torch.randn(3, 5, 8)
    assert is_nm(nm_mask(scores, "1:4"), "1:4")


@pytest.mark.parametrize("text", ["3:2", "0:4", "2:4:1", "4:4", "a:4", "", "2-4", "-1:4"])
def test_bad_patterns(text):
    with pytest.raises(UserError):
        Pattern.parse(text)


def test_pattern_parse():
    assert Pattern.parse(" 2 : 4 ") == Pattern(2, 4)
    assert str(Pattern.parse("1:8")) == "1:8"
    assert Pattern(2, 4).density == 0.5


def test_indivisible_width_and_nan():
    with pytest.raises(ValueError, match="multiple"):
        nm_mask(torch.randn(2, 6), "2:4")
    with pytest.raises(ValueError, match="NaN"):
        nm_mask(torch.tensor([[1.0, float("nan"), 0.0, 2.0]]), "2:4")


def test_is_nm_rejects():
    assert not is_nm(torch.ones(2, 4, dtype=torch.bool), "2:4")
    assert not is_nm(torch.tensor([[1, 1, 0, 0]]), "2:4")  # int, not bool


def test_flip_count_hand_example():
    old = torch.tensor([[True, True, False, False, True, False, True, False]])
    new = torch.tensor([[True, False, True, False, True, False, True, False]])  # one swap in group 0
    assert flip_count(new, old) == 2
    assert flip_count(old, old) == 0

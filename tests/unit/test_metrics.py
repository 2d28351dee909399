"""training.metrics: golden numbers, and every fast path against its plain reference."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from training.metrics import (
    RankingAccumulator,
    auc,
    auc_reference,
    grouped_auc,
    grouped_auc_reference,
    history_mask,
    ranking_metrics,
    ranking_metrics_reference,
    target_ranks,
)

# --------------------------------------------------------------------------- ranking


def test_target_rank_counts_strictly_better_items():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3], [0.4, 0.3, 0.2, 0.1]])
    assert target_ranks(scores, torch.tensor([2, 3])).tolist() == [1, 3]


def test_ties_resolve_in_the_targets_favour():
    # A constant scorer ranks every target first: the optimistic convention, documented.
    scores = torch.full((2, 5), 0.5)
    assert target_ranks(scores, torch.tensor([0, 4])).tolist() == [0, 0]
    scores = torch.tensor([[0.7, 0.5, 0.5, 0.5]])
    assert target_ranks(scores, torch.tensor([2])).tolist() == [1]


def test_exclusion_drops_items_but_never_the_target():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.8]])
    exclude = torch.tensor([[False, True, True, False]])  # target 2 is in the mask
    # Without exclusion items 1 and 3 beat the target; item 1 is excluded, item 3 is not.
    assert target_ranks(scores, torch.tensor([2])).tolist() == [2]
    assert target_ranks(scores, torch.tensor([2]), exclude).tolist() == [1]


def test_history_mask_ignores_padding_and_rejects_bad_ids():
    histories = torch.tensor([[1, 2, 0], [3, 3, 0], [0, 0, 0]])
    expected = torch.tensor(
        [[False, True, True, False], [False, False, False, True], [False, False, False, False]]
    )
    assert torch.equal(history_mask(histories, num_items=4, pad_id=0), expected)
    # A pad id outside the catalogue (e.g. -1) works the same way.
    assert torch.equal(history_mask(torch.tensor([[2, -1]]), 3, pad_id=-1), torch.tensor([[False, False, True]]))
    with pytest.raises(ValueError):
        history_mask(torch.tensor([[4, 0]]), num_items=4, pad_id=0)


def test_ranking_metrics_golden_numbers():
    ranks = torch.tensor([0, 1, 9, 100])
    metrics = ranking_metrics(ranks, ks=(5, 10))
    assert list(metrics) == ["recall@5", "ndcg@5", "recall@10", "ndcg@10", "mrr"]
    assert metrics["recall@5"] == pytest.approx(2 / 4)
    assert metrics["recall@10"] == pytest.approx(3 / 4)
    assert metrics["ndcg@5"] == pytest.approx((1 + 1 / math.log2(3)) / 4)
    assert metrics["ndcg@10"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(11)) / 4)
    assert metrics["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 10 + 1 / 101) / 4)
    assert set(ranking_metrics(ranks)) == {
        f"{m}@{k}" for m in ("recall", "ndcg") for k in (5, 10, 20, 50)
    } | {"mrr"}


def test_ranking_metrics_rejects_empty_and_bad_ks():
    with pytest.raises(ValueError):
        ranking_metrics(torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError):
        ranking_metrics(torch.tensor([0]), ks=(0,))
    with pytest.raises(ValueError):
        RankingAccumulator().compute()


def _random_ranking_case(seed: int, num_users: int = 40, num_items: int = 60):
    """Scores drawn from a handful of values (many ties) and histories that sometimes hold the target."""
    rng = random.Random(seed)
    scores = [[float(rng.randint(0, 7)) for _ in range(num_items)] for _ in range(num_users)]
    targets = [rng.randrange(1, num_items) for _ in range(num_users)]
    histories = []
    for target in targets:
        seen = rng.sample(range(1, num_items), rng.randint(0, 15))
        if rng.random() < 0.3:
            seen.append(target)  # re-consumption: the target must not be excluded
        histories.append(seen + [0] * (16 - len(seen)))  # 0 is padding
    return scores, targets, histories


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("use_exclusion", [False, True])
def test_vectorized_ranking_matches_reference(seed: int, use_exclusion: bool):
    scores, targets, histories = _random_ranking_case(seed)
    ks = (1, 2, 3, 5, 10, 20)
    exclude = history_mask(torch.tensor(histories), num_items=60, pad_id=0) if use_exclusion else None
    exclude_sets = [set(h) - {0} for h in histories] if use_exclusion else None
    fast = ranking_metrics(target_ranks(torch.tensor(scores), torch.tensor(targets), exclude), ks)
    slow = ranking_metrics_reference(scores, targets, exclude_sets, ks)
    assert fast.keys() == slow.keys()
    for name in slow:
        assert fast[name] == pytest.approx(slow[name], abs=1e-12), name


def test_exclusion_changes_the_numbers():
    # Guards the comparison above against both paths silently ignoring exclusion.
    scores, targets, histories = _random_ranking_case(0)
    exclude = history_mask(torch.tensor(histories), 60, pad_id=0)
    with_mask = target_ranks(torch.tensor(scores), torch.tensor(targets), exclude)
    without = target_ranks(torch.tensor(scores), torch.tensor(targets))
    assert (with_mask <= without).all() and (with_mask < without).any()


def test_accumulator_over_chunks_equals_one_shot():
    torch.manual_seed(0)
    ranks = torch.randint(0, 200, (1000,))
    accumulator = RankingAccumulator(ks=(5, 10, 50))
    for chunk in ranks.split(137):
        accumulator.update(chunk)
    assert accumulator.count == 1000
    expected = ranking_metrics(ranks, ks=(5, 10, 50))
    got = accumulator.compute()
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name] == pytest.approx(expected[name], rel=1e-12)

    first, second = RankingAccumulator(ks=(5, 10, 50)), RankingAccumulator(ks=(5, 10, 50))
    first.update(ranks[:300])
    second.update(ranks[300:])
    first.merge(second)
    assert first.count == 1000
    assert first.compute()["mrr"] == pytest.approx(expected["mrr"], rel=1e-12)
    with pytest.raises(ValueError):
        first.merge(RankingAccumulator(ks=(5,)))


# --------------------------------------------------------------------------- CTR


def test_auc_golden_numbers():
    assert auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert auc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)  # a tie counts one half
    assert auc([1, 0, 1, 0], [0.9, 0.1, 0.8, 0.2]) == 1.0
    assert auc([1, 0, 1, 0], [0.1, 0.9, 0.2, 0.8]) == 0.0
    # Pairs (p, n): (0.6 vs 0.6) tie, (0.6 vs 0.2) win, (0.1 vs 0.6) loss, (0.1 vs 0.2) loss.
    assert auc([1, 1, 0, 0], [0.6, 0.1, 0.6, 0.2]) == pytest.approx(1.5 / 4)
    with pytest.raises(ValueError):
        auc([1, 1], [0.2, 0.3])
    with pytest.raises(ValueError):
        auc([0, 2], [0.2, 0.3])


def test_integer_weights_equal_repeated_samples():
    labels, scores, weights = [1, 0, 1, 0, 0], [0.3, 0.3, 0.9, 0.5, 0.1], [2, 3, 1, 1, 4]
    repeated_labels = [l for l, w in zip(labels, weights) for _ in range(w)]
    repeated_scores = [s for s, w in zip(scores, weights) for _ in range(w)]
    assert auc(labels, scores, weights) == pytest.approx(auc(repeated_labels, repeated_scores))
    assert auc(labels, scores, weights) != pytest.approx(auc(labels, scores))


@pytest.mark.parametrize("seed", range(6))
def test_auc_matches_pairwise_reference_with_ties_and_weights(seed: int):
    rng = np.random.default_rng(seed)
    n = 300
    labels = rng.integers(0, 2, n)
    scores = rng.integers(0, 10, n) / 10.0  # few distinct values: many ties
    weights = rng.uniform(0.0, 3.0, n)
    assert auc(labels, scores) == pytest.approx(auc_reference(labels, scores), abs=1e-12)
    assert auc(labels, scores, weights) == pytest.approx(auc_reference(labels, scores, weights), abs=1e-12)


def test_grouped_auc_golden_numbers():
    # group "a": AUC 1 on 2 samples; "b": AUC 0 on 4 samples; "c": one class only, skipped.
    labels = [1, 0, 1, 0, 0, 0, 1, 1]
    scores = [0.9, 0.1, 0.1, 0.5, 0.6, 0.7, 0.3, 0.4]
    groups = ["a", "a", "b", "b", "b", "b", "c", "c"]
    unweighted = grouped_auc(labels, scores, groups, weighted=False)
    weighted = grouped_auc(labels, scores, groups, weighted=True)
    assert unweighted == {"gauc": pytest.approx(0.5), "groups_used": 2, "groups_skipped": 1}
    assert weighted == {"gauc": pytest.approx(2 / 6), "groups_used": 2, "groups_skipped": 1}
    none_usable = grouped_auc([1, 0], [0.2, 0.3], [1, 2])
    assert math.isnan(none_usable["gauc"]) and none_usable["groups_skipped"] == 2


def test_grouped_auc_is_not_pooled_auc():
    # Each user is ranked perfectly, but scores are not comparable across users.
    labels = [1, 0, 1, 0]
    scores = [0.2, 0.1, 0.9, 0.8]
    groups = [0, 0, 1, 1]
    assert grouped_auc(labels, scores, groups)["gauc"] == 1.0
    assert auc(labels, scores) == pytest.approx(0.75)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("weighted", [False, True])
def test_grouped_auc_matches_reference(seed: int, weighted: bool):
    rng = np.random.default_rng(100 + seed)
    n = 400
    groups = rng.integers(0, 40, n)  # ~10 samples a group: some single-class groups
    labels = (rng.random(n) < 0.25).astype(int)
    scores = rng.integers(0, 6, n).astype(float)  # many ties within groups
    fast = grouped_auc(labels, scores, groups, weighted=weighted)
    slow = grouped_auc_reference(labels, scores, groups, weighted=weighted)
    assert fast["groups_used"] == slow["groups_used"]
    assert fast["groups_skipped"] == slow["groups_skipped"] > 0
    assert fast["gauc"] == pytest.approx(slow["gauc"], abs=1e-12)

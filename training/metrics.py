"""Evaluation metrics: full-ranking next-item metrics and CTR AUC / GAUC.

This module owns the numbers we report, and nothing else: no model, no Ray, no MLflow.

Next-item ranking is evaluated over the *whole* catalogue (no sampled negatives, which are
known to inflate and reorder results). Each user has exactly one held-out target, so
Recall@k equals HitRate@k. The protocol is:

    scores [U, N] --target_ranks--> ranks [U] --ranking_metrics / RankingAccumulator--> dict

Evaluation runs in chunks of users to bound memory ([U_chunk, N] scores at a time), hence
`RankingAccumulator`, which keeps running sums rather than every rank.

CTR metrics (`auc`, `grouped_auc`) are numpy, sort-based, O(n log n).

Every fast path has a plain-Python reference beside it (`ranking_metrics_reference`,
`auc_reference`, `grouped_auc_reference`), written independently and tested against it.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

DEFAULT_KS: tuple[int, ...] = (5, 10, 20, 50)


# --------------------------------------------------------------------------------------
# Full-ranking next-item metrics
# --------------------------------------------------------------------------------------


def history_mask(histories: Tensor, num_items: int, pad_id: int) -> Tensor:
    """[U, L] long item ids (padded with `pad_id`) -> [U, N] bool, True where the user saw the item.

    Padding positions are ignored, so column `pad_id` is only True if the item really occurs.
    If `pad_id` is also a row of the score matrix (a padding embedding), exclude it
    separately: it is not the history's job to know that.
    """
    if histories.dim() != 2:
        raise ValueError(f"histories must be [U, L], got shape {tuple(histories.shape)}")
    num_users = histories.shape[0]
    mask = torch.zeros(num_users, num_items, dtype=torch.bool, device=histories.device)
    valid = histories != pad_id
    item_ids = histories[valid]
    if item_ids.numel() and (int(item_ids.min()) < 0 or int(item_ids.max()) >= num_items):
        raise ValueError(f"history item ids must lie in [0, {num_items}) apart from pad_id={pad_id}")
    user_rows = torch.arange(num_users, device=histories.device).unsqueeze(1).expand_as(histories)[valid]
    mask[user_rows, item_ids] = True
    return mask


def target_ranks(scores: Tensor, targets: Tensor, exclude: Tensor | None = None) -> Tensor:
    """[U, N] float scores, [U] long targets, optional [U, N] bool exclude -> [U] long 0-based ranks.

    rank = number of non-excluded items whose score is *strictly* greater than the target's.
    Ties are therefore resolved in the target's favour (an optimistic rank); with continuous
    model scores ties are rare, and a constant scorer is the one case where this flatters,
    which the tests document. Excluded items (e.g. the user's history) behave as if scored
    -inf; the target itself is never excluded, even when it is in `exclude` (a user may
    re-consume an item they saw before).
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be [U, N], got shape {tuple(scores.shape)}")
    if targets.shape != (scores.shape[0],):
        raise ValueError(f"targets must be [U]={scores.shape[0]}, got shape {tuple(targets.shape)}")
    targets = targets.to(device=scores.device, dtype=torch.long)
    target_scores = scores.gather(1, targets.unsqueeze(1))  # [U, 1]
    beats_target = scores > target_scores  # [U, N]
    if exclude is not None:
        if exclude.shape != scores.shape:
            raise ValueError(f"exclude must match scores {tuple(scores.shape)}, got {tuple(exclude.shape)}")
        # Masking the comparison is equivalent to filling excluded scores with -inf (an
        # item at -inf never beats anything) and avoids a second [U, N] float copy. The
        # target cannot beat itself, so it needs no un-excluding here.
        beats_target &= ~exclude.to(scores.device)
    return beats_target.sum(dim=1)


def _check_ks(ks: Iterable[int]) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks}")
    return ks


def _rank_sums(ranks: Tensor, ks: tuple[int, ...]) -> dict[str, float]:
    """[U] ranks -> per-metric *sums* over users (float64), the mergeable form of the means."""
    ranks = ranks.detach().to("cpu", torch.float64).reshape(-1)
    sums: dict[str, float] = {}
    discount = 1.0 / torch.log2(ranks + 2.0)
    for k in ks:
        hit = ranks < k
        sums[f"recall@{k}"] = float(hit.sum())
        sums[f"ndcg@{k}"] = float(torch.where(hit, discount, torch.zeros_like(discount)).sum())
    sums["mrr"] = float((1.0 / (ranks + 1.0)).sum())
    return sums


def ranking_metrics(ranks: Tensor, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """[U] long 0-based ranks -> {"recall@k", "ndcg@k" for k in ks, "mrr"}, means over users.

    recall@k = 1[rank < k] (one target, so it is the hit rate); ndcg@k = 1/log2(rank + 2) if
    rank < k else 0 (the ideal DCG of a single relevant item is 1); mrr = 1/(rank + 1) over
    the full list (no cut-off).
    """
    ks = _check_ks(ks)
    count = ranks.numel()
    if count == 0:
        raise ValueError("ranking_metrics needs at least one user")
    return {name: total / count for name, total in _rank_sums(ranks, ks).items()}


class RankingAccumulator:
    """Accumulates ranking metrics over chunks of users; memory is O(len(ks)), not O(U).

    acc = RankingAccumulator(); for chunk: acc.update(target_ranks(...)); acc.compute()
    Accumulators from different workers combine with `merge`.
    """

    def __init__(self, ks: Sequence[int] = DEFAULT_KS) -> None:
        self.ks = _check_ks(ks)
        self._sums = dict.fromkeys(_rank_sums(torch.zeros(0), self.ks), 0.0)
        self._count = 0

    @property
    def count(self) -> int:
        """Number of users accumulated so far."""
        return self._count

    def update(self, ranks: Tensor) -> None:
        """Add a chunk of [U_chunk] 0-based ranks."""
        for name, total in _rank_sums(ranks, self.ks).items():
            self._sums[name] += total
        self._count += ranks.numel()

    def merge(self, other: RankingAccumulator) -> None:
        """Fold another accumulator (same ks) into this one, e.g. one per eval worker."""
        if other.ks != self.ks:
            raise ValueError(f"cannot merge accumulators with ks {other.ks} into {self.ks}")
        for name, total in other._sums.items():
            self._sums[name] += total
        self._count += other._count

    def compute(self) -> dict[str, float]:
        """-> the same dict as `ranking_metrics` over every rank seen so far."""
        if self._count == 0:
            raise ValueError("RankingAccumulator.compute() called before any update()")
        return {name: total / self._count for name, total in self._sums.items()}


def _as_python_rows(matrix) -> list[list[float]]:
    return matrix.tolist() if hasattr(matrix, "tolist") else [list(row) for row in matrix]


def ranking_metrics_reference(
    scores,
    targets,
    exclude_sets: Sequence[set[int]] | None = None,
    ks: Sequence[int] = DEFAULT_KS,
) -> dict[str, float]:
    """Plain-Python reference for target_ranks + ranking_metrics: a sort per user.

    scores: [U][N] nested lists (or anything with .tolist()); targets: [U] ints;
    exclude_sets: per-user sets of item ids to drop (the target is always kept).
    """
    rows = _as_python_rows(scores)
    target_list = [int(t) for t in (targets.tolist() if hasattr(targets, "tolist") else targets)]
    ks = _check_ks(ks)
    totals = {f"{name}@{k}": 0.0 for k in ks for name in ("recall", "ndcg")}
    totals["mrr"] = 0.0
    for user, row in enumerate(rows):
        target = target_list[user]
        excluded = exclude_sets[user] if exclude_sets is not None else set()
        candidates = [item for item in range(len(row)) if item == target or item not in excluded]
        # Best first; among equal scores the target sorts first (ties in the target's favour).
        ordered = sorted(candidates, key=lambda item: (-row[item], item != target))
        rank = ordered.index(target)
        for k in ks:
            if rank < k:
                totals[f"recall@{k}"] += 1.0
                totals[f"ndcg@{k}"] += 1.0 / math.log2(rank + 2)
        totals["mrr"] += 1.0 / (rank + 1)
    # Same key order as ranking_metrics, for readable diffs in test failures.
    order = [f"{name}@{k}" for k in ks for name in ("recall", "ndcg")] + ["mrr"]
    return {name: totals[name] / len(rows) for name in order}


# --------------------------------------------------------------------------------------
# CTR metrics: AUC and grouped AUC
# --------------------------------------------------------------------------------------


def _check_binary(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0/1")
    return labels.astype(bool)


def _auc_parts_by_group(
    labels: np.ndarray, scores: np.ndarray, weights: np.ndarray, group_index: np.ndarray, num_groups: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sort-based Mann-Whitney statistic per group, all groups at once.

    [n] bool labels, [n] scores, [n] weights, [n] group index in [0, G) ->
    (pair_wins [G], positive_weight [G], negative_weight [G]); AUC_g = wins_g / (pos_g * neg_g).

    Samples are sorted by (group, score) and cut into tie blocks of equal (group, score).
    A positive beats every negative in its group with a lower score and half-beats those in
    its own tie block, so a block contributes pos_b * (neg weight below it in its group +
    neg_b / 2).
    """
    if len(labels) == 0:
        empty = np.zeros(num_groups)
        return empty, empty.copy(), empty.copy()
    order = np.lexsort((scores, group_index))  # primary key: group, then score ascending
    sorted_groups = group_index[order]
    sorted_scores = scores[order]
    new_block = np.empty(len(order), dtype=bool)
    new_block[:1] = True
    new_block[1:] = (sorted_groups[1:] != sorted_groups[:-1]) | (sorted_scores[1:] != sorted_scores[:-1])
    block_of_sample = np.cumsum(new_block) - 1  # [n]
    num_blocks = int(block_of_sample[-1]) + 1
    block_group = sorted_groups[new_block]  # [B]

    sorted_weights = weights[order]
    sorted_labels = labels[order]
    block_pos = np.bincount(block_of_sample, weights=sorted_weights * sorted_labels, minlength=num_blocks)
    block_neg = np.bincount(block_of_sample, weights=sorted_weights * ~sorted_labels, minlength=num_blocks)

    # Negative weight strictly below each block *within its group*: a global exclusive
    # cumulative sum minus the cumulative sum at the start of the block's group.
    neg_before_block = np.cumsum(block_neg) - block_neg  # [B]
    starts_group = np.r_[True, block_group[1:] != block_group[:-1]]  # [B]
    first_block_of_group = np.flatnonzero(starts_group)[np.cumsum(starts_group) - 1]  # [B]
    neg_below_in_group = neg_before_block - neg_before_block[first_block_of_group]

    block_wins = block_pos * (neg_below_in_group + 0.5 * block_neg)
    wins = np.bincount(block_group, weights=block_wins, minlength=num_groups)
    positive_weight = np.bincount(block_group, weights=block_pos, minlength=num_groups)
    negative_weight = np.bincount(block_group, weights=block_neg, minlength=num_groups)
    return wins, positive_weight, negative_weight


def auc(labels, scores, weights=None) -> float:
    """ROC AUC of [n] 0/1 labels vs [n] scores, optional [n] non-negative sample weights.

    The (weighted) Mann-Whitney statistic: the probability that a random positive outscores
    a random negative, a tie counting 1/2. Raises ValueError if either class has no weight.
    """
    labels = _check_binary(labels)
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != labels.shape:
        raise ValueError(f"scores {scores.shape} must match labels {labels.shape}")
    weights = np.ones_like(scores) if weights is None else np.asarray(weights, dtype=np.float64)
    if weights.shape != labels.shape or (weights < 0).any():
        raise ValueError("weights must be non-negative and match labels")
    wins, pos, neg = _auc_parts_by_group(labels, scores, weights, np.zeros(len(labels), dtype=np.int64), 1)
    if pos[0] <= 0 or neg[0] <= 0:
        raise ValueError("AUC is undefined unless both classes are present")
    return float(wins[0] / (pos[0] * neg[0]))


def grouped_auc(labels, scores, groups, weighted: bool = True) -> dict[str, float | int]:
    """Grouped AUC (GAUC) of [n] 0/1 labels vs [n] scores, grouped by [n] ids (e.g. user ids).

    The per-group AUC averaged over groups that contain both classes; single-class groups
    have no AUC and are skipped (and counted). weighted=True weights each group by its number
    of samples (the usual GAUC); weighted=False is the plain mean over groups.
    -> {"gauc": float (nan if no group is usable), "groups_used": int, "groups_skipped": int}
    """
    labels = _check_binary(labels)
    scores = np.asarray(scores, dtype=np.float64)
    groups = np.asarray(groups)
    if scores.shape != labels.shape or groups.shape != labels.shape:
        raise ValueError("labels, scores and groups must all be [n]")
    _, group_index = np.unique(groups, return_inverse=True)
    group_index = group_index.reshape(-1)
    num_groups = int(group_index.max()) + 1 if len(group_index) else 0
    wins, pos, neg = _auc_parts_by_group(labels, scores, np.ones_like(scores), group_index, num_groups)
    usable = (pos > 0) & (neg > 0)
    groups_used = int(usable.sum())
    if groups_used == 0:
        gauc = float("nan")
    else:
        group_auc = wins[usable] / (pos[usable] * neg[usable])
        group_weight = (pos + neg)[usable] if weighted else np.ones(groups_used)
        gauc = float((group_auc * group_weight).sum() / group_weight.sum())
    return {"gauc": gauc, "groups_used": groups_used, "groups_skipped": num_groups - groups_used}


def auc_reference(labels, scores, weights=None) -> float:
    """Reference AUC: a loop over every (positive, negative) pair, ties count 1/2."""
    labels = [int(v) for v in labels]
    scores = [float(v) for v in scores]
    weights = [1.0] * len(labels) if weights is None else [float(v) for v in weights]
    positives = [i for i, label in enumerate(labels) if label == 1]
    negatives = [i for i, label in enumerate(labels) if label == 0]
    wins = 0.0
    pair_weight = 0.0
    for p in positives:
        for n in negatives:
            pair = weights[p] * weights[n]
            pair_weight += pair
            if scores[p] > scores[n]:
                wins += pair
            elif scores[p] == scores[n]:
                wins += 0.5 * pair
    if pair_weight <= 0:
        raise ValueError("AUC is undefined unless both classes are present")
    return wins / pair_weight


def grouped_auc_reference(labels, scores, groups, weighted: bool = True) -> dict[str, float | int]:
    """Reference GAUC: a loop over groups calling `auc_reference`."""
    members: dict[object, list[int]] = {}
    for i, group in enumerate(groups.tolist() if hasattr(groups, "tolist") else groups):
        members.setdefault(group, []).append(i)
    labels = [int(v) for v in labels]
    scores = [float(v) for v in scores]
    weighted_sum = 0.0
    weight_total = 0.0
    used = skipped = 0
    for indices in members.values():
        group_labels = [labels[i] for i in indices]
        if len(set(group_labels)) < 2:
            skipped += 1
            continue
        used += 1
        weight = float(len(indices)) if weighted else 1.0
        weighted_sum += weight * auc_reference(group_labels, [scores[i] for i in indices])
        weight_total += weight
    gauc = weighted_sum / weight_total if used else float("nan")
    return {"gauc": gauc, "groups_used": used, "groups_skipped": skipped}

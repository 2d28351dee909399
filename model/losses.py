"""Training objectives behind one small interface: (user, positive, candidates) -> scalar.

`SampledSoftmaxLoss`: softmax over in-batch positives of the other rows (plus optional uniformly sampled
negatives), with duplicate-item collisions masked and the logQ popularity correction available.
`FullSoftmaxLoss`: cross-entropy over the whole catalogue (fMRLRec's choice; feasible when the catalogue fits).
`CTRLoss`: LEMUR's click objective. `NestedSizesLoss`: any retrieval loss summed over Matryoshka sizes.
`build_objective` is the one place where the model config picks and wraps them.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from matryoshka.layers import at_size, matryoshka_loss, validate_sizes
from model.recommender import unique_first


class RetrievalLoss(Protocol):
    def __call__(
        self,
        user: torch.Tensor,
        positive: torch.Tensor,
        positive_ids: torch.Tensor,
        negatives: torch.Tensor | None = None,
        negative_ids: torch.Tensor | None = None,
    ) -> torch.Tensor: ...


def inclusion_log_prob(item_log_prob: torch.Tensor, draws: int) -> torch.Tensor:
    """log P(an item is among a step's candidates) when they are the distinct items of `draws` draws with
    replacement from exp(item_log_prob): log(1 - (1 - p)^draws), the logQ correction of a de-duplicated sampled
    softmax. For rare items it is log(p * draws), the usual correction; an item in almost every step gets ~0,
    where log(p * draws) would push it down by up to ~2.7 nats on ml100k_mm (the most popular item at 2,560
    targets a step: p * draws = 15) and so teach the model to rank popular items too high."""
    return torch.log(-torch.expm1(draws * torch.log1p(-item_log_prob.exp())))


class SampledSoftmaxLoss:
    """user [B, D], positive [B, D], positive_ids [B], negatives [K, D], negative_ids [K] -> scalar.

    Vectors are expected L2-normalised; logits are cosine / temperature.
    """

    def __init__(self, temperature: float, item_log_prob: torch.Tensor | None = None, num_items: int | None = None,
                 unique_candidates: bool = False) -> None:
        self.temperature = temperature
        self.item_log_prob = item_log_prob  # [N+1] log sampling probability of each item as an in-batch negative
        self.num_items = num_items
        # every distinct positive item is one candidate column, not one per row (train.targets=all: ~40 rows per
        # window, most items many times over; a [rows, rows] matrix would be mostly repeats)
        self.unique_candidates = unique_candidates

    def __call__(self, user, positive, positive_ids, negatives=None, negative_ids=None):
        if self.unique_candidates:
            return self._unique(user, positive, positive_ids)
        batch = user.shape[0]
        logits = user @ positive.T / self.temperature  # [B, B]
        if self.item_log_prob is not None:
            # every row's positive is a column, repeats included: expected copies of an item p * batch
            log_q = self.item_log_prob.to(user.device)[positive_ids] + math.log(batch)
            logits = logits - log_q[None, :]
        # Another row with the same target item is not a negative.
        same = positive_ids[:, None] == positive_ids[None, :]
        off_diagonal = ~torch.eye(batch, dtype=torch.bool, device=user.device)
        logits = logits.masked_fill(same & off_diagonal, float("-inf"))
        if negatives is not None and negatives.shape[0] > 0:
            extra = user @ negatives.T / self.temperature  # [B, K]
            if self.item_log_prob is not None and self.num_items:
                extra = extra - math.log(negatives.shape[0] / self.num_items)
            extra = extra.masked_fill(negative_ids[None, :] == positive_ids[:, None], float("-inf"))
            logits = torch.cat([logits, extra], dim=1)
        labels = torch.arange(batch, device=user.device)
        return F.cross_entropy(logits, labels)

    def _unique(self, user, positive, positive_ids):
        """Candidates: each distinct positive item once (its first row's vector); a row's own column holds its own
        positive's logit (the gradient reaches every row's positive)."""
        ids, first, inverse = unique_first(positive_ids)
        logits = user @ positive[first].T / self.temperature  # [M, U]
        own = (user * positive).sum(-1, keepdim=True) / self.temperature
        logits = logits.scatter(1, inverse[:, None], own)
        if self.item_log_prob is not None:
            logits = logits - inclusion_log_prob(self.item_log_prob.to(user.device)[ids], len(positive_ids))[None, :]
        return F.cross_entropy(logits, inverse)


class FullSoftmaxLoss:
    """Cross-entropy over every catalogue item: `negatives` is the full item table [N+1, D] (row 0 = padding).

    `fresh_table`: the table is computed this step with gradients (an exact catalogue: ID-only, frozen encoders on
    the trunk cache), so the target's own row is its positive and every column is made the same way. Otherwise
    (the table is the bank's) the fresh, gradient-carrying positive replaces the target's row. Mixing the two
    kinds in one exact table let a model tell the positive apart by how it was made: frozen encoders with
    positives through dropout and a clean table reached train loss 2.5 with validation NDCG@10 0.029.

    `excluded` [N+1] bool: items that are no candidate (the items in no training example, whose scores should
    come from their content alone, `Recommender.zero_unseen_ids`, not from being pushed down as negatives).
    """

    def __init__(self, temperature: float, fresh_table: bool = False, excluded: torch.Tensor | None = None) -> None:
        self.temperature = temperature
        self.fresh_table = fresh_table
        self.excluded = excluded

    def __call__(self, user, positive, positive_ids, negatives=None, negative_ids=None):
        if negatives is None:
            raise ValueError("FullSoftmaxLoss needs the full item table as `negatives`")
        logits = user @ negatives.T / self.temperature  # [B, N+1]
        if not self.fresh_table:
            logits = logits.scatter(1, positive_ids[:, None], (user * positive).sum(-1, keepdim=True) / self.temperature)
        logits[:, 0] = float("-inf")
        if self.excluded is not None:
            logits = logits.masked_fill(self.excluded.to(logits.device), float("-inf"))
        return F.cross_entropy(logits, positive_ids)


class CTRLoss:
    """LEMUR's click objective: BCE on (user, candidate) + a grouped in-batch contrastive term.

    user [B, D], item [B, D] (L2-normalised), labels [B] in {0, 1}, groups [B] (user or query id) -> scalar.
    The click logit is cosine / temperature. The contrastive term treats each clicked row as an anchor whose
    positive is its own item; negatives are the other rows' items, except rows of the same group (the same
    user/query may have clicked them too) and rows carrying the same item.
    """

    def __init__(self, temperature: float, contrastive_weight: float = 1.0) -> None:
        self.temperature = temperature
        self.contrastive_weight = contrastive_weight

    def logits(self, user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        """[B, D], [B, D] -> click logits [B]"""
        return (user * item).sum(-1) / self.temperature

    def __call__(self, user, item, labels, groups, item_ids=None):
        labels = labels.float()
        bce = F.binary_cross_entropy_with_logits(self.logits(user, item), labels)
        if self.contrastive_weight == 0:
            return bce
        anchors = labels > 0.5
        if not anchors.any():
            return bce
        sims = user[anchors] @ item.T / self.temperature  # [P, B]
        rows = torch.nonzero(anchors).squeeze(1)
        same_group = groups[anchors][:, None] == groups[None, :]
        if item_ids is not None:
            same_group = same_group | (item_ids[anchors][:, None] == item_ids[None, :])
        own = rows[:, None] == torch.arange(len(labels), device=user.device)[None, :]
        sims = sims.masked_fill(same_group & ~own, float("-inf"))
        contrastive = F.cross_entropy(sims, rows)
        return bce + self.contrastive_weight * contrastive


class NestedSizesLoss:
    """A retrieval loss summed over Matryoshka sizes: same call as the base loss, per-size values kept.

    user [B, D], positive [B, D], positive_ids [B], negatives [K, D] | None, negative_ids [K] | None -> scalar.
    At each size s every vector is truncated to s and renormalised (`at_size`), so the loss at s is exactly the
    base loss of the size-s model; the total is sum_s weight_s * loss_s (fMRLRec uses equal weights).
    """

    def __init__(self, base_loss, sizes: Sequence[int], weights: Sequence[float] | None = None) -> None:
        self.base_loss = base_loss
        self.sizes = validate_sizes(sizes, max(sizes) if sizes else 0, require_full=True)
        self.weights = tuple(weights) if weights else None
        self.last_per_size: dict[int, float] = {}  # detached per-size losses of the latest call (for logging)

    def __call__(self, user, positive, positive_ids, negatives=None, negative_ids=None):
        def loss_at_size(size: int) -> torch.Tensor:
            extra = None if negatives is None else at_size(negatives, size)
            return self.base_loss(at_size(user, size), at_size(positive, size), positive_ids, extra, negative_ids)

        total, per_size = matryoshka_loss(loss_at_size, self.sizes, self.weights)
        self.last_per_size = {size: float(value.detach()) for size, value in per_size.items()}
        return total


def _retrieval_objective(cfg, popularity: np.ndarray, exact_catalogue: bool, all_positions: bool,
                         seen: np.ndarray | None) -> RetrievalLoss:
    """The full softmax where the config resolves to it (over a table fresh each step if `exact_catalogue`; without
    the unseen items if `model.unseen_from_content` and `seen` is known), else the sampled softmax with logQ
    correction (distinct-item candidates if `all_positions`)."""
    num_items = len(popularity) - 1
    if cfg.resolved_loss(num_items, exact_catalogue) == "full_softmax":
        excluded = None
        if cfg.unseen_from_content and seen is not None:
            excluded = torch.as_tensor(~np.asarray(seen, dtype=bool))
            excluded[0] = False  # the padding is masked anyway
        return FullSoftmaxLoss(cfg.temperature, fresh_table=exact_catalogue, excluded=excluded)
    log_prob = None
    if cfg.logq_correction:
        smoothed = popularity + 1.0
        log_prob = torch.as_tensor(np.log(smoothed / smoothed.sum()), dtype=torch.float32)
    return SampledSoftmaxLoss(cfg.temperature, item_log_prob=log_prob, num_items=num_items,
                              unique_candidates=all_positions)


def build_objective(cfg, popularity: np.ndarray, exact_catalogue: bool = False, all_positions: bool = False,
                    seen: np.ndarray | None = None):
    """The model config (`model.task`, `model.loss`, Matryoshka sizes) + training item counts [N+1] -> objective.
    `exact_catalogue`: whether the trainer computes every item's vector exactly each step (`model.loss=auto`).
    `all_positions` (`train.targets=all`): the sampled softmax takes each distinct item once as a candidate.
    `seen` [N+1] bool: the items in a training example (`pipeline.sequences.seen_items`); the others are no
    candidates of the full softmax under `model.unseen_from_content`.

    Retrieval objectives share `RetrievalLoss`'s call; with Matryoshka sizes they are wrapped in
    `NestedSizesLoss`. `task=ctr` gives `CTRLoss` (its own call: labels and groups instead of negatives).
    """
    if cfg.task == "ctr":
        return CTRLoss(cfg.temperature, cfg.ctr_contrastive_weight)
    base = _retrieval_objective(cfg, popularity, exact_catalogue, all_positions, seen)
    if cfg.matryoshka_sizes:  # fMRLRec: the same loss at every nested size, weighted and summed
        return NestedSizesLoss(base, cfg.matryoshka_sizes, cfg.loss_weights)
    return base

"""Full-ranking evaluation over the whole catalogue (no sampled negatives).

Item vectors always come from a fresh catalogue pass (`encode_catalog`), never from the memory bank, so a
checkpoint is judged on what it would serve. Row 0 of every item table is padding and is never ranked.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

from model.recommender import Recommender
from pipeline.sequences import Examples
from training.metrics import RankingAccumulator, history_mask, target_ranks


@torch.inference_mode()
def encode_catalog(model: Recommender, batches: Iterable[dict[str, torch.Tensor]], num_items: int,
                   device: torch.device) -> torch.Tensor:
    """Catalogue content batches (from `pipeline.stages.catalog_dataset`) -> content table [N+1, D], row 0 = 0."""
    was_training = model.training
    model.eval()
    table = torch.zeros(num_items + 1, model.item_encoder.dim, device=device)
    seen = torch.zeros(num_items + 1, dtype=torch.bool, device=device)
    for batch in batches:
        ids = batch["item_index"].to(device)
        table[ids] = model.item_encoder.encode_content(
            batch["image"].to(device), batch["image_mask"].to(device), batch["input_ids"].to(device),
            batch["attention_mask"].to(device), batch["text_mask"].to(device),
        )
        seen[ids] = True
    model.train(was_training)
    missing = int((~seen[1:]).sum())
    if missing:
        raise RuntimeError(f"catalogue pass did not cover {missing} of {num_items} items")
    return table


@torch.inference_mode()
def score_users(model: Recommender, content: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
    """content [N+1, D], history [U, L] -> scores [U, N+1] (column 0 = -inf)"""
    ids = torch.arange(content.shape[0], device=content.device)
    items = model.item_vectors(content, ids)  # [N+1, D]
    user = model.user_vectors(history, content[history])  # [U, D]
    scores = user @ items.T
    scores[:, 0] = float("-inf")
    return scores


@torch.inference_mode()
def evaluate_ranking(model: Recommender, content: torch.Tensor, examples: Examples, *, ks: tuple[int, ...],
                     mask_history: bool, batch_size: int = 256) -> dict[str, float]:
    """Recall@k, NDCG@k and MRR of `examples` (one target each) ranked against every catalogue item."""
    was_training = model.training
    model.eval()
    acc = RankingAccumulator(ks=ks)
    device = content.device
    for start in range(0, len(examples), batch_size):
        history = torch.as_tensor(examples.history[start : start + batch_size], device=device)
        targets = torch.as_tensor(examples.target[start : start + batch_size], device=device)
        scores = score_users(model, content, history)
        exclude = history_mask(history, content.shape[0] - 1, pad_id=0) if mask_history else None
        acc.update(target_ranks(scores, targets, exclude))
    model.train(was_training)
    return acc.compute()


def popularity_metrics(popularity: np.ndarray, examples: Examples, *, ks: tuple[int, ...],
                       mask_history: bool) -> dict[str, float]:
    """The most-popular baseline under the same protocol: every user gets items ranked by training count.

    Ties in count are broken by item index (a fixed order), so the baseline gets no tie bonus.
    """
    num_items = len(popularity) - 1
    order_bonus = -np.arange(num_items + 1) / (10.0 * (num_items + 1))
    base = torch.as_tensor(popularity + order_bonus, dtype=torch.float64)
    base[0] = float("-inf")
    acc = RankingAccumulator(ks=ks)
    for start in range(0, len(examples), 1024):
        history = torch.as_tensor(examples.history[start : start + 1024])
        targets = torch.as_tensor(examples.target[start : start + 1024])
        scores = base.expand(len(targets), -1)
        exclude = history_mask(history, num_items, pad_id=0) if mask_history else None
        acc.update(target_ranks(scores, targets, exclude))
    return acc.compute()

"""Items in no training example (`model.unseen_from_content`): which they are, their zero id vector (scored by
content alone), and the full softmax that leaves them out instead of pushing them down as negatives."""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from model.build import build_recommender
from model.losses import FullSoftmaxLoss, build_objective
from pipeline.sequences import Examples, seen_items
from training.job_config import build_config


def _examples(history: list[list[int]], target: list[int]) -> Examples:
    n = len(target)
    return Examples(user=np.arange(n), history=np.array(history), target=np.array(target),
                    timestamp=np.zeros(n, dtype=np.int64), rating=np.full(n, np.nan, dtype=np.float32))


def test_seen_items_are_the_targets_and_history_items_of_training_examples():
    train = _examples([[0, 0, 2], [0, 2, 5]], [5, 7])
    seen = seen_items(train, num_items=8)
    assert seen.tolist() == [False, False, True, False, False, True, False, True, False]


def _id_model(num_items: int = 12, dim: int = 8):
    job = build_config("tiny", ["model.use_id_embedding=true", f"model.dim={dim}"])
    torch.manual_seed(0)
    return build_recommender(job.model, job.image, job.text, num_items=num_items, max_history=4)


def test_unseen_and_new_rows_are_zeroed_and_seen_rows_kept():
    model, num_items = _id_model(), 12
    table = model.item_encoder.id_embedding.weight
    before = table.detach().clone()
    seen = torch.ones(num_items - 1, dtype=torch.bool)  # rows 0-10 known at training; rows 11-12 are new since
    seen[[0, 4, 9]] = False
    assert model.zero_unseen_ids(seen) == 4  # 4, 9, 11, 12 (row 0 is the padding)
    zero = (table == 0).all(dim=1)
    assert zero.nonzero().flatten().tolist() == [0, 4, 9, 11, 12]
    keep = ~zero
    assert torch.equal(table[keep], before[keep])  # seen rows untouched
    assert model.zero_unseen_ids(torch.ones(num_items + 1, dtype=torch.bool)) == 0


def test_an_id_only_model_keeps_its_unseen_rows():
    """No content to score by; one shared zero vector would tie every unseen item (ties go to the target)."""
    job = build_config("tiny", ["model.use_id_embedding=true", "model.modalities=", "model.dim=8"])
    model = build_recommender(job.model, job.image, job.text, num_items=12, max_history=4)
    seen = torch.ones(13, dtype=torch.bool)
    seen[3] = False
    before = model.item_encoder.id_embedding.weight.detach().clone()
    assert model.zero_unseen_ids(seen) == 0
    assert torch.equal(model.item_encoder.id_embedding.weight, before)


def test_the_full_softmax_leaves_excluded_items_out_and_sends_them_no_gradient():
    g = torch.Generator().manual_seed(0)
    user, table = torch.randn(5, 8, generator=g), torch.randn(7, 8, generator=g).requires_grad_()
    positive_ids = torch.tensor([1, 2, 2, 5, 6])
    excluded = torch.zeros(7, dtype=torch.bool)
    excluded[[3, 4]] = True
    loss = FullSoftmaxLoss(0.5, fresh_table=True, excluded=excluded)(user, None, positive_ids, negatives=table)
    kept = torch.tensor([1, 2, 5, 6])
    logits = user @ table[kept].T / 0.5
    reference = F.cross_entropy(logits, torch.tensor([0, 1, 1, 2, 3]))
    torch.testing.assert_close(loss, reference)
    loss.backward()
    assert not table.grad[[0, 3, 4]].any() and table.grad[kept].abs().sum(1).gt(0).all()


def test_the_objective_excludes_unseen_items_only_when_the_config_says_so():
    job = build_config("tiny", ["model.use_id_embedding=true", "model.modalities="])
    popularity, seen = np.ones(6), np.array([False, True, True, False, True, True])
    objective = build_objective(job.model, popularity, exact_catalogue=True, seen=seen)
    assert isinstance(objective, FullSoftmaxLoss) and objective.excluded.tolist() == [False, False, False, True,
                                                                                       False, False]
    off = dataclasses.replace(job.model, unseen_from_content=False)
    assert build_objective(off, popularity, exact_catalogue=True, seen=seen).excluded is None
    assert build_objective(job.model, popularity, exact_catalogue=True).excluded is None

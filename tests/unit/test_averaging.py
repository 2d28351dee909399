"""Weight averaging: the average's arithmetic, the swap in and out, and a trainer that averages, evaluates the
average, keeps it in its checkpoint and resumes the trained weights exactly."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from memory.local import LocalMemoryBankClient
from pipeline.sources import ITEMS_FILE, load_manifest
from pipeline.splits import build_splits
from pipeline.sequences import item_popularity
from training.averaging import TRAINED_WEIGHTS_FILE, WeightAverage, average_decay
from training.checkpoint import load_tensors, restore, save_checkpoint
from training.job_config import build_config
from training.offline_eval import DecodedCatalogue, content_spec_of
from training.trainer import build_trainer


def _two_layers() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    model[0].requires_grad_(False)  # a frozen layer: not averaged
    return model


def test_decay_spans_the_asked_epochs():
    assert average_decay(0.0, 380) == 0.0
    assert average_decay(1.0, 100) == pytest.approx(0.99)
    assert average_decay(2.0, 380) == pytest.approx(1 - 1 / 760)
    assert average_decay(0.001, 10) == 0.0  # under one step: d = 0, the average is the weights


def test_update_is_the_exponential_average_with_its_warm_up():
    model = _two_layers()
    average = WeightAverage(model, decay=0.9)
    weight = model[1].weight
    expected = weight.detach().clone()
    for n in range(120):
        with torch.no_grad():
            weight.add_(1.0)  # a step
        d = min(0.9, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * weight.detach()
        average.update(model)
    torch.testing.assert_close(average.shadow["1.weight"], expected)
    assert average.current_decay() == 0.9 and average.updates == 120
    # steps of +1: the average trails the weights by d / (1 - d) = 9 steps once the warm-up is over
    lag = (weight.detach() - average.shadow["1.weight"]).mean().item()
    assert 8.5 < lag < 9.0 + 1e-4, lag
    assert set(average.shadow) == {"1.weight", "1.bias"}  # the frozen layer is not copied


def test_applied_swaps_the_average_in_and_the_trained_weights_back_even_after_an_error():
    model = _two_layers()
    average = WeightAverage(model, decay=0.5)
    with torch.no_grad():
        model[1].weight.add_(2.0)
    average.update(model)
    trained = model[1].weight.detach().clone()
    frozen = model[0].weight.detach().clone()
    with average.applied(model) as raw:
        torch.testing.assert_close(model[1].weight.detach(), average.shadow["1.weight"])
        torch.testing.assert_close(raw["1.weight"], trained)
        assert not torch.equal(model[1].weight, trained)
    torch.testing.assert_close(model[1].weight.detach(), trained)
    with pytest.raises(RuntimeError), average.applied(model):
        raise RuntimeError("evaluation failed")
    torch.testing.assert_close(model[1].weight.detach(), trained)
    torch.testing.assert_close(model[0].weight.detach(), frozen)


def test_load_trained_refuses_a_partial_set():
    model = _two_layers()
    average = WeightAverage(model, decay=0.5)
    with pytest.raises(ValueError, match="lack 1 parameters"):
        average.load_trained(model, {"1.weight": torch.zeros(2, 4)})


@pytest.fixture(scope="module")
def setting(prepared_dir: Path):
    job = build_config("tiny", [f"data.prepared_dir={prepared_dir}", "model.dropout=0.0", "train.average_epochs=1"])
    num_items = load_manifest(prepared_dir)["num_items"]
    splits = build_splits(job.data, prepared_dir)
    catalogue = DecodedCatalogue(prepared_dir / ITEMS_FILE, num_items)
    return job, num_items, item_popularity(splits.train, num_items), catalogue, splits


def _trainer(setting):
    job, num_items, popularity, catalogue, _ = setting
    torch.manual_seed(0)
    np.random.seed(0)
    bank = LocalMemoryBankClient(capacity=num_items + 1, dim=job.model.dim)
    trainer = build_trainer(job, num_items, popularity, bank, trunk_cache=True)
    trainer.build_trunk_cache(catalogue.batches(content_spec_of(job)))
    trainer.refresh_bank(trainer.encode_catalogue(None), wait=True)
    return trainer


def _ids_batch(splits, rows: np.ndarray) -> dict:
    return {"target": torch.as_tensor(splits.train.target[rows]), "history": torch.as_tensor(splits.train.history[rows]),
            "rating": torch.as_tensor(splits.train.rating[rows]), "user": torch.as_tensor(splits.train.user[rows])}


def _trained_params(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def test_a_trainer_evaluates_and_keeps_the_average_and_resumes_the_trained_weights(setting, tmp_path: Path):
    job, _, _, _, splits = setting
    batches = [_ids_batch(splits, np.arange(i * 32, (i + 1) * 32)) for i in range(6)]
    trainer = _trainer(setting)
    trainer.start_averaging(average_decay(job.train.average_epochs, steps_per_epoch=4))
    trainer.train_epoch(iter(batches[:4]), max_steps=4)
    trained = _trained_params(trainer)
    shadow = {n: t.clone() for n, t in trainer.average.shadow.items()}
    assert any(not torch.equal(trained[n], shadow[n]) for n in trained)  # there is something to tell apart

    no_catalogue = lambda: None  # noqa: E731 (the trunk cache serves the catalogue passes)
    with trainer.end_epoch(no_catalogue, splits.validation) as ended:
        for name, p in trainer.model.named_parameters():
            if name in shadow:
                torch.testing.assert_close(p.detach(), shadow[name])  # evaluated: the average
        assert math.isfinite(ended.scores["val_ndcg@10"]) and math.isfinite(ended.scores["val_trained_ndcg@10"])
        assert ended.scores["val_mrr"] != ended.scores["val_trained_mrr"]  # two different models scored
        # the content table is the averaged weights' own; the bank holds the trained weights' vectors
        torch.testing.assert_close(ended.content, trainer.encode_catalogue(None))
        save_checkpoint(tmp_path, trainer.model, trainer.optimizer,
                        {"epoch": 0, "global_step": trainer.global_step}, trained=ended.trained)
    after = _trained_params(trainer)
    for name in trained:
        torch.testing.assert_close(after[name], trained[name])
    bank = trainer.bank.lookup(np.arange(1, trainer.num_items + 1)).vectors
    np.testing.assert_allclose(bank, trainer.encode_catalogue(None)[1:].numpy(), rtol=1e-5, atol=1e-6)
    saved = load_tensors(tmp_path / "model.pt")
    for name in shadow:
        torch.testing.assert_close(saved[name], shadow[name])  # model.pt: what is evaluated, served, registered
    assert set(load_tensors(tmp_path / TRAINED_WEIGHTS_FILE)) == set(trained)

    # a resumed attempt continues exactly: the same trained weights, average and optimizer state
    trainer.bank.save(tmp_path / "bank")
    fresh = _trainer(setting)
    restored = restore(fresh, resume_dir=tmp_path, log=lambda _: None)
    fresh.start_averaging(average_decay(job.train.average_epochs, steps_per_epoch=4), restored.trained_weights)
    assert fresh.global_step == 4 and fresh.average.updates == 4
    torch.manual_seed(1)
    np.random.seed(1)
    trainer.train_epoch(iter(batches[4:]), max_steps=2)
    torch.manual_seed(1)
    np.random.seed(1)
    fresh.train_epoch(iter(batches[4:]), max_steps=2)
    for name, tensor in _trained_params(trainer).items():
        torch.testing.assert_close(_trained_params(fresh)[name], tensor)
        torch.testing.assert_close(fresh.average.shadow[name], trainer.average.shadow[name])

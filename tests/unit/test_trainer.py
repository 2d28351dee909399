"""The plain-torch trainer on real decoded ml100k_mm batches: its parts, its step, restore, and the objective registry."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from memory.local import LocalMemoryBankClient
from model.losses import CTRLoss, FullSoftmaxLoss, NestedSizesLoss, SampledSoftmaxLoss, build_objective
from pipeline.content import ItemContentDecoder
from pipeline.sequences import item_popularity, seen_items
from pipeline.sources import ITEMS_FILE, load_manifest
from pipeline.splits import build_splits
from training.checkpoint import restore, save_checkpoint
from training.job_config import build_config
from training.offline_eval import DecodedCatalogue, content_spec_of
from training.trainer import (BankHistory, CatalogueNegatives, InBatchNegatives, RecomputeHistory, UniformNegatives,
                              EarlyStopping, Trainer, build_trainer, exact_catalogue, lr_scale, make_negatives)
from training.overrides import ConfigError


@pytest.fixture(scope="module")
def setting(prepared_dir: Path):
    job = build_config("tiny", [f"data.prepared_dir={prepared_dir}", "model.dropout=0.0"])
    num_items = load_manifest(prepared_dir)["num_items"]
    splits = build_splits(job.data, prepared_dir)
    spec = content_spec_of(job)
    decoder = ItemContentDecoder(str(prepared_dir / ITEMS_FILE), "target", spec.image_size, spec.tokenizer_path,
                                 spec.max_length, with_history_content=True)
    rows = np.arange(48)
    raw = decoder({"target": splits.train.target[rows], "history": splits.train.history[rows],
                   "rating": splits.train.rating[rows], "user": splits.train.user[rows]})
    batch = {k: torch.as_tensor(v) for k, v in raw.items()}
    catalogue = DecodedCatalogue(prepared_dir / ITEMS_FILE, num_items)
    return job, num_items, item_popularity(splits.train, num_items), batch, catalogue, splits


def _trainer(setting, *overrides: str, callbacks=()):
    job, num_items, popularity, _, catalogue, _ = setting
    job = build_config("tiny", [f"data.prepared_dir={job.data.prepared_dir}", "model.dropout=0.0", *overrides])
    torch.manual_seed(0)
    np.random.seed(0)
    bank = LocalMemoryBankClient(capacity=num_items + 1, dim=job.model.dim)
    trainer = build_trainer(job, num_items, popularity, bank, callbacks=callbacks)
    trainer.refresh_bank(trainer.encode_catalogue(catalogue.batches(content_spec_of(job))), wait=True)
    return trainer


def test_objectives_come_from_one_registry():
    job = build_config("tiny", ["model.loss=sampled_softmax"])
    popularity = np.ones(11)
    assert isinstance(build_objective(job.model, popularity), SampledSoftmaxLoss)
    job.model = dataclasses.replace(job.model, loss="full_softmax")
    assert isinstance(build_objective(job.model, popularity), FullSoftmaxLoss)
    job.model = dataclasses.replace(job.model, task="ctr")
    assert isinstance(build_objective(job.model, popularity), CTRLoss)
    nested = build_config("tiny", ["model.loss=sampled_softmax", "model.matryoshka_sizes=8,16,32"])
    wrapped = build_objective(nested.model, popularity)
    assert isinstance(wrapped, NestedSizesLoss) and isinstance(wrapped.base_loss, SampledSoftmaxLoss)


def test_negatives_sources_shape_and_choice(setting):
    trainer = _trainer(setting)
    num_items, dim = trainer.num_items, trainer.model.item_encoder.dim
    def sample(source):
        ids = source.ids(num_items)
        return source.vectors(trainer.model, ids, torch.as_tensor(trainer.bank.lookup(ids).vectors), trainer.device)

    assert InBatchNegatives().ids(num_items).size == 0 and sample(InBatchNegatives()) == (None, None)
    vectors, ids = sample(UniformNegatives(7))
    assert vectors.shape == (7, dim) and ids.shape == (7,) and int(ids.min()) >= 1 and int(ids.max()) <= num_items
    table, none = sample(CatalogueNegatives())
    assert table.shape == (num_items + 1, dim) and none is None
    # loss=auto (every preset): the full softmax where every item's vector is exact each step and the catalogue
    # fits, the in-batch sampled softmax otherwise
    tiny, id_only = build_config("tiny"), build_config("tiny", ["model.use_id_embedding=true", "model.modalities="])
    frozen = build_config("tiny", ["image.unfreeze_top=0", "text.unfreeze_top=0"])
    limit = tiny.model.full_softmax_max_items
    assert isinstance(make_negatives(tiny, 1682), InBatchNegatives)  # trained encoders: bank content would be stale
    assert isinstance(make_negatives(id_only, 1682, exact_catalogue(id_only, False)), CatalogueNegatives)
    assert isinstance(make_negatives(id_only, limit + 1, exact_catalogue(id_only, False)), InBatchNegatives)
    assert isinstance(make_negatives(frozen, 1682, exact_catalogue(frozen, True)), CatalogueNegatives)
    assert not exact_catalogue(frozen, False) and not exact_catalogue(tiny, True)
    exact_loss = build_objective(id_only.model, np.ones(1683), True)
    assert isinstance(exact_loss, FullSoftmaxLoss) and exact_loss.fresh_table  # the table's own rows are positives
    assert isinstance(build_objective(tiny.model, np.ones(1683), False), SampledSoftmaxLoss)
    assert isinstance(make_negatives(build_config("tiny", ["model.loss=full_softmax"]), 10**6), CatalogueNegatives)
    uniform = build_config("tiny", ["model.loss=sampled_softmax"])
    uniform.model.extra_negatives = 5  # a fixed value (not a setting): 0 in every preset
    assert make_negatives(uniform, 10) == UniformNegatives(5)


def test_bank_history_equals_recomputed_history_when_the_bank_is_fresh(setting):
    """LEMUR's bank is an approximation of re-encoding every history item: exact when nothing is stale."""
    batch = setting[3]
    bank_trainer = _trainer(setting)
    recompute_trainer = _trainer(setting, "memory.mode=recompute")
    assert isinstance(bank_trainer.history, BankHistory) and isinstance(recompute_trainer.history, RecomputeHistory)
    bank_trainer.model.eval()
    recompute_trainer.model.eval()
    with torch.no_grad():
        bank_loss, bank_info = bank_trainer.forward_loss(batch)
        recompute_loss, _ = recompute_trainer.forward_loss(batch)
    torch.testing.assert_close(bank_loss, recompute_loss, atol=1e-5, rtol=1e-5)
    assert bank_info["coverage"] == 1.0 and bank_info["staleness_cosine"] == pytest.approx(1.0, abs=1e-5)


def test_a_step_makes_one_bank_lookup_even_with_full_softmax_negatives(setting):
    batch = setting[3]
    trainer = _trainer(setting, "model.loss=full_softmax")
    before = trainer.bank.timings()["num_lookups"]
    trainer.step(batch)
    assert trainer.bank.timings()["num_lookups"] - before == 1


def test_steps_learn_write_back_to_the_bank_and_call_the_callbacks(setting):
    batch = setting[3]
    seen = []
    trainer = _trainer(setting, callbacks=[seen.append])
    stats = trainer.train_epoch(iter([batch] * 6), max_steps=5)
    assert seen == [0, 1, 2, 3, 4] and trainer.global_step == 5 and stats.steps == 5
    assert stats.first_step_seconds > 0 and stats.step_seconds >= stats.first_step_seconds
    targets = np.unique(batch["target"].numpy())
    written = trainer.bank.lookup(targets).written_step
    assert (written == 4).all(), written  # the last step wrote every target it encoded
    first = trainer.forward_loss(batch)[0].item()
    trainer.train_epoch(iter([batch] * 10), max_steps=10)
    last = trainer.forward_loss(batch)[0].item()
    assert last < first  # the same batch, fitted
    gradients = stats.metrics()
    assert gradients["grad_norm"] > 0 and 0.0 <= gradients["grad_clipped_fraction"] <= 1.0
    assert "encoder_grad_norm" in gradients  # the tiny preset trains its encoders whole (unfreeze_top=-1)


def test_the_logged_gradient_norms_are_the_ones_before_clipping(setting):
    trainer, batch = _trainer(setting), setting[3]
    torch.manual_seed(1), np.random.seed(1)
    trainer.optimizer.zero_grad()
    trainer.forward_loss(batch)[0].backward()
    everything = float(torch.nn.utils.get_total_norm([p.grad for p in trainer.module.parameters()
                                                      if p.grad is not None]))
    encoders = float(torch.nn.utils.get_total_norm([p.grad for p in trainer.optimizer.param_groups[1]["params"]]))
    torch.manual_seed(1), np.random.seed(1)
    _, info = trainer.step(batch)  # the same weights and draws: the same gradients
    assert info["grad_norm"] == pytest.approx(everything, rel=1e-5)
    assert info["encoder_grad_norm"] == pytest.approx(encoders, rel=1e-5) and 0 < encoders < everything
    assert info["grad_clipped"] == (everything > trainer.job.train.grad_clip)


def test_end_epoch_refreshes_the_bank_and_scores_validation_and_tests(setting):
    *_, catalogue, splits = setting
    trainer = _trainer(setting)
    trainer.global_step = 9
    with trainer.end_epoch(lambda: catalogue.batches(content_spec_of(trainer.job)), splits.validation) as ended:
        metrics = {**ended.scores, **trainer.evaluate_test(ended.content, splits.test)}
    assert {"val_ndcg@10", "val_recall@10", "test_ndcg@10", "test_mrr"} <= metrics.keys()
    # both protocols in every evaluation: the headline (history not masked by default) and the masked twin
    assert {"val_masked_ndcg@10", "test_masked_ndcg@10", "test_masked_mrr"} <= metrics.keys()
    assert metrics["test_masked_recall@50"] >= 0.0 and "test_unmasked_ndcg@10" not in metrics
    assert (trainer.bank.lookup(np.arange(1, trainer.num_items + 1)).written_step == 9).all()


def test_restore_resumes_model_optimizer_step_and_bank(setting, tmp_path: Path):
    batch = setting[3]
    trainer = _trainer(setting)
    trainer.train_epoch(iter([batch] * 3), max_steps=3)
    save_checkpoint(tmp_path, trainer.model, trainer.optimizer, {"epoch": 1, "global_step": trainer.global_step})
    trainer.bank.save(tmp_path / "bank")
    fresh = _trainer(setting)
    fresh.bank.update(np.arange(1, 4), np.zeros((3, fresh.bank.dim), np.float32), step=99)
    restored = restore(fresh, resume_dir=tmp_path, log=lambda _: None)
    assert restored.resumed and restored.start_epoch == 2 and restored.bank_filled and restored.bank_exact == 1.0
    assert fresh.global_step == 3
    for name, tensor in trainer.model.state_dict().items():
        torch.testing.assert_close(fresh.model.state_dict()[name], tensor)
    assert fresh.optimizer.state_dict()["state"][0]["step"] == trainer.optimizer.state_dict()["state"][0]["step"]
    with torch.no_grad():
        torch.testing.assert_close(fresh.forward_loss(batch)[0], trainer.forward_loss(batch)[0])


def test_early_stopping_counts_epochs_without_a_better_score_and_survives_a_restart():
    early = EarlyStopping(patience=2)
    assert early.update(0.10, 0) and not early.should_stop
    assert not early.update(0.09, 1) and not early.should_stop
    assert early.update(0.12, 2) and early.best_epoch == 2 and early.stale_epochs == 0
    assert not early.update(0.12, 3)  # equal is not better
    resumed = EarlyStopping(2, **early.state())  # what a checkpoint's state.json carries
    assert not resumed.update(0.11, 4) and resumed.should_stop and resumed.best_score == 0.12
    assert not EarlyStopping(patience=0, stale_epochs=99).should_stop  # 0 = never stop early


def test_halfway_through_the_patience_the_learning_rate_drops_and_a_restart_keeps_it():
    early = EarlyStopping(patience=4)
    early.update(0.10, 0)
    assert not early.update(0.09, 1) and early.lr_multiplier == 1.0
    assert not early.update(0.09, 2) and early.lr_drops == 1 and early.lr_multiplier == pytest.approx(0.1)
    assert early.update(0.11, 3) and early.lr_multiplier == pytest.approx(0.1)  # a drop is kept after a new best
    early.update(0.10, 4)
    early.update(0.10, 5)
    resumed = EarlyStopping(4, **early.state())
    assert resumed.lr_drops == 2 and resumed.lr_multiplier == pytest.approx(0.01)
    assert resumed.drop_epochs == [2, 5]  # the epochs at whose end they dropped: what a refit replays
    assert not resumed.update(0.10, 6) and not resumed.should_stop and resumed.lr_drops == 2
    assert not resumed.update(0.10, 7) and resumed.should_stop
    short = EarlyStopping(patience=3)  # patience under 4: stop only, never drop
    for epoch in range(4):
        short.update(0.1, epoch)
    assert short.lr_drops == 0 and short.should_stop


def test_a_refit_replays_the_selection_runs_drops_from_the_epoch_after_each():
    from training.loop import RefitPlan

    early = EarlyStopping(patience=4)
    for epoch, score in enumerate([0.10, 0.09, 0.09, 0.11, 0.10, 0.10, 0.12]):
        early.update(score, epoch)
    assert early.drop_epochs == [2, 5] and early.best_epoch == 6
    plan = RefitPlan(epochs=early.best_epoch + 1, drop_epochs=tuple(early.drop_epochs))
    # epochs 0-2 train at the full rate, 3-5 at a tenth, 6 at a hundredth: as the selection run did
    assert [plan.lr_drops_before(epoch) for epoch in range(plan.epochs)] == [0, 0, 0, 1, 1, 1, 2]


def test_the_selection_score_is_a_mean_of_recent_epochs_so_one_lucky_epoch_neither_wins_nor_stops_the_run():
    # a rising curve with one lucky epoch (2): raw scores would keep epoch 2 and stop at 4 with patience 2
    early = EarlyStopping(patience=2, window=3)
    scores = [0.050, 0.060, 0.075, 0.062, 0.066, 0.070, 0.072, 0.074]
    best = [early.update(score, epoch) for epoch, score in enumerate(scores)]
    assert best == [True, True, True, True, True, False, True, True]  # epoch 5's window lost the lucky epoch
    assert early.selection_score == pytest.approx((0.070 + 0.072 + 0.074) / 3) and early.best_epoch == 7
    assert not early.should_stop
    raw = EarlyStopping(patience=2)  # window 1: the raw score, as before
    for epoch, score in enumerate(scores[:5]):
        raw.update(score, epoch)
    assert raw.best_epoch == 2 and raw.should_stop
    # a restart keeps the window: the resumed run scores epoch 8 as an unbroken one would
    resumed = EarlyStopping(2, 3, **early.state())
    assert resumed.recent == pytest.approx(scores[-3:])
    assert not resumed.update(0.055, 8)  # (0.072 + 0.074 + 0.055) / 3 < (0.070 + 0.072 + 0.074) / 3
    assert resumed.selection_score == pytest.approx((0.072 + 0.074 + 0.055) / 3) and resumed.stale_epochs == 1


def test_a_trainer_applies_the_plateau_multiplier_on_top_of_the_schedule(setting):
    batch = setting[3]
    trainer = _trainer(setting)
    trainer.lr_multiplier = 0.1
    trainer.train_epoch(iter([batch]), max_steps=1)  # no planned length: the multiplier alone
    for group in trainer.optimizer.param_groups:
        assert group["lr"] == pytest.approx(group["initial_lr"] * 0.1)
    trainer.total_steps = 40
    trainer.train_epoch(iter([batch]), max_steps=1)
    for group in trainer.optimizer.param_groups:
        assert group["lr"] == pytest.approx(group["initial_lr"] * lr_scale(1, 40, 0.05, 0.1) * 0.1)


def test_learning_rate_warms_up_then_decays_along_a_cosine():
    total = 100
    scales = [lr_scale(step, total, 0.05, 0.1) for step in range(total + 5)]
    assert scales[0] == pytest.approx(0.2) and scales[4] == pytest.approx(1.0)  # 5 warm-up steps
    assert all(a >= b for a, b in zip(scales[4:], scales[5:]))  # never rises after the warm-up
    assert scales[total - 1] == pytest.approx(0.1, abs=1e-3) and scales[-1] == pytest.approx(0.1)
    # a long planned run (early stopping ends it) warms up over at most warmup_max_steps, not 5% of its plan
    assert lr_scale(199, 15_200, 0.05, 0.1, 200) == pytest.approx(1.0, abs=1e-3)
    assert lr_scale(99, 15_200, 0.05, 0.1, 200) == pytest.approx(0.5)


def test_the_plateau_schedule_warms_up_then_holds_whatever_the_planned_length():
    plateau = [[lr_scale(step, total, 0.05, 0.1, 200, decay=False) for step in range(1000)] for total in (1000, 3800)]
    assert plateau[0] == plateau[1]  # the epoch cap does not move any step's rate
    assert plateau[0][99] == pytest.approx(0.5) and plateau[0][199] == 1.0 and set(plateau[0][199:]) == {1.0}
    # the cosine's rate at a step does depend on the cap: the difference train.schedule=plateau removes
    assert lr_scale(900, 1000, 0.05, 0.1, 200) < 0.2 < lr_scale(900, 3800, 0.05, 0.1, 200)
    # a run planned shorter than two warm-ups still reaches the full rate halfway
    assert lr_scale(49, 100, 0.05, 0.1, 200, decay=False) == 1.0
    assert lr_scale(24, 100, 0.05, 0.1, 200, decay=False) == 0.5


def test_a_trainer_on_the_plateau_schedule_holds_the_rate_and_applies_the_drops(setting):
    import dataclasses
    batch = setting[3]
    trainer = _trainer(setting)
    trainer.job = dataclasses.replace(trainer.job, train=dataclasses.replace(trainer.job.train, schedule="plateau"))
    trainer.total_steps, trainer.global_step = 40, 30  # past the warm-up (20 steps: half of 40)
    trainer.train_epoch(iter([batch]), max_steps=1)
    for group in trainer.optimizer.param_groups:
        assert group["lr"] == pytest.approx(group["initial_lr"])
    trainer.lr_multiplier = 0.1  # one drop on a plateau
    trainer.train_epoch(iter([batch]), max_steps=1)
    for group in trainer.optimizer.param_groups:
        assert group["lr"] == pytest.approx(group["initial_lr"] * 0.1)


def test_a_trainer_with_a_planned_length_sets_every_groups_learning_rate(setting):
    batch = setting[3]
    trainer = _trainer(setting)
    trainer.total_steps = 40
    trainer.train_epoch(iter([batch] * 3), max_steps=3)
    for group in trainer.optimizer.param_groups:
        assert group["lr"] == pytest.approx(group["initial_lr"] * lr_scale(2, 40, 0.05, 0.1))


def test_an_id_only_model_trains_on_ids_alone_with_the_exact_full_softmax(setting):
    """ID-only: the stream carries ids only (nothing decoded), `auto` picks the full softmax (the id table is
    exact every step) and a catalogue pass reads nothing."""
    job, num_items, popularity, batch, _, _ = setting
    trainer = _trainer(setting, "model.use_id_embedding=true", "model.modalities=")
    assert isinstance(trainer.negatives, CatalogueNegatives) and isinstance(trainer.objective, FullSoftmaxLoss)
    ids_only = {k: batch[k] for k in ("target", "history", "rating", "user")}
    losses = [trainer.step(ids_only)[0].item() for _ in range(8)]
    assert losses[-1] < losses[0]
    content = trainer.encode_catalogue(iter(()))
    assert content.shape == (num_items + 1, job.model.dim) and not content.any()


def test_frozen_encoders_on_the_trunk_cache_train_on_ids_with_the_exact_full_softmax(setting):
    """Frozen two-stage: the cache is the whole encoders, the stream carries ids only, and `auto` trains on every
    item's fresh vector (a projection of cached features) instead of the bank's."""
    job, num_items, popularity, batch, catalogue, _ = setting
    job = build_config("tiny", [f"data.prepared_dir={job.data.prepared_dir}", "image.unfreeze_top=0",
                                "text.unfreeze_top=0"])
    torch.manual_seed(0)
    trainer = build_trainer(job, num_items, popularity, LocalMemoryBankClient(capacity=num_items + 1,
                                                                              dim=job.model.dim), trunk_cache=True)
    cache = trainer.build_trunk_cache(catalogue.batches(content_spec_of(job)))
    assert cache.encoders_frozen and isinstance(trainer.negatives, CatalogueNegatives)
    trainer.refresh_bank(trainer.encode_catalogue(iter(())), wait=True)
    ids_only = {k: batch[k] for k in ("target", "history", "rating", "user")}
    projection = trainer.model.item_encoder.projection.weight
    before = projection.detach().clone()
    losses = [trainer.step(ids_only)[0].item() for _ in range(8)]
    assert losses[-1] < losses[0] and not torch.equal(projection, before)


def test_a_loss_at_every_history_position_needs_the_full_softmax_and_learns(setting):
    """train.targets=all: ID-only (exact catalogue, full softmax) trains on windows; where the loss would be the
    sampled softmax (a trained encoder, bank content) or the task is CTR, the config is refused in one line."""
    job, num_items, popularity, batch, _, splits = setting
    trainer = _trainer(setting, "model.use_id_embedding=true", "model.modalities=", "train.targets=all")
    from pipeline.sequences import window_examples

    windows = window_examples(splits.train)
    rows = np.arange(32)
    ids_only = {"target": torch.as_tensor(windows.target[rows]), "history": torch.as_tensor(windows.history[rows]),
                "rating": torch.as_tensor(windows.rating[rows]), "user": torch.as_tensor(windows.user[rows])}
    losses = [trainer.step(ids_only)[0].item() for _ in range(8)]
    assert losses[-1] < losses[0]
    with pytest.raises(ConfigError, match="with the sampled softmax needs memory.mode=recompute"):
        _trainer(setting, "train.targets=all")  # trained encoders, history from the bank: stale positives
    with pytest.raises(ConfigError, match="with model.loss=full_softmax needs every item's vector fresh"):
        _trainer(setting, "train.targets=all", "model.loss=full_softmax", "memory.mode=recompute")
    with pytest.raises(ConfigError, match="memory.encode_fraction < 1 would read the rest from the bank"):
        _trainer(setting, "train.targets=all", "memory.mode=recompute", "memory.encode_fraction=0.2")
    # trained encoders, history recomputed: the sampled softmax over the step's distinct items
    content_model = _trainer(setting, "train.targets=all", "memory.mode=recompute")
    assert content_model.objective.unique_candidates
    losses = [content_model.step(batch)[0].item() for _ in range(6)]
    assert losses[-1] < losses[0]
    with pytest.raises(ConfigError, match="needs model.task=retrieval"):
        build_config("tiny", ["train.targets=all", "model.task=ctr"])
    with pytest.raises(ValueError, match="train.targets='every'; valid: last, all"):
        build_config("tiny", ["train.targets=every"])


@pytest.mark.parametrize("enabled", [True, False])
def test_unseen_items_get_no_gradient_and_a_catalogue_pass_zeroes_their_rows(setting, enabled):
    """Through the trainer, frozen encoders on the trunk cache (the `movielens` recipe: exact full softmax): with
    `model.unseen_from_content` the items in no training example send the steps no gradient, and end_epoch
    zeroes their id rows before it scores (evaluation, the bank and the checkpoint see content alone)."""
    job, num_items, popularity, batch, catalogue, splits = setting
    job = build_config("tiny", [f"data.prepared_dir={job.data.prepared_dir}", "model.dropout=0.0",
                                "model.use_id_embedding=true", "image.unfreeze_top=0", "text.unfreeze_top=0",
                                f"model.unseen_from_content={str(enabled).lower()}"])
    seen = seen_items(splits.train, num_items)
    unseen = np.flatnonzero(~seen[1:]) + 1
    assert len(unseen) > 0  # the tiny preset's 120 users leave items out
    torch.manual_seed(0)
    trainer = build_trainer(job, num_items, popularity, LocalMemoryBankClient(capacity=num_items + 1,
                                                                              dim=job.model.dim),
                            trunk_cache=True, seen=seen)
    trainer.build_trunk_cache(catalogue.batches(content_spec_of(job)))
    assert isinstance(trainer.objective, FullSoftmaxLoss)
    table = trainer.model.item_encoder.id_embedding.weight
    ids_only = {k: batch[k] for k in ("target", "history", "rating", "user")}
    trainer.optimizer.zero_grad()
    loss, _ = trainer.forward_loss(ids_only)
    loss.backward()
    assert (not table.grad[unseen].any()) == enabled  # out of the softmax: no gradient at all
    before = table.detach().clone()
    with trainer.end_epoch(lambda: iter(()), splits.validation):
        pass
    changed = (table.detach() != before).any(1)
    assert changed[unseen].all().item() == enabled and not changed[torch.as_tensor(seen)].any()
    assert (table[unseen] == 0).all().item() == enabled


def test_a_side_network_trains_on_the_trunk_cache_with_the_exact_full_softmax(setting):
    """`model.side_network` (the `movielens` recipe): the encoders stay frozen, so the step keeps the exact full
    softmax over every item's fresh vector; the side networks learn, no encoder weight does."""
    job, num_items, popularity, batch, catalogue, _ = setting
    job = build_config("tiny", [f"data.prepared_dir={job.data.prepared_dir}", "model.use_id_embedding=true",
                                "image.unfreeze_top=0", "text.unfreeze_top=0", "model.side_network=8"])
    torch.manual_seed(0)
    trainer = build_trainer(job, num_items, popularity, LocalMemoryBankClient(capacity=num_items + 1,
                                                                              dim=job.model.dim), trunk_cache=True)
    trainer.build_trunk_cache(catalogue.batches(content_spec_of(job)))
    assert isinstance(trainer.objective, FullSoftmaxLoss) and trainer.trunk_cache.encoders_frozen
    encoder = trainer.model.item_encoder
    before = {name: p.detach().clone() for name, p in encoder.named_parameters()}
    for _ in range(2):  # the first step moves only the up-projection (it starts at zero), the second all of it
        trainer.step({k: batch[k] for k in ("target", "history", "rating", "user")})
    moved = {name for name, p in encoder.named_parameters() if not torch.equal(p.detach(), before[name])}
    side = {name for name in before if "_side." in name}
    assert side and side <= moved
    assert not any(name.startswith(("image_encoder.", "text_encoder.")) for name in moved)


def _catalogue_trainer(setting, mode: str, *overrides: str, frozen: bool = False):
    """Trained tops (tiny encoders, top block/layer; `frozen`: the overrides freeze them) on the trunk cache,
    every history position a target."""
    job, num_items, popularity, _, catalogue, _ = setting
    job = build_config("tiny", [f"data.prepared_dir={job.data.prepared_dir}", "model.dropout=0.0",
                                "image.unfreeze_top=1", "text.unfreeze_top=1", "train.targets=all",
                                f"memory.mode={mode}", *overrides])
    torch.manual_seed(0)
    trainer = build_trainer(job, num_items, popularity, LocalMemoryBankClient(capacity=num_items + 1,
                                                                              dim=job.model.dim), trunk_cache=True)
    cache = trainer.build_trunk_cache(catalogue.batches(content_spec_of(job)))
    assert cache.encoders_frozen == frozen
    trainer.refresh_bank(trainer.encode_catalogue(catalogue.batches(content_spec_of(job))), wait=True)
    return trainer


def test_encoder_sampling_is_refused_where_a_step_makes_one_table_and_kept_in_bank_mode(setting):
    """memory.encode_fraction < 1 with frozen encoders on the trunk cache and the full softmax under
    memory.mode=recompute would be ignored (the step makes every item's vector once): refused in one line. In bank
    mode the same model samples its targets (the rest from the bank), so it is accepted there. An ID-only model
    has no encoder to sample: refused too."""
    job, num_items, popularity, *_ = setting
    frozen = [f"data.prepared_dir={job.data.prepared_dir}", "image.unfreeze_top=0", "text.unfreeze_top=0",
              "memory.encode_fraction=0.2"]

    def build(*overrides: str) -> Trainer:
        bank = LocalMemoryBankClient(capacity=num_items + 1, dim=job.model.dim)
        return build_trainer(build_config("tiny", [*frozen, *overrides]), num_items, popularity, bank,
                             trunk_cache=True)

    with pytest.raises(ConfigError, match="memory.encode_fraction < 1 would be ignored"):
        build("memory.mode=recompute")
    assert not build("memory.mode=bank").one_table_a_step
    # without the full softmax the recompute step encodes its targets apart, and samples them
    assert not build("memory.mode=recompute", "model.loss=sampled_softmax").one_table_a_step
    with pytest.raises(ConfigError, match="an ID-only model .* has no encoder to sample"):
        build("model.use_id_embedding=true", "model.modalities=")


def _window_batch(splits, rows: int = 32) -> dict:
    from pipeline.sequences import window_examples

    windows = window_examples(splits.train)
    picked = np.arange(rows)
    return {k: torch.as_tensor(getattr(windows, k)[picked]) for k in ("target", "history", "rating", "user")}


def test_catalogue_mode_trains_the_tops_on_the_exact_full_softmax_of_fresh_vectors(setting):
    """memory.mode=catalogue: with trained tops the full softmax is exact (every item through the tops once a step,
    with gradients), `auto` picks it, the tops and the items outside the batch learn, and the bank gets the
    batch's fresh vectors."""
    *_, splits = setting
    trainer = _catalogue_trainer(setting, "catalogue")
    job, num_items = trainer.job, trainer.num_items
    assert exact_catalogue(job, trunk_cache=True) and not exact_catalogue(job, trunk_cache=False)
    assert isinstance(trainer.negatives, CatalogueNegatives) and isinstance(trainer.objective, FullSoftmaxLoss)
    assert trainer.objective.fresh_table and not trainer._negatives_from_bank
    batch = _window_batch(splits)
    top = {n: p for n, p in trainer.model.item_encoder.named_parameters()
           if p.requires_grad and n.split(".")[0] in ("image_encoder", "text_encoder")}
    assert len(top) > 4  # the trained top blocks/layers
    before = {n: p.detach().clone() for n, p in top.items()}
    trainer.optimizer.zero_grad()
    loss, info = trainer.forward_loss(batch)
    loss.backward()
    in_batch = set(info["unique_ids"].tolist())
    assert in_batch == set(np.unique(np.concatenate([batch["target"].numpy(), batch["history"].numpy().ravel()]))) - {0}
    assert len(in_batch) < num_items  # so the softmax's other candidates came from the table, not the batch
    assert info["encoded_items"] == num_items  # the whole catalogue ran through the tops
    losses = [trainer.step(batch)[0].item() for _ in range(8)]
    assert losses[-1] < losses[0]
    assert [n for n, p in top.items() if torch.equal(p, before[n])] == []
    found = trainer.bank.lookup(info["unique_ids"]).written_step
    assert (np.asarray(found) == trainer.global_step - 1).all()  # written back at the last step


def test_catalogue_mode_reads_the_same_user_states_as_recomputing_the_history(setting):
    """The table is the recompute path's vectors made for every item at once: with dropout off, the same weights
    give the same user states and positives (only the candidate set of the loss differs)."""
    *_, splits = setting
    batch = _window_batch(splits, rows=16)
    outputs = {}
    for mode in ("catalogue", "recompute"):
        trainer = _catalogue_trainer(setting, mode)
        trainer.model.eval()
        with torch.no_grad():
            table, clean = trainer.catalogue_table() if mode == "catalogue" else (None, None)
            fetched = trainer.history.fetch(batch, trainer.bank, trainer.model.item_encoder.dim, trainer.device,
                                            np.arange(0), trainer.item_content)
            outputs[mode] = trainer.module(
                target_ids=batch["target"].long(), content=trainer.item_content(batch, "target"),
                history_ids=batch["history"].long(), history_content=fetched.history_content,
                history_item_content=fetched.history_item_content, all_positions=True, content_table=table,
                candidate_table=clean)
    ours, reference = outputs["catalogue"], outputs["recompute"]
    assert torch.equal(ours.positive_ids, reference.positive_ids)
    assert torch.allclose(ours.user, reference.user, atol=1e-5)
    assert torch.allclose(ours.positive, reference.positive, atol=1e-5)
    assert torch.equal(ours.unique_ids, reference.unique_ids)


def test_catalogue_mode_drops_out_the_history_items_but_not_the_candidates(setting):
    """memory.mode=catalogue makes the table twice from one pass of the tops: history items read it through the
    fusion's dropout, every positive and every candidate of the loss without it (as two_stage_frozen's loss and
    the bank's vectors are), so new items are not scored as noise. In eval mode, or at dropout 0, one table."""
    *_, splits = setting
    trainer = _catalogue_trainer(setting, "catalogue", "model.dropout=0.5")
    trainer.model.train()
    noisy, clean = trainer.catalogue_table()
    with torch.no_grad():
        reference = trainer.model.item_encoder.encode_trunk(
            trainer.trunk_cache.lookup(torch.arange(trainer.num_items + 1)), dropout=False)
    assert torch.allclose(clean, reference, atol=1e-6)
    assert not torch.allclose(noisy, clean, atol=1e-3)
    assert noisy.requires_grad and clean.requires_grad

    batch = _window_batch(splits, rows=16)
    targets, history = batch["target"].long(), batch["history"].long()
    model = trainer.model
    model.eval()  # the tables keep their dropout; the sequence model's own is off for the comparison
    out = model(target_ids=targets, content={}, history_ids=history, history_content=None, all_positions=True,
                content_table=noisy, candidate_table=clean)
    inner = (history[:, :-1] > 0)
    next_items = history[:, 1:][inner]
    expected = torch.cat([model.item_vectors(clean[next_items], next_items), model.item_vectors(clean[targets], targets)])
    assert torch.allclose(out.positive, expected, atol=1e-6)
    users = model.user_vectors(history, noisy[history])
    assert torch.allclose(out.user[-len(targets):], users, atol=1e-6)
    assert not torch.allclose(users, model.user_vectors(history, clean[history]), atol=1e-3)

    first, second = trainer.catalogue_table()
    assert first is second
    plain = _catalogue_trainer(setting, "catalogue")  # model.dropout=0.0
    plain.model.train()
    first, second = plain.catalogue_table()
    assert first is second


def test_tops_that_cannot_move_take_the_frozen_controls_steps(setting):
    """end_to_end_exact against its control (bench.quality): with the tops' learning rate ~0 the two differ only in
    where the trunk cache is split and in the shared gradient clip, so they take the same steps (Adam's update
    hardly depends on the clip's scale); at the default encoder_lr the tops move and the losses part."""
    job, num_items, popularity, _, catalogue, splits = setting
    batch = _window_batch(splits)

    def losses(*overrides: str) -> list[float]:
        job_ = build_config("tiny", [f"data.prepared_dir={job.data.prepared_dir}", "model.dropout=0.0",
                                     "train.targets=all", "memory.mode=catalogue", *overrides])
        torch.manual_seed(0)
        trainer = build_trainer(job_, num_items, popularity, LocalMemoryBankClient(
            capacity=num_items + 1, dim=job_.model.dim), trunk_cache=True)
        trainer.build_trunk_cache(catalogue.batches(content_spec_of(job_)))
        return [trainer.step(batch)[0].item() for _ in range(4)]

    frozen = losses("image.unfreeze_top=0", "text.unfreeze_top=0")
    still = losses("image.unfreeze_top=1", "text.unfreeze_top=1", "train.encoder_lr=1e-12")
    moving = losses("image.unfreeze_top=1", "text.unfreeze_top=1", "train.encoder_lr=1e-2")
    assert still == pytest.approx(frozen, rel=1e-3)
    assert moving[0] == pytest.approx(frozen[0], rel=1e-6) and moving[-1] != pytest.approx(frozen[-1], rel=1e-3)


def test_catalogue_mode_is_refused_without_the_trunk_cache_or_with_encoder_sampling(setting):
    job, num_items, popularity, *_ = setting
    job = build_config("tiny", [f"data.prepared_dir={job.data.prepared_dir}", "memory.mode=catalogue"])
    bank = LocalMemoryBankClient(capacity=num_items + 1, dim=job.model.dim)
    with pytest.raises(ConfigError, match=r"^memory.mode=catalogue needs the frozen-trunk cache, which is off; use "):
        build_trainer(job, num_items, popularity, bank, trunk_cache=False)
    with pytest.raises(ConfigError, match="memory.mode=catalogue encodes every item each step"):
        build_config("tiny", ["memory.mode=catalogue", "memory.encode_fraction=0.5"])


def _two_pass_loss(trainer, batch: dict) -> torch.Tensor:
    """A step's loss with the history items encoded apart from the catalogue: the batch's distinct items through
    the encoders' tops (history read from them), then every item again for the exact softmax's candidates."""
    fetched = RecomputeHistory().fetch(batch, trainer.bank, trainer.model.item_encoder.dim, trainer.device,
                                       np.arange(0), trainer.item_content)
    out = trainer.module(target_ids=batch["target"].long(), content=trainer.item_content(batch, "target"),
                         history_ids=batch["history"].long(), history_content=fetched.history_content,
                         history_item_content=fetched.history_item_content, all_positions=True)
    ids = np.arange(trainer.num_items + 1)
    candidates, _ = trainer.negatives.vectors(trainer.model, ids, trainer._cached_content(torch.as_tensor(ids), False),
                                              trainer.device)
    return trainer.objective(out.user, out.positive, out.positive_ids, candidates, None)


@pytest.mark.parametrize("side_width", [8, 0])
def test_recompute_makes_one_table_a_step_where_it_makes_every_item_anyway(setting, side_width):
    """Frozen encoders on the trunk cache under the full softmax (the `movielens` recipe, with a side network or
    without): a recompute step runs the encoders' tops once over the catalogue and reads history items from that
    table, as memory.mode=catalogue does, instead of over the batch's items and again over the catalogue. At
    dropout 0 the same weights give the same loss and gradients as the two passes."""
    *_, splits = setting
    batch = _window_batch(splits, rows=16)
    overrides = ("image.unfreeze_top=0", "text.unfreeze_top=0", f"model.side_network={side_width}",
                 "model.use_id_embedding=true")
    trainer = _catalogue_trainer(setting, "recompute", *overrides, frozen=True)
    assert trainer.one_table_a_step and isinstance(trainer.objective, FullSoftmaxLoss)
    trainer.model.train()
    results = []
    for make_loss in (lambda: trainer.forward_loss(batch)[0], lambda: _two_pass_loss(trainer, batch)):
        trainer.optimizer.zero_grad()
        loss = make_loss()
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in trainer.model.named_parameters()
                                      if p.grad is not None}))
    (ours, our_grads), (reference, reference_grads) = results
    side = [n for n in reference_grads if "_side." in n]
    assert bool(side) == bool(side_width)
    assert ours == pytest.approx(reference, rel=1e-6)
    assert our_grads.keys() == reference_grads.keys()
    for name, grad in reference_grads.items():
        assert torch.allclose(our_grads[name], grad, atol=1e-6, rtol=1e-4), name
    assert trainer.forward_loss(batch)[1]["encoded_items"] == trainer.num_items

    # the two passes stay where the step does not make every item: trained tops, the sampled softmax, no cache
    assert not _catalogue_trainer(setting, "recompute").one_table_a_step
    assert not _catalogue_trainer(setting, "recompute", *overrides, "model.loss=sampled_softmax",
                                  frozen=True).one_table_a_step
    assert not _trainer(setting, "memory.mode=recompute", *overrides).one_table_a_step
    assert _catalogue_trainer(setting, "catalogue").one_table_a_step

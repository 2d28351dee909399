"""`model.new_item_offset`: the score offset of the items in no training example, the same wherever items are
ranked: offline evaluation, the checkpoint's record of those items, serving in every index mode (with its
filters), items added at serving, bundles, export, and the serve option. Serving tests use the real tiny
checkpoint and the ml100k_mm catalogue."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from serving.recommender import ItemRecommender
from training.evaluate import evaluate_ranking, example_ranks, item_offsets, score_users
from training.job_config import build_config
from training.metrics import history_mask, target_ranks
from training.offline_eval import DecodedCatalogue, load_checkpoint, trained_items_of, unseen_rows

OFFSET = 0.3
UNSEEN = list(range(5, 1682, 9))  # 187 items marked as in no training example


def test_item_offsets_put_the_offset_on_unseen_rows_only():
    unseen = np.array([True, False, True, True, False])  # row 0 (padding) is never offset
    assert item_offsets(unseen, 0.25).tolist() == [0.0, 0.0, 0.25, 0.25, 0.0]
    assert item_offsets(unseen, 0.0) is None and item_offsets(None, 0.25) is None
    assert item_offsets(np.array([True, False, False]), 0.25) is None  # only the padding: nothing to offset


@pytest.mark.parametrize("value", ["2.5", "-3", "nan"])
def test_an_offset_outside_the_cosine_range_is_refused(value):
    with pytest.raises(ValueError, match="new_item_offset"):
        build_config("tiny", [f"model.new_item_offset={value}"])


def test_unseen_rows_come_from_the_state_and_past_the_trained_catalogue(caplog):
    state = {"unseen_items": [2, 4], "num_items": 5, "config": {"model": {"new_item_offset": 0.1}}}
    assert unseen_rows(state, 5, 7).tolist() == [False, False, True, False, True, False, True, True]
    with pytest.raises(ValueError, match="unseen_items are not item indices in 1..5"):
        unseen_rows({**state, "unseen_items": [6]}, 5, 7)
    older = {"num_items": 5, "config": {"model": {"new_item_offset": 0.1}}}  # saved before unseen_items existed
    assert unseen_rows(older, 5, 6).tolist() == [False] * 6 + [True]
    assert "does not record which items" in caplog.text


def test_a_warm_start_keeps_what_its_checkpoint_trained_on(tmp_path):
    (tmp_path / "state.json").write_text(json.dumps({"num_items": 5, "unseen_items": [2, 4]}))
    assert trained_items_of(tmp_path, 7).tolist() == [False, True, False, True, False, True, False, False]
    (tmp_path / "state.json").write_text(json.dumps({"num_items": 5}))
    assert trained_items_of(tmp_path, 7) is None  # not recorded: nothing inherited


def _evaluated(tiny_checkpoint, prepared_dir):
    from pipeline.sources import ITEMS_FILE
    from pipeline.splits import build_splits

    loaded = load_checkpoint(tiny_checkpoint)
    content = DecodedCatalogue(prepared_dir / ITEMS_FILE, 1682).encode(loaded)
    return loaded, content, build_splits(loaded.job.data, prepared_dir).test


def test_evaluation_ranks_with_the_offset_added_to_unseen_items(tiny_checkpoint, prepared_dir):
    loaded, content, test = _evaluated(tiny_checkpoint, prepared_dir)
    unseen = np.zeros(1683, dtype=bool)
    unseen[UNSEEN] = True
    offset = item_offsets(unseen, OFFSET)
    history = torch.as_tensor(test.history)
    raw = score_users(loaded.model, content, history)
    expected = target_ranks(raw + offset, torch.as_tensor(test.target), history_mask(history, 1683, pad_id=0))
    got = example_ranks(loaded.model, content, test, mask_history=True, item_offset=offset)
    assert np.array_equal(got, expected.numpy())
    plain = example_ranks(loaded.model, content, test, mask_history=True)
    new_target = np.isin(test.target, UNSEEN)
    assert new_target.any() and (got[new_target] <= plain[new_target]).all()  # lifted: never ranked lower
    assert (got[~new_target] >= plain[~new_target]).all() and (got != plain).any()
    lifted = evaluate_ranking(loaded.model, content, test, ks=(10,), mask_history=True, item_offset=offset)
    plain_metrics = evaluate_ranking(loaded.model, content, test, ks=(10,), mask_history=True)
    assert lifted["recall@10"] != plain_metrics["recall@10"]


@pytest.fixture(scope="module")
def offset_checkpoint(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny checkpoint with UNSEEN recorded as in no training example and model.new_item_offset = OFFSET."""
    directory = tmp_path_factory.mktemp("offset") / "checkpoint"
    shutil.copytree(tiny_checkpoint, directory)
    state = json.loads((directory / "state.json").read_text())
    state["config"]["model"]["new_item_offset"] = OFFSET
    (directory / "state.json").write_text(json.dumps({**state, "unseen_items": UNSEEN}))
    return directory


@pytest.fixture(scope="module")
def served(offset_checkpoint, prepared_dir) -> ItemRecommender:
    return ItemRecommender.from_checkpoint(offset_checkpoint, prepared_dir=prepared_dir)


def _histories(prepared_dir, count: int = 60) -> list[list[str]]:
    from pipeline.sources import ITEMS_FILE
    from pipeline.splits import build_splits

    test = build_splits(build_config("tiny", [f"data.prepared_dir={prepared_dir}"]).data, prepared_dir).test
    ids = pq.read_table(prepared_dir / ITEMS_FILE, columns=["item_index", "item_id"]).to_pandas()
    raw = dict(zip(ids.item_index, ids.item_id.astype(str)))
    return [[raw[i] for i in row if i > 0] for row in test.history[:count]]


def test_served_exact_top_k_is_the_evaluations_ranking_with_the_offset(served, offset_checkpoint, prepared_dir):
    info = served.info()
    assert info["new_item_offset"] == OFFSET and info["unseen_items"] == len(UNSEEN)
    histories = _histories(prepared_dir)
    loaded = load_checkpoint(offset_checkpoint)
    indices = [[served._index_of[i] for i in h] for h in histories]
    padded = torch.zeros(len(indices), loaded.job.data.max_history, dtype=torch.long)
    for row, h in enumerate(indices):
        recent = h[-loaded.job.data.max_history:]
        padded[row, padded.shape[1] - len(recent):] = torch.as_tensor(recent)
    scores = score_users(loaded.model, served._content, padded, item_offset=loaded.item_offset()).clone()
    scores[history_mask(padded, 1683, pad_id=0)] = float("-inf")
    values, expected = torch.topk(scores, 10, dim=1)
    got = served.recommend_batch(histories, 10)
    assert [r.item_indices for r in got] == expected.tolist()
    np.testing.assert_allclose([r.scores for r in got], values.numpy(), rtol=1e-5, atol=1e-6)
    assert any(i in UNSEEN for r in got for i in r.item_indices)  # the offset does move new items up


def test_every_mode_and_filter_keeps_the_offset(served, prepared_dir):
    histories = _histories(prepared_dir, 40)
    exact = np.array([r.item_indices for r in served.recommend_batch(histories, 10)])
    for mode, size in (("hnsw", None), ("funnel", 8)):
        found = np.array([r.item_indices for r in served.recommend_batch(histories, 10, mode=mode, size=size)])
        hits = [len(set(f) & set(e)) / 10 for f, e in zip(found, exact)]
        assert np.mean(hits) >= 0.95, mode
    history = histories[3]
    candidates = [str(i) for i in range(1, 1683, 4)]
    for mode in ("exact", "hnsw", "funnel"):
        got = served.recommend(history, 10, mode=mode, candidates=candidates)
        assert set(got.item_ids) <= set(candidates) and not set(got.item_ids) & set(history), mode
        assert got.scores == sorted(got.scores, reverse=True) and len(got.item_ids) == 10
    top = ItemRecommender.from_checkpoint(served.source["checkpoint"], prepared_dir=prepared_dir, new_item_offset=2.0)
    assert set(top.recommend(history, 20).item_indices) <= set(UNSEEN)  # an offset of 2 puts new items first
    bottom = ItemRecommender.from_checkpoint(served.source["checkpoint"], prepared_dir=prepared_dir,
                                             new_item_offset=-2.0)
    assert not set(bottom.recommend(history, 50, mode="hnsw").item_indices) & set(UNSEEN)


def test_bundles_keep_the_offset_and_added_items_are_new(served, prepared_dir, tmp_path):
    histories = _histories(prepared_dir, 20)
    bundle = served.save_bundle(tmp_path / "bundle")
    again = ItemRecommender.from_bundle(bundle)
    assert again.new_item_offset == OFFSET and again.info()["unseen_items"] == len(UNSEEN)
    assert [r.item_ids for r in again.recommend_batch(histories, 10)] == \
        [r.item_ids for r in served.recommend_batch(histories, 10)]

    # a checkpoint trained when the catalogue had 1600 items: rows past it are new as well as the listed ones
    from pipeline.sources import ITEMS_FILE
    from serving.recommender import loaded_recommender

    older = tmp_path / "older"
    shutil.copytree(served.source["checkpoint"], older)
    weights = torch.load(older / "model.pt", weights_only=True)
    weights["item_encoder.id_embedding.weight"] = weights["item_encoder.id_embedding.weight"][:1601].clone()
    torch.save(weights, older / "model.pt")
    state = json.loads((older / "state.json").read_text())
    listed = [i for i in UNSEEN if i <= 1600]
    (older / "state.json").write_text(json.dumps({**state, "num_items": 1600, "unseen_items": listed}))
    grown = ItemRecommender.from_checkpoint(older, prepared_dir=prepared_dir)
    assert grown.info()["unseen_items"] == len(listed) + 82 and grown._unseen[1601:].all()
    small = loaded_recommender(load_checkpoint(older), served._content[:1601].clone(),
                               [served._item_ids[i] for i in range(1, 1601)], new_item_offset=2.0)
    assert small.info()["unseen_items"] == len(listed)
    added = small.add_items(prepared_dir / ITEMS_FILE)
    assert len(added) == 82 and small._unseen[1601:].all() and small.info()["unseen_items"] == len(listed) + 82
    got = small.recommend(histories[0], 10)
    assert set(got.item_indices) <= set(listed) | set(range(1601, 1683))  # an offset of 2: new items first


def test_export_writes_each_items_score_offset(offset_checkpoint, prepared_dir, tmp_path):
    from training.export import export_item_vectors

    written = export_item_vectors(offset_checkpoint, tmp_path / "out", [32], prepared_dir=prepared_dir)
    table = pq.read_table(written[0]).to_pandas()
    expected = np.where(np.isin(table.item_index, UNSEEN), OFFSET, 0.0)
    np.testing.assert_allclose(table.score_offset, expected, rtol=1e-6)
    manifest = json.loads((tmp_path / "out" / "export.json").read_text())
    assert manifest["new_item_offset"] == OFFSET and manifest["unseen_items"] == len(UNSEEN)
    plain = export_item_vectors(offset_checkpoint, tmp_path / "plain", [32], prepared_dir=prepared_dir,
                                new_item_offset=0.0)
    assert (pq.read_table(plain[0]).column("score_offset").to_numpy() == 0).all()


def test_the_serve_option_overrides_the_models_offset():
    from jobs.serve import ServeOptions
    from training.overrides import ConfigError

    assert ServeOptions().recommender_options() == {}
    assert ServeOptions.from_strings({"new_item_offset": "0.2"}).recommender_options() == {"new_item_offset": 0.2}
    for bad in ("abc", "3", "nan"):
        with pytest.raises(ConfigError, match="--new-item-offset"):
            ServeOptions(new_item_offset=bad)


def test_evaluate_reports_new_and_seen_targets_apart_and_takes_the_offset_from_set(offset_checkpoint, prepared_dir,
                                                                                   tmp_path, monkeypatch, capsys):
    import sys

    import jobs.evaluate
    from pipeline.sources import ITEMS_FILE
    from training.offline_eval import evaluate_checkpoint

    loaded, content, test = _evaluated(offset_checkpoint, prepared_dir)
    catalogue = DecodedCatalogue(prepared_dir / ITEMS_FILE, 1682)
    metrics = evaluate_checkpoint(loaded, catalogue, test, ks=(10,), mask_history=True, by_target=True)
    new = np.isin(test.target, UNSEEN)
    assert metrics["new_target_examples"] == new.sum() > 0
    part = evaluate_ranking(loaded.model, content, test.subset(new), ks=(10,), mask_history=True,
                            item_offset=loaded.item_offset())
    assert metrics["new_target_recall@10"] == pytest.approx(part["recall@10"])
    shares = new.mean(), 1 - new.mean()  # the two groups' recall, weighted by their shares, is the whole
    assert shares[0] * metrics["new_target_recall@10"] + shares[1] * metrics["seen_target_recall@10"] == \
        pytest.approx(metrics["recall@10"])

    def evaluated(offset: float) -> dict[str, float]:
        monkeypatch.setattr(sys, "argv", [
            "jobs.evaluate", "--checkpoint", str(offset_checkpoint), "--split", "validation",
            "--set", f"data.prepared_dir={prepared_dir}", "--set", f"tracking.tracking_uri=sqlite:///{tmp_path}/m.db",
            "--set", f"model.new_item_offset={offset}"])
        assert jobs.evaluate.main() == 0
        out = capsys.readouterr().out
        assert "by target" in out and f"model.new_item_offset {offset:+g}" in out
        line = next(row for row in out.splitlines() if row.strip().startswith("recall@10") and "new" in row)
        return {"new": float(line.split()[2]), "seen": float(line.split()[4])}

    low, high = evaluated(-0.5), evaluated(0.5)
    assert high["new"] > low["new"] and high["seen"] < low["seen"]


def test_the_fitted_offset_is_the_lowest_that_gives_new_targets_the_recall_asked_for(offset_checkpoint, prepared_dir):
    from training.offline_eval import fit_new_item_offset

    loaded, content, test = _evaluated(offset_checkpoint, prepared_dir)
    new = np.isin(test.target, UNSEEN)

    def new_recall(offset: float) -> float:
        return evaluate_ranking(loaded.model, content, test.subset(new), ks=(10,), mask_history=True,
                                item_offset=loaded.item_offset(offset))["recall@10"]

    as_is, top = new_recall(0.0), new_recall(2.0)  # 2: the top of model.new_item_offset's range
    assert top > as_is
    for wanted in ((as_is + top) / 2, top):
        offset, count = fit_new_item_offset(loaded, content, test, wanted, mask_history=True)
        assert count == new.sum() > 0
        assert new_recall(offset) >= wanted > new_recall(offset - 1e-4) and offset > 0
    low, _ = fit_new_item_offset(loaded, content, test, 0.0, mask_history=True)
    assert low == -2.0  # reached at the bottom of the range already
    with pytest.raises(ValueError, match=rf"new items' Recall@10 of 0.9 on {new.sum()} examples: 0.9 is out of reach"):
        fit_new_item_offset(loaded, content, test, 0.9, mask_history=True)
    with pytest.raises(ValueError, match="none of the 3 examples has a target in no training example"):
        fit_new_item_offset(loaded, content, test.subset(np.flatnonzero(~new)[:3]), 0.1, mask_history=True)


def test_evaluate_fits_the_offset_on_a_split_and_scores_it_with_it(offset_checkpoint, prepared_dir, tmp_path,
                                                                  monkeypatch, capsys):
    import sys

    import jobs.evaluate
    from jobs.cli import run_main

    def run(*extra: str) -> str:
        monkeypatch.setattr(sys, "argv", [
            "jobs.evaluate", "--checkpoint", str(offset_checkpoint), "--split", "test",
            "--set", f"data.prepared_dir={prepared_dir}", "--set", f"tracking.tracking_uri=sqlite:///{tmp_path}/m.db",
            *extra])
        with pytest.raises(SystemExit) as exited:
            run_main(jobs.evaluate.main)
        captured = capsys.readouterr()
        return f"{exited.value.code}\n{captured.out}{captured.err}"

    loaded, content, test = _evaluated(offset_checkpoint, prepared_dir)
    new = test.subset(np.isin(test.target, UNSEEN))
    wanted = evaluate_ranking(loaded.model, content, new, ks=(10,), mask_history=True,
                              item_offset=loaded.item_offset(0.5))["recall@10"]  # one that an offset reaches
    out = run("--fit-new-item-recall", f"{wanted}")
    assert out.startswith("0\n") and wanted > 0
    fitted = next(line for line in out.splitlines() if "fitted on the" in line)
    offset = float(fitted.split("--set model.new_item_offset=")[1].split()[0])
    assert f"model.new_item_offset {offset:+g}" in out
    new_recall = next(row for row in out.splitlines() if row.strip().startswith("recall@10") and "new" in row)
    assert float(new_recall.split()[2]) >= round(wanted, 4) and offset <= 0.5  # the split scored with the fit
    refused = run("--fit-new-item-recall", "0")
    assert refused.startswith("2\n") and "--fit-new-item-recall 0 must be in (0, 1]" in refused
    unreachable = run("--fit-new-item-recall", "0.9")
    assert unreachable.startswith("2\n") and "error: --fit-new-item-recall: new items' Recall@10 of 0.9" in unreachable
    assert "Traceback" not in unreachable

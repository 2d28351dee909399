"""serving.recommender on a real tiny checkpoint (trained briefly in process) and the real ml100k_mm catalogue:
its exact top-k is offline evaluation's ranking, every option and bad request, new items scored by content, the
bundle, and the MLflow pyfunc model of a registered champion."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from conftest import SERVING_SIZES
from pipeline.sources import ITEMS_FILE
from serving.index import recall_at_k
from serving.recommender import ItemRecommender, RecommendationError, loaded_recommender
from training.evaluate import score_users
from training.metrics import history_mask
from training.offline_eval import DecodedCatalogue, load_checkpoint


@pytest.fixture(scope="module")
def recommender(tiny_checkpoint, prepared_dir) -> ItemRecommender:
    return ItemRecommender.from_checkpoint(tiny_checkpoint, prepared_dir=prepared_dir)


@pytest.fixture(scope="module")
def offline(tiny_checkpoint, prepared_dir):
    """What offline evaluation sees: the checkpoint loaded, its own catalogue pass, the test examples, raw ids."""
    from pipeline.splits import build_splits

    items_path = prepared_dir / ITEMS_FILE
    loaded = load_checkpoint(tiny_checkpoint)
    content = DecodedCatalogue(items_path, loaded.model.item_encoder.id_embedding.num_embeddings - 1).encode(loaded)
    test = build_splits(loaded.job.data, prepared_dir).test
    table = pq.read_table(items_path, columns=["item_index", "item_id"]).to_pandas().set_index("item_index")
    raw_id = table.item_id.astype(str).to_dict()
    histories = [[raw_id[i] for i in row if i > 0] for row in test.history]
    return loaded, content, test, histories, raw_id


def offline_top_k(offline, k: int, size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """training.evaluate's scores of every test user, history masked -> (top-k indices [U, k], scores [U, k])."""
    loaded, content, test, _, _ = offline
    history = torch.as_tensor(test.history)
    scores = score_users(loaded.model, content, history, size).clone()
    scores[history_mask(history, content.shape[0], pad_id=0)] = float("-inf")
    values, indices = torch.topk(scores, k, dim=1)
    return indices.numpy(), values.numpy()


@pytest.mark.parametrize("size", [None, SERVING_SIZES[0]])
def test_exact_top_k_is_offline_evaluations_ranking(recommender, offline, size):
    histories = offline[3]
    assert len(histories) >= 100
    expected, expected_scores = offline_top_k(offline, 10, size)
    got = recommender.recommend_batch(histories, 10, size=size)
    assert [r.item_indices for r in got] == expected.tolist()
    np.testing.assert_allclose([r.scores for r in got], expected_scores, rtol=1e-5, atol=1e-6)
    raw_id = offline[4]
    assert got[0].item_ids == [raw_id[i] for i in expected[0]]
    assert {r.size for r in got} == {size or 32}
    one = recommender.recommend(histories[3], 10, size=size)  # one user alone: the same answer as in a batch
    assert one.item_indices == got[3].item_indices


def test_unknown_ids_are_ignored_and_reported(recommender, offline):
    history = offline[3][0]
    plain = recommender.recommend(history, 5)
    mixed = recommender.recommend(["no-such-item", *history, "zzz"], 5)
    assert mixed.unknown_history == ["no-such-item", "zzz"] and plain.unknown_history == []
    assert mixed.item_ids == plain.item_ids


@pytest.mark.parametrize("call, message", [
    (lambda r: r.recommend([], 5), "empty history"),
    (lambda r: r.recommend(["nope", "nada"], 5), "none of the 2 history item ids"),
    (lambda r: r.recommend(["1"], 0), "k must be an integer in 1..1682"),
    (lambda r: r.recommend(["1"], 1683), "k must be an integer in 1..1682"),
    (lambda r: r.recommend(["1"], 5, size=12), r"size 12 is not served; this model serves sizes \[8, 16, 32\]"),
    (lambda r: r.recommend(["1"], 5, mode="ivf"), "unknown mode 'ivf'"),
    (lambda r: r.recommend(["1"], 5, mode="funnel", size=32), "funnel retrieves with a Matryoshka size below"),
    (lambda r: r.recommend(["1"], 5, candidates=["nope"]), "none of the candidate item ids"),
    (lambda r: r.recommend_batch("12", 5), "list of lists"),
])
def test_bad_requests_are_one_line_errors(recommender, call, message):
    with pytest.raises(RecommendationError, match=message) as caught:
        call(recommender)
    assert "\n" not in str(caught.value)


def test_history_exclusion_and_candidate_filter_in_every_mode(recommender, offline):
    history = offline[3][5]
    with_history = recommender.recommend(history, 50, exclude_history=False)
    assert set(with_history.item_ids) & set(history)  # a user's own items do score high
    candidates = [str(i) for i in range(1, 1683, 7)] + ["not-an-item"]
    allowed = set(candidates)
    reference = None
    for mode in ("exact", "hnsw", "funnel"):
        got = recommender.recommend(history, 10, mode=mode, candidates=candidates)
        assert set(got.item_ids) <= allowed and not set(got.item_ids) & set(history)
        assert len(got.item_ids) == 10
        if mode == "exact":
            reference = got.item_ids
            everything = recommender.recommend(history, 1682 - len(set(history)), exclude_history=True)
            assert got.item_ids == [i for i in everything.item_ids if i in allowed][:10]  # masked brute force
        assert len(set(got.item_ids) & set(reference)) >= 8, mode
    few = recommender.recommend(history, 10, candidates=["1", "2", "3"], exclude_history=False)
    assert sorted(few.item_ids) == ["1", "2", "3"]  # fewer than k: what the filter leaves


def test_hnsw_and_funnel_recall_on_the_real_tiny_vectors(recommender, offline):
    histories = offline[3]
    truth = np.array([r.item_indices for r in recommender.recommend_batch(histories, 10)])
    for mode, size in (("hnsw", None), ("funnel", 8), ("funnel", 16)):
        found = np.array([r.item_indices for r in recommender.recommend_batch(histories, 10, mode=mode, size=size)])
        assert recall_at_k(found, truth) >= 0.95, (mode, size)


def test_funnel_over_the_whole_catalogue_is_exact(tiny_checkpoint, offline):
    loaded, content, *_ = offline
    ids = [offline[4][i] for i in range(1, content.shape[0])]
    funnel_all = loaded_recommender(loaded, content, ids, funnel_candidates=content.shape[0] - 1)
    histories = offline[3][:40]
    exact = funnel_all.recommend_batch(histories, 10)
    for size in SERVING_SIZES[:2]:
        funnel = funnel_all.recommend_batch(histories, 10, mode="funnel", size=size)
        assert [r.item_indices for r in funnel] == [r.item_indices for r in exact]


def test_info_describes_the_model(recommender):
    info = recommender.info()
    assert info["num_items"] == 1682 and info["sizes"] == [8, 16, 32] and info["dim"] == 32
    assert info["index_modes"] == ["exact", "hnsw", "funnel"] and info["funnel_size"] == 8
    assert info["new_items"] == 0 and info["built_at"]


@pytest.fixture(scope="module")
def older_checkpoint(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny checkpoint as if trained when the catalogue had 1600 items (its id table cut to 1601 rows)."""
    import json
    import shutil

    directory = tmp_path_factory.mktemp("older") / "checkpoint"
    shutil.copytree(tiny_checkpoint, directory)
    state = torch.load(directory / "model.pt", weights_only=True)
    state["item_encoder.id_embedding.weight"] = state["item_encoder.id_embedding.weight"][:1601].clone()
    torch.save(state, directory / "model.pt")
    meta = json.loads((directory / "state.json").read_text())
    (directory / "state.json").write_text(json.dumps({**meta, "num_items": 1600}))
    return directory


def test_items_new_since_training_are_scored_by_content(older_checkpoint, prepared_dir):
    grown = ItemRecommender.from_checkpoint(older_checkpoint, prepared_dir=prepared_dir)
    assert grown.info()["new_items"] == 82 and grown.num_items == 1682
    content = grown._content
    table = grown.model.item_encoder.id_embedding.weight.detach()
    assert table[1601:].abs().sum().item() == 0.0 and table[1:1601].abs().sum(1).gt(0).all()  # zero id vectors
    np.testing.assert_allclose(grown.item_vectors()[1600:], torch.nn.functional.normalize(content[1601:]).numpy(),
                               atol=1e-6)


def test_bundle_round_trip(recommender, offline, tmp_path):
    bundle = recommender.save_bundle(tmp_path / "bundle")
    again = ItemRecommender.from_bundle(bundle)
    histories = offline[3][:30]
    assert [r.item_ids for r in again.recommend_batch(histories, 10)] == \
        [r.item_ids for r in recommender.recommend_batch(histories, 10)]
    assert again.info()["num_items"] == 1682 and again.info()["sizes"] == [8, 16, 32]


def test_registered_champion_loads_as_a_pyfunc_with_the_same_top_k(tiny_checkpoint, prepared_dir, offline, tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    from serving.pyfunc import log_recommender_model
    from training.registry import CHAMPION, TAG_PYFUNC, ModelRegistry

    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri)
    experiment = client.create_experiment("serving", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    client.set_terminated(run_id)
    registry = ModelRegistry(tracking_uri, "mmrec", tmp_path / "runs", serving_model=log_recommender_model)
    version = registry.register(run_id=run_id, checkpoint_path=tiny_checkpoint, data_watermark=1, trained_through=1,
                                config_hash="test", metrics={"ndcg@10": 0.1})
    registry.set_alias(CHAMPION, version.version)
    assert version.tags[TAG_PYFUNC].startswith("models:/m-")
    assert registry.get(CHAMPION).checkpoint_path == version.checkpoint_path  # the jobs still find the checkpoint
    assert client.get_run(run_id).info.status == "FINISHED"  # re-opened to log the model, finished again
    logged = {p.name for p in (tmp_path / "artifacts").rglob("*") if p.is_file()}
    assert {"MLmodel", "model.pt", "catalogue.parquet", "requirements.txt"} <= logged
    assert not any(name.endswith(".pkl") for name in logged), logged  # logged from code: nothing to unpickle

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    try:
        model = mlflow.pyfunc.load_model(f"models:/mmrec@{CHAMPION}")
    finally:
        mlflow.set_tracking_uri(previous)
    histories = offline[3][:25]
    frame = pd.DataFrame({"history": [h + ["unknown-id"] for h in histories]})
    predicted = model.predict(frame)
    direct = ItemRecommender.from_model_uri(f"models:/mmrec@{CHAMPION}", tracking_uri, prepared_dir=prepared_dir)
    expected = direct.recommend_batch(histories, 10)
    assert predicted["item_ids"].tolist() == [r.item_ids for r in expected]
    np.testing.assert_allclose(np.array(predicted["scores"].tolist()), [r.scores for r in expected], rtol=1e-5)
    assert predicted["unknown_history"].tolist() == [["unknown-id"]] * 25
    options = model.predict(pd.DataFrame({"history": [histories[0], histories[1]], "k": [3, 5], "size": [8, None]}))
    assert options["item_ids"].tolist() == [direct.recommend(histories[0], 3, size=8).item_ids,
                                            direct.recommend(histories[1], 5).item_ids]
    assert direct.info()["version"] == version.version

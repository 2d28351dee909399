"""Real TorchTrainer runs of the tiny preset on the shared cluster: 2 workers (DDP on CPU) tracked in MLflow,
killed mid-epoch, and resumed from their checkpoint.

The tests share one 2-worker run (module fixture, 2 epochs, the bank filled by a Ray Data pass) whose rank 0
calls `os._exit(1)` at a step of epoch 2 on the first attempt only (`training.faults.KillRankZeroAt`, a step
callback injected through `run_training(callbacks=...)`, guarded by a marker file in the run folder): its MLflow record, its Ray Data bank fill and its recovery are checked, then it is
resumed under the same run name for a third epoch. One run instead of an undisturbed run plus a faulty one: each
Ray Train run costs ~1-2 minutes of fixed start-up on 2 cores. Also: asking for more workers than the cluster
has fails before any work.
"""
from __future__ import annotations

import json
import math
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from training.job_config import build_config
from training.overrides import ConfigError
from pipeline.sources import prepare_dataset

pytestmark = pytest.mark.integration

STEPS = 5  # per epoch; global steps 0..4 are epoch 1, 5..9 epoch 2
FAIL_AT = STEPS + 2  # a step inside epoch 2


CATALOGUE = 600  # items 1..600 of ml100k_mm and the interactions naming them: a smaller catalogue pass per epoch


@pytest.fixture(scope="module")
def workspace(real_slice, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fault")
    raw = real_slice("fault", CATALOGUE, root=root / "raw")
    prepare_dataset(build_config("tiny").data, raw, root / "prepared")
    return root


TOP_LAYERS_TRAIN = ("image.unfreeze_top=2", "text.unfreeze_top=1")  # the frozen-trunk cache is on


def _job(workspace: Path, name: str, *extra: str):
    return build_config("tiny", [
        f"data.prepared_dir={workspace / 'prepared'}",
        f"train.storage_path={workspace / 'runs'}",
        f"tracking.tracking_uri=sqlite:///{workspace / 'mlflow.db'}",
        f"tracking.artifact_root={workspace / 'mlartifacts'}",
        f"train.run_name={name}-{uuid.uuid4().hex[:6]}",
        "train.epochs=2",
        f"train.max_steps_per_epoch={STEPS}",
        "train.seed=7",
        "data.max_users=60",  # fewer examples to shuffle and decode each epoch
        "train.batch_size=64",
        "train.num_workers=2",
        *extra,
    ])


def _history(outcome, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=outcome.tracking_uri)
    return sorted((m.step, m.value) for m in client.get_metric_history(outcome.mlflow_run_id, key))


def _quiet(_line: str) -> None:
    pass


@pytest.fixture(scope="module")
def faulty(ray_cluster, workspace):
    """The run every test here reads: rank 0 dies at step FAIL_AT (epoch 2), Ray Train restarts the group once."""
    from training.driver import run_training
    from training.faults import KillRankZeroAt

    # the LEMUR recipe's Ray Data batch-inference pass fills the bank before the two workers start; the top layers
    # of each encoder train on the frozen-trunk cache (the training stream carries ids only), rebuilt on restart
    # weight averaging on: the restarted attempt continues the trained weights, the checkpoints hold the average
    # and 10% of the items held out of training: the test set is also scored by warm and cold target
    job = _job(workspace, "faulty", "memory.fill_with_ray_data=true", "train.max_failures=1", "train.average_epochs=1",
               "data.cold_item_fraction=0.1", *TOP_LAYERS_TRAIN)
    fault = KillRankZeroAt(step=FAIL_AT, marker=str(Path(job.train.storage_path) / job.train.run_name / "fault_injected"))
    started = time.perf_counter()
    outcome = run_training(job, log=_quiet, callbacks=[fault])
    print(f"fault-injected 2-worker run: {time.perf_counter() - started:.1f}s")
    return outcome


def test_two_worker_run_is_tracked_and_its_bank_filled_by_ray_data(faulty):
    from mlflow.tracking import MlflowClient

    metrics = faulty.metrics
    for key in ("test_recall@10", "test_ndcg@10", "test_mrr", "val_ndcg@10", "samples_per_s"):
        assert math.isfinite(metrics[key]), key
    assert 0.0 <= metrics["test_ndcg@10"] <= metrics["test_recall@10"] <= 1.0
    assert metrics["test_recall@50"] > 0.0
    assert faulty.last_metrics["global_step"] == 2 * STEPS and faulty.last_metrics["epoch"] == 2
    # the outcome is the best checkpoint by the selection score (validation NDCG@10 averaged over the last 3
    # epochs), which carries its own test metrics; over two epochs that is the epoch of the higher raw score
    selection = dict(_history(faulty, "val_selection"))
    raw = dict(_history(faulty, "val_ndcg_at_10"))
    assert selection[1] == pytest.approx(raw[1]) and selection[2] == pytest.approx((raw[1] + raw[2]) / 2)
    assert metrics["val_selection"] == max(selection.values())
    assert metrics["val_ndcg@10"] == max(raw.values())
    best_state = json.loads((Path(faulty.checkpoint_path) / "state.json").read_text())
    assert best_state["epoch"] + 1 == metrics["epoch"] == metrics["best_epoch"]
    # the checkpoint records the items in none of its training examples (60 users leave most of the catalogue)
    from pipeline.sequences import seen_items
    from pipeline.splits import build_splits
    from training.offline_eval import job_config_of

    job = job_config_of(best_state)
    train = build_splits(job.data, Path(job.data.prepared_dir)).train
    never = np.flatnonzero(~seen_items(train, best_state["num_items"])[1:]) + 1
    assert best_state["unseen_items"] == never.tolist() and 0 < len(never) < best_state["num_items"]
    # epoch 1 (first attempt) started from the bank filled by Ray Data actors, not by rank 0; epoch 2 (after the
    # restart) from the checkpoint's bank snapshot
    assert _history(faulty, "bank_filled_by_ray_data") == [(1, 1.0), (2, 0.0)]
    assert [value for _, value in _history(faulty, "bank_coverage")] == pytest.approx([1.0, 1.0])  # every lookup hit
    run = MlflowClient(faulty.tracking_uri).get_run(faulty.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.num_workers"] == "2"
    assert run.data.metrics["trunk_cache_enabled"] == 1.0 and run.data.metrics["trunk_cache_mb"] > 0
    assert "test_ndcg_at_10" in run.data.metrics and "val_ndcg_at_10" in run.data.metrics


def test_warm_and_cold_targets_are_scored_in_the_test_pass_as_parts_of_the_whole(faulty):
    """Both protocols of the test set and of its warm / cold parts come from one pass of the sequence model
    (training.evaluate.evaluate_protocols): each metric of the whole is its parts' metrics weighted by size."""
    from pipeline.content import read_examples

    metrics, data = faulty.metrics, Path(faulty.run_dir) / "data"
    cold = np.load(data / "test_cold_rows.npy")
    test = read_examples(data / "test.parquet")
    assert cold.shape == (len(test),) and 0 < cold.sum() < len(test)
    assert len(read_examples(data / "test_cold.parquet")) == cold.sum()  # still written, for bench.paired
    share = cold.mean()
    for key in ("recall@10", "ndcg@10", "mrr", "masked_recall@10", "masked_ndcg@10", "masked_mrr"):
        whole = (1 - share) * metrics[f"test_warm_{key}"] + share * metrics[f"test_cold_{key}"]
        assert metrics[f"test_{key}"] == pytest.approx(whole, abs=1e-9), key
    assert metrics["test_masked_mrr"] >= metrics["test_mrr"]  # masking the history only lifts targets
    # the end of each epoch, timed by phase in MLflow (and in one progress line)
    for phase in ("validation", "test", "checkpoint", "report"):
        assert [step for step, _ in _history(faulty, f"{phase}_seconds")] == [1, 2], phase
    assert min(value for _, value in _history(faulty, "validation_seconds")) > 0


def test_the_benches_read_a_run_as_it_scored_itself(faulty):
    """bench.kept_run opens the checkpoint the run registered, and bench.paired's re-scoring of it gives the run's
    own test metrics (the benches compare runs on what training measured, not on a copy of it)."""
    from bench.kept_run import open_kept_run
    from bench.paired import per_user, run_ranks

    run_dir = Path(faulty.run_dir)
    run = open_kept_run(run_dir, needs="data/test_warm.parquet")
    assert Path(run.checkpoint) == Path(faulty.checkpoint_path)
    counts = np.load(run_dir / "data" / "popularity.npy")
    assert run.training_counts(len(counts) + 2, "a test").tolist() == [*counts.tolist(), 0, 0]  # new items: none
    with pytest.raises(SystemExit, match=r"missing\.npy is missing: a test$"):
        run.data_file("missing.npy", "a test")
    for subset in ("test_warm", "test_cold"):
        checkpoint, _, _, ranks = run_ranks(run_dir, subset, mask_history=False)
        assert checkpoint == run.checkpoint
        for metric in ("ndcg@10", "mrr"):
            assert per_user(ranks, metric).mean() == pytest.approx(faulty.metrics[f"{subset}_{metric}"], abs=1e-6)


def test_killed_worker_resumes_from_last_checkpoint_with_its_bank(faulty):
    from training.checkpoint import STATE_FILE

    outcome = faulty
    # the fault really fired (first attempt), and the run still finished
    assert (outcome.run_dir / "fault_injected").exists()
    assert outcome.checkpoint_path is not None

    # resumed from the epoch-1 checkpoint with the bank snapshot, not from scratch
    last = outcome.last_metrics  # how the run ended (outcome.metrics is its best checkpoint's)
    assert last["resumed_from_epoch"] == 1
    assert last["bank_restored"] == 1.0
    assert last["bank_restored_exact"] == 1.0  # the killed attempt's partial bank writes are gone
    assert _history(outcome, "resumed_from_epoch") == [(1, 0.0), (2, 1.0)]
    assert _history(outcome, "bank_restored") == [(1, 0.0), (2, 1.0)]
    from ray.train import Result

    latest = Path(Result.from_path(outcome.run_dir).checkpoint.path)
    state = json.loads((latest / STATE_FILE).read_text())
    # weight averaging: model.pt is the average, trained_weights.pt what the restarted attempt continued from
    assert state["averaged_weights"] and (latest / "trained_weights.pt").is_file()
    # epoch 2 ran its full STEPS after the resume; the 2 steps of the killed attempt were not counted
    assert state["epoch"] == 1 and state["global_step"] == 2 * STEPS
    assert last["global_step"] == 2 * STEPS

    # no epoch counted twice in MLflow: exactly one record per epoch
    assert _history(outcome, "epoch") == [(1, 1.0), (2, 2.0)]
    assert [step for step, _ in _history(outcome, "val_recall_at_10")] == [1, 2]
    # the restarted epoch 2 trained on from the epoch-1 weights: a fresh start would repeat epoch 1's loss
    # (seen: 4.96 -> 4.40, and 4.35 after a third epoch; epoch 2 from the initial weights would be ~4.96 again)
    losses = _history(outcome, "train_loss")
    assert [step for step, _ in losses] == [1, 2]
    (_, loss_1), (_, loss_2) = losses
    assert math.isfinite(loss_2) and loss_2 < loss_1 - 0.2, (loss_1, loss_2)

    # the data report reached MLflow as data.* metrics
    assert _history(outcome, "data.items_total") == [(0, float(CATALOGUE))]
    assert _history(outcome, "data.bad_item_fraction") == [(0, 0.0)]


def test_the_run_logs_a_recommendation_gallery_of_its_best_checkpoint(faulty, workspace):
    """gallery/index.html and gallery.json are artifacts of the run; each user's top 10 is the score ranking of the
    best checkpoint over a fresh catalogue pass, and the held-out item is marked where it is in the top 10."""
    import re

    import mlflow
    import torch

    from pipeline.content import read_examples
    from pipeline.sources import ITEMS_FILE
    from training.evaluate import score_users
    from training.metrics import history_mask
    from training.offline_eval import DecodedCatalogue, load_checkpoint

    run_id = faulty.mlflow_run_id
    files = {a.path for a in mlflow.MlflowClient(faulty.tracking_uri).list_artifacts(run_id, "gallery")}
    assert files == {"gallery/index.html", "gallery/gallery.json"}
    mlflow.set_tracking_uri(faulty.tracking_uri)
    gallery = mlflow.artifacts.load_dict(f"runs:/{run_id}/gallery/gallery.json")
    page = mlflow.artifacts.load_text(f"runs:/{run_id}/gallery/index.html")
    rows = gallery["rows"]
    assert len(rows) == 6 and gallery["k"] == 10 and gallery["checkpoint"] == str(faulty.checkpoint_path)

    loaded = load_checkpoint(Path(faulty.checkpoint_path))
    content = DecodedCatalogue(workspace / "prepared" / ITEMS_FILE, CATALOGUE).encode(loaded)
    test = read_examples(faulty.run_dir / "data" / "test.parquet")
    history = torch.as_tensor(test.history[[row["example"] for row in rows]])
    scores = score_users(loaded.model, content, history)  # [6, N+1]
    if gallery["mask_history"]:
        scores = scores.masked_fill(history_mask(history, CATALOGUE + 1, pad_id=0), float("-inf"))
    sections = page.split("<section")[1:]
    assert len(sections) == 6
    for row, user_scores, section in zip(rows, scores, sections):
        assert row["top"] == torch.topk(user_scores, 10).indices.tolist()
        assert row["target"] == int(test.target[row["example"]])
        assert row["history"] == [int(i) for i in test.history[row["example"]] if i][-5:]
        shown_top = section.split("class='strip top'>")[1]
        assert [int(i) for i in re.findall(r'data-item-index="(\d+)"', shown_top)] == row["top"]
        marked = [int(i) for i in re.findall(r'<figure class="hit" data-item-id="[^"]*" data-item-index="(\d+)"',
                                             section)]
        assert marked == ([row["target"]] if row["target"] in row["top"] else [])
    # every shown item with a decodable poster in the prepared items has it embedded, the others say "no poster"
    import io

    import pyarrow.parquet as pq
    from PIL import Image

    def decodes(image: bytes | None) -> bool:
        try:
            Image.open(io.BytesIO(image)).verify()
            return True
        except Exception:
            return False

    table = pq.read_table(workspace / "prepared" / ITEMS_FILE, columns=["item_index", "image"]).to_pydict()
    has_poster = {int(i): image is not None and decodes(image) for i, image in zip(table["item_index"], table["image"])}
    shown = [i for row in rows for i in row["history"] + row["top"]]
    expected = sum(has_poster.get(i, False) for i in shown)
    assert expected >= len(shown) // 2  # the check is not vacuous: most of ml100k_mm's items have a poster
    assert page.count("data:image/jpeg;base64,") == expected
    assert page.count('class="noimg"') == len(shown) - expected


def test_same_run_name_resumes_after_the_last_epoch_with_the_bank_restored_exactly(workspace, faulty):
    from training.driver import run_training

    # one worker this time: a checkpoint does not depend on the world size that wrote it
    job = _job(workspace, "faulty", "memory.fill_with_ray_data=true", "train.epochs=3", "train.num_workers=1",
               *TOP_LAYERS_TRAIN)
    job.train.run_name = faulty.run_name  # Ray Train hands the latest checkpoint back
    resumed = run_training(job, log=_quiet)
    last = resumed.last_metrics
    assert last["resumed_from_epoch"] == 2
    assert last["epoch"] == 3 and last["global_step"] == 3 * STEPS
    assert last["bank_restored_exact"] == 1.0  # the bank came back exactly as checkpointed
    assert last["bank_filled_by_ray_data"] == 0.0  # restored from the checkpoint, not refilled
    # a finished MLflow run is not reopened: the extension is a new run under the same Ray run name
    assert resumed.mlflow_run_id != faulty.mlflow_run_id


def test_more_workers_than_the_cluster_has_fails_fast_naming_the_key(ray_cluster, workspace):
    import ray

    from training.driver import check_cluster_fits, run_training

    cpus = ray.cluster_resources()["CPU"]
    too_many = int(cpus / 0.25) + 1
    job = _job(workspace, "too-many", f"train.num_workers={too_many}", "train.cpus_per_worker=0.25")
    with pytest.raises(ConfigError, match=rf"train\.num_workers={too_many} x train\.cpus_per_worker=0\.25 needs "
                                          rf"{too_many * 0.25:g} CPU but the Ray cluster has {cpus:g}"):
        check_cluster_fits(job, use_gpu=False)
    with pytest.raises(ConfigError, match=r"1 GPU each needs 1 GPU but the Ray cluster has 0"):
        check_cluster_fits(_job(workspace, "gpu", "train.num_workers=1"), use_gpu=True)
    check_cluster_fits(_job(workspace, "fits", f"train.num_workers={int(cpus / 0.25)}"), use_gpu=False)

    started = time.perf_counter()
    with pytest.raises(ConfigError, match=r"train\.num_workers"):
        run_training(job, log=_quiet)
    assert time.perf_counter() - started < 60  # no Ray Train start, no catalogue decode


def test_partial_checkpoint_from_a_crashed_upload_is_never_resumed_from(faulty):
    """Ray Train copies a checkpoint straight into its final folder (not atomic), but resumes only from the
    checkpoints listed in checkpoint_manager_snapshot.json, written after an upload completes: a folder left by
    a crash mid-upload, even a newer one, is ignored."""
    from ray.train import Result

    run_dir = faulty.run_dir
    registered = Path(Result.from_path(str(run_dir)).checkpoint.path)
    assert (run_dir / "checkpoint_manager_snapshot.json").is_file()
    partial = run_dir / "checkpoint_2099-01-01_00-00-00.000000"  # sorts after every real one
    partial.mkdir()
    (partial / "model.pt").write_bytes(b"\x80\x02 truncated upload")
    try:
        assert Path(Result.from_path(str(run_dir)).checkpoint.path) == registered
        assert registered.name < partial.name and (registered / "state.json").is_file()
    finally:
        import shutil

        shutil.rmtree(partial)


def test_two_runs_of_one_seed_train_identically(workspace, ray_cluster):
    """The seed fixes the data order too (a seeded shuffle, reseeded each epoch, delivered in order and split
    between the workers by row counts), the step's gathers are deterministic and the workers' bank writes land in
    rank order before the next step's lookups: two two-worker runs of seed 7 with both encoders trained and
    history from the memory bank log the same losses and validation metrics to the last digit. Before, the
    shuffle was unseeded and two runs differed from the first epoch on (the shuffle's own seeding:
    tests/integration/test_pipeline_stages.py); then, with it seeded, the content models still drifted in the
    fifth digit of the loss: `table[index]`'s backward on CPU adds repeated rows' gradients in a thread-dependent
    order (model.recommender.gather_rows; tests/unit/test_model.py); then one-worker runs were exact but
    two-worker runs still differed in the third digit of the first epoch's loss: the two workers' asynchronous
    writes raced each other's lookups (`Trainer._write_back`)."""
    from training.driver import run_training

    def losses_and_ndcg(seed: int) -> list[tuple[int, float]]:
        job = _job(workspace, f"seed{seed}", "train.num_workers=2", "memory.mode=bank", f"train.seed={seed}")
        assert job.model.modalities == ("image", "text") and job.image.unfreeze_top != 0
        outcome = run_training(job, log=_quiet)
        assert all(ms > 0 for _, ms in _history(outcome, "bank_write_ms_per_step"))  # waited for, so timed
        return _history(outcome, "train_loss") + _history(outcome, "val_ndcg_at_10")

    first = losses_and_ndcg(7)
    assert len(first) == 4  # two epochs of each
    assert losses_and_ndcg(7) == first


def test_a_refit_retrains_the_selection_runs_best_epochs_on_training_and_validation_and_keeps_its_last(
        workspace, ray_cluster):
    """`train.refit`: the selection run picks its epochs on validation; the refit, a second Ray Train run and
    MLflow run, trains that many epochs from scratch on the training and validation examples together, and its
    last epoch is what the outcome (and jobs.train's registration) carries."""
    from mlflow.tracking import MlflowClient

    from pipeline.content import read_examples
    from training.checkpoint import read_state
    from training.driver import run_training

    job = _job(workspace, "refit", "train.refit=true", "train.epochs=3", "train.num_workers=1")
    outcome = run_training(job, log=_quiet)
    selection = outcome.selection
    assert selection is not None and selection.run_name == job.train.run_name
    assert outcome.run_name == f"{job.train.run_name}-refit" and outcome.mlflow_run_id != selection.mlflow_run_id
    best = int(selection.metrics["best_epoch"])
    assert 1 <= best <= 3 and selection.last_metrics["epoch"] == 3  # no patience: the selection ran every epoch
    # the refit trained exactly the selection's best epochs, and its last one is the checkpoint it returns
    assert outcome.last_metrics["epoch"] == best and outcome.metrics["epoch"] == best
    state = read_state(outcome.checkpoint_path)
    assert state["epoch"] == best - 1 and state["refit"]["epochs"] == best
    assert state["refit"]["selection_run_id"] == selection.mlflow_run_id
    assert state["config"]["train"]["refit"] is False  # the refit's own config: it is not refitted again
    for key in ("test_ndcg@10", "test_recall@10"):
        assert math.isfinite(outcome.metrics[key]) and math.isfinite(selection.metrics[key])
    # its examples: the selection run's training and validation examples, the same validation and test
    trained = {name: read_examples(run.run_dir / "data" / "train.parquet") for name, run in
               (("selection", selection), ("refit", outcome))}
    validation = read_examples(selection.run_dir / "data" / "validation.parquet")
    assert len(trained["refit"]) == len(trained["selection"]) + len(validation) > len(trained["selection"])
    assert set(zip(validation.user, validation.target)) <= set(zip(trained["refit"].user, trained["refit"].target))
    assert (outcome.run_dir / "data" / "test.parquet").read_bytes() == \
        (selection.run_dir / "data" / "test.parquet").read_bytes()
    client = MlflowClient(tracking_uri=outcome.tracking_uri)
    tags = client.get_run(outcome.mlflow_run_id).data.tags
    assert tags["refit_of"] == selection.mlflow_run_id and tags["refit_epochs"] == str(best)
    # the gallery is drawn once, for the model the job keeps
    assert {a.path for a in client.list_artifacts(outcome.mlflow_run_id, "gallery")} == \
        {"gallery/index.html", "gallery/gallery.json"}
    assert client.list_artifacts(selection.mlflow_run_id, "gallery") == []
    with pytest.raises(ConfigError, match="train.refit"):
        run_training(job, log=_quiet, splits=object())
    # the same run name again (as after a crash in the refit): both finished runs resume with nothing left to train
    again = run_training(job, log=_quiet)
    assert again.checkpoint_path == outcome.checkpoint_path
    assert again.selection.checkpoint_path == selection.checkpoint_path
    assert again.metrics["test_ndcg@10"] == outcome.metrics["test_ndcg@10"]

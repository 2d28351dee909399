"""The pure parts of incremental retraining: the lock, the held-out window, the examples, the promotion gate,
the warm start into a grown catalogue, and the registry's URI parsing."""
from __future__ import annotations

import json
import math
import multiprocessing
import os
import socket
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from training.retrain.config import RetrainConfig, check_gate_metric
from training.retrain.gate import decide_promotion
from training.retrain.lock import RetrainLock, RetrainLockedError, lock_is_stale
from training.retrain.selection import holdout_start, incremental_splits

# --------------------------------------------------------------------------- lock


def test_lock_is_exclusive_and_released(tmp_path: Path):
    path = tmp_path / "locks" / "retrain-m.lock"
    first = RetrainLock(path, stale_after_s=3600)
    with first:
        holder = json.loads(path.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(RetrainLockedError, match=f"pid {os.getpid()}"):
            RetrainLock(path, stale_after_s=3600).acquire()
        assert path.exists(), "a refused acquire must not remove the holder's lock"
    assert not path.exists()
    with RetrainLock(path, stale_after_s=3600):  # free again
        assert path.exists()


def _exited_pid() -> int:
    process = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(0,))
    process.start()
    process.join()
    return process.pid


def test_lock_of_a_dead_holder_is_taken_over(tmp_path: Path):
    path = tmp_path / "retrain-m.lock"
    path.write_text(json.dumps({"pid": _exited_pid(), "host": socket.gethostname(), "token": "old"}))
    with RetrainLock(path, stale_after_s=3600):
        assert json.loads(path.read_text())["pid"] == os.getpid()


def test_lock_of_a_live_holder_on_another_host_waits_for_its_age(tmp_path: Path):
    path = tmp_path / "retrain-m.lock"
    path.write_text(json.dumps({"pid": 1, "host": "some-other-host", "token": "theirs"}))
    with pytest.raises(RetrainLockedError, match="some-other-host"):
        RetrainLock(path, stale_after_s=3600).acquire()
    hours_ago = time.time() - 7200
    os.utime(path, (hours_ago, hours_ago))
    with RetrainLock(path, stale_after_s=3600):
        assert json.loads(path.read_text())["pid"] == os.getpid()


def test_release_never_removes_a_lock_it_does_not_hold(tmp_path: Path):
    path = tmp_path / "retrain-m.lock"
    lock = RetrainLock(path, stale_after_s=3600)
    lock.acquire()
    path.write_text(json.dumps({"pid": 1, "host": "x", "token": "someone-else"}))  # taken over meanwhile
    lock.release()
    assert json.loads(path.read_text())["token"] == "someone-else"


@pytest.mark.parametrize(
    "holder, age, expected",
    [
        ({"pid": 123, "host": "me"}, 10.0, False),  # alive, young
        ({"pid": 123, "host": "me"}, 7200.0, True),  # too old, whoever holds it
        ({"pid": 999, "host": "me"}, 10.0, True),  # dead on this host
        ({"pid": 999, "host": "other"}, 10.0, False),  # another host's pid says nothing here
        (None, 10.0, False),  # unreadable (being written): judged by age only
        (None, 7200.0, True),
    ],
)
def test_lock_staleness_rule(holder, age, expected):
    assert lock_is_stale(holder, age_s=age, stale_after_s=3600, hostname="me", alive=lambda pid: pid == 123) is expected


# --------------------------------------------------------------------------- held-out window


def test_holdout_start_takes_the_newest_fraction():
    timestamps = np.arange(100, 200)  # 100 distinct times, shuffled order must not matter
    np.random.default_rng(0).shuffle(timestamps)
    start = holdout_start(timestamps, 0.2)
    assert start == 180
    assert (timestamps >= start).sum() == 20


def test_holdout_start_keeps_ties_together_and_leaves_something_to_train_on():
    assert holdout_start(np.array([5, 5, 5, 9, 9, 9]), 0.2) == 9  # all three 9s held out, not one
    assert holdout_start(np.array([1, 7, 7, 7]), 0.9) == 7  # 90% would be everything: keep the oldest to train
    assert holdout_start(np.array([3, 4]), 0.01) == 4  # at least one held out
    assert holdout_start(np.array([4, 4, 4]), 0.5) is None  # one instant cannot be split
    assert holdout_start(np.array([4]), 0.5) is None


# --------------------------------------------------------------------------- examples


def _interactions(rows: list[tuple[int, int, int]]) -> pd.DataFrame:
    """(user, item, timestamp) rows -> the prepared interactions columns."""
    users, items, times = map(np.asarray, zip(*rows))
    return pd.DataFrame({"user_index": users, "item_index": items, "timestamp": times, "rating": np.nan,
                         "row_order": np.arange(len(rows))})


def test_incremental_splits_train_on_new_targets_with_old_histories_and_hold_out_the_window():
    rows = [(0, 1, 10), (0, 2, 20), (0, 3, 30), (0, 4, 40), (0, 5, 50), (0, 6, 60),
            (1, 7, 15), (1, 8, 25), (1, 9, 45), (1, 10, 65)]
    splits = incremental_splits(_interactions(rows), max_history=3, trained_through=30, holdout_from=60,
                                replay_ratio=0.0)
    # new targets: after 30 and before 60; a user's first interaction has no history and is no example
    assert sorted(splits.train.target.tolist()) == [4, 5, 9]
    by_target = dict(zip(splits.train.target.tolist(), splits.train.history.tolist()))
    assert by_target[5] == [2, 3, 4]  # the history reaches back before the watermark
    assert by_target[9] == [0, 7, 8]
    assert sorted(splits.test.target.tolist()) == [6, 10]
    assert dict(zip(splits.test.target.tolist(), splits.test.history.tolist()))[10] == [7, 8, 9]
    assert splits.validation.target.tolist() == splits.test.target.tolist()


def test_incremental_splits_replay_samples_old_targets_only():
    rng = np.random.default_rng(1)
    rows = [(u, int(rng.integers(1, 50)), t) for u in range(20) for t in range(0, 100, 5)]
    interactions = _interactions(rows)
    splits = incremental_splits(interactions, max_history=4, trained_through=60, holdout_from=90, replay_ratio=0.5,
                                seed=3)
    new = splits.train.timestamp > 60
    assert new.sum() == 20 * 5  # targets at 65..85 for each of the 20 users
    replay = splits.train.subset(~new)
    assert len(replay) == 50 and (replay.timestamp <= 60).all() and (replay.timestamp >= 5).all()
    assert len(set(zip(replay.user.tolist(), replay.timestamp.tolist()))) == 50  # sampled without replacement
    assert (splits.test.timestamp >= 90).all() and len(splits.test) == 20 * 2
    again = incremental_splits(interactions, max_history=4, trained_through=60, holdout_from=90, replay_ratio=0.5,
                               seed=3)
    np.testing.assert_array_equal(again.train.timestamp, splits.train.timestamp)  # deterministic given the seed


# --------------------------------------------------------------------------- promotion gate


def test_promotion_decision_is_no_worse_by_margin():
    assert decide_promotion(0.10, 0.11, metric="ndcg@10", margin=0.0).promote
    assert decide_promotion(0.10, 0.10, metric="ndcg@10", margin=0.0).promote  # ties promote (fresher model)
    assert not decide_promotion(0.10, 0.0999, metric="ndcg@10", margin=0.0).promote
    assert decide_promotion(0.10, 0.095, metric="ndcg@10", margin=0.01).promote
    assert not decide_promotion(0.10, 0.085, metric="ndcg@10", margin=0.01).promote
    assert not decide_promotion(0.10, math.nan, metric="ndcg@10", margin=0.01).promote
    decision = decide_promotion(0.25, 0.5, metric="mrr", margin=0.0)
    tags = decision.tags()
    assert tags["gate.decision"] == "promoted" and tags["gate.metric"] == "mrr"
    assert float(tags["gate.champion_score"]) == 0.25 and float(tags["gate.challenger_score"]) == 0.5


def test_retrain_config_checks():
    with pytest.raises(ValueError, match="holdout_fraction"):
        RetrainConfig(holdout_fraction=1.0)
    with pytest.raises(ValueError, match="metric"):
        RetrainConfig(metric="auc")
    with pytest.raises(ValueError, match="steps"):
        RetrainConfig(steps=0)
    check_gate_metric("ndcg@10", (5, 10))
    check_gate_metric("mrr", (5,))
    with pytest.raises(ValueError, match="eval_ks"):
        check_gate_metric("recall@20", (5, 10))


def test_retrain_section_is_in_the_job_config():
    from training.job_config import build_config
    from training.overrides import ConfigError

    job = build_config("tiny", ["retrain.steps=7", "retrain.margin=0.01"])
    assert (job.retrain.steps, job.retrain.margin) == (7, 0.01)
    with pytest.raises(ConfigError, match="retrain"):
        build_config("tiny", ["retrain.no_such_key=1"])


def test_a_challenger_trains_its_fixed_budget_on_the_cosine_from_the_champion():
    from training.job_config import build_config
    from training.retrain.run import challenger_config

    # the preset's plateau: its rate would never anneal; a refit: the challenger selects no epoch to refit
    job = build_config("movielens", ["retrain.steps=30", "train.refit=true"])
    champion = build_config("movielens", ["model.dim=64"])
    challenger = challenger_config(job, champion, Path("/ckpt"), "retrain-1")
    assert job.train.schedule == "plateau" and challenger.train.schedule == "cosine"
    assert job.train.refit and not challenger.train.refit
    assert (challenger.train.epochs, challenger.train.max_steps_per_epoch) == (1, 30)
    assert challenger.model.dim == 64 and challenger.train.init_checkpoint == "/ckpt"


# --------------------------------------------------------------------------- warm start into a grown catalogue


def test_warm_start_copies_old_id_rows_and_keeps_new_ones(tmp_path: Path):
    from encoders.config import ImageEncoderConfig, TextEncoderConfig
    from model.build import build_recommender
    from model.config import ModelConfig
    from training.checkpoint import ID_EMBEDDING_KEY, load_model_weights

    config = ModelConfig(dim=8, num_layers=1, num_heads=2, modalities=(), use_id_embedding=True)
    image, text = ImageEncoderConfig(), TextEncoderConfig()
    torch.manual_seed(0)
    old = build_recommender(config, image, text, num_items=5, max_history=4)
    torch.save(old.state_dict(), tmp_path / "model.pt")
    torch.manual_seed(1)
    grown = build_recommender(config, image, text, num_items=8, max_history=4)
    fresh_rows = grown.state_dict()[ID_EMBEDDING_KEY][6:].clone()

    assert load_model_weights(grown, tmp_path / "model.pt") == 3
    weights = grown.state_dict()[ID_EMBEDDING_KEY]
    torch.testing.assert_close(weights[:6], old.state_dict()[ID_EMBEDDING_KEY])
    torch.testing.assert_close(weights[6:], fresh_rows)
    for key, value in old.state_dict().items():
        if key != ID_EMBEDDING_KEY:
            torch.testing.assert_close(grown.state_dict()[key], value)

    same = build_recommender(config, image, text, num_items=5, max_history=4)
    assert load_model_weights(same, tmp_path / "model.pt") == 0


# --------------------------------------------------------------------------- registry URIs


def test_model_uri_parsing():
    from training.registry import RegistryError, parse_model_uri

    assert parse_model_uri("models:/mmrec@champion") == ("mmrec", "champion", None)
    assert parse_model_uri("models:/mmrec/12") == ("mmrec", None, "12")
    for bad in ("mmrec@champion", "models:/mmrec", "models:/mmrec@", "runs:/abc/model"):
        with pytest.raises(RegistryError):
            parse_model_uri(bad)


# --------------------------------------------------------------------------- registered checkpoints are pinned


def _fake_checkpoint(directory: Path, payload: bytes) -> Path:
    directory.mkdir(parents=True)
    (directory / "model.pt").write_bytes(payload)
    (directory / "state.json").write_text(json.dumps({"watermark": 1000, "matryoshka_sizes": [32, 128, 512]}))
    (directory / "bank").mkdir()
    (directory / "bank" / "shard0.npz").write_bytes(payload[::-1])
    return directory


def test_pinned_copy_is_complete_idempotent_and_never_half_written(tmp_path, monkeypatch):
    import shutil

    from training.registry import RegistryError, pin_checkpoint

    source = _fake_checkpoint(tmp_path / "run" / "checkpoint_000001", b"weights-1")
    root = tmp_path / "registered" / "m"
    pinned = pin_checkpoint(source, root, "run-a")
    assert pinned == root / "run-a" / "checkpoint_000001"
    assert (pinned / "model.pt").read_bytes() == b"weights-1"
    assert (pinned / "bank" / "shard0.npz").read_bytes() == b"1-sthgiew"
    assert pin_checkpoint(source, root, "run-a") == pinned  # registering twice stores it once
    assert pin_checkpoint(pinned, root, "run-a") == pinned  # a pinned checkpoint is not copied into itself

    # a copy that dies half way leaves neither a target nor a staging folder behind
    other = _fake_checkpoint(tmp_path / "run" / "checkpoint_000002", b"weights-2")

    def dies_half_way(src, dst, **kwargs):
        Path(dst).mkdir(parents=True, exist_ok=kwargs.get("dirs_exist_ok", False))  # as copytree does
        shutil.copyfile(Path(src) / "model.pt", Path(dst) / "model.pt")
        raise OSError("disk full")

    monkeypatch.setattr(shutil, "copytree", dies_half_way)
    with pytest.raises(OSError, match="disk full"):
        pin_checkpoint(other, root, "run-a")
    assert sorted(p.name for p in (root / "run-a").iterdir()) == ["checkpoint_000001"]

    with pytest.raises(RegistryError, match="no model.pt"):
        pin_checkpoint(tmp_path / "run", root, "run-a")


def test_champion_survives_ray_checkpoint_rotation(tmp_path):
    """keep-last-N deletes checkpoints in the Ray run folder; the registered champion never lives there."""
    import shutil

    from mlflow.tracking import MlflowClient

    from training.registry import CHAMPION, ModelRegistry, resolve_model

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = MlflowClient(uri).create_run(MlflowClient(uri).create_experiment("e")).info.run_id
    storage = tmp_path / "runs"
    first = _fake_checkpoint(storage / "job" / "checkpoint_000001", b"champion-weights")
    registry = ModelRegistry(uri, "m", storage)
    info = registry.register(run_id=run_id, checkpoint_path=first, data_watermark=1000, trained_through=1000,
                             config_hash="abc", metrics={"ndcg@10": 0.1})
    registry.set_alias(CHAMPION, info.version)
    assert info.checkpoint_path.is_relative_to(storage / "registered" / "m")
    assert not info.checkpoint_path.is_relative_to(storage / "job")

    # the run resumes under the same name and Ray's num_to_keep=1 rotates the old checkpoint out
    _fake_checkpoint(storage / "job" / "checkpoint_000002", b"newer-weights")
    shutil.rmtree(first)

    champion = resolve_model("models:/m@champion", uri)
    assert champion.version == info.version
    assert (champion.checkpoint_path / "model.pt").read_bytes() == b"champion-weights"
    assert champion.tags["metric.ndcg_at_10"] == "0.1"
    assert champion.tags["matryoshka_sizes"] == "32,128,512"  # the version says which sizes it serves


def test_a_retrain_whose_training_dies_changes_nothing(prepared_dir, tmp_path, monkeypatch):
    """New data is there and the challenger starts training, which dies (as `TorchTrainer.fit()` raises when a
    worker dies and no retries are left): the retrain fails with that error and touches nothing. No new version,
    no alias moved, the champion's pinned checkpoint byte for byte as it was, the lock released."""
    import hashlib

    from mlflow.tracking import MlflowClient

    import training.driver
    from training.job_config import build_config
    from pipeline.sources import load_manifest
    from training.registry import CHALLENGER, CHAMPION, ModelRegistry
    from training.retrain.run import lock_path, run_retrain

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    job = build_config("tiny", [f"data.prepared_dir={prepared_dir}", f"train.storage_path={tmp_path / 'runs'}",
                                f"tracking.tracking_uri={uri}", "retrain.steps=5", "retrain.metric=mrr"])
    cut = load_manifest(prepared_dir)["watermark"] - 10 * 86400  # the champion saw all but the last 10 days
    source = _fake_checkpoint(tmp_path / "runs" / "job" / "checkpoint_000001", b"champion-weights")
    (source / "state.json").write_text(json.dumps({"config": job.to_dict(), "watermark": cut}))
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("e")).info.run_id
    registry = ModelRegistry(uri, job.tracking.registered_model, job.train.storage_path)
    champion = registry.register(run_id=run_id, checkpoint_path=source, data_watermark=cut, trained_through=cut,
                                 config_hash="abc", metrics={"mrr": 0.01})
    registry.set_alias(CHAMPION, champion.version)

    def digest(directory: Path) -> dict[str, str]:
        return {str(f.relative_to(directory)): hashlib.sha256(f.read_bytes()).hexdigest()
                for f in sorted(directory.rglob("*")) if f.is_file()}

    pinned = digest(champion.checkpoint_path)
    started: list[str] = []

    def training_dies(challenger_job, log=print, splits=None):
        started.append(challenger_job.train.init_checkpoint)
        assert lock_path(job).exists()  # the retrain holds its lock while it trains
        raise RuntimeError("Training failed due to worker errors: the actor died unexpectedly")

    monkeypatch.setattr(training.driver, "run_training", training_dies)
    lines: list[str] = []
    with pytest.raises(RuntimeError, match="worker errors"):
        run_retrain(job, log=lines.append)
    assert started == [str(champion.checkpoint_path)], lines  # it got as far as training, warm from the champion
    assert [v.version for v in registry.versions()] == [champion.version]
    assert registry.get(CHAMPION).version == champion.version and registry.get(CHALLENGER) is None
    assert digest(champion.checkpoint_path) == pinned
    assert not lock_path(job).exists()


# --------------------------------------------------------------------------- the scheduled commands


def _scheduled_entrypoints() -> list[list[str]]:
    """The `python -m jobs.retrain ...` argv of the CronJob and of the crontab line."""
    import shlex

    import yaml

    deploy = Path(__file__).resolve().parents[2] / "deploy"
    cronjob = yaml.safe_load((deploy / "retrain-cronjob.yaml").read_text())
    (container,) = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    argv = container["command"] + container.get("args", [])
    line = next(l for l in (deploy / "crontab.example").read_text().splitlines() if l.strip() and not l.startswith("#"))
    tokens = shlex.split(line)
    tokens = tokens[: tokens.index(">>")]
    return [argv[argv.index("--") + 1 :], tokens[tokens.index("--") + 1 :]]


@pytest.mark.parametrize("which", [0, 1], ids=["cronjob", "crontab"])
def test_scheduled_commands_are_valid_retrain_invocations(which: int):
    from jobs.cli import config_from_args
    from jobs.retrain import build_parser

    entrypoint = _scheduled_entrypoints()[which]
    assert entrypoint[:3] == ["python", "-m", "jobs.retrain"]
    args = build_parser().parse_args(entrypoint[3:])
    job = config_from_args(args)  # every --set key exists and type-checks
    assert args.prepare, "a scheduled retrain must pick up the new raw data"
    for path in (job.data.raw_dir, job.data.prepared_dir, job.train.storage_path):
        assert Path(path).is_absolute(), f"{path}: the job runs in an uploaded copy, relative paths break"

"""The MLflow wrapper against a real SQLite-backed MLflow: experiments are model-training experiments."""
from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient

from training.config import TrackingConfig
from training.tracking import EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND, Tracker


def _config(tmp_path: Path, name: str = "mmrec") -> TrackingConfig:
    return TrackingConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment=name,
                          artifact_root=str(tmp_path / "artifacts"))


def test_a_created_experiment_is_a_model_training_experiment(tmp_path: Path):
    cfg = _config(tmp_path)
    tracker = Tracker.start(cfg, "run-a")
    experiment = MlflowClient(cfg.tracking_uri).get_experiment_by_name("mmrec")
    assert experiment.tags[EXPERIMENT_KIND_TAG] == "custom_model_development" == MODEL_TRAINING_KIND
    assert experiment.artifact_location == (tmp_path / "artifacts").resolve().as_uri()
    assert MlflowClient(cfg.tracking_uri).get_run(tracker.run_id).info.experiment_id == experiment.experiment_id


def test_an_existing_experiment_without_a_kind_gets_it_and_a_chosen_kind_is_kept(tmp_path: Path):
    cfg = _config(tmp_path, "old")
    client = MlflowClient(cfg.tracking_uri)
    old_id = client.create_experiment("old", artifact_location=(tmp_path / "a").as_uri())
    assert EXPERIMENT_KIND_TAG not in client.get_experiment(old_id).tags
    Tracker.start(cfg, "run-b")
    assert client.get_experiment(old_id).tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND

    chosen = _config(tmp_path, "chosen")
    chosen_id = client.create_experiment("chosen", artifact_location=(tmp_path / "b").as_uri(),
                                         tags={EXPERIMENT_KIND_TAG: "genai_development"})
    Tracker.start(chosen, "run-c")
    assert client.get_experiment(chosen_id).tags[EXPERIMENT_KIND_TAG] == "genai_development"

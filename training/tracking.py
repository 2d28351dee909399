"""The one place that talks to MLflow. Side effects happen on rank 0 / the driver only.

Tracking URI: `tracking.tracking_uri`, else $MLFLOW_TRACKING_URI, else a SQLite file in the working directory.
Experiments get an absolute artifact location (relative ones land in Ray's temporary session folders) and are
marked as model-training experiments (`EXPERIMENT_KIND_TAG`), so the MLflow 3 UI opens them in its training view
(runs, metrics, models) and not in its GenAI view (traces, prompts).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from training.config import TrackingConfig


# MLflow 3's UI reads an experiment's kind from this tag (no Python constant exists for it in mlflow 3.17; the
# values are the UI's `ExperimentKind` enum). Without the tag the UI guesses the kind, or asks, from what it finds.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"


def resolve_tracking_uri(cfg: TrackingConfig) -> str:
    uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    return uri or f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def ensure_training_experiment(client, cfg: TrackingConfig) -> str:
    """The id of experiment `cfg.experiment`, created if missing, marked as a model-training experiment.

    An existing experiment without a kind (made by an older version of this product) gets the tag; one a person
    deliberately set to another kind in the UI keeps it.
    """
    experiment = client.get_experiment_by_name(cfg.experiment)
    if experiment is None:
        location = Path(cfg.artifact_root).resolve().as_uri()
        return client.create_experiment(cfg.experiment, artifact_location=location,
                                        tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND})
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
    return experiment.experiment_id


class Tracker:
    """Thin wrapper around `MlflowClient` for one run (works from any process given the run id)."""

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.client = MlflowClient(tracking_uri=tracking_uri)

    @classmethod
    def start(cls, cfg: TrackingConfig, run_name: str, tags: dict[str, str] | None = None) -> "Tracker":
        """Create the run, or resume the unfinished run with the same `run_name` (a resumed Ray run)."""
        from mlflow.tracking import MlflowClient

        uri = resolve_tracking_uri(cfg)
        client = MlflowClient(tracking_uri=uri)
        experiment_id = ensure_training_experiment(client, cfg)
        existing = client.search_runs(
            [experiment_id], filter_string=f"tags.ray_run_name = '{run_name}' and attributes.status != 'FINISHED'"
        )
        if existing:
            run_id = existing[0].info.run_id
            client.update_run(run_id, status="RUNNING")
        else:
            all_tags = {"ray_run_name": run_name, "mlflow.runName": run_name, **(tags or {})}
            run_id = client.create_run(experiment_id, tags=all_tags, run_name=run_name).info.run_id
        return cls(uri, run_id)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        fresh = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
        for start in range(0, len(fresh), 100):
            self.client.log_batch(self.run_id, params=fresh[start : start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric
        import time

        now = int(time.time() * 1000)
        batch = [
            Metric(k.replace("@", "_at_"), float(v), now, step or 0)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and v == v
        ]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def log_dict(self, payload: Any, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, payload, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def metric_key(name: str) -> str:
    """MLflow metric names may not contain '@': recall@10 -> recall_at_10."""
    return name.replace("@", "_at_")


def write_json(payload: Any, directory: Path | None = None, name: str = "payload.json") -> Path:
    directory = directory or Path(tempfile.mkdtemp())
    path = directory / name
    path.write_text(json.dumps(payload, indent=2, default=str))
    return path

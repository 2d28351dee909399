"""`python -m jobs.prepare` + `python -m jobs.train --preset tiny` as a user runs them, checked in MLflow."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]


def test_tiny_job_end_to_end(raw_data_dir, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(REPO)}
    common = ["--set", f"data.raw_dir={raw_data_dir}", "--set", f"data.prepared_dir={tmp_path / 'prepared'}"]
    prepare = subprocess.run([sys.executable, "-m", "jobs.prepare", "--preset", "tiny", *common], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)
    assert prepare.returncode == 0, prepare.stderr[-3000:]
    assert "items_without_image: 30" in prepare.stdout
    train = subprocess.run(
        [sys.executable, "-m", "jobs.train", "--preset", "tiny", *common, "--set", "train.epochs=1",
         "--set", "train.max_steps_per_epoch=30", "--set", f"tracking.artifact_root={tmp_path / 'artifacts'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert train.returncode == 0, (train.stdout + train.stderr)[-4000:]
    assert "ndcg@10" in train.stdout and "samples/s" in train.stdout + train.stderr
    # each worker progress line reaches the driver's output once (Ray Train's print patch doubled them)
    assert (train.stdout + train.stderr).count("[train] memory bank filled with") == 1
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("mmrec").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    for key in ("test_recall_at_10", "test_ndcg_at_10", "test_mrr"):
        assert 0.0 <= run.data.metrics[key] <= 1.0
    assert run.data.params["preset"] if "preset" in run.data.params else run.data.tags["preset"] == "tiny"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.json", "data_report.json"} <= artifacts

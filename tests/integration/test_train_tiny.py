"""A real 2-worker TorchTrainer run of the tiny preset (DDP on CPU), tracked in MLflow, then resumed."""
import math

import pytest

from jobs.config import build_config

pytestmark = pytest.mark.integration


def test_two_worker_tiny_run(ray_cluster, prepared_dir, tmp_path):
    from mlflow.tracking import MlflowClient

    from training.driver import run_training

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [
        f"data.prepared_dir={prepared_dir}",
        "data.max_users=60",
        "train.num_workers=2",
        "train.epochs=1",
        "train.max_steps_per_epoch=8",
        "train.batch_size=64",
        f"train.storage_path={tmp_path / 'runs'}",
        "train.run_name=ddp",
        "memory.fill_with_ray_data=true",  # the LEMUR recipe's batch-inference fill, feeding two workers
        f"tracking.tracking_uri={uri}",
        f"tracking.artifact_root={tmp_path / 'artifacts'}",
    ]
    outcome = run_training(build_config("tiny", overrides), log=lambda *_: None)
    for key in ("test_recall@10", "test_ndcg@10", "test_mrr", "val_ndcg@10", "samples_per_s"):
        assert math.isfinite(outcome.metrics[key]), key
    assert 0.0 <= outcome.metrics["test_ndcg@10"] <= 1.0
    assert outcome.metrics["global_step"] == 8
    assert outcome.metrics["bank_coverage"] == pytest.approx(1.0)  # the catalogue pass filled the bank first
    assert outcome.metrics["bank_filled_by_ray_data"] == 1.0  # by Ray Data actors, not by rank 0
    assert outcome.checkpoint_path and (tmp_path / "runs" / "ddp").is_dir()
    run = MlflowClient(uri).get_run(outcome.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.num_workers"] == "2"
    assert "test_ndcg_at_10" in run.data.metrics and "val_ndcg_at_10" in run.data.metrics

    # Same run name again: Ray Train hands the latest checkpoint back and the loop resumes after epoch 1.
    resumed = run_training(build_config("tiny", [*overrides, "train.epochs=2"]), log=lambda *_: None)
    assert resumed.metrics["epoch"] == 2 and resumed.metrics["global_step"] == 16
    assert resumed.metrics["resumed_from_epoch"] == 1
    assert resumed.metrics["bank_restored_exact"] == 1.0  # the bank came back exactly as checkpointed
    assert resumed.metrics["bank_filled_by_ray_data"] == 0.0  # restored from the checkpoint, not refilled

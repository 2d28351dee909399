"""Shared fixtures: the real ml100k_mm data and one Ray cluster per test session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("MMREC_TEST_DATA", REPO_ROOT.parent / "shared" / "data" / "ml100k_mm")).resolve()


@pytest.fixture(scope="session")
def raw_data_dir() -> Path:
    if not (DATA_DIR / "interactions.csv").exists():
        pytest.fail(f"real test data not found at {DATA_DIR}; set MMREC_TEST_DATA")
    return DATA_DIR


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for every integration test (start-up costs seconds; see RAY_NOTES)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=4,  # logical CPUs: leaves room for Ray Data's listing task beside 2 train workers
            include_dashboard=False,
            namespace="mmrec-tests",
            logging_level="WARNING",
            runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)}},
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def prepared_dir(raw_data_dir, tmp_path_factory) -> Path:
    """The real ml100k_mm, prepared once per test session (about 3 s)."""
    from pipeline.config import DataConfig
    from pipeline.sources import prepare_dataset

    out = tmp_path_factory.mktemp("prepared") / "ml100k_mm"
    prepare_dataset(DataConfig(), raw_data_dir, out)
    return out

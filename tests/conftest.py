"""Shared fixtures: the real ml100k_mm data and one Ray cluster per test session."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("MMREC_TEST_DATA", REPO_ROOT.parent / "shared" / "data" / "ml100k_mm")).resolve()


@pytest.fixture(scope="session")
def raw_data_dir() -> Path:
    if not (DATA_DIR / "interactions.csv").exists():
        pytest.fail(f"real test data not found at {DATA_DIR}; set MMREC_TEST_DATA")
    return DATA_DIR


def read_raw_csv(path: Path):
    """A raw CSV for a test to read or rewrite, cells as `pipeline.raw_input` reads them: every cell a string, an
    empty cell the empty string (not NaN)."""
    import pandas as pd

    return pd.read_csv(path, dtype=str, keep_default_na=False)


def copy_real_slice(raw_data_dir: Path, root: Path, num_items: int, num_users: int = 0) -> Path:
    """A raw dataset in `root` made of ml100k_mm's items 1..num_items (rows and posters) and the interactions
    naming them (only the first `num_users` users' when > 0): real data, small enough for one fault each."""
    (root / "images").mkdir(parents=True)
    items = read_raw_csv(raw_data_dir / "items.csv")
    items = items[items.item_id.astype(int) <= num_items]
    items.to_csv(root / "items.csv", index=False)
    for rel in items.image:
        if rel:
            shutil.copyfile(raw_data_dir / rel, root / rel)
    interactions = read_raw_csv(raw_data_dir / "interactions.csv")
    interactions = interactions[interactions.item_id.astype(int) <= num_items]
    if num_users:
        users = sorted(interactions.user_id.astype(int).unique())[:num_users]
        interactions = interactions[interactions.user_id.astype(int).isin(users)]
    interactions.to_csv(root / "interactions.csv", index=False)
    return root


@pytest.fixture(scope="session")
def real_slice(raw_data_dir, tmp_path_factory):
    """`real_slice(name, num_items, num_users=0, root=None)` -> a new raw dataset directory (see
    `copy_real_slice`) at `root`, or in a new temporary directory named after `name`."""
    def make(name: str, num_items: int, num_users: int = 0, root: Path | None = None) -> Path:
        return copy_real_slice(raw_data_dir, root or tmp_path_factory.mktemp(name), num_items, num_users)
    return make


@pytest.fixture(scope="session")
def pristine_slice(real_slice) -> Path:
    """Items 1..200 with their images, and every interaction naming them (about 30k rows), copied once: the slice
    of tests/unit/raw_slice.py that the bad-input and data-safety-read tests damage."""
    from tests.unit.raw_slice import NUM_ITEMS

    return real_slice("ml100k_slice", NUM_ITEMS)


@pytest.fixture
def raw(pristine_slice: Path, tmp_path: Path) -> Path:
    """A private copy of `pristine_slice` that a test may damage (modules with a slice of their own override it)."""
    return Path(shutil.copytree(pristine_slice, tmp_path / "raw"))


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


SERVING_SIZES = (8, 16, 32)  # the tiny model's Matryoshka sizes in the serving tests (tiny's model.dim is 32)


def train_tiny_checkpoint(prepared: Path, directory: Path, *, steps: int = 12, num_items: int | None = None,
                          overrides: tuple[str, ...] = ()) -> Path:
    """A real tiny checkpoint (model.pt + state.json, as a training run writes them): the `tiny` preset with
    Matryoshka sizes 8/16/32 and id embeddings, trained `steps` steps in process (plain trainer, no Ray) on decoded
    ml100k_mm batches. num_items < the catalogue: a checkpoint trained before the rest of the items existed."""
    import numpy as np
    import torch

    from memory.local import LocalMemoryBankClient
    from pipeline.content import ItemContentDecoder
    from pipeline.sequences import item_popularity
    from pipeline.sources import ITEMS_FILE, load_manifest
    from pipeline.splits import build_splits
    from training.checkpoint import save_checkpoint
    from training.job_config import build_config
    from training.offline_eval import content_spec_of
    from training.trainer import build_trainer

    sizes = ",".join(map(str, SERVING_SIZES))
    job = build_config("tiny", [f"data.prepared_dir={prepared}", f"model.matryoshka_sizes=[{sizes}]",
                                "model.use_id_embedding=true", "model.dropout=0.0", *overrides])
    manifest = load_manifest(prepared)
    num_items = num_items or int(manifest["num_items"])
    splits = build_splits(job.data, prepared)
    keep = (splits.train.target <= num_items) & (splits.train.history <= num_items).all(axis=1)
    spec = content_spec_of(job)
    decoder = ItemContentDecoder(str(prepared / ITEMS_FILE), "target", spec.image_size, spec.tokenizer_path,
                                 spec.max_length)
    torch.manual_seed(0)
    np.random.seed(0)
    trainer = build_trainer(job, num_items, item_popularity(splits.train, num_items),
                            LocalMemoryBankClient(capacity=num_items + 1, dim=job.model.dim))
    rows = np.flatnonzero(keep)
    batches = []
    for start in range(0, min(len(rows), 4 * 64), 64):
        picked = rows[start:start + 64]
        raw = decoder({"target": splits.train.target[picked], "history": splits.train.history[picked],
                       "rating": splits.train.rating[picked], "user": splits.train.user[picked]})
        batches.append({k: torch.as_tensor(v) for k, v in raw.items()})
    trainer.train_epoch(iter(batches * (steps // len(batches) + 1)), max_steps=steps)
    directory.mkdir(parents=True)
    save_checkpoint(directory, trainer.model, trainer.optimizer, {
        "config": job.to_dict(), "num_items": num_items, "matryoshka_sizes": list(SERVING_SIZES),
        "watermark": int(manifest["watermark"]), "epoch": 0, "global_step": steps,
    })
    return directory


@pytest.fixture(scope="session")
def tiny_checkpoint(prepared_dir, tmp_path_factory) -> Path:
    """`train_tiny_checkpoint` on the prepared ml100k_mm (once per test session)."""
    return train_tiny_checkpoint(prepared_dir, tmp_path_factory.mktemp("serving") / "checkpoint")

"""The Ray Data stages turn real posters and plot text into the batch shapes the workers expect."""
import numpy as np
import pytest

from encoders.config import resolve_text_model_path
from pipeline.config import DataConfig
from pipeline.sequences import leave_one_out
from pipeline.sources import ITEMS_FILE, read_interactions
from pipeline.stages import ContentSpec, catalog_dataset, read_examples, train_dataset, write_examples

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def spec() -> ContentSpec:
    return ContentSpec(image_size=40, max_length=20, tokenizer_path=resolve_text_model_path("minilm"))


def test_train_stream_batches_have_content(ray_cluster, prepared_dir, tmp_path, spec):
    interactions = read_interactions(prepared_dir)
    train = leave_one_out(interactions[interactions.user_index < 10], max_history=8).train
    path = write_examples(train, tmp_path / "train.parquet")
    assert np.array_equal(read_examples(path).history, train.history)
    # materialized once here (the workers stream it) so the three checks below do not decode three times
    ds = train_dataset(path, prepared_dir / ITEMS_FILE, DataConfig(), spec, batch_size=32).materialize()
    batch = ds.take_batch(64, batch_format="numpy")
    assert batch["image"].shape == (64, 3, 40, 40) and batch["image"].dtype == np.uint8
    assert batch["input_ids"].shape == (64, 20) and batch["attention_mask"].shape == (64, 20)
    assert batch["history"].shape == (64, 8)
    assert batch["image_mask"].dtype == bool and batch["image_mask"].mean() > 0.9  # 0.5% of items lack posters
    assert batch["text_mask"].all()
    # the shuffle keeps every example exactly once
    assert ds.count() == len(train)
    assert sorted(r["target"] for r in ds.select_columns(["target"]).take_all()) == sorted(train.target.tolist())


def test_catalog_stream_covers_every_item_and_masks_missing_posters(ray_cluster, prepared_dir, spec):
    rows = catalog_dataset(prepared_dir / ITEMS_FILE, DataConfig(), spec, batch_size=256).take_all()
    assert len(rows) == 1682
    assert sorted(r["item_index"] for r in rows) == list(range(1, 1683))
    missing = [r for r in rows if not r["image_mask"]]
    assert len(missing) == 30  # the dataset README: 30 items have no poster
    assert all(not r["image"].any() for r in missing)

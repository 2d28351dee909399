"""The Ray Data stages turn real posters and plot text into the batch shapes the workers expect."""
import numpy as np
import pytest

from encoders.config import resolve_text_model_path
from pipeline.config import DataConfig
from pipeline.sequences import leave_one_out
from pipeline.sources import ITEMS_FILE, read_interactions
from pipeline.content import ContentSpec, decoded_catalog_bytes, read_examples, write_examples
from pipeline.stages import catalog_dataset, decoded_catalog_dataset, train_dataset

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


@pytest.fixture(scope="module")
def catalog_rows(ray_cluster, prepared_dir, spec) -> list[dict]:
    """The Ray Data catalogue pass, in item order."""
    rows = catalog_dataset(prepared_dir / ITEMS_FILE, DataConfig(), spec, batch_size=256).take_all()
    return sorted(rows, key=lambda row: row["item_index"])


def test_catalog_stream_covers_every_item_and_masks_missing_posters(catalog_rows):
    assert [r["item_index"] for r in catalog_rows] == list(range(1, 1683))
    missing = [r for r in catalog_rows if not r["image_mask"]]
    assert len(missing) == 30  # the dataset README: 30 items have no poster
    assert all(not r["image"].any() for r in missing)


def test_driver_decoded_catalog_equals_the_ray_data_pass(catalog_rows, prepared_dir, spec):
    ds = decoded_catalog_dataset(prepared_dir / ITEMS_FILE, DataConfig(), spec, batch_size=256)
    assert ds.num_blocks() == 7  # ceil(1682 / 256): the workers iterate it in eval-sized blocks
    batches = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
    assert batches[0]["image"].shape == (256, 3, 40, 40) and batches[0]["image"].dtype == np.uint8
    assert batches[0]["input_ids"].shape == (256, 20) and batches[0]["input_ids"].dtype == np.int64
    rows = sorted(ds.take_all(), key=lambda row: row["item_index"])
    assert len(rows) == len(catalog_rows) == 1682
    for name in ("item_index", "image", "image_mask", "input_ids", "attention_mask", "text_mask"):
        assert all(np.array_equal(a[name], b[name]) for a, b in zip(rows, catalog_rows)), name
    # what the driver holds for it: 1,682 x (3*40*40 pixels + 2*8*20 token bytes + 2 mask bytes)
    assert decoded_catalog_bytes(1682, spec) == 1682 * (4800 + 320 + 2)


def test_a_seeded_shuffle_repeats_across_runs_and_changes_across_epochs(ray_cluster, prepared_dir, tmp_path, spec):
    interactions = read_interactions(prepared_dir)
    path = write_examples(leave_one_out(interactions[interactions.user_index < 40], max_history=8).train,
                          tmp_path / "train.parquet")

    def epochs(seed, passes: int = 2) -> list[list[int]]:
        # ids only (decode=False): the order is the shuffle's, the same with content decoded
        ds = train_dataset(path, prepared_dir / ITEMS_FILE, DataConfig(), spec, batch_size=32, decode=False, seed=seed)
        return [[int(t) for b in ds.iter_batches(batch_size=256) for t in b["target"]] for _ in range(passes)]

    first, second = epochs(3)
    assert len(first) > 1000 and sorted(first) == sorted(second)
    assert first != second  # a new order every epoch
    assert epochs(3) == [first, second]  # a new dataset of the same seed: the same two orders
    assert epochs(4, passes=1)[0] != first
    assert epochs(None, passes=1)[0] != epochs(None, passes=1)[0]  # unseeded: a fresh order every run

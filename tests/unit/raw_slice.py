"""The 200-item slice of ml100k_mm that the bad-input and data-safety-read tests damage, and the helpers that
prepare it and read it back (its fixtures, `pristine_slice` and `raw`, are in tests/conftest.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from pipeline.config import DataConfig
from pipeline.sources import ITEMS_FILE, REPORT_FILE, prepare_dataset
from tests.conftest import read_raw_csv

NUM_ITEMS = 200


def prepare_slice(raw: Path, tmp_path: Path, **overrides) -> tuple[dict, Path]:
    out = tmp_path / "prepared"
    prepare_dataset(DataConfig(**overrides), raw, out)
    return json.loads((out / REPORT_FILE).read_text()), out


def slice_items(raw: Path) -> pd.DataFrame:
    return read_raw_csv(raw / "items.csv")


def slice_interactions(raw: Path) -> pd.DataFrame:
    return read_raw_csv(raw / "interactions.csv")


def slice_image_path(raw: Path, item_id: int) -> Path:
    items = slice_items(raw)
    return raw / items.loc[items.item_id == str(item_id), "image"].item()


def prepared_item(out: Path, item_id: int) -> dict:
    table = pq.read_table(out / ITEMS_FILE).to_pandas()
    return table[table.item_id == str(item_id)].iloc[0].to_dict()

"""Nothing lost, nothing clobbered: a prepare that fails or crashes mid-way leaves the previous prepared data usable.

`prepare_dataset` writes into a staging folder and swaps it in with two renames (old -> `<out>.old`,
staging -> out). Failures are injected into the real writer (pyarrow) and into the swap itself.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipeline.config import DataConfig
from pipeline.sources import ITEMS_FILE, MANIFEST_FILE, load_manifest, prepare_dataset, read_interactions
from tests.conftest import read_raw_csv

NUM_ITEMS = 60


@pytest.fixture
def raw(real_slice, tmp_path: Path) -> Path:
    """Items 1..60 of ml100k_mm with their images and the interactions naming them."""
    return real_slice("raw", NUM_ITEMS, root=tmp_path / "raw")


def _fingerprint(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _grow_catalogue(raw: Path) -> None:
    """A newer raw dump: rows in reverse order plus one new item (index stability is what is at stake)."""
    items = read_raw_csv(raw / "items.csv")
    new_item = items.iloc[[0]].assign(item_id="5000", title="A New Film (1999)")
    pd.concat([items.iloc[::-1], new_item]).to_csv(raw / "items.csv", index=False)
    interactions = read_raw_csv(raw / "interactions.csv")
    extra = interactions.head(5).assign(item_id="5000", timestamp="893286638")
    pd.concat([interactions, extra]).to_csv(raw / "interactions.csv", index=False)


def _index_of(out: Path) -> dict[str, int]:
    table = pq.read_table(out / ITEMS_FILE, columns=["item_id", "item_index"]).to_pandas()
    return dict(zip(table.item_id, table.item_index))


def test_writer_failure_mid_prepare_leaves_previous_prepared_dir_intact(raw, tmp_path, monkeypatch):
    out = tmp_path / "prepared"
    prepare_dataset(DataConfig(), raw, out)
    before = _fingerprint(out)
    assert len(before) > 10  # items + many day partitions + report + manifest

    _grow_catalogue(raw)
    real_write_table = pq.write_table
    calls = []

    def failing_write_table(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 3:  # items.parquet and one day partition written, then the disk "fails"
            raise OSError("injected: no space left on device")
        return real_write_table(*args, **kwargs)

    monkeypatch.setattr(pq, "write_table", failing_write_table)
    with pytest.raises(OSError, match="injected"):
        prepare_dataset(DataConfig(), raw, out)
    monkeypatch.undo()

    assert len(calls) == 3
    assert _fingerprint(out) == before  # byte for byte the previous dataset
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared", "raw"]  # no staging or backup left behind
    assert load_manifest(out)["num_items"] == NUM_ITEMS

    prepare_dataset(DataConfig(), raw, out)  # the retry succeeds and keeps the old indices
    index = _index_of(out)
    assert index["1"] == 1 and index[str(NUM_ITEMS)] == NUM_ITEMS and index["5000"] == NUM_ITEMS + 1


def test_crash_between_the_two_renames_is_recovered_with_stable_item_indices(raw, tmp_path, monkeypatch):
    out = tmp_path / "prepared"
    prepare_dataset(DataConfig(), raw, out)
    before = _fingerprint(out)
    _grow_catalogue(raw)

    real_replace = os.replace

    def crash_on_swap_in(src, dst):
        if Path(dst) == out:  # the second rename: staging -> out
            raise OSError("injected: killed between renames")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_swap_in)
    with pytest.raises(OSError, match="between renames"):
        prepare_dataset(DataConfig(), raw, out)
    monkeypatch.undo()
    backup = out.with_name("prepared.old")
    assert not out.exists() and _fingerprint(backup) == before  # the state a kill at that instant leaves

    report = prepare_dataset(DataConfig(), raw, out)  # the next run puts the old one back, then builds on it
    assert not backup.exists()
    index = _index_of(out)
    # without the recovery the reversed rows would have been numbered afresh: item "60" would get index 1
    assert all(index[str(i)] == i for i in range(1, NUM_ITEMS + 1))
    assert index["5000"] == NUM_ITEMS + 1
    assert report.interactions_kept == len(read_interactions(out))
    assert json.loads((out / MANIFEST_FILE).read_text())["num_items"] == NUM_ITEMS + 1

"""Bad raw input on a real slice of ml100k_mm: every fault is a clear early error or a counted skip/placeholder.

Each test copies the first 200 items (rows, image files) and the interactions naming them into tmp_path,
injects one kind of fault, runs `prepare_dataset`, and checks the data report and the written tables.
"""
from __future__ import annotations

import io
import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import DataConfig
from pipeline.decode import IMAGE_CORRUPT, IMAGE_MISSING, IMAGE_OK, IMAGE_TOO_LARGE, check_image_bytes
from pipeline.sources import MANIFEST_FILE, DataError, prepare_dataset, read_interactions, report_metrics
from tests.conftest import read_raw_csv
from tests.unit.raw_slice import (
    NUM_ITEMS, prepare_slice, prepared_item, slice_image_path, slice_interactions, slice_items,
)


def png_header(width: int, height: int) -> bytes:
    """A valid PNG whose header claims width x height pixels: a decompression bomb to any decoder that trusts it."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_clean_slice_has_nothing_to_report(raw, tmp_path):
    report, out = prepare_slice(raw, tmp_path)
    interactions = slice_interactions(raw)
    assert report["items_total"] == NUM_ITEMS
    assert report["interactions_total"] == report["interactions_kept"] == len(interactions) > 20_000
    for key in ("images_corrupt", "images_too_large", "images_file_missing", "items_empty_text",
                "items_text_not_utf8", "items_with_problem", "interactions_unknown_item", "interactions_duplicate",
                "interactions_bad_timestamp"):
        assert report[key] == 0, key
    assert len(read_interactions(out)) == len(interactions)


def test_corrupt_truncated_and_non_image_bytes_become_placeholders(raw, tmp_path):
    good = slice_image_path(raw, 5).read_bytes()
    slice_image_path(raw, 5).write_bytes(good[: len(good) // 2])  # truncated JPEG: header fine, scan data cut
    slice_image_path(raw, 6).write_bytes(good[:20] + b"\x00" * 500)  # JPEG magic, garbage after it
    slice_image_path(raw, 7).write_bytes(b"<html><body>404 not found</body></html>")  # not an image at all
    report, out = prepare_slice(raw, tmp_path)

    assert report["images_corrupt"] == 3
    assert report["items_with_problem"] == 3 and report["items_without_any_content"] == 0
    assert sorted(report["examples"]["corrupt_image"]) == ["5", "6", "7"]
    for item_id in (5, 6, 7):
        row = prepared_item(out, item_id)
        assert row["image"] is None and row["image_status"] == IMAGE_CORRUPT
        assert row["text_status"] == "ok" and row["text"]  # the item keeps its text and its interactions
    assert prepared_item(out, 8)["image_status"] == IMAGE_OK
    kept = read_interactions(out)
    assert (kept.item_id == "5").sum() == (slice_interactions(raw).item_id == "5").sum() > 0
    assert report["interactions_kept"] == report["interactions_total"]


def test_missing_image_file_is_counted_apart_from_items_without_an_image(raw, tmp_path):
    slice_image_path(raw, 9).unlink()
    report, out = prepare_slice(raw, tmp_path)
    assert report["images_file_missing"] == 1
    assert report["examples"]["image_file_missing"] == ["9"]
    assert report["items_with_problem"] == 1
    baseline_without_image = (slice_items(raw).image == "").sum()
    assert report["items_without_image"] == baseline_without_image  # catalogue rows naming no image: not a fault
    row = prepared_item(out, 9)
    assert row["image"] is None and row["image_status"] == IMAGE_MISSING


def test_decompression_bomb_header_is_refused_without_decoding(raw, tmp_path, monkeypatch):
    bomb = png_header(30_000, 30_000)  # 900 M pixels claimed in a ~100-byte file
    assert len(bomb) < 200
    slice_image_path(raw, 10).write_bytes(bomb)
    # a real (blank) 3000 x 2000 JPEG, over a 5 M pixel limit; the catalogue posters are far below it
    Image.new("RGB", (3000, 2000)).save(slice_image_path(raw, 11), format="JPEG")
    monkeypatch.setattr(DataConfig, "max_image_pixels", 5_000_000)  # a fixed limit (40 M pixels), lowered here
    report, out = prepare_slice(raw, tmp_path)
    assert report["images_too_large"] == 2
    assert prepared_item(out, 10)["image_status"] == IMAGE_TOO_LARGE
    assert prepared_item(out, 11)["image_status"] == IMAGE_TOO_LARGE
    assert check_image_bytes(bomb, 10**12) == IMAGE_TOO_LARGE  # PIL's own bomb guard still applies


def test_empty_or_whitespace_text_is_masked_and_an_item_without_any_content_is_counted(raw, tmp_path):
    items = slice_items(raw)
    for item_id, blank in (("12", ""), ("13", "   \t ")):
        for column in ("title", "genres", "description"):
            items.loc[items.item_id == item_id, column] = blank
    items.to_csv(raw / "items.csv", index=False)
    slice_image_path(raw, 13).unlink()  # item 13: neither text nor image
    report, out = prepare_slice(raw, tmp_path)
    assert report["items_empty_text"] == 2
    assert report["items_without_any_content"] == 1
    assert report["items_with_problem"] == 2  # item 13 has two problems but is one item
    assert prepared_item(out, 12)["text_status"] == "empty" and prepared_item(out, 12)["image_status"] == IMAGE_OK
    assert prepared_item(out, 13)["text"] == ""


def test_non_utf8_bytes_in_items_csv_are_replaced_and_counted(raw, tmp_path):
    items = slice_items(raw)
    title = items.loc[items.item_id == "14", "title"].item()
    items.loc[items.item_id == "14", "title"] = "CAFE_MARKER " + title
    data = items.to_csv(index=False).encode("utf-8").replace(b"CAFE_MARKER", b"Caf\xe9")  # latin-1, invalid UTF-8
    (raw / "items.csv").write_bytes(data)
    with pytest.raises(UnicodeDecodeError):
        data.decode("utf-8")
    report, out = prepare_slice(raw, tmp_path)
    assert report["items_text_not_utf8"] == 1
    assert report["examples"]["text_not_utf8"] == ["14"]
    text = prepared_item(out, 14)["text"]
    assert "\ufffd" not in text and text.startswith("Caf ") and title in text


def test_interactions_naming_unknown_items_are_dropped_and_counted(raw, tmp_path):
    interactions = slice_interactions(raw)
    extra = interactions.head(40).assign(item_id=["99999", "abc"] * 20)
    pd.concat([interactions, extra]).to_csv(raw / "interactions.csv", index=False)
    report, out = prepare_slice(raw, tmp_path)
    assert report["interactions_unknown_item"] == 40
    assert set(report["examples"]["unknown_item_ids"]) == {"99999", "abc"}
    assert report["interactions_kept"] == len(interactions)
    assert set(read_interactions(out).item_id.astype(int)) <= set(range(1, NUM_ITEMS + 1))


def test_duplicate_interaction_and_item_rows_are_dropped_and_counted(raw, tmp_path):
    interactions = slice_interactions(raw)
    pd.concat([interactions, interactions.iloc[100:125]]).to_csv(raw / "interactions.csv", index=False)
    items = slice_items(raw)
    pd.concat([items, items.iloc[[3]].assign(title="a second row for item 4")]).to_csv(raw / "items.csv", index=False)
    report, out = prepare_slice(raw, tmp_path)
    assert report["interactions_duplicate"] == 25
    assert report["items_duplicate_id"] == 1
    assert report["items_total"] == NUM_ITEMS
    assert "second row" not in prepared_item(out, 4)["text"]  # the first row wins
    assert len(read_interactions(out)) == len(interactions)


def test_missing_and_non_numeric_timestamps_are_dropped_and_counted(raw, tmp_path):
    interactions = slice_interactions(raw)
    interactions.loc[[0, 1, 2], "timestamp"] = ""
    interactions.loc[[3, 4], "timestamp"] = "yesterday"
    interactions.to_csv(raw / "interactions.csv", index=False)
    report, out = prepare_slice(raw, tmp_path)
    assert report["interactions_bad_timestamp"] == 5
    assert report["interactions_kept"] == len(interactions) - 5
    assert read_interactions(out).timestamp.dtype == np.int64


@pytest.mark.parametrize(
    ("table", "column"),
    [("interactions.csv", "timestamp"), ("interactions.csv", "user_id"), ("items.csv", "title"),
     ("items.csv", "image")],
)
def test_missing_required_column_fails_before_any_work_naming_it(raw, tmp_path, table, column):
    frame = read_raw_csv(raw / table)
    frame.drop(columns=[column]).to_csv(raw / table, index=False)
    shutil.rmtree(raw / "images")  # proves no image was opened: the schema check comes first
    with pytest.raises(DataError, match=rf"missing required column\(s\) \['{column}'\]") as error:
        prepare_dataset(DataConfig(), raw, tmp_path / "prepared")
    assert "data.source" in str(error.value)  # says how to map a differently named column
    assert not (tmp_path / "prepared").exists()


def test_item_error_budget_fails_with_counts_and_the_key_and_leaves_no_output(raw, tmp_path):
    for item_id in range(1, 51):  # 50 of 200 items = 25% corrupt
        slice_image_path(raw, item_id).write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=r"25\.0% of catalogue items \(50 of 200\).*data\.max_bad_fraction=0\.2"):
        prepare_dataset(DataConfig(), raw, tmp_path / "prepared")
    assert not (tmp_path / "prepared").exists()
    report, _ = prepare_slice(raw, tmp_path, max_bad_fraction=0.3)  # a wider budget accepts the same data
    assert report["images_corrupt"] == 50 and report_metrics(report)["data.bad_item_fraction"] == 0.25


def test_interaction_error_budget_counts_unknown_items_and_bad_timestamps(raw, tmp_path):
    interactions = slice_interactions(raw)
    n = len(interactions)
    k = int(0.09 * n)
    interactions.loc[interactions.index[:k], "timestamp"] = "n/a"  # 9%
    interactions.loc[interactions.index[n // 2 : n // 2 + k], "item_id"] = "424242"  # 9% more: 18% dropped
    interactions.to_csv(raw / "interactions.csv", index=False)
    with pytest.raises(DataError, match=r"of interactions were dropped .*data\.max_dropped_fraction=0\.15"):
        prepare_dataset(DataConfig(max_dropped_fraction=0.15), raw, tmp_path / "prepared")
    report, _ = prepare_slice(raw, tmp_path)  # the default budget (0.2) lets ~20% through
    dropped = report["interactions_unknown_item"] + report["interactions_bad_timestamp"]
    assert report_metrics(report)["data.dropped_interaction_fraction"] == pytest.approx(dropped / n)
    assert dropped == 2 * k and 0.15 < dropped / n <= 0.2


def test_report_metrics_are_flat_numbers_for_mlflow(raw, tmp_path):
    slice_image_path(raw, 20).write_bytes(b"garbage")
    report, out = prepare_slice(raw, tmp_path)
    metrics = report_metrics(report)
    assert metrics["data.images_corrupt"] == 1.0
    assert metrics["data.items_total"] == NUM_ITEMS
    assert metrics["data.bad_item_fraction"] == pytest.approx(1 / NUM_ITEMS)
    assert all(k.startswith("data.") and isinstance(v, float) for k, v in metrics.items())
    assert "data.examples" not in metrics
    assert json.loads((out / MANIFEST_FILE).read_text())["num_items"] == NUM_ITEMS


# --- the decode stage itself (a plain class: no Ray needed) ------------------------------------------------------

def _jpeg(raw_data_dir: Path, item_id: int) -> bytes:
    return (raw_data_dir / "images" / f"{item_id}.jpg").read_bytes()


def test_decoder_turns_bad_images_into_masks_never_dropped_rows(raw_data_dir, tmp_path):
    """Bytes that slipped past prepare (or a catalogue written by other tools) still never crash a batch."""
    from encoders.config import resolve_text_model_path
    from pipeline.content import ItemContentDecoder

    good = _jpeg(raw_data_dir, 1)
    images = [good, good[: len(good) // 2], b"not an image", png_header(30_000, 30_000), None]
    texts = ["Toy Story (1995). Animation", "GoldenEye (1995)", "Four Rooms (1995)", "   ", "Copycat (1995)"]
    table = pa.table({
        "item_index": pa.array(range(1, 6), pa.int64()),
        "text": pa.array(texts),
        "image": pa.array(images, pa.binary()),
    })
    pq.write_table(table, tmp_path / "items.parquet")
    decoder = ItemContentDecoder(str(tmp_path / "items.parquet"), "target", image_size=32,
                                 tokenizer_path=resolve_text_model_path("minilm"), max_length=16, cache_items=8)
    batch = {"target": np.array([1, 2, 3, 4, 5, 2]), "user": np.arange(6)}
    out = decoder(batch)

    assert out["image"].shape == (6, 3, 32, 32) and out["image"].dtype == np.uint8
    assert out["image_mask"].tolist() == [True, False, False, False, False, False]
    assert out["image"][0].std() > 0 and not out["image"][1:].any()  # masked rows are zeros
    assert out["text_mask"].tolist() == [True, True, True, False, True, True]
    assert out["input_ids"].shape == (6, 16)
    assert out["user"].tolist() == list(range(6))  # every row kept, in order
    assert decoder.decode_failures == 3  # truncated, garbage, bomb (missing is not a failure); item 2 cached

    with pytest.raises(ValueError, match=r"1 item ids unknown to the catalogue \(e\.g\. \[9\]\)"):
        decoder({"target": np.array([1, 9])})


def test_check_image_bytes_catches_truncation_that_verify_misses(raw_data_dir):
    good = _jpeg(raw_data_dir, 2)
    truncated = good[: len(good) // 2]
    with Image.open(io.BytesIO(truncated)) as img:
        img.verify()  # PIL's verify() passes a truncated JPEG: why prepare decodes at draft scale instead
    assert check_image_bytes(good, 40_000_000) == IMAGE_OK
    assert check_image_bytes(truncated, 40_000_000) == IMAGE_CORRUPT
    assert check_image_bytes(b"", 40_000_000) == IMAGE_MISSING

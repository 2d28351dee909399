"""Data safety of the reads in `jobs.prepare`: paths confined to the raw dir, bounded image reads, timestamps in any
unit, malformed CSV rows and empty files. Each test runs on the real 200-item slice of tests/unit/raw_slice.py with
one fault injected, through `prepare_dataset` or through the `jobs.prepare` entry point exactly as a user runs it.
"""
from __future__ import annotations

import io
import json
import os
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.cli import run_main
from training.overrides import ConfigError
from pipeline.config import DataConfig, SourceConfig
from pipeline.decode import IMAGE_OK, IMAGE_TOO_LARGE
from pipeline.raw_input import (
    FILE_MISSING, FILE_OK, FILE_OUTSIDE, FILE_TOO_LARGE, implausible_timestamps, read_file_inside,
)
from pipeline.sources import (
    IMAGE_OUTSIDE_DATASET, ITEMS_FILE, MANIFEST_FILE, REPORT_FILE, DataError, prepare_dataset, read_interactions,
)
from tests.unit.raw_slice import (
    NUM_ITEMS, prepare_slice, prepared_item, slice_image_path, slice_interactions, slice_items,
)


def run_prepare_cli(raw_dir: Path, out: Path, *overrides: str) -> tuple[int, str, str]:
    """`python -m jobs.prepare --set data.raw_dir=... ...` in this process -> (exit code, stdout, stderr)."""
    from jobs.prepare import main

    argv = ["python -m jobs.prepare", "--set", f"data.raw_dir={raw_dir}", "--set", f"data.prepared_dir={out}"]
    for override in overrides:
        argv += ["--set", override]
    saved_argv, stdout, stderr = sys.argv, io.StringIO(), io.StringIO()
    sys.argv = argv
    try:
        with redirect_stdout(stdout), redirect_stderr(stderr):
            run_main(main)
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = saved_argv
    return code, stdout.getvalue(), stderr.getvalue()


def assert_one_line_error(code: int, stderr: str) -> None:
    assert code == 2, stderr
    assert stderr.startswith("error: ") and stderr.count("\n") == 1 and "Traceback" not in stderr, stderr


def _unique_jpeg(path: Path) -> bytes:
    """A valid JPEG of random pixels (its bytes appear nowhere in the dataset)."""
    pixels = np.random.default_rng(7).integers(0, 256, size=(40, 30, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG")
    return path.read_bytes()


def _set_image(raw: Path, item_id: int, value: str) -> None:
    items = slice_items(raw)
    items.loc[items.item_id == str(item_id), "image"] = value
    items.to_csv(raw / "items.csv", index=False)


def _stored_images(out: Path) -> list[bytes]:
    return [b for b in pq.read_table(out / ITEMS_FILE, columns=["image"]).column("image").to_pylist() if b]


# --- defect 2: image paths confined to the raw dir, reads bounded ---------------------------------------------------

def _point_three_items_outside(raw: Path, outside: Path) -> None:
    """Item 15 by `../`, item 16 by an absolute path, item 17 by a symlink inside images/ that points out."""
    _set_image(raw, 15, os.path.relpath(outside / "secret.jpg", raw))
    _set_image(raw, 16, str(outside / "secret.jpg"))
    link = slice_image_path(raw, 17)
    link.unlink()
    link.symlink_to(outside / "secret.jpg")


def test_image_paths_leaving_the_raw_dir_are_refused_counted_and_never_stored(raw, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = _unique_jpeg(outside / "secret.jpg")
    _point_three_items_outside(raw, outside)
    assert os.path.relpath(outside / "secret.jpg", raw).startswith("..")

    report, out = prepare_slice(raw, tmp_path)
    assert report["images_outside_dataset"] == 3
    assert report["examples"]["image_outside_dataset"] == ["15", "16", "17"]
    assert report["items_with_problem"] == 3 and report["images_file_missing"] == 0
    for item_id in (15, 16, 17):
        row = prepared_item(out, item_id)
        assert row["image"] is None and row["image_status"] == IMAGE_OUTSIDE_DATASET
        assert row["text_status"] == "ok"  # the item stays, with its text and interactions
    assert secret not in _stored_images(out)
    assert secret not in (out / ITEMS_FILE).read_bytes()


def test_an_outside_path_is_reported_the_same_whether_or_not_something_exists_there(raw, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    _point_three_items_outside(raw, outside)  # secret.jpg not created: every path points at nothing
    absent, out = prepare_slice(raw, tmp_path / "absent")
    _unique_jpeg(outside / "secret.jpg")
    present, _ = prepare_slice(raw, tmp_path / "present")
    assert absent == present  # every count and example: nothing tells whether the file exists
    assert present["images_outside_dataset"] == 3 and present["images_file_missing"] == 0


def test_links_and_dot_dot_that_stay_inside_the_raw_dir_are_read(raw, tmp_path):
    link = slice_image_path(raw, 18)
    link.unlink()
    link.symlink_to("19.jpg")  # relative link to a sibling poster
    _set_image(raw, 20, "images/../images/20.jpg")
    report, out = prepare_slice(raw, tmp_path)
    assert report["images_outside_dataset"] == 0 and report["items_with_problem"] == 0
    assert prepared_item(out, 18)["image"] == slice_image_path(raw, 19).read_bytes()
    assert prepared_item(out, 20)["image_status"] == IMAGE_OK


def test_an_image_file_over_the_byte_cap_is_refused_from_its_size(raw, tmp_path):
    big = slice_image_path(raw, 21)
    with big.open("r+b") as handle:  # a real poster followed by 25 MB of holes: decoders stop at its end marker
        handle.truncate(25_000_000)
    report, out = prepare_slice(raw, tmp_path)  # the default cap, data.max_image_bytes=20 MB
    assert report["images_too_large"] == 1 and report["examples"]["image_too_large"] == ["21"]
    row = prepared_item(out, 21)
    assert row["image"] is None and row["image_status"] == IMAGE_TOO_LARGE
    assert prepared_item(out, 22)["image_status"] == IMAGE_OK  # posters (~20 KB) are far below the cap

    # below any poster
    report, out = prepare_slice(raw, tmp_path / "tight", max_image_bytes=1_000, max_bad_fraction=1.0)
    assert report["images_too_large"] == NUM_ITEMS - report["items_without_image"]


def test_bounded_read_answers_from_stat_for_a_huge_sparse_file(tmp_path):
    root = tmp_path.resolve()
    with (root / "huge.jpg").open("wb") as handle:
        handle.truncate(1 << 40)  # 1 TiB of holes: reading it whole would not finish
    started = time.perf_counter()
    assert read_file_inside(root, "huge.jpg", 20_000_000) == (None, FILE_TOO_LARGE)
    assert time.perf_counter() - started < 1.0
    (root / "small.jpg").write_bytes(b"x" * 10)
    assert read_file_inside(root, "small.jpg", 10) == (b"x" * 10, FILE_OK)
    assert read_file_inside(root, "small.jpg", 9) == (None, FILE_TOO_LARGE)
    assert read_file_inside(root / "sub", "../small.jpg", 10)[1] == FILE_OUTSIDE  # the root itself is the fence
    assert read_file_inside(root, "bad\0name.jpg", 10) == (None, FILE_MISSING)
    os.mkfifo(root / "fifo.jpg")  # a FIFO would block a plain open(): it is no regular file
    assert read_file_inside(root, "fifo.jpg", 10) == (None, FILE_MISSING)


def test_image_byte_cap_and_timestamp_unit_are_validated_config():
    with pytest.raises(ValueError, match="data.max_image_bytes must be >= 1"):
        DataConfig(max_image_bytes=0)
    with pytest.raises(ValueError, match="timestamp_unit='minutes'; valid choices: auto, s, ms, us, ns, iso"):
        SourceConfig(timestamp_unit="minutes")
    from training.job_config import build_config

    with pytest.raises(ConfigError, match="data.source.timestamp_unit='minutes' rejected"):
        build_config("tiny", ["data.source.timestamp_unit=minutes"])
    assert build_config("tiny", ["data.source.timestamp_unit=ms"]).data.source.timestamp_unit == "ms"


# --- defect 3: timestamps in any unit; implausible ones dropped and named -------------------------------------------

@pytest.fixture(scope="module")
def seconds_result(pristine_slice, tmp_path_factory) -> tuple[dict, pd.DataFrame]:
    out = tmp_path_factory.mktemp("seconds") / "prepared"
    prepare_dataset(DataConfig(), pristine_slice, out)
    return json.loads((out / MANIFEST_FILE).read_text()), read_interactions(out)


def _iso(seconds: pd.Series) -> list[str]:
    """Alternate Z, +02:00 offsets and naive (UTC) forms, all naming the same instants."""
    stamps = pd.to_datetime(seconds.astype(np.int64), unit="s", utc=True)
    forms = [stamps.dt.strftime("%Y-%m-%dT%H:%M:%SZ"),
             (stamps.dt.tz_convert("Etc/GMT-2")).dt.strftime("%Y-%m-%dT%H:%M:%S+02:00"),
             stamps.dt.strftime("%Y-%m-%d %H:%M:%S")]
    return [forms[i % 3].iloc[i] for i in range(len(stamps))]


@pytest.mark.parametrize(("unit", "configured"), [("ms", "auto"), ("us", "auto"), ("ns", "auto"), ("iso", "auto"),
                                                   ("ms", "ms"), ("iso", "iso")])
def test_timestamps_in_other_units_give_the_same_days_watermark_and_rows_as_seconds(
        raw, tmp_path, seconds_result, unit, configured):
    interactions = slice_interactions(raw)
    seconds = interactions.timestamp.astype(np.int64)
    multiplier = {"ms": 10**3, "us": 10**6, "ns": 10**9}
    interactions["timestamp"] = _iso(seconds) if unit == "iso" else (seconds * multiplier.get(unit, 1)).astype(str)
    interactions.to_csv(raw / "interactions.csv", index=False)

    out = tmp_path / "prepared"
    cfg = DataConfig() if configured == "auto" else DataConfig(source=SourceConfig(timestamp_unit=configured))
    report = prepare_dataset(cfg, raw, out)
    expected_manifest, expected_rows = seconds_result
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["watermark"] == expected_manifest["watermark"]
    assert manifest["days"] == expected_manifest["days"]
    pd.testing.assert_frame_equal(read_interactions(out), expected_rows)
    assert report.interactions_kept == report.interactions_total == len(interactions)
    assert report.timestamp_unit == unit


def test_implausible_timestamps_are_dropped_counted_and_named_and_leave_the_watermark_alone(raw, tmp_path):
    interactions = slice_interactions(raw)
    seconds = interactions.timestamp.astype(np.int64)
    watermark = int(seconds.max())
    future = str(int(time.time()) + 30 * 86_400)
    bad = {3: str(int(seconds.iloc[3]) * 1000),  # one row in ms among seconds: year ~29,900
           5: "inf", 8: "-inf", 13: "1e300", 21: "-5", 34: future,
           55: "1735689600",  # 2025-01-01: not the future, but 26 years after the rest of the data
           89: "99999999999999999999999"}
    for row, value in bad.items():
        interactions.loc[row, "timestamp"] = value
    interactions.loc[144, "timestamp"] = "nan"  # unreadable, not implausible: counted apart
    interactions.to_csv(raw / "interactions.csv", index=False)

    report, out = prepare_slice(raw, tmp_path)
    assert report["interactions_implausible_timestamp"] == len(bad)
    assert report["interactions_bad_timestamp"] == 1
    assert report["interactions_kept"] == len(interactions) - len(bad) - 1
    named = report["examples"]["implausible_timestamp_lines"]
    assert [e["line"] for e in named] == [row + 2 for row in sorted(bad)][:5]  # file lines: header is line 1
    assert [e["value"] for e in named] == [bad[row] for row in sorted(bad)][:5]
    assert report["examples"]["bad_timestamp_lines"] == [{"line": 146, "value": "nan"}]
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["watermark"] == watermark and manifest["days"][-1] < "1999"
    assert len(read_interactions(out)) == report["interactions_kept"]

    with pytest.raises(DataError, match=r"8 implausible timestamp \(read as s; see data\.source\.timestamp_unit\)"):
        prepare_dataset(DataConfig(max_dropped_fraction=0.0), raw, tmp_path / "strict")


def test_implausibility_rule_on_plain_numbers():
    now, year = 1_700_000_000.0, 365 * 86_400
    rest = np.linspace(8.8e8, 8.9e8, 200)  # 1997-1998, like ml100k
    odd = [np.nan, np.inf, -np.inf, -1.0, now + 2 * 86_400, 8.9e8 + 5 * year, 1e300, 8.9e8 + 11 * year]
    flags = implausible_timestamps(np.concatenate([rest, odd]), now=now)
    assert not flags[:200].any()
    assert flags[200:].tolist() == [False, True, True, True, True, False, True, True]  # NaN: unreadable, not judged
    recent = np.linspace(now - 1e7, now, 200)  # data up to now: an hour of clock skew is fine, two days are not
    assert implausible_timestamps(np.concatenate([recent, [now + 3600, now + 2 * 86_400]]), now=now)[200:].tolist() \
        == [False, True]
    # a wrong unit for the whole column is not hidden by the percentile: the future rule still catches it
    assert implausible_timestamps(rest * 1000, now=now).all()


# --- defect 4: malformed rows, empty files, no traceback ------------------------------------------------------------

def test_malformed_rows_are_skipped_and_counted_with_their_file_lines(raw, tmp_path):
    before = slice_interactions(raw)
    lines = (raw / "interactions.csv").read_text().splitlines(keepends=True)
    total_rows = len(lines) - 1
    lines[10] = lines[10].rstrip("\n") + ",extra\n"  # line 11: five fields
    lines[20] = "196,242\n"  # line 21: two fields
    lines.insert(30, "\n")  # a blank line is no row (as in pandas)
    lines[-12] = '196,"242,3,881250949\n'  # an unterminated quote swallows the 11 lines after it: 12 rows lost
    (raw / "interactions.csv").write_text("".join(lines))
    lost_rows = {9, 19, *range(total_rows - 12, total_rows)}  # 0-based data rows of the malformed lines
    expected_unknown = sum(item == "30" for row, item in enumerate(before.item_id) if row not in lost_rows)
    item_lines = (raw / "items.csv").read_text().splitlines(keepends=True)
    bad_item_line = next(i for i, line in enumerate(item_lines) if line.startswith("30,"))
    item_lines[bad_item_line] = item_lines[bad_item_line].rstrip("\n") + ",one too many\n"
    (raw / "items.csv").write_text("".join(item_lines))

    report, out = prepare_slice(raw, tmp_path)
    assert report["interactions_total"] == total_rows
    assert report["interactions_malformed_rows"] == 1 + 1 + 12
    assert report["examples"]["malformed_interaction_lines"] == [11, 21, len(lines) - 11]
    assert report["items_malformed_rows"] == 1
    assert report["examples"]["malformed_item_lines"] == [bad_item_line + 1]
    assert report["items_total"] == NUM_ITEMS - 1  # item 30 is not in the catalogue: its interactions are unknown
    assert report["interactions_unknown_item"] == expected_unknown > 0
    dropped = report["interactions_malformed_rows"] + report["interactions_unknown_item"]
    assert report["interactions_kept"] == total_rows - dropped == len(read_interactions(out))
    assert report["interactions_duplicate"] == 0


@pytest.mark.parametrize(
    ("table", "content"),
    [("interactions.csv", ""), ("interactions.csv", "user_id,item_id,rating,timestamp\n"),
     ("interactions.csv", "\n\n\n"), ("items.csv", ""), ("items.csv", None)],
    ids=["interactions-0-bytes", "interactions-header-only", "interactions-blank-lines", "items-0-bytes",
         "items-header-only"],
)
def test_an_empty_file_ends_prepare_with_one_line(raw, tmp_path, table, content):
    if content is None:
        content = (raw / table).read_text().splitlines(keepends=True)[0]
    (raw / table).write_text(content)
    code, _, stderr = run_prepare_cli(raw, tmp_path / "prepared")
    assert_one_line_error(code, stderr)
    assert "is empty" in stderr or "no rows" in stderr
    assert not (tmp_path / "prepared").exists()


@pytest.mark.parametrize("value", ["inf", "-inf", "1e300", "-1e300", "99999999999999999999999", "1e19", "NaN"])
def test_non_finite_and_huge_timestamps_end_with_no_traceback(raw, tmp_path, value):
    interactions = slice_interactions(raw)
    interactions.loc[:9, "timestamp"] = value
    interactions.to_csv(raw / "interactions.csv", index=False)
    code, stdout, stderr = run_prepare_cli(raw, tmp_path / "prepared")
    assert code == 0 and stderr == "", stderr
    report = json.loads((tmp_path / "prepared" / REPORT_FILE).read_text())
    assert report["interactions_implausible_timestamp"] + report["interactions_bad_timestamp"] == 10
    assert report["interactions_kept"] == len(interactions) - 10

    interactions["timestamp"] = value  # every row: nothing usable is left, and the user is told in one line
    interactions.to_csv(raw / "interactions.csv", index=False)
    code, _, stderr = run_prepare_cli(raw, tmp_path / "again")
    assert_one_line_error(code, stderr)
    assert "timestamp" in stderr

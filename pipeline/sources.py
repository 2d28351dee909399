"""Raw dataset directory -> canonical parquet (items table + day-partitioned interactions) + data report.

Canonical layout written by `prepare_dataset`:
    items.parquet                     item_index (1..N, 0 is padding), item_id (raw), text, image (bytes|null),
                                      image_status, text_status
    interactions/dt=YYYY-MM-DD/*.parquet
                                      user_id (raw), user_index, item_id (raw), item_index, timestamp (int s),
                                      rating (float|null), row_order (position in the raw file; breaks ties)
    data_report.json                  every count of what was skipped, replaced or flagged, with examples (item ids,
                                      1-based line numbers of the raw CSV files)
    manifest.json                     sizes, the data watermark (newest timestamp), written_by="mmrec.prepare"
Item indices are stable across re-runs: a re-prepare keeps the mapping of items seen before and appends new ones,
which incremental retraining relies on.

Only a directory prepare recognisably wrote is ever replaced (see `is_prepared_dir` and `pipeline.owned_dirs`):
an existing `data.prepared_dir` that holds anything else, or that is, is inside or contains the raw dir, is
refused with `UnsafePathError` before any work.

The raw files are untrusted (see `pipeline.raw_input`): no content makes this module raise anything but
`DataError`, image paths are confined to the raw dir, and timestamps are converted from their unit to seconds.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import DataConfig
from pipeline.decode import IMAGE_MISSING, IMAGE_OK, IMAGE_TOO_LARGE, build_item_text, check_image_bytes
from pipeline.owned_dirs import (WRITTEN_BY, backup_path, check_no_overlap, only_expected_entries, read_json,
                                 remove_dead_staging, require_replaceable, staged)
from pipeline.owned_dirs import recover_interrupted_swap as recover_owned_swap
from pipeline.raw_input import (
    FILE_OUTSIDE, FILE_TOO_LARGE, DataError, detect_timestamp_unit, implausible_timestamps, read_csv_header,
    read_csv_table, read_file_inside, timestamps_to_seconds,
)

log = logging.getLogger(__name__)

ITEMS_FILE = "items.parquet"
INTERACTIONS_DIR = "interactions"
REPORT_FILE = "data_report.json"
MANIFEST_FILE = "manifest.json"
PREPARED_ENTRIES = frozenset({ITEMS_FILE, INTERACTIONS_DIR, REPORT_FILE, MANIFEST_FILE})  # all prepare writes
PREPARE_MARKER = "mmrec.prepare"  # the manifest's `written_by`
# Manifests written before `written_by` existed are recognised by these keys (every version wrote all of them).
_LEGACY_MANIFEST_KEYS = frozenset({"num_items", "num_users", "num_interactions", "watermark", "days", "raw_dir"})
PREPARED_WHAT = "a prepared dataset written by jobs.prepare (its manifest.json and tables only)"

IMAGE_OUTSIDE_DATASET = "outside_dataset"  # image_status of an item whose image path leaves the raw dir
MAX_EXAMPLES = 5


@dataclass
class DataReport:
    """Counts of everything skipped, replaced or flagged by `prepare_dataset`, and the two error budgets.

    Item content problems (the item stays, the bad part becomes a mask): an image that is corrupt, too large (in
    pixels or in bytes), whose file is missing or whose path leaves the raw dir, and text that is empty or not
    UTF-8. An item without an image path at all is not a problem (`items_without_image`: catalogues have those by
    design). A malformed catalogue row (wrong number of fields) is no item at all; it is charged to the same
    budget. Interactions dropped: malformed row, unreadable or implausible timestamp, empty user, unknown item.
    Exact duplicates are dropped too but lose nothing, so they are not charged to a budget.

    Every row is accounted for: items_total + items_duplicate_id + items_malformed_rows = data rows of items.csv,
    and interactions_kept + every interactions_* drop count = interactions_total = data rows of interactions.csv
    (a malformed record counts each file line it spans).
    """

    items_total: int = 0
    items_without_image: int = 0  # no image named in the catalogue row
    images_file_missing: int = 0  # an image named but no such (readable, regular) file
    images_corrupt: int = 0
    images_too_large: int = 0  # over data.max_image_pixels (from the header) or data.max_image_bytes (from stat)
    images_outside_dataset: int = 0  # the path resolves outside the raw dir (../, absolute, a link): never opened
    items_empty_text: int = 0
    items_text_not_utf8: int = 0
    items_duplicate_id: int = 0
    items_malformed_rows: int = 0  # rows with more or fewer fields than the header; no item comes from them
    items_with_problem: int = 0  # at least one content problem above; charged to data.max_bad_fraction
    items_without_any_content: int = 0  # neither a usable image nor text
    interactions_total: int = 0
    interactions_malformed_rows: int = 0
    interactions_unknown_item: int = 0
    interactions_duplicate: int = 0
    interactions_bad_timestamp: int = 0  # missing or unreadable in the timestamp unit
    interactions_implausible_timestamp: int = 0  # non-finite, negative, future or far after the rest
    interactions_bad_user: int = 0
    interactions_kept: int = 0
    users: int = 0
    timestamp_unit: str = ""  # the unit the raw timestamps were read in (data.source.timestamp_unit or detected)
    examples: dict = field(default_factory=dict)  # a few offending ids / file lines per category, for debugging

    def bad_item_fraction(self) -> float:
        """Share of catalogue rows malformed or with a content problem (compared with data.max_bad_fraction)."""
        rows = self.items_total + self.items_malformed_rows
        return (self.items_with_problem + self.items_malformed_rows) / max(rows, 1)

    def dropped_interactions(self) -> int:
        """Raw interaction rows dropped as unusable (duplicates are not: they lose nothing)."""
        return (self.interactions_malformed_rows + self.interactions_unknown_item + self.interactions_bad_timestamp
                + self.interactions_implausible_timestamp + self.interactions_bad_user)

    def dropped_interaction_fraction(self) -> float:
        """Share of raw interaction rows dropped as unusable (compared with data.max_dropped_fraction)."""
        return self.dropped_interactions() / max(self.interactions_total, 1)

    def to_dict(self) -> dict:
        return asdict(self)

    def metrics(self) -> dict[str, float]:
        """Every count plus both fractions, flat and numeric (logged to MLflow as `data.<name>`)."""
        counts = {k: float(v) for k, v in self.to_dict().items() if isinstance(v, (int, float))}
        counts["bad_item_fraction"] = self.bad_item_fraction()
        counts["dropped_interaction_fraction"] = self.dropped_interaction_fraction()
        return counts

    def summary_lines(self) -> list[str]:
        return [f"{key:>34}: {value}" for key, value in self.to_dict().items() if key != "examples"]


def _require_columns(header: list[str], required: list[str], what: str, path: Path) -> None:
    missing = [c for c in required if c and c not in header]
    if missing:
        found = header[:30] + ([f"... {len(header) - 30} more"] if len(header) > 30 else [])
        raise DataError(
            f"{path}: {what} is missing required column(s) {missing}; found {found}. "
            f"Set the names with --set data.source.<key>=<column>."
        )


def _line_examples(lines: list[int], values: list[str] | None = None) -> list:
    """The first few file lines (with the offending raw value, shortened, when given) for the report."""
    if values is None:
        return lines[:MAX_EXAMPLES]
    return [{"line": line, "value": value[:40]} for line, value in zip(lines[:MAX_EXAMPLES], values[:MAX_EXAMPLES])]


def report_metrics(payload: dict) -> dict[str, float]:
    """A saved data_report.json -> `data.<count>` metrics (keys a newer or older report lacks are skipped)."""
    known = {f.name for f in fields(DataReport)}
    report = DataReport(**{k: v for k, v in payload.items() if k in known})
    return {f"data.{k}": v for k, v in report.metrics().items()}


def check_raw_schema(raw_dir: Path, cfg: DataConfig) -> None:
    """Fail before any bulk work when a raw file or a required column is missing (header reads only)."""
    src = cfg.source
    for name, required, what in (
        (src.items_file, [src.item_column, *src.text_fields, src.image_column], "the items table"),
        (src.interactions_file, [src.user_column, src.item_column, src.timestamp_column, src.rating_column],
         "the interactions table"),
    ):
        path = raw_dir / name
        _require_columns(read_csv_header(path, what), required, what, path)


def read_raw_items(raw_dir: Path, cfg: DataConfig, report: DataReport) -> pd.DataFrame:
    """items.csv (+ image files) -> DataFrame[item_id, text, image, image_status, text_status]."""
    src = cfg.source
    path = raw_dir / src.items_file
    what = "the items table"
    header = read_csv_header(path, what)
    _require_columns(header, [src.item_column, *src.text_fields], what, path)
    if src.image_column and src.image_column not in header:
        raise DataError(f"{path}: image column {src.image_column!r} not found; set data.source.image_column='' for none")
    wanted = list(dict.fromkeys([src.item_column, *src.text_fields, *([src.image_column] if src.image_column else [])]))
    table = read_csv_table(path, what, wanted)
    if table.records == 0:
        raise DataError(f"{path}: {what} has a header but no rows")
    report.items_malformed_rows = table.malformed_rows
    frame = pd.DataFrame(table.columns, columns=wanted, dtype=object)
    duplicated = frame[src.item_column].duplicated(keep="first").to_numpy()
    report.items_duplicate_id = int(duplicated.sum())
    frame = frame[~duplicated].reset_index(drop=True)
    report.items_total = len(frame)

    raw_root = raw_dir.resolve()
    texts, text_status, images, image_status = [], [], [], []
    bad_examples: dict[str, list] = {"corrupt_image": [], "empty_text": [], "text_not_utf8": [],
                                     "image_file_missing": [], "image_too_large": [], "image_outside_dataset": []}
    problem = []
    for row in frame.to_dict("records"):
        item_id = row[src.item_column]
        text = build_item_text(row, src.text_fields, src.list_separator)
        has_problem = False
        if "\ufffd" in text:  # undecodable bytes were replaced with U+FFFD when the file was read
            has_problem = True
            report.items_text_not_utf8 += 1
            bad_examples["text_not_utf8"].append(item_id)
            text = text.replace("\ufffd", "")
        status = "ok" if text.strip() else "empty"
        if status == "empty":
            has_problem = True
            report.items_empty_text += 1
            bad_examples["empty_text"].append(item_id)
        texts.append(text)
        text_status.append(status)

        data, file_status = None, None
        rel = row.get(src.image_column, "").strip() if src.image_column else ""
        if rel:
            data, file_status = read_file_inside(raw_root, rel, cfg.max_image_bytes)
        if file_status == FILE_OUTSIDE:
            img_status = IMAGE_OUTSIDE_DATASET
        elif file_status == FILE_TOO_LARGE:
            img_status = IMAGE_TOO_LARGE
        else:
            img_status = check_image_bytes(data, cfg.max_image_pixels)
        if img_status == IMAGE_MISSING and not rel:
            report.items_without_image += 1
        elif img_status != IMAGE_OK:
            has_problem = True
            if img_status == IMAGE_OUTSIDE_DATASET:
                report.images_outside_dataset += 1
                bad_examples["image_outside_dataset"].append(item_id)
            elif img_status == IMAGE_MISSING:
                report.images_file_missing += 1
                bad_examples["image_file_missing"].append(item_id)
            elif img_status == IMAGE_TOO_LARGE:
                report.images_too_large += 1
                bad_examples["image_too_large"].append(item_id)
            else:
                report.images_corrupt += 1
                bad_examples["corrupt_image"].append(item_id)
        images.append(data if img_status == IMAGE_OK else None)  # never hand unusable bytes to training
        image_status.append(img_status)
        problem.append(has_problem)

    items = pd.DataFrame(
        {
            "item_id": frame[src.item_column].astype(str),
            "text": texts,
            "image": images,
            "image_status": image_status,
            "text_status": text_status,
        }
    )
    report.items_with_problem = int(sum(problem))
    report.items_without_any_content = int(((items.image_status != IMAGE_OK) & (items.text_status != "ok")).sum())
    report.examples = {k: v[:MAX_EXAMPLES] for k, v in bad_examples.items() if v}
    if table.malformed_lines:
        report.examples["malformed_item_lines"] = _line_examples(table.malformed_lines)
    return items


def assign_item_indices(items: pd.DataFrame, previous: pd.DataFrame | None) -> pd.DataFrame:
    """Give each item a stable index 1..N (0 = padding): known items keep theirs, new ones are appended."""
    mapping: dict[str, int] = {}
    if previous is not None:
        mapping = dict(zip(previous.item_id.astype(str), previous.item_index.astype(int)))
    next_index = max(mapping.values(), default=0) + 1
    indices = []
    for item_id in items.item_id:
        if item_id not in mapping:
            mapping[item_id] = next_index
            next_index += 1
        indices.append(mapping[item_id])
    out = items.copy()
    out.insert(0, "item_index", np.asarray(indices, dtype=np.int64))
    return out.sort_values("item_index").reset_index(drop=True)


def read_raw_interactions(raw_dir: Path, cfg: DataConfig, items: pd.DataFrame, report: DataReport) -> pd.DataFrame:
    """interactions.csv -> DataFrame[user_id, item_id, timestamp (int s), rating, row_order, item_index, user_index].

    Each raw row is kept or counted under exactly one reason, checked in this order: malformed, unreadable
    timestamp, implausible timestamp (see `pipeline.raw_input.implausible_timestamps`), empty user, unknown item,
    duplicate (user, item, second).
    """
    src = cfg.source
    path = raw_dir / src.interactions_file
    what = "the interactions table"
    required = [src.user_column, src.item_column, src.timestamp_column] + ([src.rating_column] if src.rating_column else [])
    table = read_csv_table(path, what, list(dict.fromkeys(required)))
    if table.records == 0:
        raise DataError(f"{path}: {what} has a header but no rows")
    report.interactions_total = table.records
    report.interactions_malformed_rows = table.malformed_rows
    if table.malformed_lines:
        report.examples["malformed_interaction_lines"] = _line_examples(table.malformed_lines)
    raw_timestamps = pd.Series(table.columns[src.timestamp_column], dtype=str)
    unit = detect_timestamp_unit(raw_timestamps.str.strip()) if src.timestamp_unit == "auto" else src.timestamp_unit
    report.timestamp_unit = unit
    lines = np.asarray(table.line_numbers, dtype=np.int64)
    out = pd.DataFrame(
        {
            "user_id": pd.Series(table.columns[src.user_column], dtype=str).str.strip(),
            "item_id": pd.Series(table.columns[src.item_column], dtype=str).str.strip(),
            "timestamp": timestamps_to_seconds(raw_timestamps, unit),
            "rating": (pd.to_numeric(pd.Series(table.columns[src.rating_column], dtype=str), errors="coerce")
                       if src.rating_column else np.nan),
            "row_order": np.arange(len(lines), dtype=np.int64),
        }
    )
    bad_ts = out.timestamp.isna().to_numpy()
    implausible = implausible_timestamps(out.timestamp.to_numpy())
    report.interactions_bad_timestamp = int(bad_ts.sum())
    report.interactions_implausible_timestamp = int(implausible.sum())
    for key, mask in (("bad_timestamp_lines", bad_ts), ("implausible_timestamp_lines", implausible)):
        if mask.any():
            report.examples[key] = _line_examples(lines[mask][:MAX_EXAMPLES].tolist(),
                                                  raw_timestamps[mask].head(MAX_EXAMPLES).tolist())
    bad_user = (out.user_id == "").to_numpy() & ~bad_ts & ~implausible
    report.interactions_bad_user = int(bad_user.sum())
    out = out[~bad_ts & ~implausible & ~bad_user]
    index_of = dict(zip(items.item_id, items.item_index))
    out = out.assign(item_index=out.item_id.map(index_of))
    unknown = out.item_index.isna()
    report.interactions_unknown_item = int(unknown.sum())
    if unknown.any():
        report.examples["unknown_item_ids"] = out.item_id[unknown].unique()[:MAX_EXAMPLES].tolist()
    out = out[~unknown]
    duplicated = out.duplicated(subset=["user_id", "item_id", "timestamp"], keep="first")
    report.interactions_duplicate = int(duplicated.sum())
    out = out[~duplicated].copy()
    out["timestamp"] = out.timestamp.astype(np.int64)  # finite, >= 0 and before tomorrow: checked above
    out["item_index"] = out.item_index.astype(np.int64)
    # Users get dense indices by first appearance in id order, so a max_users slice is a real slice.
    user_ids = sorted(out.user_id.unique(), key=lambda u: (len(u), u))
    user_index = {u: i for i, u in enumerate(user_ids)}
    out["user_index"] = out.user_id.map(user_index).astype(np.int64)
    report.interactions_kept = len(out)
    report.users = int(out.user_index.nunique())
    return out.reset_index(drop=True)


def _atomic_write_json(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(tmp, path)


def is_prepared_dir(path: Path) -> bool:
    """Did prepare write this directory? Its manifest says so, and it holds nothing but what prepare writes."""
    manifest = read_json(path / MANIFEST_FILE)
    if manifest is None:
        return False
    recognised = manifest.get(WRITTEN_BY) == PREPARE_MARKER or _LEGACY_MANIFEST_KEYS <= manifest.keys()
    return recognised and only_expected_entries(path, PREPARED_ENTRIES.__contains__)


def recover_interrupted_swap(out_dir: Path) -> bool:
    """Put back the previous prepared dir if a crash hit between the two renames of the swap."""
    if recover_owned_swap(out_dir, is_prepared_dir):
        log.warning("restored %s from %s.old (an earlier prepare was interrupted mid-swap)", out_dir, out_dir.name)
        return True
    return False


def check_output_dir(raw_dir: Path, out_dir: Path) -> None:
    """Refuse an output dir that overlaps the raw data or holds anything prepare did not write (`UnsafePathError`)."""
    check_no_overlap(out_dir, raw_dir, what="data.prepared_dir", other_what="the raw data directory data.raw_dir")
    require_replaceable(out_dir, is_prepared_dir, PREPARED_WHAT)
    if out_dir.exists():  # the swap then removes `<out>.old` if there is one: it must be ours too
        require_replaceable(backup_path(out_dir), is_prepared_dir, PREPARED_WHAT)


def check_error_budgets(report: DataReport, cfg: DataConfig) -> None:
    """Refuse to go on when more content is bad than data.max_bad_fraction / data.max_dropped_fraction allow."""
    if report.bad_item_fraction() > cfg.max_bad_fraction:
        raise DataError(
            f"{report.bad_item_fraction():.1%} of catalogue items "
            f"({report.items_with_problem + report.items_malformed_rows} of "
            f"{report.items_total + report.items_malformed_rows}) have a content problem (images: "
            f"{report.images_corrupt} corrupt, {report.images_too_large} too large, {report.images_file_missing} "
            f"file missing, {report.images_outside_dataset} outside the dataset; text: {report.items_empty_text} "
            f"empty, {report.items_text_not_utf8} not UTF-8; {report.items_malformed_rows} malformed rows), above "
            f"data.max_bad_fraction={cfg.max_bad_fraction}; fix the data or raise the budget"
        )
    if report.dropped_interaction_fraction() > cfg.max_dropped_fraction:
        raise DataError(
            f"{report.dropped_interaction_fraction():.1%} of interactions were dropped "
            f"({report.interactions_malformed_rows} malformed rows, {report.interactions_unknown_item} unknown item, "
            f"{report.interactions_bad_timestamp} bad timestamp, {report.interactions_implausible_timestamp} "
            f"implausible timestamp (read as {report.timestamp_unit}; see data.source.timestamp_unit), "
            f"{report.interactions_bad_user} empty user, of {report.interactions_total}), above "
            f"data.max_dropped_fraction={cfg.max_dropped_fraction}; fix the data or raise the budget"
        )


def prepare_dataset(cfg: DataConfig, raw_dir: Path, out_dir: Path) -> DataReport:
    """Read, validate and write the canonical tables. The output is swapped in atomically when complete.

    Schema problems (missing files or columns) raise `DataError` before anything is read in bulk; content
    problems are counted in the report and charged to the two error budgets (see `DataReport`).
    """
    raw_dir, out_dir = Path(raw_dir).resolve(), Path(out_dir).resolve()
    recover_interrupted_swap(out_dir)
    check_output_dir(raw_dir, out_dir)
    remove_dead_staging(out_dir)
    check_raw_schema(raw_dir, cfg)
    report = DataReport()
    previous = None
    if (out_dir / ITEMS_FILE).exists():
        previous = pq.read_table(out_dir / ITEMS_FILE, columns=["item_id", "item_index"]).to_pandas()
    items = assign_item_indices(read_raw_items(raw_dir, cfg, report), previous)
    interactions = read_raw_interactions(raw_dir, cfg, items, report)
    check_error_budgets(report, cfg)
    if interactions.empty:
        raise DataError("no usable interactions left after validation; see the data report")

    # Swapped in with two renames, not one: a crash between them leaves `<out>.old`, which the next run puts back.
    with staged(out_dir, is_prepared_dir, PREPARED_WHAT) as staging:
        items_table = pa.Table.from_pandas(items, preserve_index=False).cast(
            pa.schema(
                [
                    ("item_index", pa.int64()),
                    ("item_id", pa.string()),
                    ("text", pa.string()),
                    ("image", pa.binary()),
                    ("image_status", pa.string()),
                    ("text_status", pa.string()),
                ]
            )
        )
        pq.write_table(items_table, staging / ITEMS_FILE)
        days = pd.to_datetime(interactions.timestamp, unit="s", utc=True).dt.strftime("%Y-%m-%d")
        for day, part in interactions.groupby(days, sort=True):
            day_dir = staging / INTERACTIONS_DIR / f"dt={day}"
            day_dir.mkdir(parents=True)
            pq.write_table(pa.Table.from_pandas(part, preserve_index=False), day_dir / "part-0.parquet")
        manifest = {
            "num_items": int(items.item_index.max()),
            "num_users": report.users,
            "num_interactions": len(interactions),
            "watermark": int(interactions.timestamp.max()),
            "days": sorted(days.unique().tolist()),
            "raw_dir": str(raw_dir),
            WRITTEN_BY: PREPARE_MARKER,
        }
        _atomic_write_json(staging / REPORT_FILE, report.to_dict())
        _atomic_write_json(staging / MANIFEST_FILE, manifest)
    return report


def load_manifest(prepared_dir: Path) -> dict:
    path = prepared_dir / MANIFEST_FILE
    if not path.exists():
        raise DataError(f"{prepared_dir} is not a prepared dataset (no {MANIFEST_FILE}); run `python -m jobs.prepare` first")
    return json.loads(path.read_text())


def read_interactions(prepared_dir: Path, after_day: str | None = None) -> pd.DataFrame:
    """All interactions (or only day partitions strictly after `after_day`), in raw-file order."""
    root = prepared_dir / INTERACTIONS_DIR
    frames = []
    for day_dir in sorted(root.glob("dt=*")):
        day = day_dir.name.split("=", 1)[1]
        if after_day and day <= after_day:
            continue
        frames.append(pq.read_table(day_dir).to_pandas())
    if not frames:
        return pd.DataFrame(columns=["user_id", "user_index", "item_id", "item_index", "timestamp", "rating", "row_order"])
    return pd.concat(frames, ignore_index=True).sort_values("row_order", kind="stable").reset_index(drop=True)

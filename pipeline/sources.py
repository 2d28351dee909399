"""Raw dataset directory -> canonical parquet (items table + day-partitioned interactions) + data report.

Canonical layout written by `prepare_dataset`:
    items.parquet                     item_index (1..N, 0 is padding), item_id (raw), text, image (bytes|null),
                                      image_status, text_status
    interactions/dt=YYYY-MM-DD/*.parquet
                                      user_id (raw), user_index, item_id (raw), item_index, timestamp (int s),
                                      rating (float|null), row_order (position in the raw file; breaks ties)
    data_report.json                  every count of what was skipped, replaced or flagged
    manifest.json                     sizes, the data watermark (newest timestamp), written_by="mmrec.prepare"
Item indices are stable across re-runs: a re-prepare keeps the mapping of items seen before and appends new ones,
which incremental retraining relies on.

Only a directory prepare recognisably wrote is ever replaced (see `is_prepared_dir` and `pipeline.owned_dirs`):
an existing `data.prepared_dir` that holds anything else, or that is, is inside or contains the raw dir, is
refused with `UnsafePathError` before any work.
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
from pipeline.owned_dirs import (WRITTEN_BY, backup_path, check_no_overlap, discard_staging, new_staging_dir, only_expected_entries,
                                 read_json, remove_dead_staging, require_replaceable, swap_in)
from pipeline.owned_dirs import recover_interrupted_swap as recover_owned_swap

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


class DataError(ValueError):
    """The raw data cannot be used as given (schema problems, too much bad content)."""


@dataclass
class DataReport:
    """Counts of everything skipped, replaced or flagged by `prepare_dataset`, and the two error budgets.

    Item content problems (the item stays, the bad part becomes a mask): an image that is corrupt, too large or
    whose file is missing, and text that is empty or not UTF-8. An item without an image path at all is not a
    problem (`items_without_image`: catalogues have those by design). Interactions dropped: unknown item, bad
    timestamp, empty user. Exact duplicates are dropped too but lose nothing, so they are not charged to a budget.
    """

    items_total: int = 0
    items_without_image: int = 0  # no image named in the catalogue row
    images_file_missing: int = 0  # an image named but no such file
    images_corrupt: int = 0
    images_too_large: int = 0
    items_empty_text: int = 0
    items_text_not_utf8: int = 0
    items_duplicate_id: int = 0
    items_with_problem: int = 0  # at least one content problem above; charged to data.max_bad_fraction
    items_without_any_content: int = 0  # neither a usable image nor text
    interactions_total: int = 0
    interactions_unknown_item: int = 0
    interactions_duplicate: int = 0
    interactions_bad_timestamp: int = 0
    interactions_bad_user: int = 0
    interactions_kept: int = 0
    users: int = 0
    examples: dict = field(default_factory=dict)  # a few offending ids per category, for debugging

    def bad_item_fraction(self) -> float:
        """Share of catalogue items with at least one content problem (compared with data.max_bad_fraction)."""
        return self.items_with_problem / max(self.items_total, 1)

    def dropped_interaction_fraction(self) -> float:
        """Share of raw interaction rows dropped as unusable (compared with data.max_dropped_fraction)."""
        dropped = self.interactions_unknown_item + self.interactions_bad_timestamp + self.interactions_bad_user
        return dropped / max(self.interactions_total, 1)

    def to_dict(self) -> dict:
        return asdict(self)

    def metrics(self) -> dict[str, float]:
        """Every count plus both fractions, flat and numeric (logged to MLflow as `data.<name>`)."""
        counts = {k: float(v) for k, v in self.to_dict().items() if isinstance(v, (int, float))}
        counts["bad_item_fraction"] = self.bad_item_fraction()
        counts["dropped_interaction_fraction"] = self.dropped_interaction_fraction()
        return counts

    def summary_lines(self) -> list[str]:
        return [f"{key:>28}: {value}" for key, value in self.to_dict().items() if key != "examples"]


def _require_columns(frame: pd.DataFrame, required: list[str], what: str, path: Path) -> None:
    missing = [c for c in required if c and c not in frame.columns]
    if missing:
        raise DataError(
            f"{path}: {what} is missing required column(s) {missing}; found {list(frame.columns)}. "
            f"Set the names with --set data.source.<key>=<column>."
        )


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
        if not path.exists():
            raise DataError(f"{what} file not found: {path}")
        _require_columns(pd.read_csv(path, dtype=str, nrows=0, encoding_errors="replace"), required, what, path)


def read_raw_items(raw_dir: Path, cfg: DataConfig, report: DataReport) -> pd.DataFrame:
    """items.csv (+ image files) -> DataFrame[item_id, text, image, image_status, text_status]."""
    src = cfg.source
    path = raw_dir / src.items_file
    if not path.exists():
        raise DataError(f"items file not found: {path}")
    frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding_errors="replace")
    _require_columns(frame, [src.item_column, *src.text_fields], "the items table", path)
    if src.image_column and src.image_column not in frame.columns:
        raise DataError(f"{path}: image column {src.image_column!r} not found; set data.source.image_column='' for none")
    duplicated = frame[src.item_column].duplicated(keep="first")
    report.items_duplicate_id = int(duplicated.sum())
    frame = frame[~duplicated].reset_index(drop=True)
    report.items_total = len(frame)

    texts, text_status, images, image_status = [], [], [], []
    bad_examples: dict[str, list] = {"corrupt_image": [], "empty_text": [], "text_not_utf8": [],
                                     "image_file_missing": []}
    problem = []
    for row in frame.to_dict("records"):
        text = build_item_text(row, src.text_fields, src.list_separator)
        has_problem = False
        if "\ufffd" in text:  # read_csv replaced undecodable bytes with U+FFFD
            has_problem = True
            report.items_text_not_utf8 += 1
            bad_examples["text_not_utf8"].append(row[src.item_column])
            text = text.replace("\ufffd", "")
        status = "ok" if text.strip() else "empty"
        if status == "empty":
            has_problem = True
            report.items_empty_text += 1
            bad_examples["empty_text"].append(row[src.item_column])
        texts.append(text)
        text_status.append(status)

        data = None
        rel = row.get(src.image_column, "").strip() if src.image_column else ""
        if rel:
            image_path = (raw_dir / rel).resolve()
            if image_path.is_file():
                data = image_path.read_bytes()
        img_status = check_image_bytes(data, cfg.max_image_pixels)
        if img_status == IMAGE_MISSING and not rel:
            report.items_without_image += 1
        elif img_status == IMAGE_MISSING:
            has_problem = True
            report.images_file_missing += 1
            bad_examples["image_file_missing"].append(row[src.item_column])
        elif img_status != IMAGE_OK:
            has_problem = True
            if img_status == IMAGE_TOO_LARGE:
                report.images_too_large += 1
            else:
                report.images_corrupt += 1
            bad_examples["corrupt_image"].append(row[src.item_column])
            data = None  # never hand undecodable bytes to training
        images.append(data if img_status == IMAGE_OK else None)
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
    report.examples = {k: v[:5] for k, v in bad_examples.items() if v}
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
    src = cfg.source
    path = raw_dir / src.interactions_file
    if not path.exists():
        raise DataError(f"interactions file not found: {path}")
    frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding_errors="replace")
    required = [src.user_column, src.item_column, src.timestamp_column] + ([src.rating_column] if src.rating_column else [])
    _require_columns(frame, required, "the interactions table", path)
    report.interactions_total = len(frame)
    out = pd.DataFrame(
        {
            "user_id": frame[src.user_column].astype(str).str.strip(),
            "item_id": frame[src.item_column].astype(str).str.strip(),
            "timestamp": pd.to_numeric(frame[src.timestamp_column], errors="coerce"),
            "rating": pd.to_numeric(frame[src.rating_column], errors="coerce") if src.rating_column else np.nan,
            "row_order": np.arange(len(frame), dtype=np.int64),
        }
    )
    bad_ts = out.timestamp.isna()
    report.interactions_bad_timestamp = int(bad_ts.sum())
    bad_user = out.user_id == ""
    report.interactions_bad_user = int((bad_user & ~bad_ts).sum())
    out = out[~bad_ts & ~bad_user]
    index_of = dict(zip(items.item_id, items.item_index))
    out = out.assign(item_index=out.item_id.map(index_of))
    unknown = out.item_index.isna()
    report.interactions_unknown_item = int(unknown.sum())
    if unknown.any():
        report.examples["unknown_item_ids"] = out.item_id[unknown].unique()[:5].tolist()
    out = out[~unknown]
    duplicated = out.duplicated(subset=["user_id", "item_id", "timestamp"], keep="first")
    report.interactions_duplicate = int(duplicated.sum())
    out = out[~duplicated].copy()
    out["timestamp"] = out.timestamp.astype(np.int64)
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
            f"{report.bad_item_fraction():.1%} of catalogue items ({report.items_with_problem} of "
            f"{report.items_total}) have a content problem (images: {report.images_corrupt} corrupt, "
            f"{report.images_too_large} too large, {report.images_file_missing} file missing; text: "
            f"{report.items_empty_text} empty, {report.items_text_not_utf8} not UTF-8), above "
            f"data.max_bad_fraction={cfg.max_bad_fraction}; fix the data or raise the budget"
        )
    if report.dropped_interaction_fraction() > cfg.max_dropped_fraction:
        raise DataError(
            f"{report.dropped_interaction_fraction():.1%} of interactions were dropped "
            f"({report.interactions_unknown_item} unknown item, {report.interactions_bad_timestamp} bad timestamp, "
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

    staging = new_staging_dir(out_dir)
    try:
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
        # Two renames, not one: a crash between them leaves `<out>.old`, which the next run puts back.
        swap_in(staging, out_dir, is_prepared_dir, PREPARED_WHAT)
    finally:
        discard_staging(staging)
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

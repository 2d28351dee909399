"""Raw dataset directory -> canonical parquet (items table + day-partitioned interactions) + data report.

Canonical layout written by `prepare_dataset`:
    items.parquet                     item_index (1..N, 0 is padding), item_id (raw), text, image (bytes|null),
                                      image_status, text_status
    interactions/dt=YYYY-MM-DD/*.parquet
                                      user_id (raw), user_index, item_id (raw), item_index, timestamp (int s),
                                      rating (float|null), row_order (position in the raw file; breaks ties)
    data_report.json                  every count of what was skipped, replaced or flagged
    manifest.json                     sizes and the data watermark (newest timestamp)
Item indices are stable across re-runs: a re-prepare keeps the mapping of items seen before and appends new ones,
which incremental retraining relies on.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import DataConfig
from pipeline.decode import IMAGE_OK, IMAGE_MISSING, build_item_text, check_image_bytes

log = logging.getLogger(__name__)

ITEMS_FILE = "items.parquet"
INTERACTIONS_DIR = "interactions"
REPORT_FILE = "data_report.json"
MANIFEST_FILE = "manifest.json"


class DataError(ValueError):
    """The raw data cannot be used as given (schema problems, too much bad content)."""


@dataclass
class DataReport:
    items_total: int = 0
    items_without_image: int = 0
    images_corrupt: int = 0
    images_too_large: int = 0
    items_empty_text: int = 0
    items_text_not_utf8: int = 0
    items_duplicate_id: int = 0
    interactions_total: int = 0
    interactions_unknown_item: int = 0
    interactions_duplicate: int = 0
    interactions_bad_timestamp: int = 0
    interactions_bad_user: int = 0
    interactions_kept: int = 0
    users: int = 0
    examples: dict = field(default_factory=dict)  # a few offending ids per category, for debugging

    def bad_item_fraction(self) -> float:
        """Share of items with no usable content at all (neither image nor text)."""
        return self.examples.get("items_without_any_content", 0) / max(self.items_total, 1)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary_lines(self) -> list[str]:
        return [f"{key:>28}: {value}" for key, value in self.to_dict().items() if key != "examples"]


def _require_columns(frame: pd.DataFrame, required: list[str], what: str, path: Path) -> None:
    missing = [c for c in required if c and c not in frame.columns]
    if missing:
        raise DataError(
            f"{path}: {what} is missing required column(s) {missing}; found {list(frame.columns)}. "
            f"Set the names with --set data.source.<key>=<column>."
        )


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
    bad_examples: dict[str, list] = {"corrupt_image": [], "empty_text": [], "text_not_utf8": []}
    for row in frame.to_dict("records"):
        text = build_item_text(row, src.text_fields, src.list_separator)
        if "\ufffd" in text:
            report.items_text_not_utf8 += 1
            bad_examples["text_not_utf8"].append(row[src.item_column])
            text = text.replace("\ufffd", "")
        status = "ok" if text.strip() else "empty"
        if status == "empty":
            report.items_empty_text += 1
            bad_examples["empty_text"].append(row[src.item_column])
        texts.append(text)
        text_status.append(status)

        data = None
        rel = row.get(src.image_column, "") if src.image_column else ""
        if rel:
            image_path = (raw_dir / rel).resolve()
            if image_path.is_file():
                data = image_path.read_bytes()
        img_status = check_image_bytes(data, cfg.max_image_pixels)
        if img_status == IMAGE_MISSING:
            report.items_without_image += 1
        elif img_status != IMAGE_OK:
            if img_status == "too_large":
                report.images_too_large += 1
            else:
                report.images_corrupt += 1
            bad_examples["corrupt_image"].append(row[src.item_column])
            data = None  # never hand undecodable bytes to training
        images.append(data if img_status == IMAGE_OK else None)
        image_status.append(img_status)

    items = pd.DataFrame(
        {
            "item_id": frame[src.item_column].astype(str),
            "text": texts,
            "image": images,
            "image_status": image_status,
            "text_status": text_status,
        }
    )
    no_content = int(((items.image_status != IMAGE_OK) & (items.text_status != "ok")).sum())
    report.examples = {k: v[:5] for k, v in bad_examples.items() if v}
    report.examples["items_without_any_content"] = no_content
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
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
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


def prepare_dataset(cfg: DataConfig, raw_dir: Path, out_dir: Path) -> DataReport:
    """Read, validate and write the canonical tables. The output is swapped in atomically when complete."""
    report = DataReport()
    previous = None
    if (out_dir / ITEMS_FILE).exists():
        previous = pq.read_table(out_dir / ITEMS_FILE, columns=["item_id", "item_index"]).to_pandas()
    items = assign_item_indices(read_raw_items(raw_dir, cfg, report), previous)
    if report.bad_item_fraction() > cfg.max_bad_fraction:
        raise DataError(
            f"{report.bad_item_fraction():.1%} of items have neither a usable image nor text "
            f"(data.max_bad_fraction={cfg.max_bad_fraction}); refusing to train on them"
        )
    interactions = read_raw_interactions(raw_dir, cfg, items, report)
    if interactions.empty:
        raise DataError("no usable interactions left after validation; see the data report")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".prepare-", dir=out_dir.parent))
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
        }
        _atomic_write_json(staging / REPORT_FILE, report.to_dict())
        _atomic_write_json(staging / MANIFEST_FILE, manifest)
        if out_dir.exists():
            backup = out_dir.with_name(out_dir.name + ".old")
            shutil.rmtree(backup, ignore_errors=True)
            os.replace(out_dir, backup)
            os.replace(staging, out_dir)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
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

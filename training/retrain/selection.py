"""What a challenger trains and is judged on: new days since the champion's watermark, a replay sample of older
examples, and the held-out window of the newest unseen interactions."""
from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from pipeline.sequences import Examples, Splits, time_split
from pipeline.sources import INTERACTIONS_DIR, read_interactions

ID_COLUMNS = ["user_index", "item_index", "timestamp", "rating", "row_order"]


def utc_day(timestamp: int) -> str:
    return datetime.fromtimestamp(int(timestamp), tz=timezone.utc).strftime("%Y-%m-%d")


def utc_iso(timestamp: int) -> str:
    return datetime.fromtimestamp(int(timestamp), tz=timezone.utc).isoformat(timespec="seconds")


def holdout_start(timestamps: np.ndarray, fraction: float) -> int | None:
    """Unseen interaction times [M] -> T: the window [T, newest] holds their newest `fraction` (at least one).

    Interactions tied at T all fall in the window; T is moved later if that would leave nothing before it.
    None when no split is possible (fewer than two distinct times).
    """
    ordered = np.sort(np.asarray(timestamps, dtype=np.int64))
    if len(ordered) < 2 or ordered[0] == ordered[-1]:
        return None
    held_out = max(1, math.ceil(fraction * len(ordered)))
    start = ordered[len(ordered) - held_out]
    if start == ordered[0]:
        start = ordered[ordered > ordered[0]][0]
    return int(start)


def concat_examples(*parts: Examples) -> Examples:
    return Examples(*(np.concatenate([getattr(p, name) for p in parts]) for name in
                      ("user", "history", "target", "timestamp", "rating")))


def incremental_splits(interactions: pd.DataFrame, *, max_history: int, trained_through: int, holdout_from: int,
                       replay_ratio: float, seed: int = 0) -> Splits:
    """Interactions (old and new) -> train: targets in (trained_through, holdout_from) + a replay sample of
    older targets; test (and validation): targets at or after holdout_from. Every history is the full
    preceding one, whatever its age."""
    by_time = time_split(interactions, max_history, holdout_from)
    before = concat_examples(by_time.train, by_time.validation)
    new = before.subset(before.timestamp > trained_through)
    old = before.subset(before.timestamp <= trained_through)
    replay_count = min(len(old), int(round(replay_ratio * len(new))))
    rng = np.random.default_rng(seed)
    replay = old.subset(np.sort(rng.choice(len(old), size=replay_count, replace=False)))
    # The gate's window doubles as validation: the loop's val_ metrics then show the gate's view per epoch.
    return Splits(train=concat_examples(new, replay), validation=by_time.test, test=by_time.test)


def _previous_day(day: str) -> str:
    return (datetime.strptime(day, "%Y-%m-%d") - timedelta(days=1)).strftime("%Y-%m-%d")


def read_for_retrain(prepared: Path, trained_through: int, max_users: int = 0) -> pd.DataFrame:
    """Day partitions from the watermark's day on (whole rows), older ones as id columns only -> one frame."""
    first_day = utc_day(trained_through)
    recent = read_interactions(prepared, after_day=_previous_day(first_day))
    older_dirs = [d for d in sorted((prepared / INTERACTIONS_DIR).glob("dt=*")) if d.name.split("=", 1)[1] < first_day]
    frames = [pq.read_table(d, columns=ID_COLUMNS).to_pandas() for d in older_dirs]
    frames.append(recent[ID_COLUMNS] if len(recent) else pd.DataFrame(columns=ID_COLUMNS))
    frame = pd.concat(frames, ignore_index=True)
    for column in ("user_index", "item_index", "timestamp", "row_order"):
        frame[column] = frame[column].astype(np.int64)
    if max_users:
        frame = frame[frame.user_index < max_users]
    return frame.reset_index(drop=True)

"""The prepared dataset -> the configured train / validation / test split (no Ray, no model)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline.config import DataConfig
from pipeline.sequences import Splits, cold_start_split, leave_one_out, sample_cold_items, time_split
from pipeline.sources import load_manifest, read_interactions


def build_splits(cfg: DataConfig, prepared: Path, train_on_validation: bool = False) -> Splits:
    """Leave-one-out or by time (`data.time_split_at`, `data.validation_from`), `data.max_users` and cold-item
    hold-out applied to the prepared data. `train_on_validation`: the validation examples train too (a refit
    after selection, `train.refit`); validation is still returned."""
    interactions = read_interactions(prepared)
    if cfg.max_users:
        interactions = interactions[interactions.user_index < cfg.max_users]
    split_at = _unix_seconds(cfg.time_split_at) if cfg.split == "time" else None
    validation_from = _unix_seconds(cfg.validation_from) if cfg.validation_from else None
    if cfg.cold_item_fraction > 0:  # cold-start evaluation: some items never seen in training
        cold = sample_cold_items(load_manifest(prepared)["num_items"], cfg.cold_item_fraction, cfg.cold_seed)
        return cold_start_split(interactions, cfg.max_history, cold, split_at, validation_from, train_on_validation)
    if split_at is not None:
        return time_split(interactions, cfg.max_history, split_at, validation_from, train_on_validation)
    return leave_one_out(interactions, cfg.max_history, train_on_validation)


def _unix_seconds(date: str) -> int:
    """An ISO date (a UTC midnight) -> unix seconds, as the prepared timestamps are."""
    return int(pd.Timestamp(date, tz="UTC").timestamp())

"""Configuration of the data side: where raw data lives, its column names, and how examples are built."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import ClassVar


@dataclass(kw_only=True)
class SourceConfig:
    """Layout of a raw dataset directory like ../shared/data/ml100k_mm (column names are configurable)."""

    # Fixed (not settings): the raw directory holds these two files, and genres-like fields join with this.
    interactions_file: ClassVar[str] = "interactions.csv"
    items_file: ClassVar[str] = "items.csv"
    list_separator: ClassVar[str] = "|"  # such fields are joined with ", " instead

    user_column: str = "user_id"
    item_column: str = "item_id"
    timestamp_column: str = "timestamp"
    rating_column: str = "rating"  # "" when the data has none
    image_column: str = "image"  # relative path of the image file under the raw dir; "" for none
    text_fields: tuple[str, ...] = ("title", "genres", "description")

    def __post_init__(self) -> None:
        if not self.text_fields:
            raise ValueError("data.source.text_fields must name at least one column")


@dataclass(kw_only=True)
class DataConfig:
    raw_dir: str = "../shared/data/ml100k_mm"
    prepared_dir: str = "prepared/ml100k_mm"
    source: SourceConfig = field(default_factory=SourceConfig)
    max_users: int = 0  # 0 = all users; > 0 keeps the first N users by id (a real slice, for tiny runs)
    max_history: int = 50  # L: history items before each target
    time_split_at: str = ""  # "" = leave-one-out; an ISO date T = split by time: train before T, evaluate at/after T
    positive_rating: float = 4.0  # CTR label: rating >= this is a click
    max_bad_fraction: float = 0.2  # fail when more catalogue items than this have a content problem
    max_dropped_fraction: float = 0.2  # fail when more interaction rows than this are unusable and dropped
    decode_actors: int = 1
    decode_cache_items: int = 4096  # decoded images kept per decode actor (bounded; 0 = decode every time)
    materialize_catalog: bool = True  # keep the decoded catalogue in the object store (set false for huge ones)
    decode_cpus: float = 0.25  # fractional, so Ray Data's listing task still finds a whole CPU on 2 cores
    # Cold-start evaluation: this seeded random fraction of catalogue items is held out of training entirely
    # (0 = off); test metrics are then also reported on warm and on cold test targets.
    cold_item_fraction: float = 0.0

    # Fixed (not settings). Larger images are refused as decompression bombs.
    max_image_pixels: ClassVar[int] = 40_000_000
    # A materialised catalogue whose decoded content is at most this size is decoded in the driver process with
    # the same ItemContentDecoder instead of a Ray Data pass (whose read task and actor pool cost ~20 s to start
    # on 2 cores, for ~2 s of decoding at 1,682 items); ml100k_mm at 64 px is 22 MiB.
    driver_decode_max_mb: ClassVar[int] = 512
    # The cold items are the same in every run (bench/quality.py compares seeds of train.seed on one split).
    cold_seed: ClassVar[int] = 0

    @property
    def split(self) -> str:
        """"leave_one_out", or "time" when data.time_split_at is set."""
        return "time" if self.time_split_at else "leave_one_out"

    def __post_init__(self) -> None:
        if self.time_split_at:
            try:
                datetime.fromisoformat(self.time_split_at)
            except ValueError:
                raise ValueError(f"data.time_split_at={self.time_split_at!r} is not an ISO date (YYYY-MM-DD)") from None
        for key in ("max_history", "decode_actors"):
            if getattr(self, key) < 1:
                raise ValueError(f"data.{key} must be >= 1, got {getattr(self, key)}")
        if self.max_users < 0:
            raise ValueError("data.max_users must be >= 0 (0 = all)")
        for key in ("max_bad_fraction", "max_dropped_fraction"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"data.{key} must be in [0, 1], got {getattr(self, key)}")
        if self.decode_cpus <= 0:
            raise ValueError("data.decode_cpus must be > 0")
        if not 0.0 <= self.cold_item_fraction < 1.0:
            raise ValueError(f"data.cold_item_fraction must be in [0, 1), got {self.cold_item_fraction}")

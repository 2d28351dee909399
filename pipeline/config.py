"""Configuration of the data side: where raw data lives, its column names, and how examples are built."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import ClassVar

TIMESTAMP_UNITS = ("auto", "s", "ms", "us", "ns", "iso")


@dataclass(kw_only=True)
class SourceConfig:
    """Layout of a raw dataset directory like ../shared/data/ml100k_mm (column names are configurable)."""

    # Fixed (not settings): the raw directory holds these two files, and genres-like fields join with this.
    interactions_file: ClassVar[str] = "interactions.csv"
    items_file: ClassVar[str] = "items.csv"
    list_separator: ClassVar[str] = "|"  # such fields are joined with ", " instead

    user_column: str = field(default="user_id", metadata={"help": "user id column of interactions.csv"})
    item_column: str = field(default="item_id", metadata={"help": "item id column of interactions.csv and items.csv"})
    timestamp_column: str = field(
        default="timestamp", metadata={"help": "interaction time column: orders histories, splits by time"})
    timestamp_unit: str = field(
        default="auto",
        metadata={"help": "unit of raw timestamps: s, ms, us, ns (since the epoch), iso (ISO 8601 strings) or auto "
                          "(numbers by magnitude, else ISO)"})
    rating_column: str = field(
        default="rating", metadata={"help": 'rating column; "" when the data has none (model.task=ctr needs one)'})
    image_column: str = field(
        default="image",
        metadata={"help": 'items.csv column holding each image file\'s path under data.raw_dir; "" = no images'})
    text_fields: tuple[str, ...] = field(
        default=("title", "genres", "description"), metadata={"help": "items.csv columns joined into each item's text"})

    def __post_init__(self) -> None:
        if not self.text_fields:
            raise ValueError("data.source.text_fields must name at least one column")
        if self.timestamp_unit not in TIMESTAMP_UNITS:
            raise ValueError(f"data.source.timestamp_unit={self.timestamp_unit!r}; valid choices: "
                             f"{', '.join(TIMESTAMP_UNITS)}")


def _iso_date(key: str, value: str) -> datetime | None:
    """A `data.<key>` ISO date -> its datetime (None when empty); one error naming the key when it is not one."""
    if not value:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"data.{key}={value!r} is not an ISO date (YYYY-MM-DD)") from None


@dataclass(kw_only=True)
class DataConfig:
    raw_dir: str = field(
        default="../shared/data/ml100k_mm",
        metadata={"help": "raw dataset directory (interactions.csv, items.csv, images)"})
    prepared_dir: str = field(
        default="prepared/ml100k_mm",
        metadata={"help": "where jobs.prepare writes the prepared data and training reads it"})
    source: SourceConfig = field(default_factory=SourceConfig)
    max_users: int = field(
        default=0,
        metadata={"help": "0 = all users; N > 0 keeps the first N users by id (a real slice, for tiny runs)"})
    max_history: int = field(default=50, metadata={"help": "history items before each target (L)"})
    time_split_at: str = field(
        default="", metadata={"help": '"" = leave-one-out; an ISO date T = train before T, evaluate at/after T'})
    validation_from: str = field(
        default="",
        metadata={"help": 'with data.time_split_at=T: an ISO date V < T = validate on every interaction in [V, T) '
                          'and train only before V; "" = validate on each user\'s last interaction before T'})
    max_image_bytes: int = field(
        default=20_000_000,
        metadata={"help": "an image file larger than this is refused from its size, never read (posters: ~20 KB)"})
    positive_rating: float = field(default=4.0, metadata={"help": "model.task=ctr: a rating >= this is a click"})
    max_bad_fraction: float = field(
        default=0.2, metadata={"help": "fail when a larger share of catalogue items has a content problem"})
    max_dropped_fraction: float = field(
        default=0.2, metadata={"help": "fail when a larger share of interaction rows is unusable and dropped"})
    decode_actors: int = field(
        default=1, metadata={"help": "Ray Data actors decoding item images and text for training"})
    materialize_catalog: bool = field(
        default=True, metadata={"help": "hold the decoded catalogue in the object store (false for huge catalogues)"})
    decode_cpus: float = field(
        default=0.25,
        metadata={"help": "CPUs per decode actor (fractional: Ray Data's own tasks need a whole CPU on 2 cores)"})
    # Cold-start evaluation: this seeded random fraction of catalogue items is held out of training entirely
    # (0 = off); test metrics are then also reported on warm and on cold test targets.
    cold_item_fraction: float = field(
        default=0.0,
        metadata={"help": "share of items held out of training entirely, for cold-start metrics (0 = off)"})

    # Fixed (not settings). Larger images are refused as decompression bombs.
    max_image_pixels: ClassVar[int] = 40_000_000
    decode_cache_items: ClassVar[int] = 4096  # decoded images kept per decode actor (0 = decode every time)
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
        split_at = _iso_date("time_split_at", self.time_split_at)
        if self.validation_from:
            if split_at is None:
                raise ValueError("data.validation_from needs data.time_split_at (a validation window is part of the "
                                 "time split; leave-one-out validates on each user's second to last interaction)")
            if _iso_date("validation_from", self.validation_from) >= split_at:
                raise ValueError(f"data.validation_from={self.validation_from!r} must be before "
                                 f"data.time_split_at={self.time_split_at!r}")
        for key in ("max_history", "decode_actors", "max_image_bytes"):
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

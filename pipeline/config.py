"""Configuration of the data side: where raw data lives, its column names, and how examples are built."""
from __future__ import annotations

from dataclasses import dataclass, field

SPLITS = ("leave_one_out", "time")
TIMESTAMP_UNITS = ("auto", "s", "ms", "us", "ns", "iso")


@dataclass(kw_only=True)
class SourceConfig:
    """Layout of a raw dataset directory like ../shared/data/ml100k_mm (column names are configurable)."""

    interactions_file: str = "interactions.csv"
    items_file: str = "items.csv"
    user_column: str = "user_id"
    item_column: str = "item_id"
    timestamp_column: str = "timestamp"
    # Unit of the raw timestamps: s / ms / us / ns since the epoch, iso (ISO 8601 strings; UTC unless an offset is
    # given), or auto: numbers by their magnitude (1e11 s is the year 5138, 1e11 ms is 1973), else ISO strings.
    timestamp_unit: str = "auto"
    rating_column: str = "rating"  # "" when the data has none
    image_column: str = "image"  # relative path of the image file under the raw dir; "" for none
    text_fields: tuple[str, ...] = ("title", "genres", "description")
    list_separator: str = "|"  # genres-like fields are joined with ", " instead

    def __post_init__(self) -> None:
        if not self.text_fields:
            raise ValueError("data.source.text_fields must name at least one column")
        if self.timestamp_unit not in TIMESTAMP_UNITS:
            raise ValueError(f"data.source.timestamp_unit={self.timestamp_unit!r}; valid choices: "
                             f"{', '.join(TIMESTAMP_UNITS)}")


@dataclass(kw_only=True)
class DataConfig:
    raw_dir: str = "../shared/data/ml100k_mm"
    prepared_dir: str = "prepared/ml100k_mm"
    source: SourceConfig = field(default_factory=SourceConfig)
    max_users: int = 0  # 0 = all users; > 0 keeps the first N users by id (a real slice, for tiny runs)
    max_history: int = 50  # L: history items before each target
    split: str = "leave_one_out"
    time_split_at: str = ""  # ISO date T for split="time": train before T, evaluate at/after T
    max_image_pixels: int = 40_000_000  # larger images are refused as decompression bombs
    max_image_bytes: int = 20_000_000  # a larger image file is refused from its size, never read (posters: ~20 KB)
    positive_rating: float = 4.0  # CTR label: rating >= this is a click
    max_bad_fraction: float = 0.2  # fail when more catalogue items than this have a content problem
    max_dropped_fraction: float = 0.2  # fail when more interaction rows than this are unusable and dropped
    decode_actors: int = 1
    decode_cache_items: int = 4096  # decoded images kept per decode actor (bounded; 0 = decode every time)
    materialize_catalog: bool = True  # keep the decoded catalogue in the object store (set false for huge ones)
    # A materialised catalogue whose decoded content is at most this size is decoded in the driver process with
    # the same ItemContentDecoder instead of a Ray Data pass (whose read task and actor pool cost ~20 s to start
    # on 2 cores, for ~2 s of decoding at 1,682 items). 0 = always a Ray Data pass.
    driver_decode_max_mb: int = 512
    decode_cpus: float = 0.25  # fractional, so Ray Data's listing task still finds a whole CPU on 2 cores
    shuffle_buffer: int = 2048
    # Cold-start evaluation: this seeded random fraction of catalogue items is held out of training entirely
    # (0 = off); test metrics are then also reported on warm and on cold test targets.
    cold_item_fraction: float = 0.0
    cold_seed: int = 0

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"data.split={self.split!r}; valid choices: {', '.join(SPLITS)}")
        if self.split == "time" and not self.time_split_at:
            raise ValueError("data.time_split_at must be an ISO date when data.split=time")
        for key in ("max_history", "decode_actors", "max_image_pixels", "max_image_bytes"):
            if getattr(self, key) < 1:
                raise ValueError(f"data.{key} must be >= 1, got {getattr(self, key)}")
        if self.max_users < 0:
            raise ValueError("data.max_users must be >= 0 (0 = all)")
        for key in ("max_bad_fraction", "max_dropped_fraction"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"data.{key} must be in [0, 1], got {getattr(self, key)}")
        if self.driver_decode_max_mb < 0:
            raise ValueError("data.driver_decode_max_mb must be >= 0 (0 = always decode with Ray Data)")
        if self.decode_cpus <= 0:
            raise ValueError("data.decode_cpus must be > 0")
        if not 0.0 <= self.cold_item_fraction < 1.0:
            raise ValueError(f"data.cold_item_fraction must be in [0, 1), got {self.cold_item_fraction}")

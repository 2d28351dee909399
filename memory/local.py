"""The memory bank as training sees it, in one process (no Ray): the interface and its local implementation.

`ItemBank` is everything a trainer needs from a bank: one `lookup` of the step's ids, one asynchronous `update`
of the items it encoded, `flush` at the end of an epoch, and save/load with the checkpoint. Two implementations:
`LocalMemoryBankClient` here (one `MemoryBank` in this process: unit tests, in-process benchmarks) and
`memory.client.MemoryBankClient` (shards on Ray actors). Both write the same snapshot layout, so either loads
the other's.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Protocol

from memory.bank import LookupResult, MemoryBank

BANK_META_FILE = "bank.json"


class ItemBank(Protocol):
    capacity: int
    dim: int
    num_shards: int

    @property
    def last_lookup_seconds(self) -> float: ...

    def lookup(self, ids: Any) -> LookupResult:
        """[N] item ids -> LookupResult ([N, D] vectors, written steps, found), in input order."""

    def update(self, ids: Any, vectors: Any, step: int, wait: bool = False) -> None:
        """[N] ids <- [N, D] vectors written at `step`; asynchronous unless `wait`."""

    def flush(self) -> None: ...

    def save(self, directory: str | os.PathLike[str]) -> Path: ...

    def load(self, directory: str | os.PathLike[str]) -> None: ...

    def stats(self) -> dict[str, Any]: ...


def shard_directory(directory: str | os.PathLike[str], shard_index: int) -> str:
    """Where shard k keeps its part of a bank saved into `directory`."""
    return os.path.join(os.fspath(directory), f"shard_{shard_index:03d}")


class RoundTripTimer:
    """Counters for logging "bank round-trip time per step"."""

    def __init__(self) -> None:
        self.last_lookup_seconds = 0.0
        self.total_lookup_seconds = 0.0
        self.num_lookups = 0
        self.last_update_seconds = 0.0
        self.total_update_seconds = 0.0
        self.num_updates = 0

    def timings(self) -> dict[str, float]:
        return {
            "last_lookup_seconds": self.last_lookup_seconds,
            "total_lookup_seconds": self.total_lookup_seconds,
            "num_lookups": float(self.num_lookups),
            "mean_lookup_seconds": self.total_lookup_seconds / max(self.num_lookups, 1),
            "last_update_seconds": self.last_update_seconds,
            "total_update_seconds": self.total_update_seconds,
            "num_updates": float(self.num_updates),
        }

    def _record_lookup(self, seconds: float) -> None:
        self.last_lookup_seconds = seconds
        self.total_lookup_seconds += seconds
        self.num_lookups += 1

    def _record_update(self, seconds: float) -> None:
        self.last_update_seconds = seconds
        self.total_update_seconds += seconds
        self.num_updates += 1


def write_bank_meta(directory: Path, meta: dict[str, Any]) -> None:
    tmp = directory / f".{BANK_META_FILE}.tmp"
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, directory / BANK_META_FILE)


def read_bank_meta(directory: Path) -> dict[str, Any]:
    path = directory / BANK_META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no sharded memory bank saved in {directory} (missing {BANK_META_FILE})")
    return json.loads(path.read_text())


class LocalMemoryBankClient:
    """Same API as MemoryBankClient around one in-process MemoryBank (no Ray)."""

    def __init__(
        self, *, capacity: int, dim: int, snapshot_dir: str | None = None, restore_from: str | None = None
    ) -> None:
        self.capacity = capacity
        self.dim = dim
        self.num_shards = 1
        self.snapshot_dir = snapshot_dir
        self.max_pending_seen = 0
        self.timer = RoundTripTimer()
        if MemoryBank.has_snapshot(snapshot_dir):
            self.bank = MemoryBank.load(snapshot_dir, expected_capacity=capacity, expected_dim=dim)
        elif restore_from is not None:
            self.bank = MemoryBank.load(restore_from, expected_capacity=capacity, expected_dim=dim)
        else:
            self.bank = MemoryBank(capacity, dim)

    @property
    def pending_updates(self) -> int:
        return 0

    @property
    def last_lookup_seconds(self) -> float:
        return self.timer.last_lookup_seconds

    def timings(self) -> dict[str, float]:
        return self.timer.timings()

    def lookup(self, ids: Any) -> LookupResult:
        """[N] ids -> LookupResult ([N, D] vectors) in input order."""
        started = time.perf_counter()
        result = self.bank.lookup(ids)
        self.timer._record_lookup(time.perf_counter() - started)
        return result

    def update(self, ids: Any, vectors: Any, step: int, wait: bool = False) -> None:
        """Write [N] ids <- [N, D] vectors at `step` (always synchronous here)."""
        started = time.perf_counter()
        self.bank.update(ids, vectors, step)
        self.timer._record_update(time.perf_counter() - started)

    def flush(self) -> None:
        return None

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Same layout as MemoryBankClient.save with one shard, so either client can load it."""
        directory = Path(directory).resolve()
        directory.mkdir(parents=True, exist_ok=True)
        self.bank.save(shard_directory(directory, 0))
        write_bank_meta(directory, {"num_shards": 1, "capacity": self.capacity, "dim": self.dim})
        return directory

    def load(self, directory: str | os.PathLike[str]) -> None:
        directory = Path(directory).resolve()
        meta = read_bank_meta(directory)
        if meta.get("num_shards") != 1:
            raise ValueError(f"saved bank in {directory} has {meta.get('num_shards')} shards; a local client needs 1")
        self.bank = MemoryBank.load(shard_directory(directory, 0), expected_capacity=self.capacity, expected_dim=self.dim)

    def snapshot(self, step: int) -> bool:
        if self.snapshot_dir is None:
            return False
        self.bank.save(self.snapshot_dir, step=step)
        return True

    def stats(self) -> dict[str, Any]:
        bank_stats = self.bank.stats()
        return {
            "fill_ratio": bank_stats["fill_ratio"],
            "filled": bank_stats["filled"],
            "capacity": self.capacity,
            "dim": self.dim,
            "num_shards": 1,
            "bytes": bank_stats["bytes"],
            "max_shard_bytes": bank_stats["bytes"],
            "pending_updates": 0,
        }

    def destroy(self) -> None:
        self.bank = MemoryBank(self.capacity, self.dim)


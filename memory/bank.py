"""The memory bank itself: a plain in-process table of the latest embedding of every item.

LEMUR trains content encoders end to end; re-encoding every history item each step is too
costly, so each time an item is encoded its vector is written here (write-on-encode) and history
items are read back from here. This module owns the storage, batched lookup/update, staleness
measurement and atomic on-disk snapshots. It knows nothing about Ray (see `memory/actor.py`).

Memory: a bank of `capacity` rows at `dim` float32 columns costs `capacity * (dim * 4 + 8)` bytes
(the table plus one int64 `written_step` per row). Sharded over `num_shards` actors, each shard
holds about `capacity / num_shards * (dim * 4 + 8)` bytes. Example: 10^8 items at dim 128 over
64 shards -> 1,562,500 rows * 520 B = 812,500,000 B ≈ 0.81 GB (0.76 GiB) per shard, 52 GB in all.
"""
from __future__ import annotations

import json
import os
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SNAPSHOT_FORMAT = "mmrec-memory-bank/1"
META_FILE = "meta.json"
NEVER_WRITTEN = -1


class SnapshotError(ValueError):
    """A snapshot directory is missing, corrupt, or does not match the bank it is loaded into."""


@dataclass
class LookupResult:
    """Rows read from the bank, in the order of the ids asked for.

    vectors: float32 [N, D]; zeros where the item was never written.
    written_step: int64 [N]; the training step of the last write, -1 if never written.
    found: bool [N]; True where the item has been written at least once.
    """

    vectors: np.ndarray
    written_step: np.ndarray
    found: np.ndarray

    def __len__(self) -> int:
        return int(self.found.shape[0])


def as_id_array(ids: Any) -> np.ndarray:
    """Any 1-D integer array-like (numpy, torch, list) -> int64 numpy [N]."""
    if hasattr(ids, "detach"):  # torch.Tensor, without importing torch here
        ids = ids.detach().cpu().numpy()
    array = np.asarray(ids)
    if array.ndim != 1:
        raise ValueError(f"ids must be 1-D [N], got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"ids must be integers, got dtype {array.dtype}")
    return array.astype(np.int64, copy=False)


def as_vector_array(vectors: Any, num_rows: int, dim: int) -> np.ndarray:
    """Any [N, D] array-like (numpy, torch of any float dtype) -> float32 numpy [N, D]."""
    if hasattr(vectors, "detach"):
        import torch  # only reached when a torch tensor was passed

        vectors = vectors.detach().to(device="cpu", dtype=torch.float32).numpy()
    array = np.asarray(vectors, dtype=np.float32)
    if array.shape != (num_rows, dim):
        raise ValueError(f"vectors must have shape [N={num_rows}, dim={dim}], got {tuple(array.shape)}")
    return array


def check_id_range(ids: np.ndarray, capacity: int) -> None:
    """Raise if any id is outside [0, capacity): a silently clipped id would read another item."""
    bad = (ids < 0) | (ids >= capacity)
    if bad.any():
        raise ValueError(
            f"{int(bad.sum())} of {ids.size} ids are outside [0, {capacity}), e.g. {int(ids[bad][0])}"
        )


def _checksum(table: np.ndarray, written_step: np.ndarray) -> str:
    crc = zlib.crc32(np.ascontiguousarray(table).view(np.uint8).reshape(-1))
    crc = zlib.crc32(np.ascontiguousarray(written_step).view(np.uint8).reshape(-1), crc)
    return f"{crc:08x}"


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable; not all filesystems allow opening a directory.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class MemoryBank:
    """Latest embedding per item id: table float32 [capacity, dim], written_step int64 [capacity]."""

    def __init__(self, capacity: int, dim: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.capacity = int(capacity)
        self.dim = int(dim)
        self.table = np.zeros((self.capacity, self.dim), dtype=np.float32)
        self.written_step = np.full(self.capacity, NEVER_WRITTEN, dtype=np.int64)

    @staticmethod
    def nbytes_for(capacity: int, dim: int) -> int:
        """Bytes held by a bank of this size: float32 table + int64 written_step."""
        return int(capacity) * (int(dim) * 4 + 8)

    @property
    def filled(self) -> np.ndarray:
        """bool [capacity]: rows written at least once."""
        return self.written_step >= 0

    def lookup(self, ids: Any) -> LookupResult:
        """[N] item ids -> LookupResult (vectors [N, D], written_step [N], found [N])."""
        ids = as_id_array(ids)
        check_id_range(ids, self.capacity)
        written_step = self.written_step[ids]
        found = written_step >= 0
        vectors = self.table[ids]  # fancy indexing copies: callers may write to it
        vectors[~found] = 0.0
        return LookupResult(vectors=vectors, written_step=written_step, found=found)

    def update(self, ids: Any, vectors: Any, step: int) -> None:
        """Write [N] ids <- [N, D] vectors at `step`; for an id repeated in one call the last row wins."""
        ids = as_id_array(ids)
        vectors = as_vector_array(vectors, ids.shape[0], self.dim)
        if step < 0:
            raise ValueError(f"step must be >= 0 (-1 marks never-written rows), got {step}")
        check_id_range(ids, self.capacity)
        if ids.size == 0:
            return
        # numpy does not promise which duplicate wins in `table[ids] = ...`; pick the last explicitly.
        unique_ids, first_in_reversed = np.unique(ids[::-1], return_index=True)
        last_position = ids.shape[0] - 1 - first_in_reversed
        self.table[unique_ids] = vectors[last_position]
        self.written_step[unique_ids] = step

    def fill_ratio(self) -> float:
        return float(np.count_nonzero(self.filled)) / self.capacity

    def stats(self) -> dict[str, Any]:
        filled = self.filled
        num_filled = int(np.count_nonzero(filled))
        return {
            "capacity": self.capacity,
            "dim": self.dim,
            "filled": num_filled,
            "fill_ratio": num_filled / self.capacity,
            "bytes": self.nbytes_for(self.capacity, self.dim),
            "last_written_step": int(self.written_step.max()) if num_filled else NEVER_WRITTEN,
            "oldest_written_step": int(self.written_step[filled].min()) if num_filled else NEVER_WRITTEN,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "capacity": self.capacity,
            "dim": self.dim,
            "table": self.table.copy(),
            "written_step": self.written_step.copy(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        table = np.asarray(state["table"], dtype=np.float32)
        written_step = np.asarray(state["written_step"], dtype=np.int64)
        if table.shape != (self.capacity, self.dim) or written_step.shape != (self.capacity,):
            raise ValueError(
                f"state has table {tuple(table.shape)} / written_step {tuple(written_step.shape)}, "
                f"this bank needs ({self.capacity}, {self.dim}) / ({self.capacity},)"
            )
        self.table = table.copy()
        self.written_step = written_step.copy()

    def save(self, directory: str | os.PathLike[str], step: int | None = None) -> Path:
        """Snapshot into `directory` atomically; returns the data file written.

        The data goes to a temporary sibling, is fsynced and renamed to a fresh name; then
        meta.json (which names the data file) is replaced the same way. Replacing meta.json is the
        commit point: a crash at any moment before it leaves the previous snapshot loadable.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if step is None:
            step = int(self.written_step.max())
        token = uuid.uuid4().hex[:12]
        data_name = f"bank-{token}.npz"
        data_tmp = directory / f".{data_name}.tmp"
        meta_tmp = directory / f".{META_FILE}.{token}.tmp"
        meta = {
            "format": SNAPSHOT_FORMAT,
            "capacity": self.capacity,
            "dim": self.dim,
            "step": int(step),
            "filled": int(np.count_nonzero(self.filled)),
            "data_file": data_name,
            "checksum": _checksum(self.table, self.written_step),
        }
        try:
            with open(data_tmp, "wb") as handle:
                np.savez(handle, table=self.table, written_step=self.written_step)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(data_tmp, directory / data_name)
            with open(meta_tmp, "w") as handle:
                json.dump(meta, handle, indent=2)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(meta_tmp, directory / META_FILE)
        except BaseException:
            # meta.json still names the previous data file; nothing written here is referenced.
            for leftover in (data_tmp, meta_tmp, directory / data_name):
                leftover.unlink(missing_ok=True)
            raise
        _fsync_directory(directory)
        # Only after the commit: drop data files no meta.json points to any more.
        for old in directory.glob("bank-*.npz"):
            if old.name != data_name:
                old.unlink(missing_ok=True)
        return directory / data_name

    @staticmethod
    def has_snapshot(directory: str | os.PathLike[str] | None) -> bool:
        return directory is not None and (Path(directory) / META_FILE).is_file()

    @staticmethod
    def read_meta(directory: str | os.PathLike[str]) -> dict[str, Any]:
        meta_path = Path(directory) / META_FILE
        if not meta_path.is_file():
            raise SnapshotError(f"no memory bank snapshot in {directory} (missing {META_FILE})")
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as error:
            raise SnapshotError(f"corrupt {meta_path}: {error}") from error
        if meta.get("format") != SNAPSHOT_FORMAT:
            raise SnapshotError(f"{meta_path} has format {meta.get('format')!r}, expected {SNAPSHOT_FORMAT!r}")
        return meta

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike[str],
        expected_capacity: int | None = None,
        expected_dim: int | None = None,
    ) -> "MemoryBank":
        """Read a snapshot written by `save`; SnapshotError if missing, corrupt, or of another shape."""
        meta = cls.read_meta(directory)
        capacity, dim = int(meta["capacity"]), int(meta["dim"])
        if expected_capacity is not None and capacity != expected_capacity:
            raise SnapshotError(f"snapshot in {directory} has capacity {capacity}, expected {expected_capacity}")
        if expected_dim is not None and dim != expected_dim:
            raise SnapshotError(f"snapshot in {directory} has dim {dim}, expected {expected_dim}")
        data_path = Path(directory) / meta["data_file"]
        try:
            with np.load(data_path, allow_pickle=False) as data:
                table = data["table"]
                written_step = data["written_step"]
        except (OSError, KeyError, ValueError, EOFError) as error:
            raise SnapshotError(f"cannot read {data_path}: {error}") from error
        if table.shape != (capacity, dim) or table.dtype != np.float32:
            raise SnapshotError(f"{data_path} holds table {table.dtype}{tuple(table.shape)}, meta says float32({capacity}, {dim})")
        if written_step.shape != (capacity,) or written_step.dtype != np.int64:
            raise SnapshotError(f"{data_path} holds written_step {written_step.dtype}{tuple(written_step.shape)}")
        if _checksum(table, written_step) != meta["checksum"]:
            raise SnapshotError(f"checksum mismatch in {data_path}: the snapshot is corrupt")
        bank = cls(capacity, dim)
        bank.table = table
        bank.written_step = written_step
        return bank


def measure_staleness(cached: LookupResult, fresh_vectors: np.ndarray, step: int) -> dict[str, float]:
    """Compare cached rows with freshly encoded vectors of the same items ([N, D] each).

    Only rows that were found count. Returns how old the cached rows were (in steps), their mean
    cosine distance and mean relative L2 drift from the fresh vectors: the cost of reading the bank
    instead of re-encoding.
    """
    fresh_vectors = np.asarray(fresh_vectors, dtype=np.float32)
    if fresh_vectors.shape != cached.vectors.shape:
        raise ValueError(f"fresh vectors {fresh_vectors.shape} do not match cached {cached.vectors.shape}")
    found = cached.found
    count = int(np.count_nonzero(found))
    if count == 0:
        return {"count": 0.0, "mean_age_steps": 0.0, "mean_cosine_distance": 0.0, "mean_relative_l2": 0.0}
    old = cached.vectors[found].astype(np.float64)
    new = fresh_vectors[found].astype(np.float64)
    eps = 1e-12
    old_norm = np.linalg.norm(old, axis=1)
    new_norm = np.linalg.norm(new, axis=1)
    cosine = (old * new).sum(axis=1) / np.maximum(old_norm * new_norm, eps)
    relative_l2 = np.linalg.norm(old - new, axis=1) / np.maximum(new_norm, eps)
    return {
        "count": float(count),
        "mean_age_steps": float(np.mean(step - cached.written_step[found])),
        "mean_cosine_distance": float(np.mean(1.0 - cosine)),
        "mean_relative_l2": float(np.mean(relative_l2)),
    }

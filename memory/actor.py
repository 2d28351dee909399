"""The Ray wiring of the memory bank: one actor per shard, each wrapping a plain `MemoryBank`.

Sharding: global item id i lives on shard `i % num_shards` at local row `i // num_shards`, so
shard k owns `ceil((capacity - k) / num_shards)` rows. The actor speaks local rows only; mapping
global ids to shards is the client's job (`memory/client.py`).

Fault tolerance: the actor is restartable (`max_restarts=-1`). When its process dies Ray runs
`__init__` again with the same arguments, and `__init__` reloads the last snapshot written to
`snapshot_dir` (or, failing that, the `restore_from` snapshot the bank was created from). On
first creation an explicit `restore_from` wins over an older snapshot in `snapshot_dir`. Writes
after the last snapshot are lost, which is acceptable for a cache of embeddings that training
rewrites as it encodes items.
"""
from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np
import ray

from memory.bank import LookupResult, MemoryBank

# A call that hit a dying shard is retried once it is back; update is idempotent, so a retry is safe.
SHARD_MAX_TASK_RETRIES = 3


def shard_capacity(capacity: int, num_shards: int, shard_index: int) -> int:
    """Rows owned by shard `shard_index`: ids shard_index, shard_index + num_shards, ... < capacity."""
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index must be in [0, {num_shards}), got {shard_index}")
    return max(0, (capacity - shard_index + num_shards - 1) // num_shards)


def _was_restarted() -> bool:
    """True inside an actor that Ray is bringing back after its process died."""
    if not ray.is_initialized():
        return False
    try:
        with warnings.catch_warnings():
            # Ray 2.60 reads its own deprecated `actor_id` inside this property and warns about it.
            warnings.simplefilter("ignore", DeprecationWarning)
            return bool(ray.get_runtime_context().was_current_actor_reconstructed)
    except Exception:  # not inside an actor (plain use in tests or a driver)
        return False


class MemoryBankShardImpl:
    """One shard of the bank; plain Python so it can be tested without Ray."""

    def __init__(
        self,
        *,
        shard_index: int,
        num_shards: int,
        capacity: int,
        dim: int,
        snapshot_dir: str | None = None,
        restore_from: str | None = None,
    ) -> None:
        self.shard_index = shard_index
        self.num_shards = num_shards
        self.global_capacity = capacity
        self.local_capacity = shard_capacity(capacity, num_shards, shard_index)
        if self.local_capacity < 1:
            raise ValueError(f"capacity {capacity} leaves shard {shard_index} of {num_shards} empty")
        self.dim = dim
        self.snapshot_dir = snapshot_dir
        self.last_snapshot_step = -1
        if restore_from is not None and not _was_restarted():
            # An explicit restore beats an older live snapshot, but only on first creation.
            self.load(restore_from)
        elif MemoryBank.has_snapshot(snapshot_dir):
            self.bank = self._read(snapshot_dir)
            self.source = "snapshot"
            self.last_snapshot_step = int(MemoryBank.read_meta(snapshot_dir)["step"])
        elif restore_from is not None:
            self.bank = self._read(restore_from)
            self.source = "restore"
        else:
            self.bank = MemoryBank(self.local_capacity, dim)
            self.source = "empty"

    def _read(self, directory: str) -> MemoryBank:
        return MemoryBank.load(directory, expected_capacity=self.local_capacity, expected_dim=self.dim)

    def lookup(self, local_rows: np.ndarray) -> LookupResult:
        """[N] local rows -> LookupResult with [N, D] vectors."""
        return self.bank.lookup(local_rows)

    def update(self, local_rows: np.ndarray, vectors: np.ndarray, step: int) -> int:
        """Write [N] local rows <- [N, D] vectors; returns N (something cheap to wait on)."""
        self.bank.update(local_rows, vectors, step)
        return int(len(local_rows))

    def save(self, directory: str) -> str:
        self.bank.save(directory)
        return directory

    def load(self, directory: str) -> dict[str, Any]:
        self.bank = self._read(directory)
        self.source = "restore"
        if self.snapshot_dir is not None:
            # Without this a restart would bring back the older snapshot, not what was just loaded.
            self.snapshot(int(MemoryBank.read_meta(directory)["step"]))
        return self.stats()

    def snapshot(self, step: int) -> bool:
        """Save into snapshot_dir (what a restart reloads); False when the shard has none."""
        if self.snapshot_dir is None:
            return False
        self.bank.save(self.snapshot_dir, step=step)
        self.last_snapshot_step = int(step)
        return True

    def stats(self) -> dict[str, Any]:
        return {
            **self.bank.stats(),
            "shard_index": self.shard_index,
            "num_shards": self.num_shards,
            "global_capacity": self.global_capacity,
            "source": self.source,
            "last_snapshot_step": self.last_snapshot_step,
            "pid": os.getpid(),
        }


# num_cpus=0: the bank is memory-bound and must never block training workers from being scheduled.
MemoryBankShard = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=SHARD_MAX_TASK_RETRIES)(
    MemoryBankShardImpl
)

"""How training code talks to the memory bank: global ids in, one round-trip per shard out.

`MemoryBankClient` drives the sharded Ray actors (`memory/actor.py`); `LocalMemoryBankClient`
has the same API around one in-process `MemoryBank` (unit tests, single-process benchmarks).
Both accept numpy or torch ids/vectors and return numpy `LookupResult`s whose arrays are
writable, so `torch.from_numpy(result.vectors)` is safe.

Ordering: Ray runs the calls one caller makes to one actor in submission order, so a lookup
issued after an asynchronous update from the same client already sees that update. `flush()`
is still what makes the updates' errors surface, and what a different process must wait for.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray

from memory.actor import MemoryBankShard, shard_capacity
from memory.bank import LookupResult, as_id_array, as_vector_array, check_id_range
from memory.local import (BANK_META_FILE, LocalMemoryBankClient, RoundTripTimer, read_bank_meta,  # noqa: F401
                          shard_directory, write_bank_meta)

def shard_actor_name(name: str, shard_index: int) -> str:
    return f"{name}-shard{shard_index}"


class MemoryBankClient:
    """Global-id view of a bank sharded over named actors `f"{name}-shard{k}"`.

    Picklable: pickling keeps only the bank's name, namespace and sizes; the unpickled copy finds
    the actors again with `ray.get_actor` on first use and starts with no pending updates.
    """

    def __init__(
        self,
        *,
        name: str,
        num_shards: int,
        capacity: int,
        dim: int,
        namespace: str | None = None,
        max_inflight_updates: int = 4,
        handles: list[Any] | None = None,
    ) -> None:
        if max_inflight_updates < 1:
            raise ValueError(f"max_inflight_updates must be >= 1, got {max_inflight_updates}")
        self.name = name
        self.num_shards = num_shards
        self.capacity = capacity
        self.dim = dim
        self.namespace = namespace
        self.max_inflight_updates = max_inflight_updates
        self._handles = handles
        self._pending: list[ray.ObjectRef] = []
        self.max_pending_seen = 0
        self.timer = RoundTripTimer()

    @classmethod
    def connect(
        cls, name: str, num_shards: int, namespace: str | None = None, max_inflight_updates: int = 4
    ) -> "MemoryBankClient":
        """Attach to a bank created elsewhere (e.g. by the driver) from a Ray worker."""
        handles = [ray.get_actor(shard_actor_name(name, k), namespace=namespace) for k in range(num_shards)]
        first = ray.get(handles[0].stats.remote())
        if first["num_shards"] != num_shards:
            raise ValueError(f"bank {name!r} has {first['num_shards']} shards, not {num_shards}")
        return cls(
            name=name,
            num_shards=num_shards,
            capacity=first["global_capacity"],
            dim=first["dim"],
            namespace=namespace,
            max_inflight_updates=max_inflight_updates,
            handles=handles,
        )

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        # Handles and refs belong to the process that made them; the copy re-resolves by name.
        state["_handles"] = None
        state["_pending"] = []
        return state

    @property
    def handles(self) -> list[Any]:
        if self._handles is None:
            self._handles = [
                ray.get_actor(shard_actor_name(self.name, k), namespace=self.namespace)
                for k in range(self.num_shards)
            ]
        return self._handles

    @property
    def pending_updates(self) -> int:
        return len(self._pending)

    @property
    def last_lookup_seconds(self) -> float:
        return self.timer.last_lookup_seconds

    def timings(self) -> dict[str, float]:
        return self.timer.timings()

    def _split(self, ids: np.ndarray) -> tuple[np.ndarray, list[tuple[int, np.ndarray, np.ndarray]]]:
        """[N] global ids -> (order, [(shard, positions-in-order slice, local rows)]) per non-empty shard.

        A stable sort keeps each shard's rows in input order, so "last duplicate wins" survives sharding.
        """
        shard_of = ids % self.num_shards
        order = np.argsort(shard_of, kind="stable")
        counts = np.bincount(shard_of, minlength=self.num_shards)
        parts = []
        start = 0
        for shard_index, count in enumerate(counts.tolist()):
            if count:
                positions = order[start : start + count]
                parts.append((shard_index, positions, ids[positions] // self.num_shards))
            start += count
        return order, parts

    def lookup(self, ids: Any) -> LookupResult:
        """[N] global ids -> LookupResult ([N, D] vectors) in input order; one round-trip per shard."""
        started = time.perf_counter()
        ids = as_id_array(ids)
        check_id_range(ids, self.capacity)
        _, parts = self._split(ids)
        handles = self.handles
        refs = [handles[shard_index].lookup.remote(local_rows) for shard_index, _, local_rows in parts]
        shard_results = ray.get(refs)
        # Fresh arrays: object-store results are read-only views, these are writable.
        vectors = np.zeros((ids.shape[0], self.dim), dtype=np.float32)
        written_step = np.full(ids.shape[0], -1, dtype=np.int64)
        found = np.zeros(ids.shape[0], dtype=bool)
        for (_, positions, _), result in zip(parts, shard_results):
            vectors[positions] = result.vectors
            written_step[positions] = result.written_step
            found[positions] = result.found
        self.timer._record_lookup(time.perf_counter() - started)
        return LookupResult(vectors=vectors, written_step=written_step, found=found)

    def update(self, ids: Any, vectors: Any, step: int, wait: bool = False) -> None:
        """Write [N] global ids <- [N, D] vectors at `step`.

        Asynchronous unless `wait`: at most `max_inflight_updates` shard calls stay unfinished;
        beyond that this call blocks until enough have finished (and re-raises their errors).
        """
        started = time.perf_counter()
        ids = as_id_array(ids)
        vectors = as_vector_array(vectors, ids.shape[0], self.dim)
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        check_id_range(ids, self.capacity)
        handles = self.handles
        for shard_index, positions, local_rows in self._split(ids)[1]:
            self._pending.append(handles[shard_index].update.remote(local_rows, vectors[positions], step))
        self.max_pending_seen = max(self.max_pending_seen, len(self._pending))
        if wait:
            self.flush()
        elif len(self._pending) > self.max_inflight_updates:
            excess = len(self._pending) - self.max_inflight_updates
            done, self._pending = ray.wait(self._pending, num_returns=excess)
            ray.get(done)
        self.timer._record_update(time.perf_counter() - started)

    def flush(self) -> None:
        """Wait for every pending update; raises the first error among them."""
        pending, self._pending = self._pending, []
        if pending:
            ray.get(pending)

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Every shard saves atomically into directory/shard_{k:03d}; bank.json records the layout."""
        directory = Path(directory).resolve()  # actors run in another working directory
        directory.mkdir(parents=True, exist_ok=True)
        self.flush()
        ray.get([h.save.remote(shard_directory(directory, k)) for k, h in enumerate(self.handles)])
        write_bank_meta(
            directory, {"num_shards": self.num_shards, "capacity": self.capacity, "dim": self.dim}
        )
        return directory

    def load(self, directory: str | os.PathLike[str]) -> None:
        """Replace every shard's content with a bank saved by `save` with the same layout."""
        directory = Path(directory).resolve()
        meta = read_bank_meta(directory)
        layout = {"num_shards": self.num_shards, "capacity": self.capacity, "dim": self.dim}
        mismatched = {key: meta.get(key) for key in layout if meta.get(key) != layout[key]}
        if mismatched:
            raise ValueError(f"saved bank in {directory} has {mismatched}, this bank has {layout}")
        self.flush()
        ray.get([h.load.remote(shard_directory(directory, k)) for k, h in enumerate(self.handles)])

    def snapshot(self, step: int) -> bool:
        """Every shard saves into its snapshot_dir (what a restarted shard reloads)."""
        self.flush()
        return all(ray.get([h.snapshot.remote(step) for h in self.handles]))

    def shard_stats(self) -> list[dict[str, Any]]:
        return ray.get([h.stats.remote() for h in self.handles])

    def stats(self) -> dict[str, Any]:
        per_shard = self.shard_stats()
        filled = sum(s["filled"] for s in per_shard)
        return {
            "fill_ratio": filled / self.capacity,
            "filled": filled,
            "capacity": self.capacity,
            "dim": self.dim,
            "num_shards": self.num_shards,
            "bytes": sum(s["bytes"] for s in per_shard),
            "max_shard_bytes": max(s["bytes"] for s in per_shard),
            "pending_updates": self.pending_updates,
        }

    def destroy(self) -> None:
        """Kill the shard actors for good (no restart)."""
        self._pending = []
        for handle in self.handles:
            ray.kill(handle, no_restart=True)
        self._handles = None


def create_memory_bank(
    name: str,
    capacity: int,
    dim: int,
    num_shards: int,
    namespace: str | None = None,
    snapshot_dir: str | None = None,
    restore_from: str | None = None,
    lifetime: str | None = None,
    max_inflight_updates: int = 4,
) -> MemoryBankClient:
    """Create (or attach to) the named shard actors of a bank and return a client for it.

    snapshot_dir: shard k snapshots into snapshot_dir/shard_{k:03d} and reloads it on restart.
    restore_from: a directory written by `MemoryBankClient.save` to start from.
    lifetime: None (dies with the driver's job) or "detached" (outlives it; not a cluster restart).
    An actor that already exists under the name is reused (get_if_exists semantics).
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if capacity < num_shards:
        raise ValueError(f"capacity ({capacity}) must be >= num_shards ({num_shards}) so no shard is empty")
    if lifetime not in (None, "detached"):
        raise ValueError(f"lifetime must be None or 'detached', got {lifetime!r}")
    if restore_from is not None:
        restore_path = Path(restore_from).resolve()
        meta = read_bank_meta(restore_path)
        expected = {"num_shards": num_shards, "capacity": capacity, "dim": dim}
        if {key: meta.get(key) for key in expected} != expected:
            raise ValueError(f"saved bank in {restore_path} has {meta}, asked for {expected}")
    snapshot_path = Path(snapshot_dir).resolve() if snapshot_dir is not None else None
    handles = []
    reused = False
    for k in range(num_shards):
        actor_name = shard_actor_name(name, k)
        try:
            handles.append(ray.get_actor(actor_name, namespace=namespace))
            reused = True
            continue
        except ValueError:
            pass  # not there yet: create it below
        handles.append(
            MemoryBankShard.options(
                name=actor_name, namespace=namespace, lifetime=lifetime, get_if_exists=True
            ).remote(
                shard_index=k,
                num_shards=num_shards,
                capacity=capacity,
                dim=dim,
                snapshot_dir=shard_directory(snapshot_path, k) if snapshot_path else None,
                restore_from=shard_directory(restore_path, k) if restore_from is not None else None,
            )
        )
    client = MemoryBankClient(
        name=name,
        num_shards=num_shards,
        capacity=capacity,
        dim=dim,
        namespace=namespace,
        max_inflight_updates=max_inflight_updates,
        handles=handles,
    )
    # Waiting for every shard surfaces constructor errors (bad snapshot, wrong sizes) here.
    per_shard = client.shard_stats()
    if any(s["global_capacity"] != capacity or s["dim"] != dim for s in per_shard):
        raise ValueError(f"existing bank {name!r} does not have capacity {capacity} and dim {dim}")
    if reused and restore_from is not None:
        client.load(restore_path)
    return client


__all__ = [
    "LocalMemoryBankClient",
    "MemoryBankClient",
    "create_memory_bank",
    "shard_actor_name",
    "shard_capacity",
]

"""Integration tests of the sharded memory bank on the shared Ray cluster (`ray_cluster` fixture)."""
from __future__ import annotations

import pickle
import time
import uuid

import numpy as np
import pytest
import torch

from memory.client import LocalMemoryBankClient, MemoryBankClient, create_memory_bank

pytestmark = pytest.mark.integration

CAPACITY = 101  # not a multiple of 3: shards of unequal size
DIM = 8


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _random_updates(seed: int, rounds: int = 5, batch: int = 40):
    rng = np.random.default_rng(seed)
    for step in range(rounds):
        ids = rng.integers(0, CAPACITY, size=batch)  # duplicates on purpose: the last must win
        yield ids, rng.standard_normal((batch, DIM)).astype(np.float32), step


def _assert_same_lookup(left, right):
    assert np.array_equal(left.vectors, right.vectors)
    assert np.array_equal(left.written_step, right.written_step)
    assert np.array_equal(left.found, right.found)


def test_sharded_bank_matches_single_shard_bank(ray_cluster):
    single = create_memory_bank(_name("single"), CAPACITY, DIM, num_shards=1)
    sharded = create_memory_bank(_name("sharded"), CAPACITY, DIM, num_shards=3)
    try:
        for ids, vectors, step in _random_updates(seed=0):
            single.update(ids, vectors, step, wait=True)
            sharded.update(torch.from_numpy(ids), torch.from_numpy(vectors), step, wait=True)
        query = np.random.default_rng(1).permutation(CAPACITY)
        from_single, from_sharded = single.lookup(query), sharded.lookup(query)
        _assert_same_lookup(from_single, from_sharded)
        assert 0.5 < from_sharded.found.mean() < 1.0  # some rows written, some not: both paths exercised
        assert from_sharded.vectors.flags.writeable

        stats = sharded.stats()
        assert stats["fill_ratio"] == pytest.approx(single.stats()["fill_ratio"])
        assert (stats["num_shards"], stats["capacity"], stats["dim"]) == (3, CAPACITY, DIM)
        assert stats["bytes"] == CAPACITY * (DIM * 4 + 8)
        assert [s["capacity"] for s in sharded.shard_stats()] == [34, 34, 33]
        assert sharded.timings()["num_lookups"] == 1 and sharded.last_lookup_seconds > 0.0
        with pytest.raises(ValueError, match=r"1 of 2 ids are outside \[0, 101\)"):
            sharded.lookup(np.array([3, CAPACITY]))
    finally:
        single.destroy()
        sharded.destroy()


def test_async_updates_respect_inflight_bound_and_flush(ray_cluster):
    bound = 2
    client = create_memory_bank(_name("async"), CAPACITY, DIM, num_shards=3, max_inflight_updates=bound)
    try:
        expected = np.zeros((CAPACITY, DIM), dtype=np.float32)
        for ids, vectors, step in _random_updates(seed=2, rounds=8):
            client.update(ids, vectors, step)  # each call issues one ref per shard touched (3 > bound)
            assert client.pending_updates <= bound
            for item_id, vector in zip(ids, vectors):  # reference: a plain loop, so the last write wins
                expected[item_id] = vector
        assert client.pending_updates == bound, "updates must stay asynchronous up to the bound"
        client.flush()
        assert client.pending_updates == 0
        result = client.lookup(np.arange(CAPACITY))
        np.testing.assert_array_equal(result.vectors[result.found], expected[result.found])
        assert result.written_step[result.found].max() == 7
    finally:
        client.destroy()


def test_save_then_load_into_fresh_bank_is_identical(ray_cluster, tmp_path):
    original = create_memory_bank(_name("save"), CAPACITY, DIM, num_shards=3)
    restored = loaded = None
    try:
        for ids, vectors, step in _random_updates(seed=3):
            original.update(ids, vectors, step)  # not flushed: save must flush first
        saved = original.save(tmp_path / "bank")
        assert sorted(p.name for p in saved.iterdir()) == ["bank.json", "shard_000", "shard_001", "shard_002"]
        everything = np.arange(CAPACITY)
        before = original.lookup(everything)

        restored = create_memory_bank(_name("restored"), CAPACITY, DIM, num_shards=3, restore_from=str(saved))
        _assert_same_lookup(before, restored.lookup(everything))

        loaded = create_memory_bank(_name("loaded"), CAPACITY, DIM, num_shards=3)
        assert loaded.stats()["fill_ratio"] == 0.0
        loaded.load(saved)
        _assert_same_lookup(before, loaded.lookup(everything))

        # A different layout is refused before any actor is created.
        with pytest.raises(ValueError, match="num_shards"):
            create_memory_bank(_name("wrong"), CAPACITY, DIM, num_shards=2, restore_from=str(saved))
    finally:
        for client in (original, restored, loaded):
            if client is not None:
                client.destroy()


def _wait_for_new_incarnation(handle, old_pid: int, timeout_s: float = 30.0) -> dict:
    """Poll until the actor answers from a new process (ray.kill is asynchronous)."""
    import ray

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            stats = ray.get(handle.stats.remote(), timeout=5)
            if stats["pid"] != old_pid:
                return stats
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            pass  # dead or restarting: ask again
        time.sleep(0.2)
    raise AssertionError(f"actor did not come back in a new process within {timeout_s} s")


def test_killed_shard_restarts_with_its_last_snapshot(ray_cluster, tmp_path):
    ray = ray_cluster
    # Seed a restore directory with the local client (same on-disk layout as a 1-shard bank).
    seed = LocalMemoryBankClient(capacity=20, dim=DIM)
    seed.update(np.arange(5), np.full((5, DIM), -3.0, dtype=np.float32), step=0)
    seed.save(tmp_path / "seed")
    client = create_memory_bank(
        _name("restart"), 20, DIM, num_shards=1, snapshot_dir=str(tmp_path / "live"), restore_from=str(tmp_path / "seed")
    )
    try:
        assert client.shard_stats()[0]["source"] == "restore"
        np.testing.assert_array_equal(client.lookup(np.arange(5)).vectors, np.full((5, DIM), -3.0))
        snapshotted = np.random.default_rng(4).standard_normal((5, DIM)).astype(np.float32)
        client.update(np.arange(5), snapshotted, step=1)
        assert client.snapshot(step=1)
        client.update(np.array([10, 11]), np.ones((2, DIM), dtype=np.float32), step=2, wait=True)
        handle = client.handles[0]
        old_pid = ray.get(handle.stats.remote())["pid"]

        ray.kill(handle, no_restart=False)
        stats = _wait_for_new_incarnation(handle, old_pid)
        # A restarted shard prefers its own newer snapshot over the directory it was first restored from.
        assert stats["source"] == "snapshot" and stats["last_snapshot_step"] == 1

        result = client.lookup(np.array([0, 1, 2, 3, 4, 10, 11]))
        np.testing.assert_array_equal(result.vectors[:5], snapshotted)
        np.testing.assert_array_equal(result.found, [True] * 5 + [False] * 2)  # writes after the snapshot are lost
        np.testing.assert_array_equal(result.written_step[:5], [1] * 5)
    finally:
        client.destroy()


def test_client_pickles_and_works_inside_a_ray_task(ray_cluster):
    ray = ray_cluster
    name = _name("pickled")
    client = create_memory_bank(name, CAPACITY, DIM, num_shards=3)
    try:
        copy = pickle.loads(pickle.dumps(client))
        assert copy._handles is None and copy.pending_updates == 0
        copy.update(np.array([1, 2, 3]), np.full((3, DIM), 2.0, dtype=np.float32), step=4, wait=True)
        np.testing.assert_array_equal(client.lookup(np.array([2])).vectors, np.full((1, DIM), 2.0))

        @ray.remote(num_cpus=0)
        def write_then_read(bank: MemoryBankClient, ids: np.ndarray) -> np.ndarray:
            bank.update(ids, np.full((len(ids), DIM), 7.0, dtype=np.float32), step=9, wait=True)
            return bank.lookup(ids).written_step

        ids = np.array([0, 50, 100])
        np.testing.assert_array_equal(ray.get(write_then_read.remote(client, ids)), [9, 9, 9])
        np.testing.assert_array_equal(client.lookup(ids).vectors, np.full((3, DIM), 7.0))

        connected = MemoryBankClient.connect(name, num_shards=3)
        assert (connected.capacity, connected.dim) == (CAPACITY, DIM)
        assert connected.stats()["filled"] == 6
        with pytest.raises(ValueError, match="has 3 shards, not 1"):
            MemoryBankClient.connect(name, num_shards=1)
    finally:
        client.destroy()

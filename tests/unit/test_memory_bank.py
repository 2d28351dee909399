"""Unit tests of the memory bank: plain Python and numpy, no Ray started."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import memory.bank as bank_module
from memory.actor import MemoryBankShardImpl, shard_capacity
from memory.bank import LookupResult, MemoryBank, SnapshotError, measure_staleness
from memory.client import LocalMemoryBankClient
from memory.config import MemoryConfig


def _vectors(num_rows: int, dim: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((num_rows, dim)).astype(np.float32)


def test_lookup_update_round_trip_and_found_semantics():
    bank = MemoryBank(capacity=10, dim=4)
    vectors = _vectors(3, 4)
    bank.update(np.array([7, 2, 5]), vectors, step=3)

    result = bank.lookup(np.array([5, 0, 7, 2, 9]))
    np.testing.assert_array_equal(result.found, [True, False, True, True, False])
    np.testing.assert_array_equal(result.written_step, [3, -1, 3, 3, -1])
    np.testing.assert_array_equal(result.vectors[0], vectors[2])
    np.testing.assert_array_equal(result.vectors[2], vectors[0])
    np.testing.assert_array_equal(result.vectors[3], vectors[1])
    assert result.vectors.dtype == np.float32 and result.vectors.shape == (5, 4)
    assert not result.vectors[[1, 4]].any(), "never-written rows must read as zeros"
    assert bank.fill_ratio() == pytest.approx(0.3)

    # A later write replaces the vector and its step; the lookup result is a writable copy.
    bank.update(np.array([2]), np.full((1, 4), 9.0, dtype=np.float32), step=8)
    result.vectors[3] = -1.0
    again = bank.lookup(np.array([2, 7]))
    np.testing.assert_array_equal(again.vectors[0], np.full(4, 9.0, dtype=np.float32))
    np.testing.assert_array_equal(again.written_step, [8, 3])
    stats = bank.stats()
    assert stats["filled"] == 3 and stats["last_written_step"] == 8 and stats["oldest_written_step"] == 3
    assert stats["bytes"] == 10 * (4 * 4 + 8)


def test_duplicate_ids_in_one_update_last_occurrence_wins():
    bank = MemoryBank(capacity=6, dim=2)
    ids = np.array([1, 4, 1, 1, 4, 0])
    vectors = np.arange(12, dtype=np.float32).reshape(6, 2)
    bank.update(ids, vectors, step=1)
    result = bank.lookup(np.array([1, 4, 0]))
    np.testing.assert_array_equal(result.vectors, vectors[[3, 4, 5]])


def test_torch_inputs_are_accepted():
    bank = MemoryBank(capacity=5, dim=3)
    vectors = torch.randn(2, 3, dtype=torch.bfloat16, requires_grad=True)
    bank.update(torch.tensor([4, 0]), vectors, step=0)
    result = bank.lookup(torch.tensor([0, 4]))
    np.testing.assert_array_equal(result.vectors, vectors.detach().float().numpy()[[1, 0]])
    np.testing.assert_array_equal(result.written_step, [0, 0])


@pytest.mark.parametrize("bad_ids", [np.array([0, 10, 11, 3]), np.array([-1, 2])])
def test_ids_out_of_range_raise_with_count_and_example(bad_ids):
    bank = MemoryBank(capacity=10, dim=2)
    num_bad = int(((bad_ids < 0) | (bad_ids >= 10)).sum())
    with pytest.raises(ValueError, match=rf"{num_bad} of {bad_ids.size} ids are outside \[0, 10\)"):
        bank.lookup(bad_ids)
    with pytest.raises(ValueError, match="outside"):
        bank.update(bad_ids, np.zeros((bad_ids.size, 2), dtype=np.float32), step=0)
    assert bank.fill_ratio() == 0.0, "a rejected update must not write the valid ids either"


def test_update_rejects_wrong_vector_shape_and_negative_step():
    bank = MemoryBank(capacity=4, dim=3)
    with pytest.raises(ValueError, match=r"\[N=2, dim=3\]"):
        bank.update(np.array([0, 1]), np.zeros((2, 4), dtype=np.float32), step=0)
    with pytest.raises(ValueError, match=r"\[N=2, dim=3\]"):
        bank.update(np.array([0, 1]), np.zeros((3, 3), dtype=np.float32), step=0)
    with pytest.raises(ValueError, match="step"):
        bank.update(np.array([0]), np.zeros((1, 3), dtype=np.float32), step=-1)
    with pytest.raises(ValueError, match="integers"):
        bank.lookup(np.array([0.5]))


def test_state_dict_round_trip_and_shape_check():
    bank = MemoryBank(capacity=8, dim=3)
    bank.update(np.array([1, 6]), _vectors(2, 3), step=4)
    other = MemoryBank(capacity=8, dim=3)
    other.load_state_dict(bank.state_dict())
    np.testing.assert_array_equal(other.table, bank.table)
    np.testing.assert_array_equal(other.written_step, bank.written_step)
    with pytest.raises(ValueError, match=r"needs \(9, 3\)"):
        MemoryBank(capacity=9, dim=3).load_state_dict(bank.state_dict())


def test_save_load_round_trip_is_exact(tmp_path):
    bank = MemoryBank(capacity=50, dim=16)
    bank.update(np.arange(0, 50, 3), _vectors(17, 16, seed=1), step=12)
    bank.save(tmp_path / "snap")
    meta = json.loads((tmp_path / "snap" / "meta.json").read_text())
    assert (meta["capacity"], meta["dim"], meta["step"], meta["filled"]) == (50, 16, 12, 17)

    loaded = MemoryBank.load(tmp_path / "snap")
    assert np.array_equal(loaded.table, bank.table)
    assert np.array_equal(loaded.written_step, bank.written_step)
    assert loaded.stats() == bank.stats()
    # Saving again replaces the data file instead of piling up old ones.
    bank.save(tmp_path / "snap")
    assert len(list((tmp_path / "snap").glob("bank-*.npz"))) == 1


def test_load_rejects_missing_mismatched_and_corrupt_snapshots(tmp_path):
    with pytest.raises(SnapshotError, match="missing meta.json"):
        MemoryBank.load(tmp_path / "nothing")
    bank = MemoryBank(capacity=20, dim=4)
    bank.update(np.array([3]), _vectors(1, 4), step=0)
    data_file = bank.save(tmp_path / "snap")
    with pytest.raises(SnapshotError, match="capacity 20, expected 21"):
        MemoryBank.load(tmp_path / "snap", expected_capacity=21)
    with pytest.raises(SnapshotError, match="dim 4, expected 8"):
        MemoryBank.load(tmp_path / "snap", expected_dim=8)

    # Flip bytes inside the stored table: the checksum must notice.
    with np.load(data_file) as data:
        table, written_step = data["table"].copy(), data["written_step"]
    table[3, 0] += 1.0
    with open(data_file, "wb") as handle:
        np.savez(handle, table=table, written_step=written_step)
    with pytest.raises(SnapshotError, match="checksum mismatch"):
        MemoryBank.load(tmp_path / "snap")

    data_file.write_bytes(b"not a zip file")
    with pytest.raises(SnapshotError, match="cannot read"):
        MemoryBank.load(tmp_path / "snap")


def _write_half_then_fail(handle, **arrays):
    handle.write(b"PK\x03\x04 half a zip")
    raise OSError("disk full (simulated)")


@pytest.mark.parametrize("failure", ["savez", "commit_rename"])
def test_failed_save_leaves_previous_snapshot_intact(tmp_path, monkeypatch, failure):
    bank = MemoryBank(capacity=30, dim=8)
    first = _vectors(30, 8, seed=2)
    bank.update(np.arange(30), first, step=1)
    bank.save(tmp_path / "snap")

    bank.update(np.arange(30), _vectors(30, 8, seed=3), step=2)
    if failure == "savez":
        monkeypatch.setattr(bank_module.np, "savez", _write_half_then_fail)
    else:
        real_replace = os.replace

        def fail_on_meta(src, dst):
            if str(dst).endswith("meta.json"):
                raise OSError("crash before commit (simulated)")
            return real_replace(src, dst)

        monkeypatch.setattr(bank_module.os, "replace", fail_on_meta)
    with pytest.raises(OSError, match="simulated"):
        bank.save(tmp_path / "snap")
    monkeypatch.undo()

    survivor = MemoryBank.load(tmp_path / "snap")
    assert np.array_equal(survivor.table, first)
    assert (survivor.written_step == 1).all()
    assert not list((tmp_path / "snap").glob(".*.tmp")), "temporary files must be cleaned up"
    assert len(list((tmp_path / "snap").glob("bank-*.npz"))) == 1, "an uncommitted data file must go"
    # And the next save works and wins.
    bank.save(tmp_path / "snap")
    assert (MemoryBank.load(tmp_path / "snap").written_step == 2).all()


def test_nbytes_for_matches_documented_example():
    assert MemoryBank.nbytes_for(10, 4) == 10 * 24
    per_shard = MemoryBank.nbytes_for(10**8 // 64, 128)
    assert per_shard == 812_500_000
    assert MemoryBank(100, 32).table.nbytes + MemoryBank(100, 32).written_step.nbytes == MemoryBank.nbytes_for(100, 32)


def test_measure_staleness_numbers():
    cached = LookupResult(
        vectors=np.array([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]], dtype=np.float32),
        written_step=np.array([4, 8, -1]),
        found=np.array([True, True, False]),
    )
    fresh = np.array([[0.0, 1.0], [0.0, 2.0], [5.0, 5.0]], dtype=np.float32)
    stats = measure_staleness(cached, fresh, step=10)
    assert stats["count"] == 2
    assert stats["mean_age_steps"] == pytest.approx((6 + 2) / 2)
    assert stats["mean_cosine_distance"] == pytest.approx((1.0 + 0.0) / 2)
    assert stats["mean_relative_l2"] == pytest.approx((np.sqrt(2.0) + 0.0) / 2)


def test_shard_capacity_partitions_ids():
    for capacity, num_shards in [(10, 3), (9, 3), (7, 1), (100, 64)]:
        sizes = [shard_capacity(capacity, num_shards, k) for k in range(num_shards)]
        assert sum(sizes) == capacity
        for k, size in enumerate(sizes):
            owned = np.arange(k, capacity, num_shards)
            assert size == owned.size and (owned // num_shards).max() == size - 1


def test_shard_impl_snapshot_and_reload_without_ray(tmp_path):
    shard = MemoryBankShardImpl(shard_index=2, num_shards=3, capacity=10, dim=2, snapshot_dir=str(tmp_path / "s"))
    assert shard.local_capacity == 3 and shard.stats()["source"] == "empty"
    shard.update(np.array([0, 2]), np.ones((2, 2), dtype=np.float32), step=5)
    assert shard.snapshot(step=5)
    reborn = MemoryBankShardImpl(shard_index=2, num_shards=3, capacity=10, dim=2, snapshot_dir=str(tmp_path / "s"))
    assert reborn.stats()["source"] == "snapshot" and reborn.last_snapshot_step == 5
    np.testing.assert_array_equal(reborn.lookup(np.array([0, 1, 2])).found, [True, False, True])
    with pytest.raises(SnapshotError, match="capacity 3, expected 4"):
        MemoryBankShardImpl(shard_index=0, num_shards=3, capacity=10, dim=2, snapshot_dir=str(tmp_path / "s"))


def test_local_client_basic_behaviour(tmp_path):
    client = LocalMemoryBankClient(capacity=12, dim=4)
    vectors = torch.randn(3, 4)
    client.update(torch.tensor([11, 0, 11]), vectors, step=2)
    client.flush()
    result = client.lookup(np.array([11, 0, 5]))
    np.testing.assert_array_equal(result.vectors[0], vectors[2].numpy())
    np.testing.assert_array_equal(result.found, [True, True, False])
    torch.from_numpy(result.vectors).add_(1.0)  # writable: no read-only warning path
    assert client.stats()["fill_ratio"] == pytest.approx(2 / 12)
    assert client.stats()["bytes"] == 12 * (4 * 4 + 8)
    assert client.timings()["num_lookups"] == 1 and client.last_lookup_seconds >= 0.0

    client.save(tmp_path / "saved")
    fresh = LocalMemoryBankClient(capacity=12, dim=4)
    fresh.load(tmp_path / "saved")
    assert np.array_equal(fresh.bank.table, client.bank.table)
    with pytest.raises(SnapshotError, match="capacity 12, expected 13"):
        LocalMemoryBankClient(capacity=13, dim=4).load(tmp_path / "saved")
    with pytest.raises(ValueError, match="outside"):
        client.lookup(np.array([12]))


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"mode": "cache"}, "memory.mode"),
        ({"num_shards": 0}, "memory.num_shards"),
        ({"encode_fraction": 0.0}, "memory.encode_fraction"),
        ({"encode_fraction": 1.5}, "memory.encode_fraction"),
        ({"refresh_every_steps": -1}, "memory.refresh_every_steps"),
    ],
)
def test_config_validation_names_the_key(overrides, key):
    with pytest.raises(ValueError, match=key):
        MemoryConfig(**overrides)


def test_config_mode_error_lists_choices_and_defaults_are_valid():
    with pytest.raises(ValueError, match=r"\['bank', 'recompute', 'catalogue'\]"):
        MemoryConfig(mode="nope")
    config = MemoryConfig()
    assert (config.mode, config.num_shards, config.encode_fraction) == ("bank", 1, 1.0)
    with pytest.raises(TypeError):
        MemoryConfig("bank")  # kw_only

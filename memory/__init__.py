"""LEMUR's memory bank: the latest embedding of every item, written whenever an item is encoded.

- `bank`: the plain store (`MemoryBank`, `LookupResult`, `measure_staleness`, atomic snapshots).
- `actor`: one Ray actor per shard (`MemoryBankShard`); id i lives on shard i % num_shards.
- `client`: what training uses (`create_memory_bank`, `MemoryBankClient.connect`,
  `LocalMemoryBankClient` for single-process use); batched, one round-trip per shard per call.
- `config`: `MemoryConfig`.

Memory per shard: capacity / num_shards * (dim * 4 + 8) bytes (float32 row + int64 written_step).
10^8 items at dim 128 over 64 shards: 1,562,500 * 520 B = 812.5 MB ≈ 0.81 GB (0.76 GiB) per shard.
"""
from memory.actor import MemoryBankShard, shard_capacity, shard_directory
from memory.bank import LookupResult, MemoryBank, SnapshotError, measure_staleness
from memory.client import LocalMemoryBankClient, MemoryBankClient, create_memory_bank, shard_actor_name
from memory.config import MEMORY_MODES, MemoryConfig

__all__ = [
    "MEMORY_MODES",
    "LocalMemoryBankClient",
    "LookupResult",
    "MemoryBank",
    "MemoryBankClient",
    "MemoryBankShard",
    "MemoryConfig",
    "SnapshotError",
    "create_memory_bank",
    "measure_staleness",
    "shard_actor_name",
    "shard_capacity",
    "shard_directory",
]

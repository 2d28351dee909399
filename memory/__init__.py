"""LEMUR's memory bank: the latest embedding of every item, written whenever an item is encoded.

- `bank`: the plain store (`MemoryBank`, `LookupResult`, `measure_staleness`, atomic snapshots).
- `actor`: one Ray actor per shard (`MemoryBankShard`); id i lives on shard i % num_shards.
- `client`: what training uses (`create_memory_bank`, `MemoryBankClient.connect`,
  `LocalMemoryBankClient` for single-process use); batched, one round-trip per shard per call.
- `config`: `MemoryConfig`.

Import the module you need (this package imports nothing, so `memory.config` and `memory.bank` load without Ray).

Memory per shard: capacity / num_shards * (dim * 4 + 8) bytes (float32 row + int64 written_step).
10^8 items at dim 128 over 64 shards: 1,562,500 * 520 B = 812.5 MB ≈ 0.81 GB (0.76 GiB) per shard.
"""

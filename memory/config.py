"""Typed configuration of the memory bank: how history embeddings are obtained and kept fresh."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

MEMORY_MODES = ("bank", "recompute", "catalogue")


@dataclass(kw_only=True)
class MemoryConfig:
    """How training obtains embeddings of history items, and what it keeps per item.

    mode: "bank" reads history items from the memory bank (LEMUR write-on-encode);
        "recompute" re-encodes every history item each step (the exact, costly reference);
        "catalogue" runs every catalogue item through the encoders' trained tops once per step (on the trunk cache)
        and reads history items (through the fusion's dropout), targets and the full softmax's candidates (without
        it) from that table: exact for every item, at the cost of the whole catalogue's tops each step (ml100k_mm:
        1,682 items against ~900 recomputed).
    num_shards: number of bank actors; item id i lives on shard i % num_shards.
    encode_fraction: share of a step's items that are re-encoded (and written back) in "bank" mode.
    refresh_every_steps: every N steps re-encode the whole catalogue into the bank; 0 = only at each evaluation.
    trunk_cache: keep each item's frozen-trunk output (`training.trunk_cache`) so that steps run only the
        encoders' trained top layers.
    fill_with_ray_data: the initial bank fill as a Ray Data batch-inference pass, with as many encoder actors as
        the cluster's CPUs allow (else rank 0 alone).
    """

    mode: str = field(
        default="bank",
        metadata={"help": "bank: history items from the memory bank (LEMUR); recompute: re-encode every history "
                          "item; catalogue: every item through the trained tops once a step (needs the trunk "
                          "cache; the full softmax over fresh vectors)"})
    num_shards: int = field(default=1, metadata={"help": "memory-bank actors; item i lives on shard i % num_shards"})
    encode_fraction: float = field(
        default=1.0,
        metadata={"help": "share of a step's targets run through the encoders, the rest bank vectors (bank mode, one "
                          "target per example; refused where it would be ignored)"})
    refresh_every_steps: int = field(
        default=0,
        metadata={"help": "re-encode the catalogue into the bank every N steps (0 = only at each evaluation)"})
    trunk_cache: bool = field(
        default=True,
        metadata={"help": "run each encoder's frozen layers once per item and keep the output; steps run only the "
                          "trained top layers (off where that is not exact: the run says why)"})
    fill_with_ray_data: bool = field(
        default=False,
        metadata={"help": "fill the bank before training with a Ray Data actor pool (else rank 0 alone)"})

    # Fixed (not settings): re-encoded items per step compared against their cached vector (bank_cosine_cached_
    # fresh), and the fill pass's encoder actors (0 = as many as the cluster's CPUs allow).
    staleness_sample: ClassVar[int] = 64
    # The frozen-trunk cache is off (and the run says so) beyond this size; ml100k_mm with the movielens preset's
    # encoders (top layer of each trained) takes 85 MiB.
    trunk_cache_max_mb: ClassVar[float] = 4096
    fill_actors: ClassVar[int] = 0

    def __post_init__(self) -> None:
        if self.mode not in MEMORY_MODES:
            raise ValueError(f"memory.mode={self.mode!r} is not one of {list(MEMORY_MODES)}")
        if self.num_shards < 1:
            raise ValueError(f"memory.num_shards must be >= 1, got {self.num_shards}")
        if not 0.0 < self.encode_fraction <= 1.0:
            raise ValueError(f"memory.encode_fraction must be in (0, 1], got {self.encode_fraction}")
        if self.mode == "catalogue" and self.encode_fraction < 1.0:
            raise ValueError("memory.encode_fraction < 1 samples the encoder for bank mode; memory.mode=catalogue "
                             "encodes every item each step")
        if self.refresh_every_steps < 0:
            raise ValueError(
                f"memory.refresh_every_steps must be >= 0 (0 = never), got {self.refresh_every_steps}"
            )

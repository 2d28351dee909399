"""The Ray Data wiring: example ids -> (shuffle) -> decode + tokenize item content -> train workers.

Only item ids travel through the shuffle; pixels and tokens are produced in `ItemContentDecoder` actors,
batch by batch, and streamed into `ray.train.get_dataset_shard(...).iter_torch_batches()`. Decoded pixels are
never materialised for the whole dataset.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data
from ray.data import RandomSeedConfig
from ray.data.extensions import ArrowTensorArray

from pipeline.config import DataConfig
from pipeline.content import ContentSpec, ItemContentDecoder, decode_catalog

def decode_blocks(rows: int, actors: int, batch_size: int) -> int:
    """Blocks to cut `rows` ids into: at least 4 per decode actor, at most one per batch."""
    return max(1, min(max(4 * actors, rows // (8 * batch_size)), -(-rows // batch_size)))


def _decode(ds: ray.data.Dataset, items_path: Path, id_column: str, cfg: DataConfig, spec: ContentSpec,
            batch_size: int, with_history_content: bool = False) -> ray.data.Dataset:
    return ds.map_batches(
        ItemContentDecoder,
        fn_constructor_kwargs={
            "items_path": str(items_path),
            "id_column": id_column,
            "image_size": spec.image_size,
            "tokenizer_path": spec.tokenizer_path,
            "max_length": spec.max_length,
            "max_image_pixels": cfg.max_image_pixels,
            "cache_items": cfg.decode_cache_items,
            "with_history_content": with_history_content,
        },
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.decode_actors),
        num_cpus=cfg.decode_cpus,
    )


def id_blocks(table: pa.Table, actors: int, batch_size: int) -> ray.data.Dataset:
    """A small id table (read in this process) as a dataset of ready-cut blocks, in row order.

    No listing, read or repartition tasks run: every Ray Data task that finds no idle worker starts a Python
    worker process, ~3 s of CPU each on a 2-core machine, and a parquet read plus a repartition started 12 of
    them per pass (raylet warnings, `bench/pipeline.py`). One block feeds one decode actor at a time, so enough
    blocks are cut that every actor works.
    """
    bounds = np.linspace(0, table.num_rows, decode_blocks(table.num_rows, actors, batch_size) + 1).astype(np.int64)
    return ray.data.from_arrow([table.slice(start, end - start) for start, end in zip(bounds[:-1], bounds[1:])])


def train_dataset(examples_path: Path, items_path: Path, cfg: DataConfig, spec: ContentSpec,
                  batch_size: int, shuffle: bool = True, with_history_content: bool = False,
                  decode: bool = True, seed: int | None = None) -> ray.data.Dataset:
    """Training examples with their target item's content (and, for memory.mode=recompute, every history
    item's content); a new random order each epoch. `decode=False` (the trainer has a trunk cache, see
    `training.trunk_cache`): ids only, nothing decoded.

    `seed`: the n-th pass (epoch) of every dataset built with this seed shuffles the same way (Ray reseeds each
    execution from the seed and the execution index); rows reach the trainer in that order only where the
    consumer preserves order (`training.driver` does). None: a fresh random order every run.
    """
    table = pq.read_table(examples_path)
    if not decode:
        # the decoder would have turned the fixed-size history lists into an [n, L] array: a tensor column does it
        history = table.column("history").combine_chunks()
        table = table.set_column(table.schema.get_field_index("history"), "history", ArrowTensorArray.from_numpy(
            history.values.to_numpy().reshape(len(history), history.type.list_size)))
    ds = id_blocks(table, cfg.decode_actors, batch_size)
    if shuffle:
        # ids only: cheap, and re-run (new order) every epoch
        ds = ds.random_shuffle(seed=None if seed is None else RandomSeedConfig(seed=seed, reseed_after_execution=True))
    return _decode(ds, items_path, "target", cfg, spec, batch_size, with_history_content) if decode else ds


def decoded_catalog_dataset(items_path: Path, cfg: DataConfig, spec: ContentSpec,
                            batch_size: int = 256) -> ray.data.Dataset:
    """The same rows as `catalog_dataset(...).materialize()`, decoded in this process, one block per batch.

    For catalogues small enough to hold decoded (`data.driver_decode_max_mb`): the decode itself is seconds,
    while a Ray Data pass first starts an actor pool.
    """
    return ray.data.from_arrow([
        pa.table({name: ArrowTensorArray.from_numpy(values) if values.ndim > 1 else pa.array(values)
                  for name, values in batch.items()})
        for batch in decode_catalog(items_path, spec, batch_size, cfg.max_image_pixels)
    ])


def catalog_dataset(items_path: Path, cfg: DataConfig, spec: ContentSpec, batch_size: int = 256) -> ray.data.Dataset:
    """Every catalogue item with its content, in item_index order chunks (for bank fills and evaluation)."""
    ds = id_blocks(pq.read_table(items_path, columns=["item_index"]), cfg.decode_actors, batch_size)
    return _decode(ds, items_path, "item_index", cfg, spec, batch_size)

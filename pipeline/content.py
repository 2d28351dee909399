"""Item content and examples in this process (no Ray): decoded catalogue batches and example files.

`ItemContentDecoder` turns item ids into decoded pixels and token ids; it is the Ray Data UDF of
`pipeline.stages` and, called directly, the in-process catalogue decoder (`decode_catalog`) of offline
evaluation, export and small catalogues. `write_examples` / `read_examples` store examples as ids only.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.decode import IMAGE_OK, decode_image
from pipeline.sequences import Examples

log = logging.getLogger(__name__)


def write_examples(examples: Examples, path: Path) -> Path:
    """Examples -> one parquet file with a fixed-length list column `history` (ids only, no content)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    length = examples.history.shape[1]
    table = pa.table(
        {
            "user": pa.array(examples.user, pa.int64()),
            "history": pa.FixedSizeListArray.from_arrays(pa.array(examples.history.reshape(-1), pa.int64()), length),
            "target": pa.array(examples.target, pa.int64()),
            "timestamp": pa.array(examples.timestamp, pa.int64()),
            "rating": pa.array(examples.rating, pa.float32()),
        }
    )
    tmp = path.with_suffix(".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)
    return path


def read_examples(path: Path) -> Examples:
    """One parquet file of `write_examples` -> Examples whose arrays own their memory (writable: arrow's
    zero-copy views are read-only, and torch warns on every tensor made from one)."""
    table = pq.read_table(path)
    history = table.column("history").combine_chunks()
    length = history.type.list_size
    return Examples(
        user=table.column("user").to_numpy().astype(np.int64),
        history=history.flatten().to_numpy().reshape(-1, length).astype(np.int64),
        target=table.column("target").to_numpy().astype(np.int64),
        timestamp=table.column("timestamp").to_numpy().astype(np.int64),
        rating=table.column("rating").to_numpy(zero_copy_only=False).astype(np.float32),
    )


class ItemContentDecoder:
    """Callable class for `map_batches`: adds decoded pixels and token ids of the item in `id_column`.

    Loads the item table and the tokenizer once per actor. Output columns (B rows):
      image [B, 3, S, S] uint8, image_mask [B] bool, input_ids [B, T] int64, attention_mask [B, T] int64,
      text_mask [B] bool. A missing or undecodable image is a mask, never a dropped row.
    """

    def __init__(self, items_path: str, id_column: str, image_size: int, tokenizer_path: str, max_length: int,
                 max_image_pixels: int = 40_000_000, cache_items: int = 0, with_history_content: bool = False) -> None:
        from encoders.text import load_tokenizer

        table = pq.read_table(items_path, columns=["item_index", "text", "image"])
        index = table.column("item_index").to_numpy()
        size = int(index.max()) + 1
        self.images: list[bytes | None] = [None] * size
        self.texts: list[str] = [""] * size
        for i, text, image in zip(index, table.column("text").to_pylist(), table.column("image").to_pylist()):
            self.images[i] = image
            self.texts[i] = text or ""
        self.id_column = id_column
        self.image_size = image_size
        self.max_length = max_length
        self.max_image_pixels = max_image_pixels
        self.tokenizer = load_tokenizer(tokenizer_path)
        self.decode_failures = 0
        # Bounded per-actor cache of decoded pixels: popular targets repeat many times per epoch.
        self.cache_items = cache_items
        self.cache: dict[int, tuple[np.ndarray, bool]] = {}
        self.with_history_content = with_history_content

    def _decode_one(self, item: int, data: bytes | None) -> tuple[np.ndarray | None, bool]:
        cached = self.cache.get(item)
        if cached is not None:
            return cached
        if data is None:
            result: tuple[np.ndarray | None, bool] = (None, False)
        else:
            decoded = decode_image(data, self.image_size, self.max_image_pixels)
            result = (decoded.pixels, decoded.status == IMAGE_OK)
            if decoded.status != IMAGE_OK:
                self.decode_failures += 1
                log.warning("item %d: image %s, using the text only", item, decoded.status)
        if len(self.cache) < self.cache_items:
            self.cache[item] = result
        return result

    def _lookup(self, ids: np.ndarray) -> tuple[list[bytes | None], list[str]]:
        if ids.size and (ids.min() < 0 or ids.max() >= len(self.images)):
            bad = ids[(ids < 0) | (ids >= len(self.images))]
            raise ValueError(f"{len(bad)} item ids unknown to the catalogue (e.g. {bad[:3].tolist()})")
        return [self.images[i] for i in ids], [self.texts[i] for i in ids]

    def content(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """[n] item ids -> image [n,3,S,S] uint8, image_mask [n], input_ids/attention_mask [n,T], text_mask [n].

        Id 0 (history padding) gets empty content with both masks off.
        """
        ids = np.asarray(ids, dtype=np.int64)
        images, texts = self._lookup(ids)
        pixels = np.zeros((len(ids), 3, self.image_size, self.image_size), dtype=np.uint8)
        image_mask = np.zeros(len(ids), dtype=bool)
        for row, (item, data) in enumerate(zip(ids.tolist(), images)):
            if item == 0:
                continue
            decoded, ok = self._decode_one(item, data)
            if ok:
                pixels[row] = decoded
                image_mask[row] = True
        text_mask = np.array([bool(t.strip()) for t in texts], dtype=bool) & (ids > 0)
        tokens = self.tokenizer(
            [t if t.strip() else "" for t in texts],
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="np",
        )
        return {
            "image": pixels,
            "image_mask": image_mask,
            "input_ids": tokens["input_ids"].astype(np.int64),
            "attention_mask": tokens["attention_mask"].astype(np.int64),
            "text_mask": text_mask,
        }

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = dict(batch)
        if "history" in out and out["history"].dtype == object:
            out["history"] = np.stack(out["history"]).astype(np.int64)
        out.update(self.content(batch[self.id_column]))
        if self.with_history_content:
            # memory.mode=recompute: every history item's content too (the costly baseline LEMUR replaces)
            history = np.asarray(out["history"], dtype=np.int64)
            flat = self.content(history.reshape(-1))
            out.update({f"history_{k}": v.reshape(*history.shape, *v.shape[1:]) for k, v in flat.items()})
        return out


@dataclass(frozen=True)
class ContentSpec:
    """What the decode stage produces: square image side, tokens per text, and the tokenizer to use."""

    image_size: int
    max_length: int
    tokenizer_path: str


def decoded_catalog_bytes(num_items: int, spec: ContentSpec) -> int:
    """What the decoded content of `num_items` items occupies: uint8 pixels + two int64 token rows + masks."""
    return num_items * (3 * spec.image_size * spec.image_size + 2 * 8 * spec.max_length + 2)


def decode_catalog(items_path: Path, spec: ContentSpec, batch_size: int = 256,
                   max_image_pixels: int = 40_000_000) -> Iterator[dict[str, np.ndarray]]:
    """Every catalogue item decoded in this process, in item_index order: batches of <= `batch_size` rows with
    item_index [n], image [n,3,S,S] uint8, image_mask [n], input_ids/attention_mask [n,T] int64, text_mask [n]."""
    ids = np.sort(pq.read_table(items_path, columns=["item_index"]).column("item_index").to_numpy())
    decoder = ItemContentDecoder(str(items_path), "item_index", spec.image_size, spec.tokenizer_path,
                                 spec.max_length, max_image_pixels=max_image_pixels)
    for start in range(0, len(ids), batch_size):
        yield decoder({"item_index": ids[start:start + batch_size]})

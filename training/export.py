"""Export of a checkpoint's item vectors for serving, at one Matryoshka size or at every supported size.

This module owns `export_item_vectors`: checkpoint -> fresh catalogue pass (decoded in process, no Ray, through
`training.offline_eval`, so export and offline evaluation see the same item table) ->
one parquet file per size, `item_vectors_s<size>.parquet` with columns
    item_index int64 (1..N, the training index), item_id string (the raw id), vector fixed_size_list<float32>[size],
    score_offset float32 (model.new_item_offset on the items in no training example, else 0)
Vectors are L2-normalised at their size (scores are cosine similarities), so a nearest-neighbour index over
the file serves the size-s model exactly; with a nonzero offset, a score is the cosine plus the item's
score_offset (`serving.recommender` searches the offset items beside the index and merges). `export.json`
beside them records what was written.
An export directory is recognised by its export.json and holds nothing but what an export writes (`is_export_dir`);
`jobs.export` builds it in a staging folder and replaces only a previous export, never anything else.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.owned_dirs import is_staging_dir, names_matching, only_expected_entries, require_replaceable
from pipeline.sources import ITEMS_FILE, load_manifest
from training.checkpoint import read_state
from training.offline_eval import DecodedCatalogue, load_checkpoint

EXPORT_MANIFEST = "export.json"
EXPORT_MODEL_DIR = "model"
EXPORT_WHAT = "an export written by jobs.export (export.json, item_vectors_s*.parquet, model/ only)"
_is_export_entry = names_matching(["item_vectors_s"], [EXPORT_MANIFEST, EXPORT_MODEL_DIR])


def is_export_dir(path: Path) -> bool:
    """Did an export write this directory? It has export.json and nothing an export does not write."""
    return (path / EXPORT_MANIFEST).is_file() and only_expected_entries(path, _is_export_entry)


def export_item_vectors(checkpoint_dir: str | Path, out_dir: str | Path, sizes: Sequence[int] | None = None,
                        *, prepared_dir: str | Path | None = None, new_item_offset: float | None = None) -> list[Path]:
    """Write `item_vectors_s<size>.parquet` into `out_dir` for each size; -> the files written.

    sizes: None = every size the checkpoint supports (its `matryoshka_sizes`, or just model.dim); otherwise a
        subset of them (ValueError naming the supported sizes for any other).
    prepared_dir: the prepared dataset holding items.parquet; default: the checkpoint config's data.prepared_dir
        (relative to the current directory).
    new_item_offset: the score_offset of the items in no training example (default: the checkpoint's
        model.new_item_offset).
    """
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    # Files are written over by name: only into a new or empty directory, a previous export, or a staging folder.
    require_replaceable(out_dir, lambda p: is_export_dir(p) or is_staging_dir(p), EXPORT_WHAT, "written into")
    if prepared_dir is None:
        prepared_dir = read_state(checkpoint_dir)["config"]["data"]["prepared_dir"]
    prepared_dir = Path(prepared_dir).resolve()
    items_path = prepared_dir / ITEMS_FILE
    if not items_path.exists():
        raise FileNotFoundError(f"{items_path} not found: pass prepared_dir= (the dataset the checkpoint trained on)")
    num_items = int(load_manifest(prepared_dir)["num_items"])
    # the current catalogue: items newer than the checkpoint get content-only vectors (see offline_eval)
    loaded = load_checkpoint(checkpoint_dir, num_items)
    model, state = loaded.model, loaded.state
    supported = model.supported_sizes
    sizes = tuple(supported if sizes is None else sizes)
    unsupported = [s for s in sizes if s not in supported]
    if not sizes or unsupported:
        raise ValueError(f"cannot export sizes {list(unsupported) or list(sizes)}: the checkpoint in "
                         f"{checkpoint_dir} supports {list(supported)}")
    content = DecodedCatalogue(items_path, num_items, max_image_pixels=loaded.job.data.max_image_pixels).encode(loaded)
    ids = torch.arange(1, num_items + 1)
    items = pq.read_table(items_path, columns=["item_index", "item_id"]).to_pandas().set_index("item_index")
    item_ids = pa.array(items.loc[ids.numpy(), "item_id"].astype(str).tolist(), pa.string())
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if new_item_offset is None:
        new_item_offset = loaded.job.model.new_item_offset
    item_offset = loaded.item_offset(new_item_offset)  # [N+1] or None (nothing added)
    offsets = np.zeros(num_items, np.float32) if item_offset is None else item_offset[1:].numpy()  # [N]
    with torch.inference_mode():
        for size in sizes:
            vectors = model.item_vectors(content[1:], ids, size).numpy().astype(np.float32)  # [N, size]
            table = pa.table({
                "item_index": pa.array(ids.numpy(), pa.int64()),
                "item_id": item_ids,
                "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), size),
                "score_offset": pa.array(offsets, pa.float32()),
            })
            path = out_dir / f"item_vectors_s{size}.parquet"
            pq.write_table(table, path)
            written.append(path)
    (out_dir / EXPORT_MANIFEST).write_text(json.dumps({
        "checkpoint": str(checkpoint_dir.resolve()), "sizes": list(sizes), "supported_sizes": list(supported),
        "num_items": num_items, "new_items": loaded.new_items, "unseen_items": int(loaded.unseen.sum()),
        "new_item_offset": new_item_offset, "normalised": True, "files": [p.name for p in written],
        "watermark": state.get("watermark"),
    }, indent=2))
    return written


def read_item_vectors(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """An exported parquet file -> (item_index [N] int64, vectors [N, size] float32)."""
    table = pq.read_table(path)
    column = table.column("vector").combine_chunks()
    vectors = column.flatten().to_numpy().reshape(len(table), column.type.list_size)
    return table.column("item_index").to_numpy(), vectors

"""The recommender API: a user's history of raw item ids -> the top-k items, with cosine scores (no Ray).

This module owns `ItemRecommender`: a trained model, the content table of the catalogue it serves, and the retrieval
indexes over its item vectors (`serving.index`). A user vector is computed exactly as offline evaluation computes
it (`training.evaluate.score_users`): item vectors `model.item_vectors(content, ids)` and user vectors
`model.user_vectors(history, content[history])`, history left-padded to the model's `max_history`, newest last.
So its exact top-k is the offline evaluation's ranking for the same user (tests/unit/test_serving.py checks it).

Content table: a fresh catalogue pass through `training.offline_eval` (`load_checkpoint` + `DecodedCatalogue`),
as `training.export` does. Items in the catalogue that the checkpoint never trained on (a newer prepared
items.parquet, or `add_items`) get a zero id vector: they are scored by their content alone.

A *bundle* (`save_bundle` / `from_bundle`) is what serving ships: the checkpoint's model.pt and state.json plus
catalogue.parquet (item_index, item_id, content vector), so loading needs no image decoding or encoder pass.
The MLflow pyfunc model (`serving.pyfunc`) is a bundle.

New items: the items in no training example of the checkpoint (its state.json's `unseen_items`), those past its
catalogue and those `add_items` adds get `new_item_offset` (default: the checkpoint's model.new_item_offset) added to
their cosine score, as evaluation does (`training.evaluate.item_offsets`). Every index searches the other items; the
new ones are scored exactly beside it and the two top-k lists merged, so an approximate index stays exact for them.

Modes (`recommend(mode=...)`): "exact" (brute force), "hnsw" (faiss graph), "funnel" (Matryoshka: retrieve
`funnel_candidates` with a size-s prefix, re-rank with the full vectors). Indexes are built on first use per
(mode, size) and kept; `index=` at construction builds one up front.
Not thread-safe while `add_items` runs (it swaps the tables and drops the indexes).
"""
from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from model.config import valid_new_item_offset
from model.recommender import Recommender
from matryoshka.layers import truncate
from pipeline.sources import ITEMS_FILE, load_manifest
from serving.index import ExactIndex, FunnelIndex, Hits, HnswIndex, ItemIndex, merge_hits, search_filtered
from training.checkpoint import MODEL_FILE, STATE_FILE, read_state
from training.job_config import JobConfig
from training.offline_eval import DecodedCatalogue, LoadedCheckpoint, content_spec_of, load_checkpoint

INDEX_MODES = ("exact", "hnsw", "funnel")
BUNDLE_CATALOGUE = "catalogue.parquet"
BUNDLE_MANIFEST = "serving.json"


@dataclass(frozen=True)
class Recommendations:
    item_ids: list[str]  # raw item ids (items.csv item_id), best first
    item_indices: list[int]  # the training index (1..N)
    scores: list[float]  # cosine scores, same order (new items': + the recommender's new_item_offset)
    unknown_history: list[str]  # history ids not in the catalogue: ignored and reported
    size: int  # the vector size of the scores (funnel: the full size it re-ranks with)


class RecommendationError(ValueError):
    """A bad request (empty history, k out of range, unsupported size or mode, no known history or candidate):
    its message is one line, fit to return to the caller."""


class ItemRecommender:
    """Top-k items for users given as histories of raw item ids, newest last.

    model: eval mode, CPU, its id table sized for the catalogue (`LoadedCheckpoint.model`).
    content: [N+1, D] content vectors (row 0 = padding). item_ids: N raw ids, item_ids[i - 1] is index i.
    funnel_size: the default funnel prefix (None = the smallest Matryoshka size below the full one);
    funnel_candidates: k' (raised to k when k is larger); hnsw_*: faiss HNSW graph degree and beams.
    unseen: [N+1] bool, the items in no training example (default: the last `new_items` rows);
    new_item_offset: added to their scores (None = the config's model.new_item_offset; in [-2, 2]).
    """

    def __init__(self, model: Recommender, content: torch.Tensor, item_ids: Sequence[str], *, job: JobConfig,
                 index: str | Sequence[str] = "exact", source: dict | None = None, new_items: int = 0,
                 unseen: np.ndarray | None = None, new_item_offset: float | None = None,
                 funnel_size: int | None = None, funnel_candidates: int = 200, funnel_coarse: str = "exact",
                 hnsw_m: int = 32, hnsw_ef_construction: int = 80, hnsw_ef_search: int = 128) -> None:
        if content.shape[0] != len(item_ids) + 1:
            raise ValueError(f"content has {content.shape[0]} rows, expected {len(item_ids) + 1} (N items + padding)")
        self.model = model.eval()
        self.job = job
        self.max_history = job.data.max_history
        self.dim = int(content.shape[1])
        self.sizes = tuple(int(s) for s in model.supported_sizes)
        smaller = [s for s in self.sizes if s < self.dim]
        self.funnel_size = funnel_size if funnel_size is not None else (smaller[0] if smaller else None)
        self.funnel_candidates = funnel_candidates
        self.funnel_coarse = funnel_coarse
        self.hnsw_options = {"m": hnsw_m, "ef_construction": hnsw_ef_construction, "ef_search": hnsw_ef_search}
        self.source = dict(source or {})
        self.new_items = new_items
        if unseen is None:
            unseen = np.zeros(len(item_ids) + 1, dtype=bool)
            unseen[len(item_ids) + 1 - new_items:] = True
        if len(unseen) != len(item_ids) + 1:
            raise ValueError(f"unseen has {len(unseen)} rows, expected {len(item_ids) + 1} (N items + padding)")
        self._unseen = np.asarray(unseen, dtype=bool).copy()
        self._unseen[0] = False
        self.new_item_offset = float(job.model.new_item_offset if new_item_offset is None else new_item_offset)
        if not valid_new_item_offset(self.new_item_offset):
            raise ValueError(f"new_item_offset={new_item_offset} must be in [-2, 2] (a cosine offset)")
        self.built_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self._set_catalogue(content, list(item_ids))
        for mode in ([index] if isinstance(index, str) else list(index)):
            self._index(mode, None if mode != "funnel" else self.funnel_size)

    def __getstate__(self) -> dict:
        """Pickled (shipped to a Ray actor) without its indexes: faiss graphs do not pickle; they are rebuilt."""
        return {**self.__dict__, "_indexes": {}}

    # ------------------------------------------------------------------------------------------------ loading

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | Path, *, prepared_dir: str | Path | None = None,
                        index: str | Sequence[str] = "exact", **options) -> "ItemRecommender":
        """A training checkpoint + the prepared catalogue (default: the checkpoint config's data.prepared_dir)
        -> a recommender over every item of that catalogue (a fresh catalogue pass, as `training.export`)."""
        checkpoint_dir = Path(checkpoint_dir).resolve()
        if prepared_dir is None:
            prepared_dir = read_state(checkpoint_dir)["config"]["data"]["prepared_dir"]
        items_path = Path(prepared_dir).resolve() / ITEMS_FILE
        if not items_path.is_file():
            raise FileNotFoundError(f"{items_path} not found: pass prepared_dir= (the dataset the checkpoint "
                                    f"trained on, or a newer preparation of it)")
        num_items = int(load_manifest(items_path.parent)["num_items"])
        loaded = load_checkpoint(checkpoint_dir, num_items)
        content = DecodedCatalogue(items_path, num_items, max_image_pixels=loaded.job.data.max_image_pixels) \
            .encode(loaded)
        return cls(loaded.model, content, _item_ids(items_path, num_items), job=loaded.job, index=index,
                   new_items=loaded.new_items, unseen=loaded.unseen,
                   source={"checkpoint": str(checkpoint_dir), "items": str(items_path)}, **options)

    @classmethod
    def from_model_uri(cls, uri: str, tracking_uri: str, **kw) -> "ItemRecommender":
        """`models:/NAME@ALIAS` or `models:/NAME/VERSION` (the registry at `tracking_uri`) -> its recommender.
        Keywords as `from_checkpoint`."""
        from training.registry import resolve_model

        version = resolve_model(uri, tracking_uri)
        recommender = cls.from_checkpoint(version.checkpoint_path, **kw)
        recommender.source.update(model_uri=uri, version=version.version, registered_model=version.name)
        return recommender

    def save_bundle(self, directory: str | Path) -> Path:
        """Write model.pt, state.json (from the checkpoint) and catalogue.parquet into a new `directory`."""
        directory = Path(directory)
        checkpoint = Path(self.source.get("checkpoint", ""))
        if not (checkpoint / MODEL_FILE).is_file():
            raise ValueError("save_bundle needs a recommender loaded from a checkpoint or a bundle")
        directory.mkdir(parents=True, exist_ok=False)
        for name in (MODEL_FILE, STATE_FILE):
            shutil.copy2(checkpoint / name, directory / name)
        content = self._content[1:].numpy().astype(np.float32)  # [N, D]
        pq.write_table(pa.table({
            "item_index": pa.array(np.arange(1, self.num_items + 1), pa.int64()),
            "item_id": pa.array(self._item_ids[1:].tolist(), pa.string()),
            "content": pa.FixedSizeListArray.from_arrays(pa.array(content.reshape(-1), pa.float32()), self.dim),
        }), directory / BUNDLE_CATALOGUE)
        (directory / BUNDLE_MANIFEST).write_text(json.dumps({**self.info(), "written_at": time.strftime(
            "%Y-%m-%dT%H:%M:%S%z")}, indent=2))
        return directory

    @classmethod
    def from_bundle(cls, directory: str | Path, *, index: str | Sequence[str] = "exact",
                    **options) -> "ItemRecommender":
        """A directory written by `save_bundle` -> its recommender (no decoding, no encoder pass)."""
        directory = Path(directory).resolve()
        table = pq.read_table(directory / BUNDLE_CATALOGUE)
        column = table.column("content").combine_chunks()
        content = column.flatten().to_numpy().reshape(len(table), column.type.list_size)
        order = np.argsort(table.column("item_index").to_numpy())
        indices = table.column("item_index").to_numpy()[order]
        if not np.array_equal(indices, np.arange(1, len(table) + 1)):
            raise ValueError(f"{directory / BUNDLE_CATALOGUE}: item_index is not 1..{len(table)}")
        loaded = load_checkpoint(directory, len(table))
        table_with_pad = torch.cat([torch.zeros(1, content.shape[1]), torch.from_numpy(content[order].copy())])
        source = {"checkpoint": str(directory), "bundle": str(directory)}
        manifest_path = directory / BUNDLE_MANIFEST
        if manifest_path.is_file():
            saved = json.loads(manifest_path.read_text())
            source.update({key: saved[key] for key in ("model_uri", "version", "registered_model") if saved.get(key)})
            if saved.get("new_item_offset") is not None:  # the offset it was served with, unless given here
                options.setdefault("new_item_offset", saved["new_item_offset"])
        ids = np.asarray(table.column("item_id").to_pylist(), dtype=object)[order]
        return cls(loaded.model, table_with_pad, [str(i) for i in ids], job=loaded.job, index=index,
                   new_items=loaded.new_items, unseen=loaded.unseen, source=source, **options)

    # ------------------------------------------------------------------------------------------------ catalogue

    def _set_catalogue(self, content: torch.Tensor, item_ids: list[str]) -> None:
        self._content = content.float().contiguous()  # [N+1, D]
        self._item_ids = np.asarray([""] + item_ids, dtype=object)  # [N+1], "" = padding
        self._index_of = {item_id: i + 1 for i, item_id in enumerate(item_ids)}
        if len(self._index_of) != len(item_ids):
            raise ValueError("item ids are not unique")
        ids = torch.arange(self._content.shape[0])
        with torch.inference_mode():
            # the same calls as training.evaluate.score_users, once per size
            self._vectors = {s: self.model.item_vectors(self._content, ids, None if s == self.dim else s).numpy()
                             for s in self.sizes}  # size -> [N+1, s]
        self._indexes: dict[tuple[str, int | None], ItemIndex] = {}

    @property
    def num_items(self) -> int:
        return len(self._item_ids) - 1

    def item_vectors(self, size: int | None = None) -> np.ndarray:
        """[N, size or D] the L2-normalised item vectors (row i - 1 = item index i), as `training.export`."""
        return self._vectors[size or self.dim][1:]

    def add_items(self, items_path: str | Path) -> list[str]:
        """Add the items of a newer items.parquet (prepared) whose index is past this catalogue; -> their raw ids.

        They are decoded and encoded by the model's item encoder and get a zero id vector (as a catalogue pass
        gives items the checkpoint never trained on): scored by content alone. Items already
        here must keep their index and id (a preparation of the same dataset keeps them).
        """
        from pipeline.content import ItemContentDecoder
        from training.evaluate import encode_content_batch

        items_path = Path(items_path)
        table = pq.read_table(items_path, columns=["item_index", "item_id"]).to_pandas().sort_values("item_index")
        indices = table.item_index.to_numpy()
        ids = table.item_id.astype(str).tolist()
        if not np.array_equal(indices, np.arange(1, len(indices) + 1)):
            raise ValueError(f"{items_path}: item_index is not 1..{len(indices)}")
        if len(indices) < self.num_items or ids[: self.num_items] != self._item_ids[1:].tolist():
            raise ValueError(f"{items_path} is not a grown version of this catalogue: its first {self.num_items} "
                             f"items are not the ones served")
        new = indices[self.num_items:]
        if not len(new):
            return []
        spec = content_spec_of(self.job)
        decoder = ItemContentDecoder(str(items_path), "item_index", spec.image_size, spec.tokenizer_path,
                                     spec.max_length, max_image_pixels=self.job.data.max_image_pixels)
        parts = [encode_content_batch(self.model, decoder({"item_index": new[start:start + 256]}),
                                      torch.device("cpu")) for start in range(0, len(new), 256)]
        _grow_id_table(self.model, len(indices))
        content = torch.cat([self._content, *parts])
        self.new_items += len(new)
        self._unseen = np.concatenate([self._unseen, np.ones(len(new), dtype=bool)])
        self._set_catalogue(content, ids)
        return ids[len(ids) - len(new):]

    # ------------------------------------------------------------------------------------------------ serving

    def info(self) -> dict:
        return {
            "model_uri": self.source.get("model_uri", ""), "version": self.source.get("version", ""),
            "registered_model": self.source.get("registered_model", ""),
            "checkpoint": self.source.get("checkpoint", ""), "num_items": self.num_items,
            "new_items": self.new_items, "unseen_items": int(self._unseen.sum()),
            "new_item_offset": self.new_item_offset, "sizes": list(self.sizes), "dim": self.dim,
            "index_modes": list(INDEX_MODES), "built_indexes": [f"{m}@{s or self.dim}" for m, s in self._indexes],
            "funnel_size": self.funnel_size, "funnel_candidates": self.funnel_candidates,
            "max_history": self.max_history, "built_at": self.built_at,
        }

    def recommend(self, history: Sequence[str], k: int = 10, *, exclude_history: bool = True,
                  size: int | None = None, candidates: Sequence[str] | None = None,
                  mode: str = "exact") -> Recommendations:
        """The top-k items for one history (raw ids, newest last). size: a Matryoshka size (funnel: the prefix
        it retrieves with; None = the full size, funnel: `funnel_size`); candidates: only these raw ids (unknown
        ones ignored); exclude_history: never recommend an item of the history. Fewer than k results only when
        the filters leave fewer items."""
        return self.recommend_batch([history], k, exclude_history=exclude_history, size=size,
                                    candidates=candidates, mode=mode)[0]

    @torch.inference_mode()
    def recommend_batch(self, histories: Sequence[Sequence[str]], k: int = 10, *, exclude_history: bool = True,
                        size: int | None = None, candidates: Sequence[str] | None = None,
                        mode: str = "exact") -> list[Recommendations]:
        """`recommend` for many histories at once: one sequence-model pass, one index search."""
        retrieve_size, score_size = self._check_request(k, size, mode)
        if isinstance(histories, str) or not all(isinstance(h, (list, tuple, np.ndarray)) for h in histories):
            raise RecommendationError("histories must be a list of lists of item ids")
        known, unknown = [], []
        for history in histories:
            if len(history) == 0:
                raise RecommendationError("empty history: give at least one item id (newest last)")
            indices = [self._index_of.get(str(item_id)) for item_id in history]
            if all(i is None for i in indices):
                raise RecommendationError(f"none of the {len(history)} history item ids is in the catalogue "
                                          f"(e.g. {str(history[0])[:40]!r})")
            known.append([i for i in indices if i is not None])
            unknown.append([str(item_id) for item_id, i in zip(history, indices) if i is None])
        allowed = None
        if candidates is not None:
            allowed_indices = [self._index_of[str(c)] for c in candidates if str(c) in self._index_of]
            if not allowed_indices:
                raise RecommendationError("none of the candidate item ids is in the catalogue")
            allowed = np.zeros(self.num_items, dtype=bool)
            allowed[np.asarray(allowed_indices) - 1] = True
        queries = self._user_vectors(known, score_size if mode != "funnel" else self.dim)  # [U, s]
        exclude = [np.unique(np.asarray(h, np.int64) - 1) for h in known] if exclude_history else None
        index = self._index(mode, retrieve_size)
        exact = self._index("exact", score_size) if mode != "funnel" else self._index("exact", None)
        if self.new_item_offset and self._unseen.any():
            hits = self._search_with_offset(index, exact, queries, k, exclude, allowed, score_size)
        else:
            hits = search_filtered(index, exact, queries, k, exclude=exclude, allowed=allowed)
        results = []
        for rows, scores, missing in zip(hits.rows, hits.scores, unknown):
            found = rows >= 0
            item_indices = (rows[found] + 1).tolist()
            results.append(Recommendations(item_ids=[str(i) for i in self._item_ids[item_indices]],
                                           item_indices=item_indices, scores=scores[found].astype(float).tolist(),
                                           unknown_history=missing, size=score_size))
        return results

    @torch.inference_mode()
    def user_vectors(self, histories: Sequence[Sequence[str]], size: int | None = None) -> np.ndarray:
        """histories (raw ids, newest last; unknown ids ignored) -> [U, size or D] normalised user vectors, the
        queries `recommend` searches with (benchmarks and other indexes use them)."""
        known = [[self._index_of[str(i)] for i in history if str(i) in self._index_of] for history in histories]
        if not all(known):
            raise RecommendationError("every history needs at least one item id of the catalogue")
        if size is not None and size not in self.sizes:
            raise RecommendationError(f"size {size!r} is not served; this model serves sizes {list(self.sizes)}")
        return self._user_vectors(known, size or self.dim)

    def _check_request(self, k: int, size: int | None, mode: str) -> tuple[int | None, int]:
        """-> (the size the index retrieves with, the size of the returned scores); RecommendationError if bad."""
        if mode not in INDEX_MODES:
            raise RecommendationError(f"unknown mode {mode!r}; choose one of {list(INDEX_MODES)}")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= self.num_items:
            raise RecommendationError(f"k must be an integer in 1..{self.num_items} (the catalogue size), got {k!r}")
        if size is not None and (isinstance(size, bool) or size not in self.sizes):
            raise RecommendationError(f"size {size!r} is not served; this model serves sizes {list(self.sizes)}")
        if mode != "funnel":
            return (None if size in (None, self.dim) else size), (size or self.dim)
        prefix_size = size if size is not None else self.funnel_size
        if prefix_size is None or prefix_size >= self.dim:
            raise RecommendationError(f"the funnel retrieves with a Matryoshka size below the full {self.dim}; "
                                      f"this model serves sizes {list(self.sizes)}")
        return prefix_size, self.dim

    def _search_with_offset(self, index: ItemIndex, exact: ExactIndex, queries: np.ndarray, k: int,
                            exclude: list[np.ndarray] | None, allowed: np.ndarray | None, size: int) -> Hits:
        """Top-k with `new_item_offset` on the unseen items: `index` over the other items, an exact scan (at the
        scores' `size`) over the unseen ones plus the offset, the two merged. Filters apply to both."""
        unseen = self._unseen[1:]  # [N] table rows
        new_rows = np.flatnonzero(unseen)
        parts = []
        others = ~unseen if allowed is None else allowed & ~unseen
        if others.any():
            parts.append(search_filtered(index, exact, queries, k, exclude=exclude, allowed=others))
        allowed_new = None if allowed is None else allowed[new_rows]
        if allowed_new is None or allowed_new.any():
            position = np.full(self.num_items, -1, dtype=np.int64)
            position[new_rows] = np.arange(len(new_rows))
            new_exclude = None if exclude is None else [position[e][position[e] >= 0] for e in exclude]
            key = ("unseen", None if size == self.dim else size)
            if key not in self._indexes:
                self._indexes[key] = ExactIndex(self.item_vectors(size)[new_rows])
            scan = self._indexes[key]
            found = search_filtered(scan, scan, queries, k, exclude=new_exclude, allowed=allowed_new)
            rows = np.where(found.rows >= 0, new_rows[np.maximum(found.rows, 0)], -1)
            parts.append(Hits(found.scores + np.float32(self.new_item_offset), rows))
        return merge_hits(parts, k)

    def _user_vectors(self, histories: list[list[int]], size: int) -> np.ndarray:
        """histories (training indices, newest last) -> [U, size] normalised user vectors, as `score_users`."""
        padded = torch.zeros(len(histories), self.max_history, dtype=torch.long)  # [U, L], left-padded
        for row, history in enumerate(histories):
            recent = history[-self.max_history:]
            padded[row, self.max_history - len(recent):] = torch.as_tensor(recent)
        raw = self.model.raw_user_vectors(padded, self._content[padded])  # [U, D], the sequence model runs once
        return F.normalize(raw if size == self.dim else truncate(raw, size), dim=-1).numpy()

    def _index(self, mode: str, size: int | None) -> ItemIndex:
        """The index of `mode` at `size` (None = full; funnel: its prefix size), built on first use."""
        key = (mode, None if size == self.dim else size)
        if key not in self._indexes:
            if mode == "funnel":
                if size is None or size >= self.dim:
                    raise RecommendationError(f"the funnel needs a Matryoshka size below {self.dim}; this model "
                                              f"serves sizes {list(self.sizes)}")
                self._indexes[key] = FunnelIndex(self.item_vectors(), size, candidates=self.funnel_candidates,
                                                 coarse=self.funnel_coarse, **self.hnsw_options)
            elif mode == "hnsw":
                self._indexes[key] = HnswIndex(self.item_vectors(size), **self.hnsw_options)
            elif mode == "exact":
                self._indexes[key] = ExactIndex(self.item_vectors(size))
            else:
                raise RecommendationError(f"unknown index {mode!r}; choose one of {list(INDEX_MODES)}")
        return self._indexes[key]


def _item_ids(items_path: Path, num_items: int) -> list[str]:
    """items.parquet -> the raw id of every index 1..num_items, in index order."""
    items = pq.read_table(items_path, columns=["item_index", "item_id"]).to_pandas().set_index("item_index")
    return items.loc[np.arange(1, num_items + 1), "item_id"].astype(str).tolist()


def _grow_id_table(model: Recommender, num_items: int) -> None:
    """Give the model's id embedding zero rows up to `num_items` (content-only vectors for new items)."""
    embedding = model.item_encoder.id_embedding
    if embedding is None or embedding.num_embeddings >= num_items + 1:
        return
    extra = torch.zeros(num_items + 1 - embedding.num_embeddings, embedding.embedding_dim)
    embedding.weight = torch.nn.Parameter(torch.cat([embedding.weight.detach(), extra]), requires_grad=False)
    embedding.num_embeddings = num_items + 1


def loaded_recommender(loaded: LoadedCheckpoint, content: torch.Tensor, item_ids: Sequence[str],
                       **options) -> ItemRecommender:
    """A recommender from a checkpoint already loaded and encoded (tests and benchmarks reuse one catalogue pass)."""
    return ItemRecommender(loaded.model, content, item_ids, job=loaded.job, new_items=loaded.new_items,
                           unseen=loaded.unseen, **options)

"""Retrieval indexes over L2-normalised item vectors: exact search, HNSW, and the Matryoshka funnel.

This module owns top-k search over an item table `vectors [N, d]` (row r = the item with training index r + 1):
    ExactIndex    brute force: one matmul and a top-k; the reference every other index is measured against
    HnswIndex     approximate: a faiss `IndexHNSWFlat` graph with inner-product metric (cosine on unit vectors)
    FunnelIndex   Matryoshka funnel: retrieve k' candidates with the size-s prefix of every vector (renormalised:
                  `normalize(v[:s])`, `matryoshka.layers.at_size`), then re-rank them with the full vectors
and `search_filtered`, which serves a candidate filter and per-query exclusions (the user's history) through any of
them: over-fetch, drop the filtered rows, and fall back to an exact masked search for a query left with too few.

Why faiss (faiss-cpu on PyPI) for the ANN index rather than hnswlib or usearch: it is maintained by Meta with
regular releases and manylinux wheels for current Pythons (hnswlib's last PyPI release is from 2023 and often
builds from source); the same library also gives the exact `IndexFlatIP`, IVF / PQ indexes and GPU builds should
the catalogue outgrow a graph in memory, so changing the index is a constructor, not a dependency. usearch is
fast and small but younger, and its API changed across recent major versions.

Everything here is numpy / torch / faiss: no model, no Ray. Scores are inner products (cosine similarities).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch


@dataclass(frozen=True)
class Hits:
    """Top-k results of Q queries, best first. Rows are positions in the item table; -1 (score -inf) pads a query
    that got fewer than k results."""

    scores: np.ndarray  # [Q, k] float32
    rows: np.ndarray  # [Q, k] int64


class ItemIndex(Protocol):
    name: str
    size: int  # the query/vector size it searches with (the funnel re-ranks at the full size)

    def search(self, queries: np.ndarray, k: int) -> Hits:
        """queries [Q, d] (L2-normalised, d = the table's full width) -> the top-k rows of each."""
        ...


def normalize_rows(vectors: np.ndarray) -> np.ndarray:
    """[n, d] -> [n, d] float32 with unit rows (zero rows stay zero), as `torch.nn.functional.normalize`."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return (vectors / norms).astype(np.float32)


def prefix(vectors: np.ndarray, size: int) -> np.ndarray:
    """[n, D] unit vectors -> [n, size]: the Matryoshka prefix, renormalised (`matryoshka.layers.at_size`)."""
    return normalize_rows(np.ascontiguousarray(np.asarray(vectors)[:, :size]))


def _top_k(scores: torch.Tensor, k: int) -> Hits:
    """scores [Q, N] -> the k best of each row (ties: lower row first), padded with -1 / -inf past N or -inf."""
    k_eff = min(k, scores.shape[1])
    values, rows = torch.topk(scores, k_eff, dim=1)  # sorted, best first
    values, rows = values.numpy().astype(np.float32), rows.numpy().astype(np.int64)
    rows[~np.isfinite(values)] = -1
    if k_eff < k:
        pad = k - k_eff
        values = np.pad(values, ((0, 0), (0, pad)), constant_values=-np.inf)
        rows = np.pad(rows, ((0, 0), (0, pad)), constant_values=-1)
    return Hits(values, rows)


class ExactIndex:
    """Brute force over all N vectors: queries [Q, d] @ vectors.T [d, N], then top-k (chunks of queries)."""

    name = "exact"

    def __init__(self, vectors: np.ndarray, chunk: int = 256, max_chunk_scores: int = 2**25) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        # a table from Ray's object store is a read-only view: torch wants its own writable copy
        self.vectors = torch.from_numpy(vectors if vectors.flags.writeable else vectors.copy())  # [N, d]
        self.size = self.vectors.shape[1]
        self.chunk = max(1, min(chunk, max_chunk_scores // max(len(vectors), 1)))  # [chunk, N] scores <= 128 MiB

    def __len__(self) -> int:
        return self.vectors.shape[0]

    @torch.inference_mode()
    def search(self, queries: np.ndarray, k: int, banned: np.ndarray | None = None) -> Hits:
        """queries [Q, d] -> top-k; banned [Q, N] bool (optional): rows never returned for that query."""
        queries = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
        parts = []
        for start in range(0, max(len(queries), 1), self.chunk):
            scores = queries[start : start + self.chunk] @ self.vectors.T  # [q, N]
            if banned is not None:
                scores[torch.from_numpy(banned[start : start + self.chunk])] = float("-inf")
            parts.append(_top_k(scores, k))
        return Hits(np.concatenate([p.scores for p in parts]), np.concatenate([p.rows for p in parts]))


class HnswIndex:
    """faiss HNSW graph (IndexHNSWFlat, inner product). m: graph degree; ef_construction: build beam;
    ef_search: query beam (raised to k when k is larger)."""

    name = "hnsw"

    def __init__(self, vectors: np.ndarray, *, m: int = 32, ef_construction: int = 80, ef_search: int = 128) -> None:
        import faiss

        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.size = vectors.shape[1]
        self.count = vectors.shape[0]
        self.ef_search = ef_search
        self.index = faiss.IndexHNSWFlat(self.size, m, faiss.METRIC_INNER_PRODUCT)
        self.index.hnsw.efConstruction = ef_construction
        self.index.add(vectors)

    def __len__(self) -> int:
        return self.count

    def search(self, queries: np.ndarray, k: int) -> Hits:
        import faiss

        k_eff = min(k, self.count)
        params = faiss.SearchParametersHNSW(efSearch=max(self.ef_search, k_eff))
        scores, rows = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k_eff, params=params)
        scores = np.where(rows < 0, -np.inf, scores).astype(np.float32)
        if k_eff < k:
            scores = np.pad(scores, ((0, 0), (0, k - k_eff)), constant_values=-np.inf)
            rows = np.pad(rows, ((0, 0), (0, k - k_eff)), constant_values=-1)
        return Hits(scores, rows.astype(np.int64))


class FunnelIndex:
    """Matryoshka funnel: `candidates` (k') rows by the size-`prefix_size` prefix through `coarse` ("exact" or
    "hnsw" over the prefixes), re-ranked by the full vectors. k' = N makes it exact search at full size."""

    name = "funnel"

    def __init__(self, vectors: np.ndarray, prefix_size: int, *, candidates: int = 200, coarse: str = "exact",
                 **hnsw_options) -> None:
        self.full = np.ascontiguousarray(vectors, dtype=np.float32)  # [N, D] unit rows
        if not 0 < prefix_size <= self.full.shape[1]:
            raise ValueError(f"funnel prefix size {prefix_size} must be in 1..{self.full.shape[1]}")
        if candidates < 1:
            raise ValueError(f"funnel candidates must be >= 1, got {candidates}")
        self.prefix_size = prefix_size
        self.size = self.full.shape[1]
        self.candidates = candidates
        short = prefix(self.full, prefix_size)
        self.coarse = HnswIndex(short, **hnsw_options) if coarse == "hnsw" else ExactIndex(short)

    def __len__(self) -> int:
        return self.full.shape[0]

    def search(self, queries: np.ndarray, k: int) -> Hits:
        queries = np.ascontiguousarray(queries, dtype=np.float32)  # [Q, D]
        found = self.coarse.search(prefix(queries, self.prefix_size), max(self.candidates, k))  # [Q, k']
        rows = np.maximum(found.rows, 0)
        scores = np.einsum("qd,qkd->qk", queries, self.full[rows])  # [Q, k'] full-size cosine
        scores[found.rows < 0] = -np.inf
        return _rerank(scores, found.rows, k)


def _rerank(scores: np.ndarray, rows: np.ndarray, k: int) -> Hits:
    """scores [Q, k'] of candidate rows [Q, k'] -> the k best of each query as table rows."""
    best = _top_k(torch.from_numpy(np.ascontiguousarray(scores)), k)
    picked = np.take_along_axis(rows, np.maximum(best.rows, 0), axis=1)
    picked[best.rows < 0] = -1
    return Hits(best.scores, picked)


def search_filtered(index: ItemIndex, exact: ExactIndex, queries: np.ndarray, k: int, *,
                    exclude: Sequence[np.ndarray] | None = None, allowed: np.ndarray | None = None) -> Hits:
    """Top-k of every query among the allowed rows, minus that query's excluded rows, through `index`.

    queries [Q, d]; exclude: per query, distinct rows never returned (the user's history); allowed [N] bool (a candidate
    filter) or None. `index` is asked for enough rows to survive the filters (k + the query's exclusions,
    scaled by 1 / the allowed fraction, x2); a query still short of min(k, rows it may get) is answered by
    `exact` with a mask, so filtering never loses results, it only costs time. When that fetch would be a
    quarter of the table or more, every query is answered by the masked exact scan directly. `exact` must search the same
    vectors at the same size as `index` ranks with.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    num_rows = len(exact)
    exclude = list(exclude) if exclude is not None else [np.zeros(0, np.int64)] * len(queries)
    if isinstance(index, ExactIndex) or (allowed is None and not any(len(e) for e in exclude)):
        if isinstance(index, ExactIndex) and (allowed is not None or any(len(e) for e in exclude)):
            return exact.search(queries, k, banned=_banned(exclude, allowed, num_rows))
        return index.search(queries, k)
    allowed_count = num_rows if allowed is None else int(allowed.sum())
    most_excluded = max((len(e) for e in exclude), default=0)
    fetch = (k + most_excluded) * (1 if allowed is None else 2 * num_rows / max(allowed_count, 1))
    fetch = int(min(num_rows, np.ceil(fetch)))
    if 4 * fetch >= num_rows:  # asking the index for a large share of the table costs more than a masked scan
        return exact.search(queries, k, banned=_banned(exclude, allowed, num_rows))
    found = index.search(queries, fetch)
    scores = np.full((len(queries), k), -np.inf, np.float32)
    rows = np.full((len(queries), k), -1, np.int64)
    short = []
    for q in range(len(queries)):
        keep = found.rows[q] >= 0
        if allowed is not None:
            keep &= allowed[np.maximum(found.rows[q], 0)]
        if len(exclude[q]):
            keep &= ~np.isin(found.rows[q], exclude[q])
        got_rows, got_scores = found.rows[q][keep][:k], found.scores[q][keep][:k]
        reachable = allowed_count - (int(allowed[exclude[q]].sum()) if allowed is not None else len(exclude[q]))
        if len(got_rows) < min(k, reachable):
            short.append(q)
            continue
        rows[q, : len(got_rows)], scores[q, : len(got_rows)] = got_rows, got_scores
    if short:
        fallback = exact.search(queries[short], k, banned=_banned([exclude[q] for q in short], allowed, num_rows))
        rows[short], scores[short] = fallback.rows, fallback.scores
    return Hits(scores, rows)


def merge_hits(parts: Sequence[Hits], k: int) -> Hits:
    """Hits of the same queries over disjoint rows (each [Q, k_i], rows -1 = none) -> the k best of their union."""
    scores = np.concatenate([np.where(p.rows >= 0, p.scores, -np.inf) for p in parts], axis=1)
    rows = np.concatenate([p.rows for p in parts], axis=1)
    return _rerank(scores.astype(np.float32), rows, k)


def _banned(exclude: Sequence[np.ndarray], allowed: np.ndarray | None, num_rows: int) -> np.ndarray:
    """[Q, N] bool: True where a query may not get the row."""
    banned = np.zeros((len(exclude), num_rows), dtype=bool) if allowed is None else np.repeat(~allowed[None], len(exclude), 0)
    for q, rows in enumerate(exclude):
        banned[q, rows] = True
    return banned


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """found [Q, k], truth [Q, k] rows (-1 = none) -> mean over queries of |found ∩ truth| / |truth|."""
    hits = [len(set(f[f >= 0]) & set(t[t >= 0])) / max(int((t >= 0).sum()), 1) for f, t in zip(found, truth)]
    return float(np.mean(hits)) if hits else 0.0

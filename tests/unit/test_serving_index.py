"""serving.index: exact search against a brute-force reference, the funnel at k' = N, HNSW recall, and filtered
search (history exclusion, a candidate filter, the exact fallback) in every mode. No model: unit vectors only."""
from __future__ import annotations

import numpy as np
import pytest

from serving.index import (ExactIndex, FunnelIndex, HnswIndex, normalize_rows, prefix, recall_at_k,
                           search_filtered)


def unit_vectors(n: int, d: int, seed: int) -> np.ndarray:
    return normalize_rows(np.random.default_rng(seed).standard_normal((n, d)))


def brute_force(queries: np.ndarray, vectors: np.ndarray, k: int, banned: np.ndarray | None = None) -> np.ndarray:
    """The reference: score every (query, row) pair in float64, sort each query's rows (ties: lower row first)."""
    scores = queries.astype(np.float64) @ vectors.astype(np.float64).T
    if banned is not None:
        scores[banned] = -np.inf
    out = []
    for row in scores:
        order = sorted(range(len(row)), key=lambda r: (-row[r], r))
        out.append([r for r in order[:k] if np.isfinite(row[r])])
    return out


def test_exact_equals_brute_force():
    items, queries = unit_vectors(500, 24, 0), unit_vectors(40, 24, 1)
    hits = ExactIndex(items).search(queries, 10)
    assert hits.rows.tolist() == brute_force(queries, items, 10)
    np.testing.assert_allclose(hits.scores, np.sort(queries @ items.T, axis=1)[:, ::-1][:, :10], rtol=1e-5)


def test_k_past_the_table_pads_with_minus_one():
    hits = ExactIndex(unit_vectors(3, 4, 0)).search(unit_vectors(2, 4, 1), 5)
    assert (hits.rows[:, 3:] == -1).all() and np.isneginf(hits.scores[:, 3:]).all()
    assert sorted(hits.rows[0, :3].tolist()) == [0, 1, 2]


def test_funnel_with_every_row_as_candidate_equals_exact():
    items, queries = unit_vectors(300, 32, 2), unit_vectors(30, 32, 3)
    exact = ExactIndex(items).search(queries, 10)
    funnel = FunnelIndex(items, 8, candidates=len(items)).search(queries, 10)
    assert funnel.rows.tolist() == exact.rows.tolist()
    np.testing.assert_allclose(funnel.scores, exact.scores, rtol=1e-5)


def test_funnel_retrieves_with_the_renormalised_prefix():
    items, queries = unit_vectors(200, 16, 4), unit_vectors(5, 16, 5)
    funnel = FunnelIndex(items, 4, candidates=7)
    coarse = ExactIndex(prefix(items, 4)).search(prefix(queries, 4), 7)
    found = funnel.search(queries, 7)
    for q in range(5):  # the same 7 candidates, re-ranked by the full vectors
        assert set(found.rows[q]) == set(coarse.rows[q])
        full = queries[q] @ items[found.rows[q]].T
        assert (np.diff(full) <= 1e-6).all()


def test_hnsw_recall_on_random_vectors():
    items, queries = unit_vectors(2000, 32, 6), unit_vectors(100, 32, 7)
    truth = ExactIndex(items).search(queries, 10).rows
    assert recall_at_k(HnswIndex(items).search(queries, 10).rows, truth) >= 0.95


@pytest.mark.parametrize("mode", ["exact", "hnsw", "funnel"])
@pytest.mark.parametrize("allowed_count", [None, 400, 6])
def test_filtered_search_equals_masked_brute_force(mode, allowed_count):
    """History exclusion and a candidate filter in every mode, including a filter so narrow that the index's
    over-fetch finds too few rows and the exact fallback answers."""
    items, queries = unit_vectors(1000, 16, 8), unit_vectors(20, 16, 9)
    rng = np.random.default_rng(10)
    exclude = [np.unique(rng.integers(0, 1000, size=int(rng.integers(0, 30)))) for _ in range(20)]
    allowed = None
    if allowed_count is not None:
        allowed = np.zeros(1000, dtype=bool)
        allowed[rng.choice(1000, allowed_count, replace=False)] = True
    index = {"exact": lambda: ExactIndex(items), "hnsw": lambda: HnswIndex(items, ef_search=256),
             "funnel": lambda: FunnelIndex(items, 16, candidates=1000)}[mode]()  # funnel at k'=N, size 16: exact
    hits = search_filtered(index, ExactIndex(items), queries, 10, exclude=exclude, allowed=allowed)
    banned = np.zeros((20, 1000), dtype=bool) if allowed is None else np.repeat(~allowed[None], 20, 0)
    for q, rows in enumerate(exclude):
        banned[q, rows] = True
    truth = brute_force(queries, items, 10, banned)
    for q in range(20):
        got = [r for r in hits.rows[q].tolist() if r >= 0]
        assert not (set(got) & set(exclude[q].tolist())), "an excluded row came back"
        if allowed is not None:
            assert allowed[got].all()
        assert len(got) == len(truth[q]) == min(10, int((~banned[q]).sum()))
        if mode != "hnsw":
            assert got == truth[q]
    if mode == "hnsw":
        assert recall_at_k(hits.rows, np.array([t + [-1] * (10 - len(t)) for t in truth])) >= 0.95


def test_recall_at_k_counts_overlap():
    assert recall_at_k(np.array([[1, 2, 3]]), np.array([[3, 4, 1]])) == pytest.approx(2 / 3)
    assert recall_at_k(np.array([[1, -1]]), np.array([[1, -1]])) == 1.0


@pytest.mark.parametrize("mode", ["hnsw", "funnel"])
def test_a_query_whose_over_fetch_finds_no_allowed_row_falls_back_to_exact(mode):
    """The allowed rows are the 300 the query likes least: the index's over-fetch (the best 134) holds none."""
    items, query = unit_vectors(2000, 16, 11), unit_vectors(1, 16, 12)
    allowed = np.zeros(2000, dtype=bool)
    allowed[np.argsort(query[0] @ items.T)[:300]] = True
    index = HnswIndex(items) if mode == "hnsw" else FunnelIndex(items, 8, candidates=20)
    hits = search_filtered(index, ExactIndex(items), query, 10, allowed=allowed)
    assert hits.rows[0].tolist() == brute_force(query, items, 10, ~allowed[None])[0]

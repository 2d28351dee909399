"""Benchmark: retrieval for serving. Recall@10 and per-query cost of each index mode against exact full-size search.

    python -m bench.serve --checkpoint runs/tiny-mrl/checkpoint_... [--prepared-dir prepared/ml100k_mm]
    python -m bench.serve --checkpoint DIR --parts catalogue          # skip the 1M synthetic part
    python -m bench.serve --parts synthetic --synthetic-items 200000   # a smaller synthetic catalogue

Parts (each is a function returning rows; `--parts` picks them; sections of bench/results/serve.json that a run
does not redo are kept, so other parts, such as the HTTP latency of jobs.serve, can be added beside these):
1. catalogue: the real catalogue of a trained checkpoint (`ItemRecommender.from_checkpoint`: fresh catalogue pass,
   the vectors `training.export` writes). Queries: every user's vector from their whole history (the recommender's
   own `user_vectors`). Reference: exact search with the full-size vectors. Rows: exact at each Matryoshka size
   (small vectors alone), HNSW at full size, and the funnel (retrieve k' with the size-s prefix, re-rank full) at
   each smaller size and two k'. No history exclusion: this measures the index, not the filter.
2. synthetic: N random unit vectors (default 1,000,000 x 128, float32) and random unit queries: exact (one torch
   matmul + top-k) vs faiss HNSW (M=32, efConstruction 40) at three efSearch values. Random vectors in 128 dims
   are the hardest case for a graph index (no cluster structure), so its recall here is a lower bound.
Per-query cost: one query at a time (what an online request sees), median over the queries, in milliseconds;
build time: seconds to build the index from the vectors. Goals (issue #20): funnel recall@10 >= 0.95 of exact
full-size search; on 1M items an HNSW query >= 20x faster than exact.
Writes bench/results/serve.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from serving.index import ExactIndex, FunnelIndex, HnswIndex, ItemIndex, normalize_rows, prefix, recall_at_k

RESULTS = Path(__file__).resolve().parent / "results" / "serve.json"
K = 10


def timed_build(build) -> tuple[ItemIndex, float]:
    started = time.perf_counter()
    index = build()
    return index, time.perf_counter() - started


def per_query_ms(index: ItemIndex, queries: np.ndarray, k: int = K, limit: int = 200) -> float:
    """Median milliseconds of one `search` of one query (the first `limit` queries, after one warm-up)."""
    index.search(queries[:1], k)
    times = []
    for query in queries[:limit]:
        started = time.perf_counter()
        index.search(query[None], k)
        times.append(time.perf_counter() - started)
    return 1000 * float(np.median(times))


def measure(name: str, size: int, index: ItemIndex, build_s: float, queries: np.ndarray, truth: np.ndarray,
            limit: int = 200, **extra) -> dict:
    found = index.search(queries, K).rows
    return {"mode": name, "size": size, "build_s": round(build_s, 3), "recall@10": round(recall_at_k(found, truth), 4),
            "ms_per_query": round(per_query_ms(index, queries, limit=limit), 4), **extra}


def bench_catalogue(checkpoint: Path, prepared_dir: Path | None, candidates: tuple[int, ...] = (50, 200)) -> dict:
    """Part 1: every mode on the real catalogue's vectors, against exact full-size search."""
    from pipeline.sequences import order_interactions
    from pipeline.sources import read_interactions
    from serving.recommender import ItemRecommender

    recommender = ItemRecommender.from_checkpoint(checkpoint, prepared_dir=prepared_dir)
    prepared = Path(recommender.source["items"]).parent
    ordered = order_interactions(read_interactions(prepared))
    histories = ordered.groupby("user_index", sort=True).item_id.apply(lambda s: s.astype(str).tolist()).tolist()
    queries = recommender.user_vectors(histories)  # [U, D]
    items = recommender.item_vectors()  # [N, D]
    full = recommender.dim
    exact, build_s = timed_build(lambda: ExactIndex(items))
    truth = exact.search(queries, K).rows
    rows = [measure("exact", full, exact, build_s, queries, truth)]
    for size in recommender.sizes:
        if size == full:
            continue
        small, build_s = timed_build(lambda: ExactIndex(recommender.item_vectors(size)))
        rows.append(measure("exact", size, small, build_s, prefix(queries, size), truth))
    hnsw, build_s = timed_build(lambda: HnswIndex(items))
    rows.append(measure("hnsw", full, hnsw, build_s, queries, truth, m=32, ef_search=128))
    for size in recommender.sizes:
        if size == full:
            continue
        for k_prime in candidates:
            funnel, build_s = timed_build(lambda: FunnelIndex(items, size, candidates=k_prime))
            rows.append(measure("funnel", size, funnel, build_s, queries, truth, candidates=k_prime,
                                rerank_size=full))
    return {"checkpoint": str(checkpoint), "items": recommender.num_items, "queries": len(queries), "dim": full,
            "sizes": list(recommender.sizes), "reference": f"exact at size {full}", "rows": rows}


def bench_synthetic(items: int, dim: int, queries: int = 200, seed: int = 0, ef_construction: int = 40,
                    ef_search: tuple[int, ...] = (32, 128, 512)) -> dict:
    """Part 2: exact vs HNSW on `items` random unit vectors (how query cost grows with the catalogue)."""
    rng = np.random.default_rng(seed)
    vectors = np.empty((items, dim), np.float32)
    for start in range(0, items, 100_000):  # in slices: float64 normals of 1M x 128 would need 1 GiB at once
        vectors[start:start + 100_000] = normalize_rows(rng.standard_normal((min(100_000, items - start), dim)))
    asked = normalize_rows(rng.standard_normal((queries, dim)))
    exact, build_s = timed_build(lambda: ExactIndex(vectors))
    truth = exact.search(asked, K).rows
    rows = [measure("exact", dim, exact, build_s, asked, truth, limit=50)]
    hnsw, build_s = timed_build(lambda: HnswIndex(vectors, m=32, ef_construction=ef_construction))
    for ef in ef_search:
        hnsw.ef_search = ef
        rows.append(measure("hnsw", dim, hnsw, build_s, asked, truth, m=32, ef_construction=ef_construction,
                            ef_search=ef))
    for row in rows[1:]:
        row["speedup_vs_exact"] = round(rows[0]["ms_per_query"] / row["ms_per_query"], 1)
    return {"items": items, "dim": dim, "queries": queries, "reference": f"exact at size {dim}", "rows": rows}


def goals(result: dict) -> dict:
    out = {}
    catalogue = result.get("catalogue")
    if catalogue:
        funnels = [r for r in catalogue["rows"] if r["mode"] == "funnel"]
        out["funnel_recall@10_min"] = min(r["recall@10"] for r in funnels) if funnels else None
        out["funnel_recall_goal_0.95_met"] = bool(funnels) and all(r["recall@10"] >= 0.95 for r in funnels)
    synthetic = result.get("synthetic")
    if synthetic:
        best = max(r["speedup_vs_exact"] for r in synthetic["rows"][1:])
        out["synthetic_hnsw_speedup_max"] = best
        out["synthetic_speedup_goal_20x_met"] = best >= 20
    return out


def format_table(result: dict) -> str:
    lines = []
    for part in ("catalogue", "synthetic"):
        section = result.get(part)
        if not section:
            continue
        lines.append(f"\n{part}: {section['items']:,} items, {section['queries']} queries, reference "
                     f"{section['reference']}")
        lines.append(f"{'mode':<8} {'size':>5} {'k_prime':>7} {'ef':>5} {'build s':>9} {'recall@10':>10} "
                     f"{'ms/query':>9} {'speedup':>8}")
        for row in section["rows"]:
            lines.append(f"{row['mode']:<8} {row['size']:>5} {row.get('candidates', ''):>7} "
                         f"{row.get('ef_search', ''):>5} {row['build_s']:>9.3f} {row['recall@10']:>10.4f} "
                         f"{row['ms_per_query']:>9.3f} {row.get('speedup_vs_exact', ''):>8}")
    for key, value in result.get("goals", {}).items():
        lines.append(f"{key}: {value}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="a trained checkpoint (needed by the catalogue part)")
    parser.add_argument("--prepared-dir", type=Path, default=None,
                        help="its prepared data (default: the checkpoint config's data.prepared_dir)")
    parser.add_argument("--parts", default="catalogue,synthetic", help="comma-separated: catalogue, synthetic")
    parser.add_argument("--synthetic-items", type=int, default=1_000_000)
    parser.add_argument("--synthetic-dim", type=int, default=128)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    unknown = parts - {"catalogue", "synthetic"}
    if unknown or ("catalogue" in parts and args.checkpoint is None):
        parser.error(f"unknown parts {sorted(unknown)}" if unknown else "the catalogue part needs --checkpoint")
    import faiss
    import torch

    result = json.loads(args.out.read_text()) if args.out.is_file() else {}
    result["machine"] = {"platform": platform.platform(), "python": platform.python_version(),
                         "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                         "faiss": faiss.__version__, "faiss_threads": faiss.omp_get_max_threads(),
                         "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if "catalogue" in parts:
        result["catalogue"] = bench_catalogue(args.checkpoint, args.prepared_dir)
        print(format_table({"catalogue": result["catalogue"]}), flush=True)
    if "synthetic" in parts:
        result["synthetic"] = bench_synthetic(args.synthetic_items, args.synthetic_dim)
    result["goals"] = goals(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(format_table(result))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

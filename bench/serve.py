"""Benchmark: retrieval for serving. Recall@10 and per-query cost of each index mode against exact full-size search.

    python -m bench.serve --checkpoint runs/tiny-mrl/checkpoint_... [--prepared-dir prepared/ml100k_mm]
    python -m bench.serve --checkpoint DIR --parts catalogue          # skip the 1M synthetic part
    python -m bench.serve --parts synthetic --synthetic-items 200000   # a smaller synthetic catalogue

Parts (each is a function returning rows; `--parts` picks them; sections of bench/results/serve.json that a run
does not redo are kept, so other parts, such as the HTTP latency of jobs.serve, can be added beside these):
1. catalogue: the real catalogue of a trained checkpoint (`ItemRecommender.from_checkpoint`: fresh catalogue pass,
   the vectors `training.export` writes). Queries: every user's vector from their whole history (the recommender's
   own `user_vectors`), and every item's vector (item-to-item). Reference: exact search with the full-size vectors. Rows: exact at each Matryoshka size
   (small vectors alone), HNSW at full size, and the funnel (retrieve k' with the size-s prefix, re-rank full) at
   each smaller size and two k'. No history exclusion: this measures the index, not the filter.
2. synthetic: N random unit vectors (default 1,000,000 x 128, float32): exact (one torch matmul + top-k) vs faiss
   HNSW (M=32, efConstruction 40) at three efSearch values, for random queries (uniform on the sphere: no item is
   much nearer than another, the worst case for a graph index) and for queries near an item (an item plus noise
   of the same norm).
Per-query cost: one query at a time (what an online request sees), median over the queries, in milliseconds;
build time: seconds to build the index from the vectors. Goals (issue #20): funnel recall@10 >= 0.95 of exact
full-size search; on 1M items an HNSW query >= 20x faster than exact.
Writes bench/results/serve.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
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
    """Part 1: every mode on the real catalogue's vectors, against exact full-size search, for two query sets:
    "users" (every user's vector from their whole history) and "items" (every item's own vector: "more like
    this"). The spread of a query set is reported as the mean pairwise cosine of its queries (1 = all the same)."""
    from pipeline.sequences import order_interactions
    from pipeline.sources import read_interactions
    from serving.recommender import ItemRecommender

    recommender = ItemRecommender.from_checkpoint(checkpoint, prepared_dir=prepared_dir)
    prepared = Path(recommender.source["items"]).parent
    ordered = order_interactions(read_interactions(prepared))
    histories = ordered.groupby("user_index", sort=True).item_id.apply(lambda s: s.astype(str).tolist()).tolist()
    items = recommender.item_vectors()  # [N, D]
    query_sets = {"users": recommender.user_vectors(histories), "items": items}  # [U, D], [N, D]
    full = recommender.dim
    smaller = [size for size in recommender.sizes if size != full]
    exact, exact_build_s = timed_build(lambda: ExactIndex(items))
    hnsw, hnsw_build_s = timed_build(lambda: HnswIndex(items))
    small_exact = {size: timed_build(lambda: ExactIndex(recommender.item_vectors(size))) for size in smaller}
    funnels = {(size, k_prime): timed_build(lambda: FunnelIndex(items, size, candidates=k_prime))
               for size in smaller for k_prime in candidates}
    rows, spread = [], {}
    for name, queries in query_sets.items():
        spread[name] = round(float(np.square(np.linalg.norm(queries.mean(axis=0)))), 4)
        truth = exact.search(queries, K).rows
        rows.append(measure("exact", full, exact, exact_build_s, queries, truth, query_set=name))
        for size, (index, build_s) in small_exact.items():
            rows.append(measure("exact", size, index, build_s, prefix(queries, size), truth, query_set=name))
        rows.append(measure("hnsw", full, hnsw, hnsw_build_s, queries, truth, m=32, ef_search=128, query_set=name))
        for (size, k_prime), (index, build_s) in funnels.items():
            rows.append(measure("funnel", size, index, build_s, queries, truth, candidates=k_prime,
                                rerank_size=full, query_set=name))
    return {"checkpoint": str(checkpoint), "items": recommender.num_items, "queries": len(histories),
            "dim": full, "sizes": list(recommender.sizes), "reference": f"exact at size {full}",
            "mean_pairwise_cosine": spread, "rows": rows}


def bench_synthetic(items: int, dim: int, queries: int = 200, seed: int = 0, ef_construction: int = 40,
                    ef_search: tuple[int, ...] = (32, 128, 512)) -> dict:
    """Part 2: exact vs HNSW on `items` random unit vectors (how query cost grows with the catalogue).

    Two query sets: "random" (uniform on the sphere: every item is about as far as every other, the worst case
    for a graph index) and "near" (a catalogue vector plus noise of the same norm: cosine ~0.71 to its source,
    like a user vector near what the user likes).
    """
    rng = np.random.default_rng(seed)
    vectors = np.empty((items, dim), np.float32)
    for start in range(0, items, 100_000):  # in slices: float64 normals of 1M x 128 would need 1 GiB at once
        vectors[start:start + 100_000] = normalize_rows(rng.standard_normal((min(100_000, items - start), dim)))
    query_sets = {
        "random": normalize_rows(rng.standard_normal((queries, dim))),
        "near": normalize_rows(vectors[rng.integers(0, items, queries)]
                               + normalize_rows(rng.standard_normal((queries, dim)))),
    }
    exact, exact_build_s = timed_build(lambda: ExactIndex(vectors))
    truths = {name: exact.search(asked, K).rows for name, asked in query_sets.items()}
    hnsw, build_s = timed_build(lambda: HnswIndex(vectors, m=32, ef_construction=ef_construction))
    rows = []
    for name, asked in query_sets.items():
        reference = measure("exact", dim, exact, exact_build_s, asked, truths[name], limit=50, query_set=name)
        rows.append(reference)
        for ef in ef_search:
            hnsw.ef_search = ef
            row = measure("hnsw", dim, hnsw, build_s, asked, truths[name], m=32, ef_construction=ef_construction,
                          ef_search=ef, query_set=name)
            row["speedup_vs_exact"] = round(reference["ms_per_query"] / row["ms_per_query"], 1)
            rows.append(row)
    return {"items": items, "dim": dim, "queries": queries, "reference": f"exact at size {dim}", "rows": rows}


def untrained_checkpoint(preset: str, prepared_dir: Path, directory: Path, seed: int = 0) -> Path:
    """A checkpoint of `preset` at its initial weights (seeded): pretrained encoders give real content geometry
    without a training run. Vectors only: not a model to judge recommendations by."""
    import torch

    from model.build import build_recommender
    from pipeline.sources import load_manifest
    from training.checkpoint import MODEL_FILE, STATE_FILE
    from training.job_config import build_config

    job = build_config(preset, [f"data.prepared_dir={prepared_dir.resolve()}"])
    manifest = load_manifest(prepared_dir)
    torch.manual_seed(seed)
    model = build_recommender(job.model, job.image, job.text, num_items=int(manifest["num_items"]),
                              max_history=job.data.max_history)
    directory.mkdir(parents=True)
    torch.save(model.state_dict(), directory / MODEL_FILE)
    (directory / STATE_FILE).write_text(json.dumps({
        "config": job.to_dict(), "num_items": int(manifest["num_items"]), "watermark": manifest["watermark"],
        "matryoshka_sizes": list(job.model.supported_sizes), "epoch": 0, "global_step": 0,
        "note": f"untrained {preset} (seed {seed}): bench.serve vectors only"}))
    return directory


def goals(result: dict) -> dict:
    out = {}
    for name, catalogue in result.items():
        if not name.startswith("catalogue") or not isinstance(catalogue, dict):
            continue
        for query_set in ("users", "items"):
            funnels = [r for r in catalogue["rows"] if r["mode"] == "funnel" and r.get("query_set") == query_set]
            if funnels:
                best = max(r["recall@10"] for r in funnels)
                out[f"{name}.{query_set}.funnel_recall@10_best"] = best
                out[f"{name}.{query_set}.funnel_recall_goal_0.95_met"] = best >= 0.95
    synthetic = result.get("synthetic")
    if synthetic:
        best = max(r["speedup_vs_exact"] for r in synthetic["rows"] if r["mode"] == "hnsw")
        out["synthetic_hnsw_speedup_max"] = best
        out["synthetic_speedup_goal_20x_met"] = best >= 20
    return out


def format_table(result: dict) -> str:
    lines = []
    for part in [name for name in result if name.startswith("catalogue")] + ["synthetic"]:
        section = result.get(part)
        if not section:
            continue
        lines.append(f"\n{part}: {section['items']:,} items, {section['queries']} queries, reference "
                     f"{section['reference']}")
        lines.append(f"{'queries':<7} {'mode':<8} {'size':>5} {'k_prime':>7} {'ef':>5} {'build s':>9} "
                     f"{'recall@10':>10} {'ms/query':>9} {'speedup':>8}")
        for row in section["rows"]:
            lines.append(f"{row.get('query_set', 'users'):<7} {row['mode']:<8} {row['size']:>5} {row.get('candidates', ''):>7} "
                         f"{row.get('ef_search', ''):>5} {row['build_s']:>9.3f} {row['recall@10']:>10.4f} "
                         f"{row['ms_per_query']:>9.3f} {row.get('speedup_vs_exact', ''):>8}")
    for key, value in result.get("goals", {}).items():
        lines.append(f"{key}: {value}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="a trained checkpoint (the catalogue part needs it or "
                        "--untrained-preset)")
    parser.add_argument("--untrained-preset", default="",
                        help="instead of --checkpoint: the initial weights of this preset (e.g. movielens_mrl, whose "
                             "pretrained encoders give real content vectors); needs --prepared-dir")
    parser.add_argument("--name", default="catalogue",
                        help="the result section of the catalogue part (catalogue, catalogue_<what>)")
    parser.add_argument("--prepared-dir", type=Path, default=None,
                        help="its prepared data (default: the checkpoint config's data.prepared_dir)")
    parser.add_argument("--parts", default="catalogue,synthetic", help="comma-separated: catalogue, synthetic")
    parser.add_argument("--synthetic-items", type=int, default=1_000_000)
    parser.add_argument("--synthetic-dim", type=int, default=128)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    unknown = parts - {"catalogue", "synthetic"}
    if unknown or ("catalogue" in parts and args.checkpoint is None and not args.untrained_preset):
        parser.error(f"unknown parts {sorted(unknown)}" if unknown else "the catalogue part needs --checkpoint")
    if not args.name.startswith("catalogue") or (args.untrained_preset and args.prepared_dir is None):
        parser.error("--name must start with 'catalogue'; --untrained-preset needs --prepared-dir")
    import faiss
    import torch

    result = {}
    result["machine"] = {"platform": platform.platform(), "python": platform.python_version(),
                         "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                         "faiss": faiss.__version__, "faiss_threads": faiss.omp_get_max_threads(),
                         "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if "catalogue" in parts:
        with tempfile.TemporaryDirectory(prefix="bench-serve-") as scratch:
            checkpoint = args.checkpoint or untrained_checkpoint(args.untrained_preset, args.prepared_dir,
                                                                 Path(scratch) / "checkpoint")
            result[args.name] = bench_catalogue(checkpoint, args.prepared_dir)
        if args.untrained_preset:
            result[args.name]["checkpoint"] = f"untrained {args.untrained_preset}, seed 0"
        print(format_table({args.name: result[args.name]}), flush=True)
    if "synthetic" in parts:
        result["synthetic"] = bench_synthetic(args.synthetic_items, args.synthetic_dim)
    print(format_table(save_sections(result, args.out)))
    print(f"\nwrote {args.out}")
    return 0


def save_sections(sections: dict, out: Path) -> dict:
    """Write `sections` into the JSON at `out`, keeping the sections of earlier runs that these do not replace
    (each part of this benchmark can be re-run alone); the goals are recomputed. -> the whole result."""
    result = json.loads(out.read_text()) if out.is_file() else {}
    result.update(sections)
    result["goals"] = goals(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    raise SystemExit(main())

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
3. http: POST /recommend of `jobs.serve` (Ray Serve, one replica, started by this script in its own local Ray and
   stopped after), loaded by threads of this process (one keep-alive `http.client` connection each, sharing the
   machine's CPUs with the server, as a sidecar client would) at each --concurrency for --seconds: latency
   p50/p90/p99 and throughput, for exact search and the funnel at each smaller size it serves. Each request is a
   random real user's last max_history items, k = 10. The model: --checkpoint, else (--http-preset, default
   movielens_mrl) that architecture at its seeded initial weights over the real catalogue (1,682 items):
   latency depends on shapes, not on weight values, and training it first takes ~5 minutes here (alone).
       python -m bench.serve --parts http [--checkpoint DIR] [--concurrency 1,8,32] [--seconds 8]
       python -m bench.serve --parts http --url http://127.0.0.1:8000     # a server already running
Per-query cost: one query at a time (what an online request sees), median over the queries, in milliseconds;
build time: seconds to build the index from the vectors. Goals (issue #20): funnel recall@10 >= 0.95 of exact
full-size search; on 1M items an HNSW query >= 20x faster than exact; p99 <= 50 ms at concurrency 8 (http).
Writes bench/results/serve.json and prints a table.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from serving.index import ExactIndex, FunnelIndex, HnswIndex, ItemIndex, normalize_rows, prefix, recall_at_k

RESULTS = Path(__file__).resolve().parent / "results" / "serve.json"
K = 10
REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "ml100k_mm"


def http_variants(sizes: list[int]) -> list[tuple[str, dict]]:
    """(label, extra request fields): exact search at the full size, and the funnel retrieving with each smaller
    size the served model has (re-ranking at the full size)."""
    return [("exact", {"mode": "exact"}),
            *((f"funnel@{size}", {"mode": "funnel", "size": size}) for size in sorted(sizes)[:-1])]


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


# ---------------------------------------------------------------------------------------------- http part

@dataclass
class LoadResult:
    variant: str
    concurrency: int
    requests: int
    errors: int
    seconds: float
    throughput_rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float


def _worker(url: urllib.parse.SplitResult, bodies: list[bytes], deadline: float, latencies: list[float],
            errors: list[str], seed: int) -> None:
    """Send requests over one keep-alive connection until `deadline`; append each latency (s) or error."""
    rng = random.Random(seed)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    path = url.path.rstrip("/") + "/recommend"
    while time.perf_counter() < deadline:
        body = bodies[rng.randrange(len(bodies))]
        started = time.perf_counter()
        try:
            connection.request("POST", path, body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            payload = response.read()
            if response.status != 200:
                errors.append(f"{response.status}: {payload[:200]!r}")
                continue
        except (OSError, http.client.HTTPException) as err:
            errors.append(f"{type(err).__name__}: {err}")
            connection.close()
            connection = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
            continue
        latencies.append(time.perf_counter() - started)
    connection.close()


def measure_http(base_url: str, bodies: list[bytes], concurrency: int, seconds: float, variant: str = "",
            warmup_s: float = 1.0) -> LoadResult:
    """`concurrency` threads sending `bodies` (picked at random) for `seconds` -> latency percentiles, throughput."""
    url = urllib.parse.urlsplit(base_url)
    if warmup_s > 0:
        _worker(url, bodies, time.perf_counter() + warmup_s, [], [], seed=-1)
    latencies: list[float] = []
    errors: list[str] = []
    started = time.perf_counter()
    deadline = started + seconds
    threads = [threading.Thread(target=_worker, args=(url, bodies, deadline, latencies, errors, seed))
               for seed in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    ms = np.asarray(latencies) * 1000 if latencies else np.asarray([float("nan")])
    return LoadResult(variant=variant, concurrency=concurrency, requests=len(latencies), errors=len(errors),
                      seconds=round(elapsed, 2), throughput_rps=round(len(latencies) / elapsed, 1),
                      p50_ms=round(float(np.percentile(ms, 50)), 2), p90_ms=round(float(np.percentile(ms, 90)), 2),
                      p99_ms=round(float(np.percentile(ms, 99)), 2), max_ms=round(float(ms.max()), 2))


def request_bodies(prepared_dir: Path, variant_fields: dict, max_history: int, users: int = 200, k: int = 10,
                   seed: int = 0) -> list[bytes]:
    """`users` random real users' last `max_history` items as /recommend bodies with `variant_fields`."""
    from serving.online import UserHistories

    histories = UserHistories.from_prepared(prepared_dir, keep=max_history)
    ids = sorted(histories._histories)  # noqa: SLF001 -- the benchmark samples users, the service never does
    picked = random.Random(seed).sample(ids, min(users, len(ids)))
    return [json.dumps({"history": histories.get(user), "k": k, **variant_fields}).encode() for user in picked]


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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(checkpoint: Path | None, model: str, prepared_dir: Path, *, replicas: int, cpus: float,
                 log_path: Path, timeout_s: float = 600) -> tuple[subprocess.Popen, str]:
    """`python -m jobs.serve` in a new process (its own local Ray) -> (the process, its base URL) once healthy."""
    port = _free_port()
    source = ["--checkpoint", str(checkpoint)] if checkpoint else ["--model", model]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "jobs.serve", *source, "--port", str(port), "--prepared-dir", str(prepared_dir),
             "--replicas", str(replicas), "--cpus-per-replica", str(cpus), "--poll-s", "0"],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"jobs.serve exited {process.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{base}/healthz", timeout=5) as response:
                if response.status == 200:
                    return process, base
        except OSError:
            pass
        time.sleep(1)
    stop_server(process)
    raise RuntimeError(f"jobs.serve was not healthy after {timeout_s:.0f}s:\n{log_path.read_text()[-3000:]}")


def stop_server(process: subprocess.Popen) -> None:
    """SIGINT (the job deletes its app, and its local Ray stops with it), then SIGKILL the group if needed."""
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def run_http_bench(base_url: str, prepared_dir: Path, *, max_history: int, concurrencies: list[int],
                   seconds: float, sizes: list[int]) -> list[LoadResult]:
    """Every variant the served model supports (`http_variants`) at every concurrency."""
    results = []
    for label, fields in http_variants(sizes):
        bodies = request_bodies(prepared_dir, fields, max_history)
        for concurrency in concurrencies:
            result = measure_http(base_url, bodies, concurrency, seconds, variant=label)
            results.append(result)
            print(format_http_row(result), flush=True)
    return results


HTTP_HEADER = (f"{'variant':<11} {'conc':>4} {'requests':>8} {'errors':>6} {'req/s':>7} {'p50 ms':>7} {'p90 ms':>7} "
          f"{'p99 ms':>7} {'max ms':>7}")


def format_http_row(r: LoadResult) -> str:
    return (f"{r.variant:<11} {r.concurrency:>4} {r.requests:>8} {r.errors:>6} {r.throughput_rps:>7.1f} "
            f"{r.p50_ms:>7.1f} {r.p90_ms:>7.1f} {r.p99_ms:>7.1f} {r.max_ms:>7.1f}")


def bench_http(args: argparse.Namespace, prepared_dir: Path | None) -> dict:
    """The http part: serve (unless --url), load, stop -> the serve.json section."""
    from training.checkpoint import read_state

    work = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    if prepared_dir is None and args.checkpoint is not None:
        prepared_dir = Path(read_state(args.checkpoint)["config"]["data"]["prepared_dir"])
    if prepared_dir is None:
        from pipeline.config import DataConfig
        from pipeline.sources import prepare_dataset

        prepared_dir = work / "prepared"
        prepare_dataset(DataConfig(), args.raw_dir, prepared_dir)
    checkpoint, what = args.checkpoint, args.url or str(args.checkpoint or "")
    if not args.url and checkpoint is None:
        checkpoint = untrained_checkpoint(args.http_preset, prepared_dir, work / "checkpoint")
        what = f"{args.http_preset} (untrained weights)"
    max_history = int(read_state(checkpoint)["config"]["data"]["max_history"]) if checkpoint else 50
    process, base, started = None, args.url, time.perf_counter()
    if not base:
        process, base = start_server(checkpoint, "", prepared_dir, replicas=args.replicas,
                                     cpus=args.cpus_per_replica, log_path=work / "serve.log")
    print(f"\nhttp: serving {what} at {base} (ready in {time.perf_counter() - started:.0f}s); "
          f"{os.cpu_count()} CPUs on this machine\n{HTTP_HEADER}", flush=True)
    load_before = [round(x, 2) for x in os.getloadavg()]  # other users of the machine: read the numbers with it
    try:
        with urllib.request.urlopen(f"{base}/model", timeout=30) as response:
            info = json.loads(response.read())["info"]
        concurrencies = [int(c) for c in args.concurrency.split(",") if c.strip()]
        rows = run_http_bench(base, prepared_dir, max_history=max_history, concurrencies=concurrencies,
                              seconds=args.seconds, sizes=info["sizes"])
    finally:
        if process is not None:
            stop_server(process)
    return {"model": what, "items": info["num_items"], "dim": info["dim"], "sizes": info["sizes"],
            "max_history": max_history, "k": K, "replicas": args.replicas, "cpus_per_replica": args.cpus_per_replica,
            "cpus": os.cpu_count(), "seconds_per_point": args.seconds, "load_average_before": load_before,
            "load_average_after": [round(x, 2) for x in os.getloadavg()], "rows": [asdict(r) for r in rows]}


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
    http_rows = [r for r in (result.get("http") or {}).get("rows", []) if r["concurrency"] == 8]
    if http_rows:
        out["http_p99_ms_at_concurrency_8_max"] = max(r["p99_ms"] for r in http_rows)
        out["http_p99_goal_50ms_at_8_met"] = all(r["p99_ms"] <= 50 and r["errors"] == 0 for r in http_rows)
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
    for key in sorted(k for k in result if k.startswith("http") and "rows" in result[k]):
        http = result[key]
        lines.append(f"\n{key}: {http['model']}, {http['items']:,} items, {http['replicas']} replica(s) x "
                     f"{http['cpus_per_replica']:g} CPU, {http['cpus']} CPUs, load average {http['load_average_before']}")
        lines.append(HTTP_HEADER)
        lines += [format_http_row(LoadResult(**row)) for row in http["rows"]]
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
    parser.add_argument("--parts", default="catalogue,synthetic",
                        help="comma-separated: catalogue, synthetic, http")
    parser.add_argument("--synthetic-items", type=int, default=1_000_000)
    parser.add_argument("--synthetic-dim", type=int, default=128)
    parser.add_argument("--out", type=Path, default=RESULTS)
    http = parser.add_argument_group("http part")
    http.add_argument("--url", default="", help="measure a jobs.serve already running at this base URL")
    http.add_argument("--http-preset", default="movielens_mrl", help="architecture served without --checkpoint")
    http.add_argument("--raw-dir", type=Path, default=DEFAULT_DATA, help="ml100k_mm, prepared into a temporary "
                      "folder when neither --prepared-dir nor --checkpoint names one")
    http.add_argument("--concurrency", default="1,8,32", help="comma-separated client thread counts")
    http.add_argument("--seconds", type=float, default=8.0, help="measured seconds per (variant, concurrency)")
    http.add_argument("--replicas", type=int, default=1)
    http.add_argument("--cpus-per-replica", type=float, default=1.0)
    http.add_argument("--http-section", default="http", help="the serve.json key of this http run (compare "
                      "settings side by side: e.g. http_2replicas); the goal is read from 'http'")
    args = parser.parse_args()
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    unknown = parts - {"catalogue", "synthetic", "http"}
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
    if "http" in parts:
        result[args.http_section] = bench_http(args, args.prepared_dir)
        result[args.http_section]["command"] = "python -m bench.serve " + " ".join(sys.argv[1:])
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

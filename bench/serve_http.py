"""HTTP load on `jobs.serve`'s POST /recommend: latency p50/p99 and throughput at several concurrencies, for
exact search and the Matryoshka funnel at two prefix sizes (the HTTP part of `bench/serve.py`).

    python -m bench.serve_http                                 # serves the default model, measures, stops
    python -m bench.serve_http --url http://127.0.0.1:8000     # measures a server already running
    python -m bench.serve_http --checkpoint DIR --concurrency 1,8,32 --seconds 10

The model (without --url/--checkpoint/--model): the `movielens_mrl` architecture (pretrained EfficientNet-Lite0 +
MiniLM encoders, a 512-wide LRU, Matryoshka sizes 32/128/512) over the real ml100k_mm catalogue (1,682 items),
with its trainable weights at their seeded initial values: serving latency depends on shapes, not on weight values,
and training it first would take half an hour here. It is served by `jobs.serve` (Ray Serve, one replica) in a
local Ray started by this script; the load comes from this process's threads (one keep-alive `http.client`
connection each), sharing the machine's CPUs with the server, as a sidecar client would.

Each request is one real user's history (the last max_history items of a random ml100k_mm user) and k = 10.
Results: printed as a table and written to bench/results/serve.json under "http" (other keys are kept).
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "serve.json"
DEFAULT_DATA = REPO.parent / "shared" / "data" / "ml100k_mm"
# (label, extra request fields): exact search at the full size, and the funnel retrieving with two prefix sizes
VARIANTS = (("exact", {"mode": "exact"}), ("funnel@32", {"mode": "funnel", "size": 32}),
            ("funnel@128", {"mode": "funnel", "size": 128}))


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


def measure(base_url: str, bodies: list[bytes], concurrency: int, seconds: float, variant: str = "",
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
    """A checkpoint directory (model.pt + state.json) of `preset`'s architecture at its seeded initial weights."""
    import torch

    from model.build import build_recommender
    from pipeline.sources import load_manifest
    from training.checkpoint import save_checkpoint
    from training.job_config import build_config

    job = build_config(preset, [f"data.prepared_dir={prepared_dir}"])
    manifest = load_manifest(prepared_dir)
    torch.manual_seed(seed)
    model = build_recommender(job.model, job.image, job.text, num_items=int(manifest["num_items"]),
                              max_history=job.data.max_history)
    directory.mkdir(parents=True, exist_ok=True)
    save_checkpoint(directory, model, torch.optim.SGD(model.parameters(), lr=0.1), {
        "config": job.to_dict(), "num_items": int(manifest["num_items"]),
        "matryoshka_sizes": list(job.model.supported_sizes), "watermark": int(manifest["watermark"]),
        "epoch": 0, "global_step": 0, "note": "untrained: for latency benchmarks only"})
    return directory


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(checkpoint: Path | None, model: str, prepared_dir: Path, *, replicas: int, cpus: float,
                 log_path: Path, timeout_s: float = 600) -> tuple[subprocess.Popen, str]:
    """`python -m jobs.serve` in a new process (its own local Ray) -> (the process, its base URL) once healthy."""
    import urllib.request

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
                   seconds: float, variants=VARIANTS) -> list[LoadResult]:
    results = []
    for label, fields in variants:
        bodies = request_bodies(prepared_dir, fields, max_history)
        for concurrency in concurrencies:
            result = measure(base_url, bodies, concurrency, seconds, variant=label)
            results.append(result)
            print(format_row(result), flush=True)
    return results


HEADER = (f"{'variant':<11} {'conc':>4} {'requests':>8} {'errors':>6} {'req/s':>7} {'p50 ms':>7} {'p90 ms':>7} "
          f"{'p99 ms':>7} {'max ms':>7}")


def format_row(r: LoadResult) -> str:
    return (f"{r.variant:<11} {r.concurrency:>4} {r.requests:>8} {r.errors:>6} {r.throughput_rps:>7.1f} "
            f"{r.p50_ms:>7.1f} {r.p90_ms:>7.1f} {r.p99_ms:>7.1f} {r.max_ms:>7.1f}")


def write_results(section: dict, path: Path = RESULTS, key: str = "http") -> None:
    """Put `section` under `key` of the results file, keeping what other parts of bench/serve.py wrote."""
    existing = json.loads(path.read_text()) if path.is_file() else {}
    existing[key] = section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(existing, indent=2) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.serve_http", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="", help="measure a server already running at this base URL")
    parser.add_argument("--checkpoint", default="", help="serve this checkpoint (default: see above)")
    parser.add_argument("--model", default="", help="serve this registered model (models:/NAME@ALIAS)")
    parser.add_argument("--preset", default="movielens_mrl", help="architecture of the default untrained model")
    parser.add_argument("--raw-dir", type=Path, default=DEFAULT_DATA, help="ml100k_mm, prepared into a temp dir")
    parser.add_argument("--prepared-dir", type=Path, default=None, help="an already prepared ml100k_mm")
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated client thread counts")
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per (variant, concurrency)")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--cpus-per-replica", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    concurrencies = [int(c) for c in args.concurrency.split(",") if c.strip()]

    work = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    prepared = args.prepared_dir
    if prepared is None:
        from pipeline.config import DataConfig
        from pipeline.sources import prepare_dataset

        prepared = work / "prepared"
        prepare_dataset(DataConfig(), args.raw_dir, prepared)
    checkpoint = Path(args.checkpoint) if args.checkpoint else None
    what = args.url or args.model or str(checkpoint or "")
    if not args.url and not args.model and checkpoint is None:
        checkpoint = untrained_checkpoint(args.preset, prepared, work / "checkpoint")
        what = f"{args.preset} (untrained weights)"
    from training.checkpoint import read_state

    max_history = (int(read_state(checkpoint)["config"]["data"]["max_history"]) if checkpoint else 50)
    process = None
    started = time.perf_counter()
    base = args.url
    if not base:
        process, base = start_server(checkpoint, args.model, prepared, replicas=args.replicas,
                                     cpus=args.cpus_per_replica, log_path=work / "serve.log")
    print(f"[bench] serving {what} at {base} (ready in {time.perf_counter() - started:.0f}s); "
          f"{os.cpu_count()} CPUs on this machine", flush=True)
    try:
        print(HEADER)
        results = run_http_bench(base, prepared, max_history=max_history, concurrencies=concurrencies,
                                 seconds=args.seconds)
        info = json.loads(__import__("urllib.request").request.urlopen(f"{base}/model", timeout=30).read())
    finally:
        if process is not None:
            stop_server(process)
    write_results({
        "command": "python -m bench.serve_http " + " ".join(sys.argv[1:]),
        "model": what, "num_items": info["info"]["num_items"], "dim": info["info"]["dim"],
        "sizes": info["info"]["sizes"], "max_history": max_history, "k": 10,
        "replicas": args.replicas, "cpus_per_replica": args.cpus_per_replica, "cpus": os.cpu_count(),
        "seconds_per_point": args.seconds, "results": [asdict(r) for r in results],
        "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }, args.out)
    print(f"[bench] written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

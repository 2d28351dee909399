"""Benchmark: is the data pipeline fast enough?

    python -m bench.pipeline                         # 40,000 rows, 2 decode actors, then a 40-step movielens run
    python -m bench.pipeline --rows 2000 --skip-training

1. Decode throughput: the rows/s at which the product's Ray Data stage (`pipeline.stages.train_dataset`: read
   example ids -> shuffle -> `ItemContentDecoder` actors: JPEG decode + resize + tokenize) delivers batches,
   against a plain single-process Python loop calling the same `ItemContentDecoder` over the same rows, in the
   same run. Decode cache off (`DataConfig.decode_cache_items = 0`) so every row really decodes. Both timings include
   building the decoder(s) (item table + tokenizer load); the Ray one also the read, shuffle and actor start.
2. Data wait in training: a short real run of the `movielens` preset; the train loop times how long each step
   waits for its next batch and reports `data_wait_fraction` (wait / epoch time, first batch included).

Writes bench/results/pipeline.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from training.job_config import JobConfig, build_config
from pipeline.sequences import Examples
from pipeline.sources import ITEMS_FILE, load_manifest
from pipeline.config import DataConfig
from pipeline.content import ItemContentDecoder, write_examples
from pipeline.stages import train_dataset

RESULTS = Path(__file__).resolve().parent / "results" / "pipeline.json"


def sample_examples(num_items: int, rows: int, seed: int = 0) -> Examples:
    """`rows` examples whose targets are random catalogue items (histories empty: only targets are decoded)."""
    rng = np.random.default_rng(seed)
    return Examples(
        user=np.arange(rows, dtype=np.int64), history=np.zeros((rows, 1), np.int64),
        target=rng.integers(1, num_items + 1, size=rows).astype(np.int64),
        timestamp=np.zeros(rows, np.int64), rating=np.full(rows, np.nan, np.float32),
    )


def single_process(examples: Examples, items_path: Path, job: JobConfig) -> dict[str, float]:
    """Rows/s of one Python process calling the decoder batch by batch (the reference)."""
    from training.offline_eval import content_spec_of

    spec = content_spec_of(job)
    started = time.perf_counter()
    decoder = ItemContentDecoder(str(items_path), "target", spec.image_size, spec.tokenizer_path, spec.max_length,
                                 job.data.max_image_pixels, cache_items=0)
    built = time.perf_counter()
    rows = 0
    for start in range(0, len(examples), job.train.batch_size):
        out = decoder({"target": examples.target[start : start + job.train.batch_size]})
        rows += len(out["image"])
    finished = time.perf_counter()
    return {"rows": rows, "seconds": finished - started, "rows_per_s": rows / (finished - started),
            "setup_seconds": built - started, "rows_per_s_after_setup": rows / (finished - built)}


def ray_data(examples_path: Path, items_path: Path, job: JobConfig, shuffle: bool = True) -> dict[str, float]:
    """Rows/s of the product's Ray Data training stage, from dataset creation to the last batch."""
    from training.offline_eval import content_spec_of

    started = time.perf_counter()
    ds = train_dataset(examples_path, items_path, job.data, content_spec_of(job), job.train.batch_size, shuffle=shuffle)
    rows, first = 0, None
    for batch in ds.iter_batches(batch_size=job.train.batch_size, batch_format="numpy"):
        rows += len(batch["image"])
        if first is None:
            first = time.perf_counter()
    finished = time.perf_counter()
    after_first = finished - (first or finished)
    return {"rows": rows, "seconds": finished - started, "rows_per_s": rows / (finished - started),
            "first_batch_seconds": (first or finished) - started,
            "rows_per_s_after_first_batch": (rows - job.train.batch_size) / after_first if after_first else float("nan"),
            "decode_actors": job.data.decode_actors, "decode_cpus": job.data.decode_cpus, "shuffle": shuffle}


def training_wait(args: argparse.Namespace) -> dict[str, float]:
    """A short real `movielens` run: the loop's own data-wait fraction and throughput."""
    from training.driver import run_training

    job = build_config("movielens", [
        f"data.prepared_dir={args.prepared_dir}", "train.epochs=1", f"train.max_steps_per_epoch={args.train_steps}",
        "train.schedule=cosine",  # one short epoch: the schedule does not matter, plateau's patience check would
        f"train.storage_path={args.storage_path}", "tracking.experiment=mmrec-bench-pipeline",
        f"train.run_name=pipeline-movielens-{time.strftime('%Y%m%d-%H%M%S')}",
    ])
    started = time.perf_counter()
    outcome = run_training(job, log=lambda line: print(line, flush=True))
    keys = ("data_wait_fraction", "samples_per_s", "epoch_seconds", "global_step")
    return {**{k: float(outcome.metrics[k]) for k in keys}, "run_seconds": time.perf_counter() - started,
            "mlflow_run_id": outcome.mlflow_run_id, "steps": args.train_steps,
            "batch_size": job.train.batch_size, "image_size": job.image.image_size,
            "text_length": job.text.max_length, "decode_actors": job.data.decode_actors}


def format_table(result: dict) -> str:
    loop, pipe = result["decode"]["single_process"], result["decode"]["ray_data"]
    ray_label = f"Ray Data stage, {pipe['decode_actors']} decode actors" + ("" if pipe.get("shuffle", True) else ", no shuffle")
    lines = [
        f"{'decode + resize + tokenize':<44}{'rows':>7}{'seconds':>10}{'rows/s':>10}{'rows/s steady':>15}"
        f"{'start-up s':>12}",
        f"{'single-process Python loop':<44}{loop['rows']:>7}{loop['seconds']:>10.1f}{loop['rows_per_s']:>10.1f}"
        f"{loop['rows_per_s_after_setup']:>15.1f}{loop['setup_seconds']:>12.1f}",
        f"{ray_label:<44}{pipe['rows']:>7}{pipe['seconds']:>10.1f}{pipe['rows_per_s']:>10.1f}"
        f"{pipe['rows_per_s_after_first_batch']:>15.1f}{pipe['first_batch_seconds']:>12.1f}",
        f"{'ratio (Ray / loop)':<44}{'':>7}{'':>10}{result['decode']['ratio']:>10.2f}"
        f"{result['decode']['ratio_steady']:>15.2f}   (goal >= 1.8)",
        "(start-up: the loop's decoder set-up; Ray: dataset creation to the first batch)",
    ]
    if result.get("training"):
        t = result["training"]
        lines += ["", f"movielens run, {t['steps']} steps x {t['batch_size']}: data wait {t['data_wait_fraction']:.1%} "
                      f"of epoch time (goal < 10%), {t['samples_per_s']:.1f} samples/s, epoch {t['epoch_seconds']:.0f}s"]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepared-dir", default="prepared/ml100k_mm")
    parser.add_argument("--rows", type=int, default=40000)
    parser.add_argument("--decode-actors", type=int, default=2)
    parser.add_argument("--decode-cpus", type=float, default=0.5)
    parser.add_argument("--no-shuffle", action="store_true",
                        help="leave out the stage's per-epoch random_shuffle (to see what the all-to-all costs)")
    parser.add_argument("--train-steps", type=int, default=40)
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--storage-path", default="runs/bench")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    from training.driver import init_ray, quiet_ray_data

    prepared = Path(args.prepared_dir).resolve()
    items_path = prepared / ITEMS_FILE
    job = build_config("movielens", [f"data.prepared_dir={prepared}", f"data.decode_actors={args.decode_actors}",
                                     f"data.decode_cpus={args.decode_cpus}"])
    DataConfig.decode_cache_items = 0  # a fixed value, not a setting: off for this measurement, so every row decodes
    examples = sample_examples(load_manifest(prepared)["num_items"], args.rows)
    result: dict = {"benchmark": "pipeline", "command": "python -m bench.pipeline " + " ".join(sys.argv[1:]),
                    "machine": {"platform": platform.platform(), "python": platform.python_version(),
                                "cpus": os.cpu_count()},
                    "image_size": job.image.image_size, "text_length": job.text.max_length}
    init_ray()
    quiet_ray_data()
    with tempfile.TemporaryDirectory() as tmp:
        examples_path = write_examples(examples, Path(tmp) / "examples.parquet")
        loop = single_process(examples, items_path, job)
        print(f"[bench] single process: {loop['rows_per_s']:.1f} rows/s", flush=True)
        pipe = ray_data(examples_path, items_path, job, shuffle=not args.no_shuffle)
        print(f"[bench] Ray Data: {pipe['rows_per_s']:.1f} rows/s", flush=True)
    result["decode"] = {"single_process": loop, "ray_data": pipe, "ratio": pipe["rows_per_s"] / loop["rows_per_s"],
                        "ratio_steady": pipe["rows_per_s_after_first_batch"] / loop["rows_per_s_after_setup"]}
    result["machine"]["load_average_after_decode"] = list(os.getloadavg())
    if not args.skip_training:
        result["training"] = training_wait(args)
        result["machine"]["load_average_at_end"] = list(os.getloadavg())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(format_table(result))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

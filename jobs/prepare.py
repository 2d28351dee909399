"""Turn a raw dataset directory (interactions.csv, items.csv, images/) into canonical parquet + a data report.

    python -m jobs.prepare --set data.raw_dir=../shared/data/ml100k_mm --set data.prepared_dir=prepared/ml100k_mm
Nothing is dropped without being counted: the report lists missing/corrupt/oversized images, image paths outside
the raw dir (refused, never opened), empty text, malformed CSV rows (with their line numbers), unknown items,
duplicates, and unreadable or implausible timestamps; it is printed and saved as data_report.json next to the
tables. Timestamps may be s/ms/us/ns numbers or ISO strings (--set data.source.timestamp_unit=auto by default).
Any input the job cannot use ends it with exit code 2 and a one-line `error:` message, never a traceback.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from jobs.cli import add_config_arguments, config_from_args, run_main


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    args = parser.parse_args()
    job = config_from_args(args)
    from pipeline.sources import prepare_dataset

    raw, out = Path(job.data.raw_dir).resolve(), Path(job.data.prepared_dir).resolve()
    print(f"[prepare] reading {raw}")
    started = time.perf_counter()
    report = prepare_dataset(job.data, raw, out)
    print("\n".join(report.summary_lines()))
    print(f"[prepare] wrote {out} in {time.perf_counter() - started:.1f}s")
    return 0


if __name__ == "__main__":
    run_main(main)

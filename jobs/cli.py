"""Shared command-line plumbing for the jobs: preset + `--set` overrides, and a clean failure message."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Callable

from training.job_config import PRESETS, JobConfig, build_config
from training.overrides import ConfigError, format_config


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS),
                        help="starting configuration: tiny (CI, ~1 min on 2 CPUs), movielens (pretrained encoders, "
                             "~25 min on 2 CPUs), movielens_mrl (movielens with Matryoshka vectors at sizes "
                             "32/128/512 from one model), gpu (everything trained, one GPU)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value, type-checked (repeatable), e.g. --set train.epochs=3 "
                             "--set data.raw_dir=/data/ml100k_mm; unknown keys are refused with the valid ones")
    parser.add_argument("--print-config", nargs="?", const="text", choices=("text", "json"), default=None,
                        help="print the resolved config and exit: one 'key = value  # meaning' line per key "
                             "(text, the default) or the nested config as JSON (--print-config json)")


def config_from_args(args: argparse.Namespace) -> JobConfig:
    """The preset with the `--set` overrides applied; with `--print-config` print it and exit 0 instead."""
    job = build_config(args.preset, args.overrides)
    if args.print_config:
        print(json.dumps(job.to_dict(), indent=2) if args.print_config == "json" else format_config(job))
        sys.exit(0)
    return job


def run_main(main: Callable[[], int]) -> None:
    """Exit non-zero with one clear line for expected failures (bad config, bad data, an unusable checkpoint);
    tracebacks otherwise."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from pipeline.sources import DataError
    from training.checkpoint import CheckpointError

    try:
        sys.exit(main())
    except (ConfigError, DataError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)

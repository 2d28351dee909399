"""Shared command-line plumbing for the jobs: preset + `--set` overrides, `--model`/`--checkpoint` for the jobs that
read a trained model, and a clean failure message. The job modules import this; nothing imports a job."""
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
                        help="starting configuration: tiny (CI, ~1 min on 2 CPUs), movielens (pretrained encoders "
                             "frozen and cached, a side network trained beside each, to early stopping: ~10 min on 2 "
                             "CPUs), movielens_e2e (their "
                             "top layers trained end to end with the memory bank, 3 x 200 steps), "
                             "movielens_mrl (movielens with a 1-layer LRU and Matryoshka vectors at sizes 32/64/128 "
                             "from one model), gpu (everything trained, one GPU)")
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


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", metavar="models:/NAME@ALIAS", help="a registered model version, by alias "
                        "(models:/mmrec@champion) or number (models:/mmrec/3)")
    source.add_argument("--checkpoint", metavar="DIR", help="a training checkpoint directory (holds model.pt)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a value of the checkpoint's config (repeatable), e.g. "
                             "--set data.prepared_dir=/data/prepared --set tracking.tracking_uri=sqlite:////abs/mlflow.db")


def resolve_model_arguments(args: argparse.Namespace):
    """--model/--checkpoint -> (checkpoint dir, registry version or None); None after printing the error."""
    from training.job_config import JobConfig
    from training.overrides import apply_overrides
    from training.registry import RegistryError, resolve_checkpoint
    from training.tracking import resolve_tracking_uri

    try:
        tracking_uri = resolve_tracking_uri(apply_overrides(JobConfig(), args.overrides).tracking)
        return resolve_checkpoint(args.model, args.checkpoint, tracking_uri)
    except RegistryError as err:
        print(f"error: {err}", file=sys.stderr)
        return None


def run_main(main: Callable[[], int]) -> None:
    """Exit non-zero with one clear line for expected failures (bad config, bad data, an unusable checkpoint, a
    directory the product refuses to replace); tracebacks otherwise."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from pipeline.owned_dirs import UnsafePathError
    from pipeline.sources import DataError
    from training.checkpoint import CheckpointError

    try:
        sys.exit(main())
    except (ConfigError, DataError, CheckpointError, UnsafePathError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)

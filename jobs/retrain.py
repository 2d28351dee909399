"""Incremental retrain of the registered champion on the interactions that arrived since, behind a promotion gate.

    python -m jobs.retrain --preset tiny --prepare --set retrain.steps=50
    ray job submit --working-dir . -- python -m jobs.retrain --preset movielens --prepare \
        --set data.raw_dir=/data/raw --set data.prepared_dir=/data/prepared --set train.storage_path=/data/runs
--prepare first re-prepares the raw data (new days, new items; item indices stay stable), else the prepared
data is used as it is.
Warm-starts a challenger from `models:/<tracking.registered_model>@champion` on the days newer than its watermark
(plus a replay sample of older data), scores champion and challenger on the newest held-out window with
`retrain.metric`, registers the challenger, and moves `@champion` only if it is no worse by `retrain.margin`.
Exit status: 0 after a retrain (promoted or not) and when there is nothing new to train on (idempotent);
3 when another retrain of the same model is running; 2 on bad config, data or registry state.
"""
from __future__ import annotations

import argparse
import sys

from jobs.cli import add_config_arguments, config_from_args, run_main

EXIT_LOCKED = 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.retrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--prepare", action="store_true",
                        help="re-prepare data.raw_dir into data.prepared_dir first (what a scheduled run wants)")
    return parser


def main() -> int:
    args = build_parser().parse_args()
    job = config_from_args(args)
    from training.registry import RegistryError
    from training.retrain.lock import RetrainLockedError
    from training.retrain.run import run_retrain
    from serving.pyfunc import log_recommender_model

    try:
        # the challenger is registered as an MLflow pyfunc model as well (models:/NAME@challenger loads)
        outcome = run_retrain(job, prepare=args.prepare, serving_model=log_recommender_model)
    except RetrainLockedError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_LOCKED
    except RegistryError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"[retrain] {outcome.status}: {outcome.message}")
    if outcome.decision is not None:
        print(f"[retrain] held-out window: {outcome.holdout_examples} examples; trained on {outcome.train_examples}")
        print(f"{'metric':<12} {'champion':>10} {'challenger':>11}")
        for key in outcome.champion_metrics:
            print(f"{key:<12} {outcome.champion_metrics[key]:>10.4f} {outcome.challenger_metrics[key]:>11.4f}")
    return 0


if __name__ == "__main__":
    run_main(main)

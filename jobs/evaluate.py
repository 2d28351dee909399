"""Evaluate a registered model or a checkpoint on a split of the prepared data, and log it as an MLflow run.

    python -m jobs.evaluate --model models:/mmrec@champion --split test
    python -m jobs.evaluate --checkpoint runs/tiny-20260101-120000/checkpoint_... --split validation
    ray job submit --working-dir . -- python -m jobs.evaluate --model models:/mmrec@champion
The config is the one the checkpoint was trained with (same examples, same protocol); `--set` changes it,
e.g. `--set data.prepared_dir=/data/prepared` when the data lives elsewhere. Items added to the catalogue
since training are ranked too (by content). `--set model.new_item_offset=X` scores the items in no training example
with X added (what serving would then return; pick it on `--split validation`). `--fit-new-item-recall R` picks
it for you: the smallest offset at which the split's examples whose target is such an item reach Recall@10 R
(fit it on validation, read it on test; a time split's validation window holds such examples, leave-one-out
hardly any), then scores the split with it and prints `--set model.new_item_offset=X` to train, evaluate or
serve with. Runs in this process: no Ray cluster is needed.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from jobs.cli import add_model_arguments, resolve_model_arguments, run_main

SPLITS = ("test", "validation")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--split", default="test", choices=SPLITS, help="which examples to score (default: test)")
    parser.add_argument("--fit-new-item-recall", type=float, metavar="R",
                        help="set model.new_item_offset to the smallest offset at which the examples whose target is "
                             "an item in no training example reach Recall@10 R (in (0, 1]) on this split, and score "
                             "the split with it")
    args = parser.parse_args()
    if args.fit_new_item_recall is not None and not 0 < args.fit_new_item_recall <= 1:
        parser.error(f"--fit-new-item-recall {args.fit_new_item_recall:g} must be in (0, 1]")

    from pipeline.sources import ITEMS_FILE, load_manifest
    from pipeline.splits import build_splits
    from training.offline_eval import (DecodedCatalogue, checkpoint_job_config, evaluate_checkpoint,
                                       fit_new_item_offset, load_checkpoint)
    from training.overrides import ConfigError
    from training.tracking import Tracker

    resolved = resolve_model_arguments(args)
    if resolved is None:
        return 2
    checkpoint, version = resolved
    label = f"{args.model} (version {version.version})" if version else str(checkpoint)
    print(f"[evaluate] {label}: checkpoint {checkpoint}")
    job = checkpoint_job_config(checkpoint, args.overrides)
    prepared = Path(job.data.prepared_dir).resolve()
    manifest = load_manifest(prepared)
    examples = getattr(build_splits(job.data, prepared), args.split)
    print(f"[evaluate] {len(examples)} {args.split} examples from {prepared}; ranking {manifest['num_items']} items")

    started = time.perf_counter()
    loaded = load_checkpoint(checkpoint, manifest["num_items"])
    if loaded.new_items:
        print(f"[evaluate] {loaded.new_items} items are newer than the checkpoint: ranked by content only")
    catalogue = DecodedCatalogue(prepared / ITEMS_FILE, manifest["num_items"], batch_size=job.train.eval_batch_size,
                                 max_image_pixels=job.data.max_image_pixels)
    content = catalogue.encode(loaded)
    offset = job.model.new_item_offset
    if args.fit_new_item_recall is not None:
        try:
            offset, fitted_on = fit_new_item_offset(loaded, content, examples, args.fit_new_item_recall,
                                                    mask_history=job.train.eval_mask_history,
                                                    batch_size=job.train.eval_batch_size)
        except ValueError as err:
            raise ConfigError(f"--fit-new-item-recall: {err}") from None
        print(f"[evaluate] fitted on the {fitted_on} {args.split} examples whose target is an item in no training "
              f"example: --set model.new_item_offset={offset:g} gives them Recall@10 {args.fit_new_item_recall:g}")
    if offset:
        print(f"[evaluate] model.new_item_offset {offset:+g} on the scores of the {int(loaded.unseen.sum())} items "
              f"in no training example")
    metrics = evaluate_checkpoint(loaded, catalogue, examples, ks=job.train.eval_ks,
                                  mask_history=job.train.eval_mask_history, batch_size=job.train.eval_batch_size,
                                  sizes=job.model.matryoshka_sizes, new_item_offset=offset, by_target=True,
                                  content=content)
    seconds = time.perf_counter() - started

    name = f"evaluate-{version.name}-v{version.version}" if version else "evaluate-checkpoint"
    tags = {"job": "evaluate", "split": args.split, "checkpoint_path": str(checkpoint)}
    if version:
        tags.update(model_uri=args.model, model_name=version.name, model_version=version.version)
    tracker = Tracker.start(job.tracking, f"{name}-{args.split}-{time.strftime('%Y%m%d-%H%M%S')}", tags=tags)
    tracker.log_params({"model": args.model or "", "checkpoint": str(checkpoint), "split": args.split,
                        "num_examples": len(examples), "num_items": manifest["num_items"],
                        "new_item_offset": offset, "fit_new_item_recall": args.fit_new_item_recall or ""})
    tracker.log_metrics({f"{args.split}_{k}": v for k, v in metrics.items()} | {"eval_seconds": seconds})
    tracker.finish("FINISHED")

    print(f"\n{args.split} metrics (full ranking over {manifest['num_items']} items, {len(examples)} examples, "
          f"{seconds:.1f}s):")
    for key, value in metrics.items():
        if "@s" not in key and not key.startswith(("new_target", "seen_target")):
            print(f"  {key:<12} {value:.4f}")
    new_count = int(metrics["new_target_examples"])
    if new_count:  # what new_item_offset trades: the examples whose target is a new item against the others
        print(f"\n  by target ({new_count} of {len(examples)} are items in no training example):")
        for key in [k for k in metrics if k.startswith("seen_target_")]:
            metric = key[len("seen_target_"):]
            print(f"  {metric:<12} new {metrics['new_target_' + metric]:.4f}   seen {metrics[key]:.4f}")
    print(f"\nMLflow run: {tracker.run_id} ({tracker.tracking_uri})")
    return 0


if __name__ == "__main__":
    run_main(main)

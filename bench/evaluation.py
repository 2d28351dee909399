"""The test set's scoring at the end of an epoch: one pass of the sequence model per protocol and part, or one.

    python -m bench.evaluation                 # ~2 min on 2 cores

At every epoch with a new best validation score the training loop scores the test set under both protocols
(history masked and not) and, in cold-start runs (`data.cold_item_fraction`), its warm-target and cold-target
parts too. Until session 36 each of those was an `evaluate_ranking` call of its own: the sequence model ran over
every test user twice for the whole set and twice again for its two parts (four passes' worth). Now
`training.evaluate.evaluate_protocols` runs it once a batch and reads every protocol and part from that pass.
This bench times both ways on the same model, content table and test set, in this process, and checks that they
give the same metrics (the largest absolute difference over every key).

The model is the `movielens` preset's (SASRec, dim 128, history 50) with its initial weights and a seeded random
content table (neither changes the work done); the splits are the bench protocol's: 10% of items held out
(`data.cold_item_fraction=0.1`), the time split at 1998-03-01 (21,808 test users, `bench.quality`'s
`--set data.time_split_at=1998-03-01`) and leave-one-out (943). The median of `--repeats` timings.
Prints a table and writes bench/results/evaluation.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from bench.memory_bank import bench_prepared
from model.build import build_recommender
from pipeline.sequences import ColdStartSplits
from pipeline.sources import load_manifest
from pipeline.splits import build_splits
from training.evaluate import evaluate_protocols, evaluate_ranking
from training.job_config import build_config

REPO = Path(__file__).resolve().parents[1]
SPLITS = {"time split at 1998-03-01": ["data.time_split_at=1998-03-01"], "leave-one-out": []}


def per_part(model, content, test, cold, *, ks, headline, sizes, batch_size) -> dict[str, float]:
    """The loop before session 36: `evaluate_ranking` per protocol, for the test set and for each part."""
    metrics = {}
    for name, examples, part_sizes in (("test", test, sizes), ("test_warm", test.subset(~cold), ()),
                                       ("test_cold", test.subset(cold), ())):
        if len(examples) == 0:
            continue
        scored = evaluate_ranking(model, content, examples, ks=ks, mask_history=headline, batch_size=batch_size,
                                  sizes=part_sizes)
        other = evaluate_ranking(model, content, examples, ks=ks, mask_history=not headline, batch_size=batch_size)
        scored.update({f"{'unmasked' if headline else 'masked'}_{k}": v for k, v in other.items()})
        metrics.update({f"{name}_{k}": v for k, v in scored.items()})
    return metrics


def one_pass(model, content, test, cold, *, ks, headline, sizes, batch_size) -> dict[str, float]:
    """The loop now: `evaluate_protocols` with the parts as row subsets."""
    scored = evaluate_protocols(model, content, test, ks=ks, headline_mask=headline, batch_size=batch_size,
                                sizes=sizes, subsets={"warm": ~cold, "cold": cold})
    return {f"test_{name + '_' if name else ''}{k}": v for name, part in scored.items() for k, v in part.items()}


def timed(function, repeats: int) -> tuple[float, dict]:
    seconds, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = function()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared/data/ml100k_mm"),
                        help="raw ml100k_mm, prepared once under /tmp/mmrec-bench/prepared (as the other benches)")
    parser.add_argument("--prepared-dir", type=Path, default=None, help="an already prepared ml100k_mm instead")
    parser.add_argument("--preset", default="movielens")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--out", default=str(REPO / "bench/results/evaluation.json"))
    args = parser.parse_args()
    prepared = args.prepared_dir or bench_prepared(args.data)
    num_items = load_manifest(prepared)["num_items"]
    torch.manual_seed(0)
    rows = []
    for split, split_overrides in SPLITS.items():
        job = build_config(args.preset, [f"data.prepared_dir={prepared}", "data.cold_item_fraction=0.1",
                                         *split_overrides, *args.overrides])
        splits = build_splits(job.data, prepared)
        assert isinstance(splits, ColdStartSplits)
        test = splits.test
        cold = np.isin(test.target, splits.cold_items)
        model = build_recommender(job.model, job.image, job.text, num_items=num_items,
                                  max_history=job.data.max_history).eval()
        content = torch.nn.functional.normalize(
            torch.randn(num_items + 1, job.model.dim, generator=torch.Generator().manual_seed(0)), dim=-1)
        content[0] = 0
        kwargs = dict(ks=job.train.eval_ks, headline=job.train.eval_mask_history, sizes=job.model.matryoshka_sizes,
                      batch_size=job.train.eval_batch_size)
        before_s, before = timed(lambda: per_part(model, content, test, cold, **kwargs), args.repeats)
        after_s, after = timed(lambda: one_pass(model, content, test, cold, **kwargs), args.repeats)
        if set(before) != set(after):
            raise SystemExit(f"error: the two ways report different keys: {sorted(set(before) ^ set(after))}")
        rows.append({"split": split, "test_users": len(test), "cold_target_users": int(cold.sum()),
                     "metrics": len(after), "per_part_seconds": before_s, "one_pass_seconds": after_s,
                     "speedup": before_s / after_s,
                     "max_abs_difference": max(abs(before[k] - after[k]) for k in after)})
        print(f"{split}: per part {before_s:.2f}s, one pass {after_s:.2f}s", flush=True)
    print(f"\n| split | test users (cold target) | per protocol and part, s | one pass, s | speedup | "
          f"largest metric difference over {rows[0]['metrics']} keys |\n|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['split']} | {row['test_users']:,} ({row['cold_target_users']:,}) | "
              f"{row['per_part_seconds']:.2f} | {row['one_pass_seconds']:.2f} | {row['speedup']:.2f}x | "
              f"{row['max_abs_difference']:.1e} |")
    result = {"benchmark": "evaluation", "rows": rows, "settings": {**vars(args), "prepared_dir": str(prepared)},
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "torch_threads": torch.get_num_threads()}}
    Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

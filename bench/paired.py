"""Benchmark: can our test set tell two trained models apart? Paired bootstrap over the same test users.

    python -m bench.paired runs/bench/quality-id_only-s1-... runs/bench/quality-two_stage_frozen-s1-...
    python -m bench.paired RUN_A RUN_B RUN_C --subset test --out /tmp/paired.json
    python -m bench.paired RUN_A RUN_B --by-popularity 4     # also NDCG@10 in 4 groups, rare targets to popular
    python -m bench.paired RUN_A RUN_B --among-seen           # ranked against the items some training example holds
    python -m bench.paired RUN_A RUN_B --unseen-ids zero      # items in no training example scored by content alone

Each argument is a run directory of `jobs.train` / `bench.quality` (it holds `mmrec_run.json`, the checkpoints
and the run's `data/<subset>.parquet`). For each run the checkpoint the run kept as best (highest
`val_selection`, as the driver registers it) ranks every user of the subset against the whole catalogue, in this
process, and gives one metric value per test example (leave-one-out: one per user; a time split: every later
interaction). The runs must share the subset's users and targets (the same split): otherwise one `error:` line.

Printed and written (bench/results/paired.json): each run's mean with its standard error (the spread a second
draw of users would give: the test set's own noise, separate from the seeds'), and for every run after the first
its difference from the first, with a 95% paired-bootstrap interval (whole users resampled with replacement, the
same users for both models, so a user's several examples count as one correlated draw) and the share of
resamples in which it is positive. A gap whose interval holds 0 is one this test set cannot resolve, however
many seeds agree on its sign. `--by-popularity K` adds the same for NDCG@10 within K groups of the examples,
split by how often the target was a training target (the first run's `data/popularity.npy`): where content helps
an item's ranking more than its id vector, the gap should grow as the count falls.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results" / "paired.json"
METRICS = ("ndcg@10", "recall@10", "mrr")


def per_user(ranks: np.ndarray, metric: str) -> np.ndarray:
    """[U] 0-based ranks -> [U] per-user values of `metric` (their mean is `training.metrics.ranking_metrics`)."""
    ranks = np.asarray(ranks, dtype=np.float64)
    if metric == "mrr":
        return 1.0 / (ranks + 1.0)
    name, _, k = metric.partition("@")
    if name not in ("ndcg", "recall") or not k.isdigit():
        raise ValueError(f"metric must be one of ndcg@k, recall@k, mrr; got {metric!r}")
    hit = ranks < int(k)
    return np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0) if name == "ndcg" else hit.astype(np.float64)


def paired_bootstrap(a: np.ndarray, b: np.ndarray, resamples: int = 10_000, seed: int = 0,
                     users: np.ndarray | None = None) -> dict[str, float]:
    """Per-example values of two models on the same examples -> mean(b - a), its 95% bootstrap interval and the
    share of resamples where it is > 0. With `users` (one id per example) whole users are resampled, so that
    a user's several test examples (a time split) count as one correlated draw, not as independent ones."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or not len(a):
        raise ValueError(f"need two equal-length 1-d arrays of per-example values, got {a.shape} and {b.shape}")
    diff = b - a
    if users is None:
        sums, counts = diff, np.ones_like(diff)
    else:
        _, group = np.unique(np.asarray(users), return_inverse=True)
        sums, counts = np.bincount(group, weights=diff), np.bincount(group).astype(np.float64)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, 1000):  # 1000 resamples at a time: [1000, users] indices, not [resamples, users]
        count = min(1000, resamples - start)
        drawn = rng.integers(0, len(sums), size=(count, len(sums)))
        means[start:start + count] = sums[drawn].sum(axis=1) / counts[drawn].sum(axis=1)
    low, high = np.quantile(means, [0.025, 0.975])
    return {"difference": float(diff.mean()), "low": float(low), "high": float(high),
            "share_positive": float((means > 0).mean())}


def standard_error(values: np.ndarray, users: np.ndarray | None = None) -> float:
    """The standard error of the mean of per-example `values`; with `users`, clustered by user (the spread of the
    mean of per-user sums over per-user counts, to first order)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return float("nan")
    if users is None:
        return float(values.std(ddof=1) / np.sqrt(len(values)))
    _, group = np.unique(np.asarray(users), return_inverse=True)
    residual = np.bincount(group, weights=values - values.mean())  # per-user sums of deviations
    clusters = len(residual)
    return float(np.sqrt(clusters / max(clusters - 1, 1) * (residual ** 2).sum()) / len(values))


def popularity_buckets(counts: np.ndarray, buckets: int) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """[N] training-interaction counts of the examples' targets -> ([N] bucket index, [(lowest, highest) count per
    bucket]): `buckets` groups of about equal size from the rarest targets up. Equal counts never straddle two
    buckets, so with heavy ties a bucket can be larger than N / buckets (and the list shorter than `buckets`)."""
    counts = np.asarray(counts, dtype=np.float64)
    if buckets < 1 or counts.ndim != 1 or not len(counts):
        raise ValueError(f"need buckets >= 1 and a non-empty 1-d array of counts, got {buckets} and {counts.shape}")
    edges = np.unique(np.quantile(counts, np.linspace(0, 1, buckets + 1)[1:-1]))  # inner edges, ties merged
    index = np.searchsorted(edges, counts, side="right")  # bucket b holds edges[b-1] <= count < edges[b]
    used = np.unique(index)
    index = np.searchsorted(used, index)  # renumber the non-empty buckets 0..
    ranges = [(float(counts[index == b].min()), float(counts[index == b].max())) for b in range(len(used))]
    return index, ranges


def compare_runs(runs: list[dict], chosen: np.ndarray, metric: str, users: np.ndarray,
                 resamples: int) -> list[dict]:
    """`metric` over the `chosen` examples ([N] bool) of every run (its "ranks"): a row per run with its mean and
    standard error, and for every run after the first its paired gap from the first (`paired_bootstrap`)."""
    rows, base = [], None
    for run in runs:
        values = per_user(run["ranks"][chosen], metric)
        row = {"run": run["run"], "mean": float(values.mean()), "standard_error": standard_error(values, users[chosen])}
        if base is None:
            base = values
        else:
            row.update(paired_bootstrap(base, values, resamples, users=users[chosen]))
        rows.append(row)
    return rows


def run_ranks(run_dir: Path, subset: str, mask_history: bool, among_seen: bool = False,
              unseen_ids: str = "as-trained") -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
    """A run directory -> (its kept checkpoint's path, the subset's users and targets, their 0-based ranks).
    among_seen: ranked against the items of some training example only (the run's `data/popularity.npy` > 0).
    unseen_ids="zero": the unseen items' id vectors zeroed first (`Recommender.zero_unseen_ids`, what training
    does since session 27: for runs made before it, whose unseen rows hold a ridge prediction from content)."""
    from bench.kept_run import open_kept_run
    from training.evaluate import example_ranks

    run = open_kept_run(run_dir, needs=f"data/{subset}.parquet")
    content = run.content()
    examples = run.examples(subset)
    if unseen_ids == "zero":
        seen = np.load(run.data_file("seen.npy", "--unseen-ids zero needs the run's seen items"))
        if run.model.item_encoder.id_embedding is None:
            raise SystemExit(f"error: --unseen-ids zero needs a model with item ids; {run_dir} has none")
        run.model.zero_unseen_ids(torch.as_tensor(seen))
    unseen = None
    if among_seen:
        unseen = torch.as_tensor(run.training_counts(len(content), "--among-seen needs the run's training counts") == 0)
    ranks = example_ranks(run.model, content, examples, mask_history=mask_history, exclude_items=unseen)
    return run.checkpoint, np.asarray(examples.user), np.asarray(examples.target), ranks


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.paired", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories; every one after the first is "
                                                           "compared with the first")
    parser.add_argument("--subset", default="test_warm", help="test, test_warm or test_cold (default test_warm)")
    parser.add_argument("--mask-history", action="store_true", help="the masked protocol (default: unmasked)")
    parser.add_argument("--among-seen", action="store_true",
                        help="rank against the items of some training example only (the run's data/popularity.npy "
                             "> 0): a warm comparison that the level of the unseen items, which no loss trains, "
                             "does not move (default: the whole catalogue, the protocol)")
    parser.add_argument("--unseen-ids", choices=("as-trained", "zero"), default="as-trained",
                        help="zero: score the items in no training example by their content alone (their id "
                             "vectors zeroed), as training now does; as-trained: the id vectors the run kept "
                             "(in runs before session 27: a ridge prediction from content) (default)")
    parser.add_argument("--resamples", type=int, default=10_000)
    parser.add_argument("--by-popularity", type=int, default=0, metavar="K",
                        help="also NDCG@10 in K groups of examples by their target's training interactions "
                             "(the first run's data/popularity.npy), rarest first (default 0: off)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if len(args.runs) < 2:
        parser.error("give at least two run directories")
    if args.among_seen and args.subset != "test_warm":
        parser.error("--among-seen compares warm targets: it needs --subset test_warm (the unseen items it leaves "
                     "out are what cold targets compete with)")
    started = time.perf_counter()
    torch.set_grad_enabled(False)
    runs, first_targets, users = [], None, None
    for run_dir in args.runs:
        checkpoint, run_users, targets, ranks = run_ranks(run_dir, args.subset, args.mask_history, args.among_seen,
                                                       args.unseen_ids)
        same = first_targets is None or (np.array_equal(targets, first_targets) and np.array_equal(run_users, users))
        if not same:
            raise SystemExit(f"error: {run_dir} has other {args.subset} users or targets than {args.runs[0]}: "
                             "runs of different splits cannot be paired")
        first_targets, users = targets, run_users
        runs.append({"run": run_dir.name, "checkpoint": Path(checkpoint).name, "ranks": ranks})
        print(f"[paired] {run_dir.name}: {len(ranks)} examples ranked", flush=True)
    everything = np.ones(len(users), dtype=bool)
    table = [{"metric": metric, **row} for metric in METRICS
             for row in compare_runs(runs, everything, metric, users, args.resamples)]
    print(f"\n{args.subset}{' (ranked among the seen items only)' if args.among_seen else ''}"
          f"{' (unseen items by content alone: id vectors zeroed)' if args.unseen_ids == 'zero' else ''}, "
          f"{len(first_targets)} examples of {len(np.unique(users))} users, differences from "
          f"{runs[0]['run']} "
          f"(95% paired bootstrap, {args.resamples} resamples)\n")
    print("| metric | run | mean ± s.e. | difference [95% interval] | share > 0 |\n|---|---|---|---|---:|")
    for row in table:
        gap = (f"{row['difference']:+.4f} [{row['low']:+.4f}, {row['high']:+.4f}] | {row['share_positive']:.2f}"
               if "difference" in row else "– | –")
        print(f"| {row['metric']} | {row['run']} | {row['mean']:.4f} ± {row['standard_error']:.4f} | {gap} |")
    by_popularity = popularity_table(runs, args.runs[0], first_targets, users, args) if args.by_popularity else []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "paired", "command": " ".join(["python -m bench.paired", *sys.argv[1:]]),
        "machine": {"python": platform.python_version(), "torch": torch.__version__},
        "subset": args.subset, "mask_history": args.mask_history, "among_seen": args.among_seen,
        "unseen_ids": args.unseen_ids,
        "examples": len(first_targets),
        "users": int(len(np.unique(users))),
        "runs": [{k: v for k, v in run.items() if k != "ranks"} for run in runs], "table": table,
        "by_popularity": by_popularity, "seconds": round(time.perf_counter() - started, 1)}, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


def popularity_table(runs: list[dict], first_run: Path, targets: np.ndarray, users: np.ndarray,
                     args: argparse.Namespace) -> list[dict]:
    """NDCG@10 per popularity group of the targets: each run's mean ± s.e., and its paired gap from the first run."""
    popularity_file = first_run / "data" / "popularity.npy"
    if not popularity_file.is_file():
        raise SystemExit(f"error: {popularity_file} is missing: --by-popularity needs the run's training counts")
    counts = np.load(popularity_file)[targets]
    index, ranges = popularity_buckets(counts, args.by_popularity)
    rows = [{"bucket": bucket, "target_train_count": [low, high], "examples": int((index == bucket).sum()), **row}
            for bucket, (low, high) in enumerate(ranges)
            for row in compare_runs(runs, index == bucket, "ndcg@10", users, args.resamples)]
    print(f"\nNDCG@10 by the target's training interactions, differences from {runs[0]['run']}\n")
    print("| target's training count | examples | run | mean ± s.e. | difference [95% interval] |\n"
          "|---|---:|---|---|---|")
    for row in rows:
        low, high = row["target_train_count"]
        gap = f"{row['difference']:+.4f} [{row['low']:+.4f}, {row['high']:+.4f}]" if "difference" in row else "–"
        print(f"| {low:.0f}–{high:.0f} | {row['examples']} | {row['run']} | {row['mean']:.4f} ± "
              f"{row['standard_error']:.4f} | {gap} |")
    return rows


if __name__ == "__main__":
    sys.exit(main())

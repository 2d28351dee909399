"""Batch recommendations: the top-k items of every user (or of --users) to parquet, as Ray Data batch inference.

    python -m jobs.recommend --model models:/mmrec@champion --out recs/champion
    python -m jobs.recommend --checkpoint runs/x/checkpoint_... --out recs/x --users 1,7,42 --k 20 --size 128
    ray job submit --working-dir . -- python -m jobs.recommend --model models:/mmrec@champion --out /shared/recs
A user's history is every interaction of theirs in the prepared data (data.prepared_dir of the checkpoint's config,
or --set data.prepared_dir=...), in time order; the model reads its newest data.max_history items and items of the
history are not recommended (--include-history to allow them). The recommender is built once in this process
(one catalogue pass) and shipped to each actor of a `map_batches` actor pool (--actors) by Ray, so the actors need
no access to the checkpoint or the images.
Writes into --out:
    recommendations.parquet   user_id, rank (1 = best), item_id, score (cosine) for each user, k rows each
    recommend.json            what was written, with which model, options and counts
--out is built in a staging folder beside it and swapped in whole; an existing --out is replaced only when it is a
previous output of this job (its recommend.json), anything else is refused.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jobs.cli import add_model_arguments, resolve_model_arguments, run_main

OUTPUT_FILE = "recommendations.parquet"
MANIFEST = "recommend.json"
WHAT = "an output of jobs.recommend (recommend.json and recommendations.parquet only)"
OUTPUT_SCHEMA = pa.schema([("user_id", pa.string()), ("rank", pa.int32()), ("item_id", pa.string()),
                           ("score", pa.float32())])


def is_recommend_dir(path: Path) -> bool:
    from pipeline.owned_dirs import names_matching, only_expected_entries

    return (path / MANIFEST).is_file() and only_expected_entries(path, names_matching([], [MANIFEST, OUTPUT_FILE]))


class RecommendBatch:
    """`map_batches` callable: a batch of (user_id, history) -> rows (user_id, rank, item_id, score).
    Each actor gets its copy of the recommender once, when it starts."""

    def __init__(self, recommender, k: int, size: int | None, mode: str, exclude_history: bool) -> None:
        import torch

        torch.set_num_threads(1)
        self.recommender = recommender
        self.options = {"k": k, "size": size, "mode": mode, "exclude_history": exclude_history}

    def __call__(self, batch: pa.Table) -> pa.Table:
        histories = batch.column("history").to_pylist()
        results = self.recommender.recommend_batch(histories, **self.options)
        counts = [len(r.item_ids) for r in results]
        return pa.table({
            "user_id": pa.array(np.repeat(np.asarray(batch.column("user_id").to_pylist(), dtype=object), counts),
                                pa.string()),
            "rank": pa.array(np.concatenate([np.arange(1, n + 1) for n in counts] or [np.zeros(0)]), pa.int32()),
            "item_id": pa.array([i for r in results for i in r.item_ids], pa.string()),
            "score": pa.array([s for r in results for s in r.scores], pa.float32()),
        }, schema=OUTPUT_SCHEMA)


def user_histories(prepared_dir: Path, users: list[str] | None) -> tuple[pa.Table, list[str]]:
    """-> (table user_id, history (raw item ids, oldest first) of the selected users in user order, unknown users)."""
    from pipeline.sequences import order_interactions
    from pipeline.sources import read_interactions

    ordered = order_interactions(read_interactions(prepared_dir))
    ordered = ordered.assign(user_id=ordered.user_id.astype(str), item_id=ordered.item_id.astype(str))
    grouped = ordered.groupby("user_index", sort=True)
    frame = grouped.agg(user_id=("user_id", "first"), history=("item_id", list)).reset_index(drop=True)
    unknown: list[str] = []
    if users is not None:
        known = set(frame.user_id)
        unknown = [u for u in users if u not in known]
        frame = frame.set_index("user_id").loc[[u for u in dict.fromkeys(users) if u in known]].reset_index()
    return pa.table({"user_id": pa.array(frame.user_id.tolist(), pa.string()),
                     "history": pa.array(frame.history.tolist(), pa.list_(pa.string()))}), unknown


def parse_users(args: argparse.Namespace) -> list[str] | None:
    if args.users is None and args.users_file is None:
        return None
    users = [u.strip() for u in (args.users or "").split(",") if u.strip()]
    if args.users_file:
        users += [line.strip() for line in Path(args.users_file).read_text().splitlines() if line.strip()]
    return users


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.recommend", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output directory: new, empty, or a previous output of this job (replaced whole)")
    parser.add_argument("--users", metavar="ID,ID,...", help="only these raw user ids (default: every user)")
    parser.add_argument("--users-file", metavar="FILE", help="only the raw user ids in FILE, one a line")
    parser.add_argument("--k", type=int, default=10, help="items per user (default 10)")
    parser.add_argument("--size", type=int, default=None,
                        help="a Matryoshka vector size the model serves (default: the full size; with --mode "
                             "funnel: the prefix size it retrieves with)")
    parser.add_argument("--mode", choices=("exact", "hnsw", "funnel"), default="exact",
                        help="exact search (default), a faiss HNSW index, or the Matryoshka funnel")
    parser.add_argument("--include-history", action="store_true",
                        help="allow items of a user's history among their recommendations")
    parser.add_argument("--actors", type=int, default=1, help="recommender actors in the pool (default 1)")
    parser.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs each actor reserves (default 1)")
    parser.add_argument("--batch-size", type=int, default=256, help="users per batch (default 256)")
    return parser


def main() -> int:
    args = build_parser().parse_args()
    from pipeline.owned_dirs import check_no_overlap, require_replaceable, staged
    from serving.recommender import ItemRecommender, RecommendationError
    from training.offline_eval import checkpoint_job_config

    out = Path(args.out).resolve()
    require_replaceable(out, is_recommend_dir, WHAT)  # before any work (UnsafePathError: one line, exit 2)
    if args.k < 1 or args.actors < 1 or args.batch_size < 1 or args.cpus_per_actor <= 0:
        print("error: --k, --actors and --batch-size must be >= 1 and --cpus-per-actor > 0", file=sys.stderr)
        return 2
    resolved = resolve_model_arguments(args)
    if resolved is None:
        return 2
    checkpoint, version = resolved
    job = checkpoint_job_config(checkpoint, args.overrides)
    prepared = Path(job.data.prepared_dir).resolve()
    check_no_overlap(out, checkpoint, what="--out", other_what="the checkpoint")
    check_no_overlap(out, prepared, what="--out", other_what="the prepared data")
    try:
        users = parse_users(args)
    except OSError as err:
        print(f"error: --users-file: {err.strerror}: {args.users_file}", file=sys.stderr)
        return 2
    if users is not None and not users:
        print("error: --users / --users-file name no user", file=sys.stderr)
        return 2
    started = time.perf_counter()
    table, unknown = user_histories(prepared, users)
    if unknown:
        print(f"error: {len(unknown)} of the requested users have no interactions in {prepared}: "
              f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}", file=sys.stderr)
        return 2
    recommender = ItemRecommender.from_checkpoint(checkpoint, prepared_dir=prepared,
                                                  new_item_offset=job.model.new_item_offset)  # --set applies
    try:  # a bad --k / --size / --mode for this model: one line, before Ray starts
        recommender.recommend(table.column("history")[0].as_py(), args.k, size=args.size, mode=args.mode)
    except RecommendationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"[recommend] {args.model or checkpoint}: top-{args.k} ({args.mode}, size {args.size or recommender.dim}) "
          f"for {table.num_rows} users -> {out}")
    rows = _run(table, recommender, args, out, staged, version)
    print(f"[recommend] wrote {rows} rows to {out / OUTPUT_FILE} in {time.perf_counter() - started:.1f}s")
    return 0


def _run(table: pa.Table, recommender, args: argparse.Namespace, out: Path, staged, version) -> int:
    """The Ray Data pass: user blocks -> actor pool of recommenders -> one parquet file, written as batches arrive."""
    import ray

    from pipeline.stages import id_blocks
    from training.driver import init_ray, quiet_ray_data

    init_ray()
    quiet_ray_data()
    with staged(out, is_recommend_dir, WHAT) as staging:
        ds = id_blocks(table, args.actors, args.batch_size).map_batches(
            RecommendBatch,
            fn_constructor_kwargs={"recommender": recommender, "k": args.k, "size": args.size, "mode": args.mode,
                                   "exclude_history": not args.include_history},
            batch_size=args.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=args.actors),
            num_cpus=args.cpus_per_actor,
        )
        rows = 0
        with pq.ParquetWriter(staging / OUTPUT_FILE, OUTPUT_SCHEMA) as writer:
            for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                writer.write_table(batch.cast(OUTPUT_SCHEMA))
                rows += batch.num_rows
        (staging / MANIFEST).write_text(json.dumps({
            "model_uri": args.model or "", "registered_version": version.version if version else "",
            "checkpoint": recommender.source.get("checkpoint", ""), "users": table.num_rows, "rows": rows,
            "k": args.k, "size": args.size or recommender.dim, "mode": args.mode,
            "exclude_history": not args.include_history, "num_items": recommender.num_items,
            "columns": OUTPUT_SCHEMA.names,
        }, indent=2))
    return rows


if __name__ == "__main__":
    run_main(main)

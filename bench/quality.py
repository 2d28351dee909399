"""Benchmark: does end-to-end multimodal training beat ID-only and frozen two-stage, on warm and cold items?

    python -m bench.quality --seeds 0 --methods id_only,two_stage_frozen,end_to_end   # ~1.5 h on 2 cores
    python -m bench.quality --set train.encoder_lr=1e-3      # extra overrides for every trained method
    python -m bench.quality --steps 100 --epochs 1 --patience 0 --set train.targets=last --set memory.mode=bank \
        --batch-size 128                                     # sessions 3-4's short budget, one target per example

Every method starts from the `movielens` preset (since 2026-12-03: a loss at every history position,
`train.targets=all`, with history vectors recomputed, `memory.mode=recompute`) and trains to early stopping by
default: whole epochs, at most 100, patience 10 (on validation NDCG@10 averaged over 3 epochs), the weights
averaged over about an epoch (the preset's `train.average_epochs=1`, since 2026-12-04). Measured per seed
on 2 cores: ID-only 8-14 min, frozen two-stage 8-15 min, end-to-end ~55 min (BENCHMARKS.md); `--resume`
keeps the finished runs of an interrupted bench, continues the run it was training from that run's last
checkpoint (its wall time counts the interrupted part up to that checkpoint), or adds seeds / methods to a
finished bench (refused if its protocol differs).

Every method is a config of the product (`run_training`, the same Ray Data pipeline, memory bank, TorchTrainer
loop and MLflow logging), on all of ml100k_mm, leave-one-out (or by time with `--set data.time_split_at=DATE`:
every later interaction is a test example), full ranking over the catalogue, with a seeded 10% of items held
out of training entirely (`data.cold_item_fraction`). The same budget for every method: `--epochs` epochs of
`--steps` steps (0 = the whole training set) of `--batch-size` examples, stopped early after `--patience` epochs
without a better validation NDCG@10 (0 = never); the result is the best epoch's checkpoint.
Methods:

- popularity: training-target counts (the driver's baseline of every run; identical across seeds),
- id_only: SASRec over item-id embeddings, no content (`model.modalities=` `model.use_id_embedding=true`),
- two_stage_frozen: pretrained EfficientNet-Lite0 + MiniLM frozen (`unfreeze_top=0`): only the projection,
  id embeddings and sequence model learn,
- end_to_end: the same encoders with their top block trained by the recommendation loss (`unfreeze_top=1`),
  BatchNorm statistics kept (always, since 2026-12-03; before, `image.freeze_norm_stats=true`), on the sampled
  softmax over each step's distinct items (logQ-corrected),
- end_to_end_sampled: the same with LEMUR's encoder sampling (`memory.encode_fraction=0.2`; bank mode, one target
  per example: `--set memory.mode=bank --set train.targets=last`),
- end_to_end_exact: the same on the exact full softmax, as ID-only and frozen train: every item through the
  trained tops once a step (`memory.mode=catalogue`; history items through the fusion's dropout, candidates
  and positives without it, as two_stage_frozen's; before 2026-12-05 its candidates were dropped out too),
- two_stage_frozen_catalogue: end_to_end_exact's control, frozen encoders on the same loss,
- *_content_only: the same two without the item-id embedding (fMRLRec's item space: content only),
- end_to_end_side: the encoders frozen, a side network trained beside each (the `movielens` preset's model),
- matryoshka_lru, lru_32 / lru_128 / lru_512: end_to_end_side with a 1-layer LRU, one Matryoshka model at dim
  512 scored at sizes 32 / 128 / 512 (its runs keep those test metrics under "sizes") and the same model trained
  at each size alone; other sizes by name: `lru_64`, `matryoshka_lru_32_64_128` (one model at dim 128).

Metrics (Recall@10, NDCG@10, MRR, Recall@50, and NDCG@10 with the history masked; mean ± std over `--seeds` via
`train.seed`) on all test users, on users whose test item is warm, and on users whose test item is cold. Wall time is the whole `run_training` call (data,
Ray Train start-up, catalogue passes, training, evaluation). Writes bench/results/quality.json, prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np

from pipeline.config import DataConfig
from training.job_config import JobConfig, build_config
from pipeline.content import read_examples
from training.evaluate import popularity_metrics, size_table

RESULTS = Path(__file__).resolve().parent / "results" / "quality.json"
METRICS = ("recall@10", "ndcg@10", "mrr", "recall@50", "masked_ndcg@10")
SUBSETS = ("test", "test_warm", "test_cold")

# Each trained method is a list of `--set` overrides on top of the shared budget (`common_overrides`).
NO_SIDE = "model.side_network=0"  # the `movielens` preset trains a side network; these methods do not
METHODS: dict[str, list[str]] = {
    "id_only": ["model.use_id_embedding=true", "model.modalities="],
    "two_stage_frozen": ["image.unfreeze_top=0", "text.unfreeze_top=0", NO_SIDE],
    # BatchNorm keeps its pretrained statistics, always (session 3: training the top block with batch statistics
    # was the main reason end-to-end trailed; BENCHMARKS.md).
    "end_to_end": ["image.unfreeze_top=1", "text.unfreeze_top=1", NO_SIDE],
    # LEMUR's encoder sampling: the same, with a random 20% of a step's targets run through the trained tops and the
    # rest read from the memory bank (bank mode only: `--set memory.mode=bank --set train.targets=last`).
    "end_to_end_sampled": ["image.unfreeze_top=1", "text.unfreeze_top=1", "memory.encode_fraction=0.2", NO_SIDE],
    # The same on the exact full softmax, as ID-only and frozen train, every item run through the trained tops
    # once a step (memory.mode=catalogue) instead of the sampled softmax over the step's own items.
    "end_to_end_exact": ["image.unfreeze_top=1", "text.unfreeze_top=1", "memory.mode=catalogue", NO_SIDE],
    # end_to_end_exact's control: the same loss (memory.mode=catalogue), frozen encoders: this pair differs only
    # in whether the tops train.
    "two_stage_frozen_catalogue": ["image.unfreeze_top=0", "text.unfreeze_top=0", "memory.mode=catalogue", NO_SIDE],
    # fMRLRec's item space: content only, no id embedding -- what a cold item has anyway.
    "two_stage_frozen_content_only": ["image.unfreeze_top=0", "text.unfreeze_top=0", "model.use_id_embedding=false",
                                      NO_SIDE],
    "end_to_end_content_only": ["image.unfreeze_top=1", "text.unfreeze_top=1", "model.use_id_embedding=false",
                                NO_SIDE],
    # End to end at the frozen model's cost (IISAN-style): the encoders frozen, a side network over every layer's
    # pooled output trained with the recommender (encoders.side); the trunk cache holds those outputs.
    "end_to_end_side": ["image.unfreeze_top=0", "text.unfreeze_top=0", "model.side_network=64"],
}
# fMRLRec's claim on the product's end-to-end model (the side network): one Matryoshka model (a full-width 1-layer
# LRU, nested losses weighted 0.25 / 0.5 / 1; at dim 512 the `movielens_mrl` preset's shape before 2026-12-06, at
# dim 128 (`matryoshka_lru_32_64_128`) the preset's model since) scored at each of its sizes, against the same model
# trained at each size alone (Matryoshka off, model.dim = the size).
# Other sizes by name: `lru_<D>` and `matryoshka_lru_<s1>_..._<sk>` (`method_overrides`).
MATRYOSHKA_SIZES = (32, 128, 512)
_SIDE_LRU = [*METHODS["end_to_end_side"], "model.sequence_model=lru", "model.num_layers=1"]
_SINGLE_LRU = re.compile(r"lru_(\d+)")
_NESTED_LRU = re.compile(r"matryoshka_lru((?:_\d+)+)")
POPULARITY = "popularity"


def _single_lru(dim: int) -> list[str]:
    return [*_SIDE_LRU, f"model.dim={dim}"]


def _nested_lru(sizes: tuple[int, ...]) -> list[str]:
    """One Matryoshka LRU at dim sizes[-1], scored at each size; each size's loss weighs half the next one's
    (0.25 / 0.5 / 1 for three sizes, the `movielens_mrl` preset's weights). `matryoshka_lru_32_64_128` is that
    preset's model (`tests/unit/test_matryoshka_integration.py`)."""
    weights = [0.5 ** (len(sizes) - 1 - i) for i in range(len(sizes))]
    return [*_single_lru(sizes[-1]), "model.matryoshka_sizes=" + ",".join(map(str, sizes)),
            "model.matryoshka_weights=" + ",".join(f"{w:g}" for w in weights)]


METHODS["matryoshka_lru"] = _nested_lru(MATRYOSHKA_SIZES)
METHODS.update({f"lru_{size}": _single_lru(size) for size in MATRYOSHKA_SIZES})


def method_overrides(method: str) -> list[str]:
    """A method's `--set` overrides: METHODS' entry, or for `lru_<D>` the side-network model with a 1-layer LRU at
    dim D, for `matryoshka_lru_<s1>_..._<sk>` one Matryoshka LRU at those sizes. KeyError for any other name."""
    if method in METHODS:
        return METHODS[method]
    if single := _SINGLE_LRU.fullmatch(method):
        return _single_lru(int(single[1]))
    if nested := _NESTED_LRU.fullmatch(method):
        return _nested_lru(tuple(int(size) for size in nested[1].strip("_").split("_")))
    raise KeyError(method)


def _known(method: str) -> bool:
    try:
        method_overrides(method)
    except KeyError:
        return False
    return True


def common_overrides(args: argparse.Namespace) -> list[str]:
    """The shared protocol and budget: same data, split, steps, batch, encoders' input sizes for every method."""
    return [
        f"data.prepared_dir={args.prepared_dir}",
        "data.time_split_at=",  # leave-one-out
        f"data.cold_item_fraction={args.cold_fraction}",
        f"image.image_size={args.image_size}",
        f"text.max_length={args.text_length}",
        f"train.epochs={args.epochs}",
        f"train.max_steps_per_epoch={args.steps}",
        f"train.patience={args.patience}",
        # the default protocol of every result through session 35 (the preset's schedule is plateau since session
        # 34); sessions 36-37 ran plateau with --set train.schedule=plateau, which comes after and overrides this
        "train.schedule=cosine",
        f"train.batch_size={args.batch_size}",
        "train.eval_ks=10,50",
        f"train.storage_path={args.storage_path}",
        f"tracking.experiment={args.experiment}",
    ]


def method_config(method: str, seed: int, args: argparse.Namespace, run_name: str = "") -> JobConfig:
    """The method's job; `run_name` (an interrupted run's) resumes that run from its last checkpoint, else a new
    name."""
    run_name = run_name or f"quality-{method}-s{seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    overrides = [*common_overrides(args), *method_overrides(method), *args.overrides, f"train.seed={seed}",
                 f"train.run_name={run_name}"]
    job = build_config("movielens", overrides)
    job.preset = f"bench-quality-{method}"
    return job


def subset_popularity(run_dir: Path, job: JobConfig) -> dict[str, dict[str, float]]:
    """The popularity baseline, both protocols, on the test / warm / cold files the driver wrote for this run."""
    popularity = np.load(run_dir / "data" / "popularity.npy")
    out = {}
    for subset in SUBSETS:
        path = run_dir / "data" / f"{subset}.parquet"
        if path.exists():
            examples = read_examples(path)
            headline = popularity_metrics(popularity, examples, ks=job.train.eval_ks,
                                          mask_history=job.train.eval_mask_history)
            other = popularity_metrics(popularity, examples, ks=job.train.eval_ks,
                                       mask_history=not job.train.eval_mask_history)
            prefix = "unmasked_" if job.train.eval_mask_history else "masked_"
            out[subset] = {**headline, **{prefix + k: v for k, v in other.items()}}
    return out


def pick(metrics: dict[str, float], subset: str) -> dict[str, float]:
    return {name: float(metrics.get(f"{subset}_{name}", float("nan"))) for name in METRICS}


def summarise(runs: list[dict]) -> dict[str, dict]:
    """Per method: mean and std (over seeds) of every subset x metric, and of wall time."""
    summary: dict[str, dict] = {}
    for method in dict.fromkeys(run["method"] for run in runs):
        mine = [run for run in runs if run["method"] == method]
        entry: dict = {"seeds": [run["seed"] for run in mine]}
        for subset in SUBSETS:
            entry[subset] = {}
            for name in METRICS:
                entry[subset][name] = _mean_std([run["metrics"][subset][name] for run in mine])
        if all("sizes" in run for run in mine):
            entry["sizes"] = size_summary([run["sizes"] for run in mine])
        if all("selection" in run for run in mine):  # train.refit: the selection runs' test metrics beside
            entry["selection"] = {subset: {name: _mean_std([run["selection"]["metrics"][subset][name] for run in mine])
                                           for name in METRICS} for subset in SUBSETS}
        entry["wall_seconds"] = _mean_std([run["wall_seconds"] for run in mine])
        summary[method] = entry
    return summary


def _mean_std(values: list[float]) -> dict[str, float]:
    array = np.array(values, dtype=float)
    return {"mean": float(array.mean()), "std": float(array.std(ddof=0))}


def size_summary(tables: list[list[dict[str, float]]]) -> dict[str, dict[str, dict[str, float]]]:
    """Each run's `size_table` rows -> {size: {metric: {"mean", "std"}}} over the runs (the sizes every run has)."""
    sizes = sorted(set.intersection(*({int(row["size"]) for row in table} for table in tables)))
    out: dict[str, dict[str, dict[str, float]]] = {}
    for size in sizes:
        rows = [next(row for row in table if int(row["size"]) == size) for table in tables]
        names = [name for name in rows[0] if name != "size"]
        values = {name: np.array([row.get(name, float("nan")) for row in rows], dtype=float) for name in names}
        out[str(size)] = {name: {"mean": float(v.mean()), "std": float(v.std(ddof=0))} for name, v in values.items()}
    return out


def format_table(summary: dict[str, dict]) -> str:
    header = f"{'method':<30}" + "".join(f"{f'{s}/{m}':>22}" for s in SUBSETS for m in METRICS) + f"{'wall s':>12}"
    lines = [header]
    for method, entry in summary.items():
        cells = "".join(
            f"{entry[s][m]['mean']:>13.4f} ± {entry[s][m]['std']:<6.4f}" for s in SUBSETS for m in METRICS
        )
        lines.append(f"{method:<30}{cells}{entry['wall_seconds']['mean']:>12.0f}")
        if "selection" in entry:  # train.refit: the selection runs, whose best epochs the refits trained
            chosen = entry["selection"]
            lines.append(f"{'  (its selection runs)':<30}" + "".join(
                f"{chosen[s][m]['mean']:>13.4f} ± {chosen[s][m]['std']:<6.4f}" for s in SUBSETS for m in METRICS))
    for method, entry in summary.items():
        for size, metrics in entry.get("sizes", {}).items():
            cells = "".join(f"  test/{m}@s{size} {metrics[m]['mean']:.4f} ± {metrics[m]['std']:.4f}"
                            for m in ("ndcg@10", "recall@10") if m in metrics)
            lines.append(f"{method:<30}{cells}")
    return "\n".join(lines)


def format_markdown(summary: dict[str, dict]) -> str:
    lines = []
    for subset in SUBSETS:
        lines.append(f"\n{subset}\n")
        lines.append("| method | " + " | ".join(METRICS) + " | wall s |")
        lines.append("|---|" + "---|" * (len(METRICS) + 1))
        for method, entry in summary.items():
            cells = " | ".join(f"{entry[subset][m]['mean']:.4f} ± {entry[subset][m]['std']:.4f}" for m in METRICS)
            lines.append(f"| {method} | {cells} | {entry['wall_seconds']['mean']:.0f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepared-dir", default="prepared/ml100k_mm")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma list of {', '.join(METHODS)}, lru_<D>, matryoshka_lru_<s1>_..._<sk>")
    parser.add_argument("--seeds", default="0,1,2", help="train.seed values (comma list)")
    parser.add_argument("--steps", type=int, default=0, help="training steps per epoch (0 = whole epochs)")
    parser.add_argument("--epochs", type=int, default=100, help="epochs at most, every method")
    parser.add_argument("--patience", type=int, default=10, help="stop after this many epochs without a better "
                                                                 "validation NDCG@10 (0 = never)")
    parser.add_argument("--batch-size", type=int, default=64, help="examples per step (with the `movielens` "
                                                                   "preset's train.targets=all: windows of history)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--text-length", type=int, default=16)
    parser.add_argument("--cold-fraction", type=float, default=0.1)
    parser.add_argument("--storage-path", default="runs/bench")
    parser.add_argument("--experiment", default="mmrec-bench-quality")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="extra override for every trained method (e.g. train.encoder_lr=1e-3)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--resume", action="store_true",
                        help="keep the runs already in OUT's .partial.json (an interrupted bench: the run it was "
                             "training continues from its last checkpoint) or else in OUT (a finished one, to add "
                             "seeds or methods) and train only the missing ones; refused when they were measured "
                             "under another protocol")
    args = parser.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    unknown = [method for method in methods if not _known(method)]
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; valid: {', '.join(METHODS)}, lru_<D>, "
                     f"matryoshka_lru_<s1>_..._<sk>")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]

    from training.driver import init_ray, run_training

    first = method_config(methods[0], seeds[0], args)
    protocol = run_protocol(first, args)
    partial = args.out.with_suffix(".partial.json")
    runs: list[dict] = []
    interrupted = None  # the run a stopped bench was training (--resume continues it)
    if args.resume:
        try:
            runs, source = resumed_runs(args.out, partial, protocol)
        except ValueError as error:
            print(f"python -m bench.quality: error: {error}", file=sys.stderr)
            return 2
        if runs:
            print(f"[bench] resuming: {len(runs)} runs from {source}", flush=True)
        interrupted = interrupted_run(partial, Path(args.storage_path))

    started_all = time.perf_counter()
    for seed in seeds:
        for method in methods:
            if any(run["method"] == method and run["seed"] == seed for run in runs):
                continue
            earlier = interrupted if interrupted and (interrupted["method"], interrupted["seed"]) == (method, seed) \
                else None
            kept = earlier["seconds"] if earlier else 0.0  # the interrupted part's wall time, up to its checkpoint
            job = method_config(method, seed, args, earlier["run_name"] if earlier else "")
            if earlier:
                print(f"[bench] resuming the interrupted run {earlier['run_name']} from its last checkpoint "
                      f"({kept:.0f} s of it kept)", flush=True)
            # the run in flight, so that an interruption resumes it (--resume)
            partial.write_text(json.dumps({"protocol": protocol, "runs": runs, "in_flight": {
                "method": method, "seed": seed, "run_name": job.train.run_name, "started_at": time.time() - kept}},
                indent=2))
            init_ray()  # one Ray session for every run (the first starts it; none where --resume left nothing)
            started = time.perf_counter()
            outcome = run_training(job, log=lambda line: print(line, flush=True))
            wall = time.perf_counter() - started + kept
            metrics = {subset: pick(outcome.metrics, subset) for subset in SUBSETS}
            runs.append({"method": method, "seed": seed, "wall_seconds": wall, "metrics": metrics,
                         **({"resumed_after_seconds": kept} if earlier else {}),
                         "epochs": outcome.last_metrics.get("epoch"), "best_epoch": outcome.metrics.get("epoch"),
                         "mlflow_run_id": outcome.mlflow_run_id, "run_name": outcome.run_name,
                         "run_dir": str(Path(job.train.storage_path).resolve() / outcome.run_name),
                         "data_wait_fraction": outcome.metrics.get("data_wait_fraction")})
            if outcome.selection is not None:  # train.refit: the run that chose the refit's epochs, tested too
                chosen = outcome.selection
                runs[-1]["selection"] = {
                    "metrics": {subset: pick(chosen.metrics, subset) for subset in SUBSETS},
                    "epochs": chosen.last_metrics.get("epoch"), "best_epoch": chosen.metrics.get("epoch"),
                    "mlflow_run_id": chosen.mlflow_run_id, "run_name": chosen.run_name, "run_dir": str(chosen.run_dir)}
            sizes = size_table(outcome.metrics)
            if sizes:  # a Matryoshka model: the test metrics at each of its sizes
                runs[-1]["sizes"] = sizes
            print(f"[bench] {method} seed={seed} wall={wall:.0f}s " + " ".join(
                f"{s}/{m}={metrics[s][m]:.4f}" for s in SUBSETS for m in METRICS), flush=True)
            # survives an interruption (--resume)
            partial.write_text(json.dumps({"protocol": protocol, "runs": runs}, indent=2))
        trained = next((run for run in runs if run["seed"] == seed and run["method"] != POPULARITY), None)
        if trained is not None and not any(run["method"] == POPULARITY and run["seed"] == seed for run in runs):
            # from the files a trained run of this seed wrote (the same split for every method); a subset
            # without examples (warm / cold with --cold-fraction 0) is NaN, as it is for the trained methods
            job = method_config(trained["method"], seed, args)
            subsets = subset_popularity(Path(job.train.storage_path).resolve() / trained["run_name"], job)
            runs.append({"method": POPULARITY, "seed": seed, "wall_seconds": 0.0, "metrics": {
                s: {m: float(subsets[s][m]) if s in subsets else float("nan") for m in METRICS} for s in SUBSETS}})
    # resumed runs may add methods
    order = list(dict.fromkeys([POPULARITY, *methods, *METHODS, *(run["method"] for run in runs)]))
    runs.sort(key=lambda run: (order.index(run["method"]), run["seed"]))
    summary = summarise(runs)
    counts = _subset_sizes(first)
    result = {
        "benchmark": "quality",
        "command": "python -m bench.quality " + " ".join(sys.argv[1:]),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count(), "load_average_at_end": list(os.getloadavg())},
        "protocol": {**protocol,
                     "methods": {m: method_overrides(m) for m in dict.fromkeys(run["method"] for run in runs)
                                 if _known(m)},
                     "common_overrides": common_overrides(args), "test_users": counts},
        "summary": summary,
        "runs": runs,
        "total_seconds": time.perf_counter() - started_all,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    partial.unlink(missing_ok=True)
    print(f"\nml100k_mm, split {protocol['split']}, full ranking; {args.steps} steps x {args.batch_size}; seeds {seeds}; "
          f"test users {counts}")
    print(format_table(summary))
    print(format_markdown(summary))
    print(f"\nwrote {args.out} ({result['total_seconds']:.0f}s in all)")
    return 0


def run_protocol(job: JobConfig, args: argparse.Namespace) -> dict:
    """What makes two runs' numbers comparable: data, split, budget, input sizes and the extra overrides (not
    where the runs are stored, nor which methods and seeds run)."""
    split = job.data.split if job.data.split == "leave_one_out" else f"time, at {job.data.time_split_at}"
    if job.data.validation_from:
        split += f", validation window from {job.data.validation_from}"
    return {"data": "ml100k_mm", "prepared_dir": str(Path(args.prepared_dir).resolve()), "split": split,
            "ranking": "full catalogue", "cold_item_fraction": args.cold_fraction, "cold_seed": DataConfig.cold_seed,
            "steps": args.steps, "epochs": args.epochs, "patience": args.patience, "batch_size": args.batch_size,
            "image_size": args.image_size, "text_length": args.text_length, "extra_overrides": list(args.overrides)}


def resumed_runs(out: Path, partial: Path, protocol: dict) -> tuple[list[dict], Path | None]:
    """The runs `--resume` keeps: the interrupted `partial`'s, else the finished `out`'s, else none. ValueError
    (one line) when they were measured under another protocol: mixing them would average unlike numbers. A partial
    file from before the protocol was stored in it (a bare list of runs) is kept as it is."""
    source = partial if partial.exists() else out if out.exists() else None
    if source is None:
        return [], None
    try:
        stored = json.loads(source.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"--resume: cannot read {source}: {error}") from None
    if isinstance(stored, list):
        return stored, source
    theirs = stored.get("protocol", {})
    # results written before the prepared directory was part of the protocol name it in common_overrides only
    differ = [f"{key} {theirs.get(key)!r}, here {value!r}" for key, value in protocol.items()
              if (key in theirs or key != "prepared_dir") and theirs.get(key) != value]
    if differ:
        raise ValueError(f"--resume: the runs in {source} were measured under another protocol ("
                         + "; ".join(differ) + "); use another --out")
    return list(stored.get("runs", [])), source


def interrupted_run(partial: Path, storage_path: Path) -> dict | None:
    """The run that was training when the bench was stopped (the partial file's `in_flight`), for --resume to
    continue from its last checkpoint: {method, seed, run_name, seconds}, `seconds` being its wall time up to
    that checkpoint (what was trained after it is lost and trained again). None when there is none, or its run
    directory has no checkpoint (it starts again under a new name)."""
    try:
        flight = json.loads(partial.read_text()).get("in_flight")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    if not flight:
        return None
    checkpoints = list((storage_path / flight["run_name"]).glob("checkpoint_*"))
    if not checkpoints:
        return None
    last = max(checkpoint.stat().st_mtime for checkpoint in checkpoints)
    return {"method": flight["method"], "seed": flight["seed"], "run_name": flight["run_name"],
            "seconds": max(0.0, last - flight["started_at"])}


def _subset_sizes(job: JobConfig) -> dict[str, int]:
    from pipeline.splits import build_splits

    splits = build_splits(job.data, Path(job.data.prepared_dir).resolve())
    return {"test": len(splits.test), "test_warm": len(getattr(splits, "test_warm", splits.test)),
            "test_cold": len(getattr(splits, "test_cold", ()))}


if __name__ == "__main__":
    raise SystemExit(main())

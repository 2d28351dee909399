"""Benchmark: one Matryoshka (fMRLRec) model vs separate models trained at single sizes, same budget each.

    python -m bench.matryoshka                       # sizes 32,128,512, 600 steps per model
    python -m bench.matryoshka --sizes 32,128,512 --steps 1500 --steps-per-epoch 750 --modalities text \
        --sequence-model lru --weights 0.25,0.5,1 --seed 0 --out bench/results/NAME.json  # the configuration measured
    # more seeds, one file each (two can run side by side on two cores), then one seed-averaged comparison:
    python -m bench.matryoshka ... --matryoshka-only --seed 1 --out .../mrl_seed1.json   # or --singles-only
    python -m bench.matryoshka --combine FILE.json [FILE.json ...] --out combined.json

Each model trains for the same number of steps on ALL ml100k_mm users (leave-one-out), then is scored on the
test split with full ranking over the catalogue. The Matryoshka model (model.dim = largest size,
model.matryoshka_sizes = all sizes) is scored at every size from its one checkpoint; each single-size model
(model.dim = s, Matryoshka off: the plain architecture you would otherwise train) at its own size. The Matryoshka
model is the one the product builds (the `movielens_mrl` preset's, there at dim 128 over the side-network
encoders): a full-width sequence model whose last state, truncated, is the user vector. The variants that lost
(fMRLRec's nested LRU, a user head, block normalisation, a zero-initialised head, a 4 x dim LRU feed-forward) were
removed with their flags; their results are in BENCHMARKS.md and their code in git history at e629acf.

Why in process rather than `run_training`: on a shared 2-core machine Ray start-up, TorchTrainer set-up and
catalogue materialisation cost 40-60 s per run and vary a lot with other load; that would swamp the quantity
measured here (training cost). Each model is trained by the product's own trainer (`training.trainer`, what the
Ray Train workers run: the same objective with `NestedSizesLoss`, the same step with history content from a memory
bank and write-on-encode), with a full catalogue pass refreshing the bank every `steps_per_epoch` steps (as the
Ray loop does once per epoch), and scored by `evaluate_ranking`. The bank is
the in-process `LocalMemoryBankClient`, and targets' decoded content is looked up from a catalogue decoded once
(the Ray Data decode stage produces the same tensors).

Timing: wall-clock seconds and process CPU seconds of training only (bank fills and refreshes included;
final evaluation excluded). Writes bench/results/matryoshka.json (or --out) and prints a table.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from training.job_config import JobConfig, movielens, tiny
from memory.local import LocalMemoryBankClient
from pipeline.sequences import Splits, item_popularity
from pipeline.sources import ITEMS_FILE, load_manifest
from pipeline.splits import build_splits
from training.evaluate import evaluate_ranking
from training.offline_eval import DecodedCatalogue, content_spec_of
from training.trainer import build_trainer

RESULTS = Path(__file__).resolve().parent / "results" / "matryoshka.json"
CONTENT_KEYS = ("image", "image_mask", "input_ids", "attention_mask", "text_mask")


def bench_job(dim: int, sizes: tuple[int, ...], args: argparse.Namespace) -> JobConfig:
    """Every ml100k_mm user, ID + content item vectors; the tiny preset's built-in encoders, or (`--encoders
    pretrained`) the movielens preset's EfficientNet-Lite0 + MiniLM with their top layers trained."""
    job = tiny()
    if args.encoders == "pretrained":
        job.image, job.text = movielens().image, movielens().text
    job.preset = "bench-matryoshka"
    job.data.prepared_dir = args.prepared_dir
    job.data.max_users = 0
    job.data.max_history = args.max_history
    job.model = dataclasses.replace(
        job.model, dim=dim, num_heads=2, num_layers=1, use_id_embedding=True, sequence_model=args.sequence_model,
        loss=args.loss, matryoshka_sizes=sizes, modalities=tuple(m for m in args.modalities.split(",") if m),
        matryoshka_weights=tuple(float(w) for w in args.weights.split(",") if w) if sizes else (),
    )
    job.train = dataclasses.replace(job.train, batch_size=args.batch_size, max_steps_per_epoch=args.steps_per_epoch,
                                    epochs=math.ceil(args.steps / args.steps_per_epoch), eval_ks=(10, 20),
                                    seed=args.seed)
    return job


class CatalogueContent:
    """Decoded content of every item, held as tensors indexed by item id ([N+1, ...], row 0 = padding)."""

    def __init__(self, catalogue: DecodedCatalogue, job: JobConfig) -> None:
        self.batches = catalogue.batches(content_spec_of(job))
        self.table = {key: torch.cat([b[key] for b in self.batches]) for key in CONTENT_KEYS}
        first = self.batches[0]
        padding = {key: torch.zeros_like(first[key][:1]) for key in CONTENT_KEYS}
        self.table = {key: torch.cat([padding[key], value]) for key, value in self.table.items()}

    def batch(self, history: np.ndarray, target: np.ndarray) -> dict[str, torch.Tensor]:
        targets = torch.as_tensor(target)
        return {"history": torch.as_tensor(history), "target": targets,
                **{key: value[targets] for key, value in self.table.items()}}


def train_one(job: JobConfig, splits: Splits, content: CatalogueContent, num_items: int, steps: int,
              log) -> tuple[torch.nn.Module, torch.Tensor, dict[str, float]]:
    """Train for `steps` steps with the product's trainer -> (model, fresh content table [N+1, D], timings)."""
    torch.manual_seed(job.train.seed)
    rng = np.random.default_rng(job.train.seed)
    bank = LocalMemoryBankClient(capacity=num_items + 1, dim=job.model.dim)
    trainer = build_trainer(job, num_items, item_popularity(splits.train, num_items), bank)
    wall, cpu = time.perf_counter(), time.process_time()
    trainer.refresh_bank(trainer.encode_catalogue(content.batches))

    def batches():
        """Shuffled training batches, a new order each pass, decoded content looked up per target."""
        while True:
            order = rng.permutation(len(splits.train))
            for start in range(0, len(order) - job.train.batch_size + 1, job.train.batch_size):
                rows = order[start : start + job.train.batch_size]
                yield content.batch(splits.train.history[rows], splits.train.target[rows])

    losses, per_size_losses = [], []

    def record(stats, _step) -> None:
        losses.append(stats.last_loss)
        per_size_losses.append(dict(getattr(trainer.objective, "last_per_size", {})))

    stream = batches()
    while trainer.global_step < steps:
        epoch_steps = min(job.train.max_steps_per_epoch, steps - trainer.global_step)
        trainer.train_epoch(stream, epoch_steps, log=record)
        table = trainer.encode_catalogue(content.batches)  # the end-of-epoch catalogue pass refreshes the bank
        trainer.refresh_bank(table)
        log(f"  step {trainer.global_step}/{steps} loss {np.mean(losses[-epoch_steps:]):.4f} "
            f"({time.perf_counter() - wall:.0f}s)")
    timings = {"train_wall_s": time.perf_counter() - wall, "train_cpu_s": time.process_time() - cpu,
               "final_loss": float(np.mean(losses[-50:])),
               # the Matryoshka model's training loss at each size (its final_loss is their weighted sum)
               "final_loss_per_size": {str(size): float(np.mean([p[size] for p in per_size_losses[-50:]]))
                                       for size in per_size_losses[-1]}}
    return trainer.model.eval(), table, timings


def run(args: argparse.Namespace, log=functools.partial(print, flush=True)) -> dict:
    sizes = tuple(int(s) for s in args.sizes.split(","))
    torch.set_num_threads(args.threads)
    prepared = Path(args.prepared_dir).resolve()
    num_items = load_manifest(prepared)["num_items"]
    probe = bench_job(sizes[-1], sizes, args)
    splits = build_splits(probe.data, prepared)
    catalogue = DecodedCatalogue(prepared / ITEMS_FILE, num_items)
    content = CatalogueContent(catalogue, probe)
    log(f"[bench] {len(splits.train)} train / {len(splits.test)} test examples (all users), {num_items} items; "
        f"{args.steps} steps x batch {args.batch_size} per model, loss={args.loss}, sequence={args.sequence_model}")

    runs = []
    plans = [] if args.singles_only else [("matryoshka", sizes[-1], sizes)]
    plans += [] if args.matryoshka_only else [("single", s, ()) for s in sizes]
    for kind, dim, nested in plans:
        job = bench_job(dim, nested, args)
        log(f"[bench] training {kind} dim={dim}" + (f" sizes={list(nested)}" if nested else ""))
        model, table, timings = train_one(job, splits, content, num_items, args.steps, log)
        metrics = evaluate_ranking(model, table, splits.test, ks=job.train.eval_ks, mask_history=False,
                                   batch_size=512, sizes=nested)
        scored = nested or (dim,)
        per_size = {
            s: {name: metrics[f"{name}@s{s}"] if nested else metrics[name] for name in ("ndcg@10", "recall@10", "mrr")}
            for s in scored
        }
        log(f"[bench]   {timings['train_wall_s']:.0f}s wall, {timings['train_cpu_s']:.0f}s cpu; " + ", ".join(
            f"s{s}: ndcg@10={v['ndcg@10']:.4f}" for s, v in per_size.items()))
        runs.append({"kind": kind, "dim": dim, "sizes": list(scored), "seed": args.seed, **timings,
                     "per_size": {str(s): v for s, v in per_size.items()}})
        if args.out:  # partial results survive an interrupted benchmark
            Path(args.out).with_suffix(".partial.json").write_text(json.dumps(runs, indent=2))

    result = {"settings": dict(vars(args)), "runs": runs,
              "machine": {"torch_threads": args.threads, "note": "shared 2-core CPU machine; wall times are noisy"}}
    return {**result, **compare(runs)}


# Settings that must agree between result files for their runs to be compared or averaged (seed may differ).
SAME_SETTINGS = ("steps", "steps_per_epoch", "batch_size", "max_history", "loss", "sequence_model",
                 "modalities", "encoders")
# What defines the Matryoshka model itself: these must agree among the files that hold one.
METHOD_SETTINGS = ("sizes", "weights")


def _settings(result: dict) -> dict:
    """A result file's settings, with the defaults of options added since older files were written."""
    return {"weights": "", **result["settings"]}


def combine(paths: Sequence[str], singles_from: Sequence[str] = ()) -> dict:
    """Runs of several result files (e.g. one per seed, run side by side) -> one comparison over all of them.

    `singles_from`: more files of which only the single-size runs count (say, files that also hold a Matryoshka
    model of another method). Refuses files whose settings differ (other than the seed), and Matryoshka runs of
    different METHOD_SETTINGS.
    """
    sources = [(p, json.loads(Path(p).read_text()), False) for p in paths]
    sources += [(p, json.loads(Path(p).read_text()), True) for p in singles_from]
    reference = _settings(sources[0][1])
    methods = {tuple(_settings(r)[key] for key in METHOD_SETTINGS) for _, r, singles in sources
               if not singles and any(run["kind"] == "matryoshka" for run in r["runs"])}
    if len(methods) > 1:
        raise SystemExit(f"the Matryoshka runs in {paths} differ in {METHOD_SETTINGS}: {sorted(methods)}: "
                         "not one method (pass files of another method with --singles-from)")
    runs = []
    for path, result, singles in sources:
        settings = _settings(result)
        differ = [key for key in SAME_SETTINGS if settings.get(key) != reference.get(key)]
        if differ:
            raise SystemExit(f"{path} was run with other settings than {sources[0][0]} ({', '.join(differ)}): "
                             "its numbers are not comparable")
        runs += [{"seed": settings["seed"], **run} for run in result["runs"]
                 if not singles or run["kind"] == "single"]
    twice = sorted(key for key, n in Counter((r["kind"], r["dim"], r["seed"]) for r in runs).items() if n > 1)
    if twice:
        raise SystemExit(f"runs (kind, dim, seed) {twice} occur in more than one file: one seed would count twice")
    method = dict(zip(METHOD_SETTINGS, methods.pop())) if methods else {}
    return {"settings": {**reference, "seed": sorted({r["seed"] for r in runs}), "combined_from": list(paths),
                         "singles_from": list(singles_from), **method},
            "runs": runs, **compare(runs)}


def _mean_std(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def compare(runs: list[dict]) -> dict:
    """Matryoshka vs single-size runs, each averaged over the seeds present -> comparison rows + summary.

    No comparison (summary None) unless both kinds are present. Cost: mean CPU seconds of one Matryoshka run
    vs the sum over sizes of the mean CPU seconds of one single-size run.
    """
    matryoshka = [r for r in runs if r["kind"] == "matryoshka"]
    singles = {}
    for r in runs:
        if r["kind"] == "single":
            singles.setdefault(r["dim"], []).append(r)
    if not matryoshka or not singles:
        return {"comparison": [], "summary": None}
    rows = []
    served = set(matryoshka[0]["sizes"])
    singles = {size: ones for size, ones in singles.items() if size in served}
    for size, ones in sorted(singles.items()):
        row = {"size": size, "matryoshka_runs": len(matryoshka), "single_runs": len(ones)}
        for metric in ("ndcg@10", "recall@10"):
            m_mean, m_std = _mean_std([r["per_size"][str(size)][metric] for r in matryoshka])
            s_mean, s_std = _mean_std([r["per_size"][str(size)][metric] for r in ones])
            row.update({f"matryoshka_{metric}": m_mean, f"matryoshka_{metric}_std": m_std,
                        f"single_{metric}": s_mean, f"single_{metric}_std": s_std})
        row["relative_ndcg_gap"] = (row["matryoshka_ndcg@10"] - row["single_ndcg@10"]) / row["single_ndcg@10"] \
            if row["single_ndcg@10"] else float("nan")
        rows.append(row)
    summary = {}
    for key in ("train_wall_s", "train_cpu_s"):
        summary[f"matryoshka_{key}"] = _mean_std([r[key] for r in matryoshka])[0]
        summary[f"singles_{key}_sum"] = sum(_mean_std([r[key] for r in ones])[0] for ones in singles.values())
    summary["cost_ratio_cpu"] = summary["matryoshka_train_cpu_s"] / summary["singles_train_cpu_s_sum"]
    summary["cost_ratio_wall"] = summary["matryoshka_train_wall_s"] / summary["singles_train_wall_s_sum"]
    summary["all_sizes_within_3pct"] = all(r["relative_ndcg_gap"] >= -0.03 for r in rows)
    summary["goal_met"] = summary["all_sizes_within_3pct"] and summary["cost_ratio_cpu"] < 0.5
    return {"comparison": rows, "summary": summary}


def format_table(result: dict) -> str:
    if result["summary"] is None:
        return "\n".join(f"{r['kind']} dim={r['dim']}: NDCG@10 {r['per_size'][str(r['dim'])]['ndcg@10']:.4f} "
                         f"Recall@10 {r['per_size'][str(r['dim'])]['recall@10']:.4f} ({r['train_cpu_s']:.0f} cpu s)"
                         for r in result["runs"])
    def cell(r: dict, name: str) -> str:  # mean, with its seed-to-seed std when several runs were averaged
        runs = r[f"{name.split('_')[0]}_runs"]
        return f"{r[name]:.4f}" + (f" ± {r[name + '_std']:.4f}" if runs > 1 else "")

    lines = [f"{'size':>5} {'runs':>5} {'NDCG@10 MRL':>16} {'NDCG@10 single':>16} {'rel. gap':>9} "
             f"{'Recall@10 MRL':>16} {'Recall@10 single':>17}"]
    for r in result["comparison"]:
        lines.append(f"{r['size']:>5} {r['matryoshka_runs']:>2}/{r['single_runs']:<2} "
                     f"{cell(r, 'matryoshka_ndcg@10'):>16} {cell(r, 'single_ndcg@10'):>16} {r['relative_ndcg_gap']:>+9.1%} "
                     f"{cell(r, 'matryoshka_recall@10'):>16} {cell(r, 'single_recall@10'):>17}")
    s = result["summary"]
    lines.append(f"training cost: Matryoshka {s['matryoshka_train_wall_s']:.0f}s wall / {s['matryoshka_train_cpu_s']:.0f}s cpu;"
                 f" single-size runs summed {s['singles_train_wall_s_sum']:.0f}s wall / {s['singles_train_cpu_s_sum']:.0f}s cpu"
                 f" (ratio {s['cost_ratio_cpu']:.2f} cpu, {s['cost_ratio_wall']:.2f} wall)")
    lines.append(f"goal (every size within 3% relative NDCG@10 and < 0.5x summed cost): "
                 f"{'met' if s['goal_met'] else 'NOT met'}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.matryoshka", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="32,128,512", help="nested sizes; the last is the Matryoshka model.dim")
    parser.add_argument("--steps", type=int, default=600, help="training steps per model (the shared budget)")
    parser.add_argument("--steps-per-epoch", type=int, default=200, help="catalogue refresh of the bank every N steps")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--max-history", type=int, default=20)
    parser.add_argument("--loss", default="sampled_softmax", choices=["full_softmax", "sampled_softmax"])
    parser.add_argument("--sequence-model", default="sasrec", choices=["sasrec", "lru"])
    parser.add_argument("--modalities", default="image,text", help="content modalities beside the item id ('' = id only)")
    parser.add_argument("--encoders", default="builtin", choices=["builtin", "pretrained"],
                        help="builtin: tiny preset (fast; for quality); pretrained: movielens preset's encoders, "
                             "whose cost does not depend on the output size (for the cost comparison)")
    parser.add_argument("--prepared-dir", default="prepared/ml100k_mm")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU seconds are not inflated by spin-waits)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weights", default="", help="Matryoshka loss weight per size, e.g. 0.25,0.5,1 ('' = equal)")
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--singles-only", action="store_true",
                      help="train only the single-size models (e.g. other seeds, to see their seed-to-seed spread)")
    only.add_argument("--matryoshka-only", action="store_true",
                      help="train only the Matryoshka model (compare with singles from other files via --combine)")
    parser.add_argument("--combine", nargs="+", metavar="RESULT_JSON",
                        help="train nothing: compare the runs of these result files (say, one per seed), "
                             "averaged over seeds, and write the comparison to --out")
    parser.add_argument("--singles-from", nargs="+", default=[], metavar="RESULT_JSON",
                        help="with --combine: also these files, of which only the single-size runs count")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    started = time.perf_counter()
    if args.singles_from and not args.combine:
        parser.error("--singles-from needs --combine")
    result = combine(args.combine, args.singles_from) if args.combine else run(args)
    result["bench_wall_s"] = time.perf_counter() - started
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    out.with_suffix(".partial.json").unlink(missing_ok=True)
    print(format_table(result))
    print(f"[bench] wrote {out} ({result['bench_wall_s']:.0f}s in all)")


if __name__ == "__main__":
    main()

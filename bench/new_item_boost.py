"""Benchmark: is a trained model's weakness on new items a ranking problem or a level problem?

    python -m bench.new_item_boost runs/bench/quality-two_stage_frozen_catalogue-s0-...
    python -m bench.new_item_boost RUN_A RUN_B --factors 0,1,1.5 --out /tmp/boost.json

Each argument is a run directory of `jobs.train` / `bench.quality` trained with held-out cold items
(`data.cold_item_fraction`): its kept checkpoint (as `bench.paired` picks it), its `data/popularity.npy` (the
training-target counts: items at 0 are the *unseen* ones, the held-out items among them) and its test subsets.

Two measurements per run, both with the history unmasked (the headline protocol):

- how cold test targets rank among the unseen items only, against among all items: content that tells new
  items apart ranks a cold target high among them, whatever level the new items sit at against the warm ones;
- the trade-off of lifting every unseen item's score by one offset: for each `--factors` f the offset (in logits,
  cosine / `model.temperature`) is the one at which the unseen items' softmax mass, averaged over a sample of
  training examples, is f x their share of the catalogue (f = 1: a new item is, on average, as likely as an
  average item; fitted on training data only, never on test). Cold and warm Recall@10 / NDCG@10 / Recall@50 at
  each offset (and over all test examples, to show the net effect), and the unseen items' mass at offset 0 beside
  the cold targets' share of the test examples.
  Two priors: `uniform` lifts every unseen item alike; `content` spreads them by the popularity their content
  predicts (a ridge from the encoders' features to log training count, fitted on the warm items, times what a
  unit of log count is worth in the model's training logits) and fits the offset on top, so both give the
  unseen items the same mass;
- how far the scores follow popularity: the correlation of each warm item's mean score (over up to 2,000 warm
  test examples) with its log training count, and the cold targets' median (0-based) rank among all items;
- whether that popularity carries over to new items: the correlation of each unseen item's mean score (same
  examples) with its log count as a test target, against what a ridge fit on the warm items predicts from the
  encoders' features (the input of the model's content projection: pretrained features where the encoders are
  frozen). For the ridge (penalty chosen by 5-fold cross-validation on the warm items) and for the trained
  content vectors: R^2 of log training count across warm folds. A tower whose content vectors explain warm
  popularity far better than the features do out of sample has learnt it per item, and gives a new item little
  of it.

- `--match-cold R,...`: warm accuracy at a given cold Recall@10, for each run: the smallest uniform offset at which
  its cold Recall@10 reaches R, and its warm and all-example metrics there. The level of the unseen items is one
  scalar that no loss trains and that trades cold recall against warm accuracy in every model, so two models
  compare on warm items at the same cold recall (where each run's trade-off curve passes through it), not only
  at the levels they happen to be trained to ("not reached" where no offset gets there). Each offset is also given
  in cosine units, `model.new_item_offset`: the product's setting that adds it wherever items are ranked. Fitted
  on the test set it is a measurement; each level is also fitted the product's way, on the validation examples
  whose target is unseen, and read on test (`fitted on validation`: how well a validation-chosen offset holds).
  Offsets here are on the raw scores: a run's own model.new_item_offset is not applied.

- `--from-quality FILE` (repeatable; with several files each method is labelled `method [file stem]`): the run
  directories of a `bench.quality` result (its `run_dir`s, popularity left out), and a summary over seeds per
  method: as trained and at each `--match-cold` level, the mean and standard deviation of warm NDCG@10 / Recall@10,
  cold Recall@10 and all-example NDCG@10, and of cold targets' Recall@10 among the unseen items (the warm goal's
  comparison at a fixed level of the new items: gaps against the seeds' spread).

- `--size S`: every reading with a Matryoshka model's size-S vectors (item and user vectors truncated to their first S
  dims and renormalised, as its evaluation scores each size); a run whose model does not serve S is one error line.

This measures; it changes no model. Writes bench/results/new_item_boost.json, prints a table.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results" / "new_item_boost.json"


def unseen_mass(logits: torch.Tensor, unseen: torch.Tensor, offset: float) -> float:
    """logits [U, N+1] (column 0 = padding, -inf), unseen [N+1] bool -> the unseen items' softmax mass, averaged
    over the U rows, after adding `offset` to their logits."""
    probabilities = torch.softmax(logits + offset * unseen.to(logits.dtype), dim=1)
    return float(probabilities[:, unseen].sum(1).mean())


def offset_for_mass(logits: torch.Tensor, unseen: torch.Tensor, target: float, *, low: float = -50.0,
                    high: float = 50.0, iterations: int = 60) -> float:
    """The logit offset at which `unseen_mass` is `target` (bisection: the mass rises with the offset)."""
    if not 0.0 < target < 1.0:
        raise ValueError(f"the target mass must be in (0, 1), got {target}")
    if not bool(unseen.any()):
        raise ValueError("no unseen items")
    if not unseen_mass(logits, unseen, low) <= target <= unseen_mass(logits, unseen, high):
        raise ValueError(f"the target mass {target} is out of reach within offsets [{low}, {high}]")
    from training.offline_eval import lowest_reaching

    return lowest_reaching(lambda offset: unseen_mass(logits, unseen, offset), target, low, high, iterations)


def offset_for_recall(recall_at: Callable[[float], float], target: float, *, low: float = -30.0,
                      high: float = 30.0, iterations: int = 40) -> float:
    """The smallest offset (to bisection precision) at which `recall_at(offset)`, non-decreasing in the offset (the
    cold targets are unseen items: lifting the unseen items only lifts them), reaches `target`."""
    from training.offline_eval import lowest_reaching

    return lowest_reaching(recall_at, target, low, high, iterations)


def ridge_fit(features: np.ndarray, target: np.ndarray, ridge: float) -> np.ndarray:
    """features [n, d], target [n] -> weights [d+1] (the last: the intercept) of a ridge regression whose penalty
    is `ridge` x the features' mean energy (so one grid of `ridge` fits features of any scale)."""
    x = np.c_[features, np.ones(len(features))]
    gram = x.T @ x
    penalty = ridge * float(np.mean(np.diag(gram)[:-1])) * np.eye(len(gram))
    penalty[-1, -1] = 0.0  # the intercept is not shrunk
    return np.linalg.solve(gram + penalty, x.T @ target)


def ridge_predict(weights: np.ndarray, features: np.ndarray) -> np.ndarray:
    return features @ weights[:-1] + weights[-1]


def ridge_cv(features: np.ndarray, target: np.ndarray, ridges=(1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0), folds: int = 5,
             seed: int = 0) -> tuple[float, float]:
    """-> (the penalty of `ridges` with the best cross-validated R^2, that R^2): R^2 = 1 - squared error of the
    held-out predictions / the target's variance, pooled over `folds` random folds."""
    if len(target) < 2 * folds:
        raise ValueError(f"{len(target)} rows are too few for {folds}-fold cross-validation")
    fold = np.random.default_rng(seed).permutation(len(target)) % folds
    total = float(((target - target.mean()) ** 2).sum())
    best = (ridges[0], float("-inf"))
    for ridge in ridges:
        predicted = np.empty_like(target, dtype=float)
        for k in range(folds):
            held = fold == k
            predicted[held] = ridge_predict(ridge_fit(features[~held], target[~held], ridge), features[held])
        r2 = 1.0 - float(((predicted - target) ** 2).sum()) / total
        if r2 > best[1]:
            best = (ridge, r2)
    return best


def content_prior(logits: torch.Tensor, log_counts: np.ndarray, predicted: np.ndarray, warm: np.ndarray,
                  unseen: np.ndarray) -> tuple[np.ndarray, float]:
    """Training logits [U, N+1], log training counts [N+1], predicted log counts [N+1], warm / unseen [N+1] bool
    -> (logit shifts [N+1]: zero but for the unseen items, whose shifts are their predicted log counts, centred over
    them, times the slope; that slope: the warm items' mean training logit per unit of their log count)."""
    mean_logit = logits[:, torch.as_tensor(warm)].mean(0).double().numpy()
    slope = float(np.polyfit(log_counts[warm], mean_logit, 1)[0])
    shape = np.zeros(len(log_counts))
    shape[unseen] = slope * (predicted[unseen] - predicted[unseen].mean())
    return shape, slope


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1])


def encode_with_features(catalogue, loaded) -> tuple[torch.Tensor, np.ndarray | None]:
    """-> (the content table `DecodedCatalogue.encode` gives, and every item's input of the item encoder's content
    projection [N+1, F], row 0 = 0: the fused, normalised features of its encoders, eval mode; None without
    content), from that one catalogue pass: a forward pre-hook on the projection captures its inputs."""
    from training.offline_eval import content_spec_of

    model = loaded.model
    if not model.item_encoder.has_content:
        return catalogue.encode(loaded), None
    captured: list[torch.Tensor] = []
    hook = model.item_encoder.projection.register_forward_pre_hook(lambda _, args: captured.append(args[0].detach()))
    try:
        content = catalogue.encode(loaded)
    finally:
        hook.remove()
    ids = torch.cat([torch.as_tensor(batch["item_index"]) for batch in catalogue.batches(content_spec_of(loaded.job))])
    features = torch.cat(captured)
    if len(features) != len(ids):
        raise RuntimeError(f"the projection ran on {len(features)} rows in a catalogue pass of {len(ids)} items")
    out = np.zeros((len(content), features.shape[1]))
    out[ids.numpy()] = features.double().numpy()
    return content, out


def ranks_with_offset(user: torch.Tensor, items: torch.Tensor, targets: torch.Tensor, boost: torch.Tensor,
                      among: torch.Tensor | None = None) -> torch.Tensor:
    """user [U, D], items [N+1, D] (both normalised), targets [U], boost [N+1] (logit offsets) -> 0-based target
    ranks [U] over every item (`training.metrics.target_ranks`: ties count for the target), or over the items of
    `among` ([N+1] bool) only."""
    from training.metrics import target_ranks

    scores = user @ items.T + boost[None, :]
    scores[:, 0] = float("-inf")
    exclude = None if among is None else (~among)[None, :].expand_as(scores)
    return target_ranks(scores, targets, exclude)


def metrics_of(ranks: np.ndarray) -> dict[str, float]:
    from bench.paired import per_user

    return {metric: float(per_user(ranks, metric).mean()) for metric in ("recall@10", "ndcg@10", "recall@50")}


def measure_run(run_dir: Path, factors: list[float], train_sample: int, seed: int,
                match_cold: list[float] = (), size: int | None = None) -> dict:
    from bench.kept_run import open_kept_run

    run = open_kept_run(run_dir, needs="data/test_cold.parquet")
    checkpoint, loaded = run.checkpoint, run.loaded
    model, temperature = loaded.model.eval(), loaded.job.model.temperature
    if size is not None and size not in model.supported_sizes:
        raise ValueError(f"--size {size}: its model serves sizes {', '.join(map(str, model.supported_sizes))}")
    content, features = encode_with_features(run.catalogue(), loaded)
    counts = run.training_counts(len(content), "the run's training counts tell the unseen items")
    unseen = torch.zeros(len(content), dtype=torch.bool)
    unseen[1:] = torch.as_tensor(counts[1:] == 0)
    items = model.item_vectors(content, torch.arange(len(content)), size)  # a Matryoshka prefix with --size

    def users_of(examples, rows) -> torch.Tensor:
        history = torch.as_tensor(examples.history[rows])
        return model.user_vectors(history, content[history], size)

    def ranks(users: torch.Tensor, targets: torch.Tensor, boost: torch.Tensor, among=None) -> np.ndarray:
        return torch.cat([ranks_with_offset(users[start:start + 1024], items, targets[start:start + 1024], boost, among)
                          for start in range(0, len(targets), 1024)]).numpy()

    train = run.examples("train")
    rows = np.random.default_rng(seed).choice(len(train.target), min(train_sample, len(train.target)), replace=False)
    logits = users_of(train, np.sort(rows)) @ items.T / temperature
    logits[:, 0] = float("-inf")
    share = float(unseen.sum()) / (len(content) - 1)
    unseen_items = unseen.numpy()
    warm_items = ~unseen_items
    warm_items[0] = False
    log_counts = np.log1p(counts[:len(content)].astype(float))

    # the level priors for unseen items, in logits, from training data only: "uniform" (one offset), and "content":
    # the same offset plus, per unseen item, the log training count a ridge on the encoders' features (fitted on
    # the warm items) predicts for it, centred over the unseen items, times the slope of the warm items' mean
    # training logit on their log count (what one unit of log count is worth in this model's scores)
    priors = {"uniform": torch.zeros(len(content), dtype=logits.dtype)}
    carry: dict = {}
    if features is not None:
        ridge, features_r2 = ridge_cv(features[warm_items], log_counts[warm_items], seed=seed)
        predicted = ridge_predict(ridge_fit(features[warm_items], log_counts[warm_items], ridge), features)
        vectors = F.normalize(content, dim=-1).double().numpy()
        shape, slope = content_prior(logits, log_counts, predicted, warm_items, unseen_items)
        priors["content"] = torch.as_tensor(shape, dtype=logits.dtype)
        carry = {"features_cv_r2": round(features_r2, 4), "features_ridge": ridge,
                 "content_vectors_cv_r2": round(ridge_cv(vectors[warm_items], log_counts[warm_items], seed=seed)[1], 4),
                 "logit_per_log_count": round(slope, 4)}

    # every test example's user vector once (the sequence model is the costly part), reused at every offset
    subsets = {}
    for name in ("test_warm", "test_cold"):
        examples = run.examples(name)
        users = torch.cat([users_of(examples, slice(start, start + 1024)) for start in range(0, len(examples.target), 1024)])
        subsets[name] = (users, torch.as_tensor(np.array(examples.target)))
    plain: dict[str, np.ndarray] = {}

    def measured(row: dict, boost: torch.Tensor, keep: bool = False) -> dict:
        """row + each subset's metrics (and all test examples') under `boost` (cosine units) [N+1]."""
        every = []
        for name, (users, targets) in subsets.items():
            subset_ranks = ranks(users, targets, boost.to(users.dtype))
            row.update({f"{name}/{k}": round(v, 4) for k, v in metrics_of(subset_ranks).items()})
            every.append(subset_ranks)
            if keep:
                plain[name] = subset_ranks
        row.update({f"test/{k}": round(v, 4) for k, v in metrics_of(np.concatenate(every)).items()})
        return row

    rows_out = []
    for prior, shape in priors.items():
        shaped = logits + shape[None, :]
        for factor in factors:
            if factor == 0 and prior != "uniform":
                continue  # factor 0 is the model as trained, measured once
            offset = 0.0 if factor == 0 else offset_for_mass(shaped, unseen, factor * share)
            boost = (offset * unseen.to(shape.dtype) + shape) * temperature  # in cosine units, as the scores
            row = {"prior": prior, "factor": factor, "logit_offset": round(offset, 4),
                   "unseen_mass": round(unseen_mass(shaped, unseen, offset), 4)}
            rows_out.append(measured(row, boost, keep=factor == 0))
    cold_users, cold_targets = subsets["test_cold"]
    unit = unseen.to(logits.dtype) * temperature  # one logit of offset on every unseen item, in cosine units

    def recall_of(users: torch.Tensor, targets: torch.Tensor) -> Callable[[float], float]:
        return lambda offset: metrics_of(ranks(users, targets, (offset * unit).to(users.dtype)))["recall@10"]

    # the product's way to pick an offset: on the validation examples whose target is unseen, then read on test
    validation = run.examples("validation")
    val_rows = np.flatnonzero(unseen_items[np.asarray(validation.target)])
    fitters = {"test": recall_of(cold_users, cold_targets)}
    if len(val_rows):
        val_users = torch.cat([users_of(validation, val_rows[start:start + 1024])
                               for start in range(0, len(val_rows), 1024)])
        fitters["validation"] = recall_of(val_users, torch.as_tensor(np.asarray(validation.target)[val_rows]))
    matched = []
    for level in match_cold:
        for fitted_on in ("test", "validation"):
            wanted = {"cold_recall@10_wanted": level, "fitted_on": fitted_on}
            try:
                offset = offset_for_recall(fitters[fitted_on], level)
            except (KeyError, ValueError):  # no level of the unseen items gets there (an ID-only model's), or
                matched.append({**wanted, "reached": False})  # no validation example has an unseen target
                continue
            row = {**wanted, "reached": True, "logit_offset": round(offset, 4),
                   "new_item_offset": round(offset * temperature, 5),  # in cosine units: model.new_item_offset
                   "unseen_mass": round(unseen_mass(logits, unseen, offset), 4),
                   "fitted_cold_recall@10": round(fitters[fitted_on](offset), 4)}
            matched.append(measured(row, offset * unit))
    among = ranks(cold_users, cold_targets, torch.zeros(len(items)), among=unseen)
    test_examples = len(subsets["test_warm"][1]) + len(cold_targets)
    # how far the scores follow popularity: each item's mean score over (up to) 2,000 warm test examples, against
    # its log training count (warm items) and its log count as a test target (unseen items)
    mean_score = (subsets["test_warm"][0][:2000] @ items.T).mean(0).numpy()
    popularity_correlation = correlation(mean_score[warm_items], log_counts[warm_items])
    log_test_counts = np.log1p(np.bincount(np.concatenate([subsets[name][1].numpy() for name in subsets]),
                                           minlength=len(content))[:len(content)].astype(float))
    carry["unseen_mean_score_vs_log_test_count_correlation"] = round(
        correlation(mean_score[unseen_items], log_test_counts[unseen_items]), 4)
    if "content" in priors:
        carry["unseen_ridge_prediction_vs_log_test_count_correlation"] = round(
            correlation(predicted[unseen_items], log_test_counts[unseen_items]), 4)
    return {"run": run_dir.name, "checkpoint": Path(checkpoint).name, "size": size or items.shape[1],
            "unseen_items": int(unseen.sum()),
            "unseen_share_of_catalogue": round(share, 4), "cold_share_of_test": round(len(cold_targets) / test_examples, 4),
            "cold_among_unseen": {k: round(v, 4) for k, v in metrics_of(among).items()},
            "cold_median_rank": float(np.median(plain["test_cold"])),
            "warm_mean_score_vs_log_count_correlation": round(popularity_correlation, 4),
            "popularity_of_new_items": carry,
            "cold_among_unseen_random_recall@10": round(min(10, int(unseen.sum())) / int(unseen.sum()), 4),
            "random_recall@10": round(10 / (len(content) - 1), 4), "offsets": rows_out, "matched_cold": matched,
            "validation_cold_examples": int(len(val_rows))}


def runs_from_quality(path: Path) -> list[tuple[Path, str]]:
    """A `bench.quality` result -> [(run directory, method)] of its trained runs, in its order. ValueError (one
    line) where the file cannot be read or names no run directory."""
    try:
        stored = json.loads(path.read_text())
        runs = [(Path(run["run_dir"]), str(run["method"])) for run in stored["runs"] if run.get("run_dir")]
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"--from-quality: cannot read the runs of {path}: {error!r}") from None
    if not runs:
        raise ValueError(f"--from-quality: {path} names no trained run directory")
    return runs


def labelled_quality_runs(paths: list[Path]) -> list[tuple[Path, str]]:
    """The runs of several `bench.quality` results, each labelled by its method, and with more than one file by
    `method [file stem]` (the same method under two protocols is two rows of the summary)."""
    return [(run_dir, method if len(paths) == 1 else f"{method} [{path.stem}]")
            for path in paths for run_dir, method in runs_from_quality(path)]


SUMMARY_METRICS = ("test_warm/ndcg@10", "test_warm/recall@10", "test_cold/recall@10", "test/ndcg@10")


def method_summary(results: list[dict], methods: list[str]) -> dict[str, dict]:
    """Per method (the runs of `results` in the order of `methods`, one label per result): the seeds' mean and std
    (ddof 0, as bench.quality) of SUMMARY_METRICS as trained (`as_trained`) and at each matched cold level
    (`at_cold`, keyed by the level, "<level> from validation" where the offset was fitted on validation; a level
    some run did not reach is left out, its count in `not_reached`), and
    of the cold targets' Recall@10 among the unseen items."""
    def spread(values: list[float]) -> dict[str, float]:
        array = np.array(values, dtype=float)
        return {"mean": round(float(array.mean()), 4), "std": round(float(array.std()), 4), "n": len(values)}

    summary: dict[str, dict] = {}
    for method in dict.fromkeys(methods):
        mine = [result for result, label in zip(results, methods) if label == method]
        trained = [next(row for row in result["offsets"] if row["factor"] == 0) for result in mine]
        entry = {"runs": len(mine),
                 "as_trained": {name: spread([row[name] for row in trained]) for name in SUMMARY_METRICS},
                 "cold_among_unseen_recall@10": spread([r["cold_among_unseen"]["recall@10"] for r in mine]),
                 "at_cold": {}, "not_reached": {}}
        levels = dict.fromkeys(_level_key(row) for r in mine for row in r["matched_cold"])
        for level in levels:
            rows = [row for r in mine for row in r["matched_cold"] if _level_key(row) == level]
            reached = [row for row in rows if row["reached"]]
            if len(reached) < len(rows):
                entry["not_reached"][str(level)] = len(rows) - len(reached)
                continue
            entry["at_cold"][str(level)] = {name: spread([row[name] for row in reached]) for name in SUMMARY_METRICS}
        summary[method] = entry
    return summary


def _level_key(row: dict) -> str:
    """A matched row's level as the summary keys it: "0.03" (its offset fitted on test), "0.03 from validation"."""
    fitted = row.get("fitted_on", "test")
    return str(row["cold_recall@10_wanted"]) + ("" if fitted == "test" else f" from {fitted}")


def format_summary(summary: dict[str, dict]) -> str:
    """The warm goal's table: one row per method and cold level (as trained first), mean ± std over its runs."""
    lines = ["| method | runs | cold level | warm NDCG@10 | warm R@10 | cold R@10 | all NDCG@10 |",
             "|---|---:|---|---:|---:|---:|---:|"]

    def cells(block: dict) -> str:
        return " | ".join(f"{block[name]['mean']:.4f} ± {block[name]['std']:.4f}" for name in SUMMARY_METRICS)

    for method, entry in summary.items():
        lines.append(f"| {method} | {entry['runs']} | as trained | {cells(entry['as_trained'])} |")
        for level, block in entry["at_cold"].items():
            lines.append(f"| {method} | {entry['runs']} | cold R@10 {level} | {cells(block)} |")
        for level, missed in entry["not_reached"].items():
            lines.append(f"| {method} | {entry['runs']} | cold R@10 {level} | not reached by {missed} run(s) | | | |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.new_item_boost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", type=Path, help="run directories trained with held-out cold items")
    parser.add_argument("--from-quality", type=Path, action="append", default=[], metavar="FILE",
                        help="also the runs of a bench.quality result, summarised per method over its seeds "
                             "(repeatable: each method then labelled with its file's name)")
    parser.add_argument("--factors", default="0,0.4,0.55,0.75,1,1.5",
                        help="unseen items' mass as multiples of their catalogue share (0 = no offset, always "
                             "measured)")
    parser.add_argument("--match-cold", default="", metavar="R,...",
                        help="also each run's warm and all-example metrics at the smallest uniform offset at which "
                             "its cold Recall@10 reaches each R (default: none)")
    parser.add_argument("--train-sample", type=int, default=4000, help="training examples the offsets are fitted on")
    parser.add_argument("--size", type=int, default=None,
                        help="score with each run's Matryoshka vectors of this size (default: the full vectors)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    try:
        factors = [float(f) for f in args.factors.split(",")]
    except ValueError:
        parser.error(f"--factors must be a comma list of numbers, got {args.factors!r}")
    if any(f < 0 for f in factors):
        parser.error("--factors must be >= 0")
    factors = sorted(set(factors) | {0.0})  # the model as trained is always the first row
    try:
        match_cold = [float(r) for r in args.match_cold.split(",") if r.strip()]
    except ValueError:
        parser.error(f"--match-cold must be a comma list of numbers, got {args.match_cold!r}")
    if any(not 0 < r <= 1 for r in match_cold):
        parser.error("--match-cold levels must be in (0, 1]")
    if args.size is not None and args.size < 1:
        parser.error(f"--size must be >= 1, got {args.size}")
    labelled: list[tuple[Path, str]] = [(run_dir, "") for run_dir in args.runs]
    try:
        labelled += labelled_quality_runs(args.from_quality)
    except ValueError as error:
        parser.error(str(error))
    if not labelled:
        parser.error("name run directories or --from-quality FILE")
    started = time.perf_counter()
    torch.set_grad_enabled(False)
    results = []
    for run_dir, _ in labelled:
        try:
            result = measure_run(run_dir, factors, args.train_sample, args.seed, match_cold, args.size)
        except ValueError as error:  # a factor whose mass cannot be reached (f x share >= 1), a size not served
            raise SystemExit(f"error: {run_dir}: {error}") from None
        results.append(result)
        among = result["cold_among_unseen"]
        print(f"\n{result['run']} (size {result['size']}): {result['unseen_items']} unseen items ({result['unseen_share_of_catalogue']:.1%} of "
              f"the catalogue; cold targets are {result['cold_share_of_test']:.1%} of the test examples)")
        print(f"cold targets among the unseen items only: Recall@10 {among['recall@10']:.4f} (random "
              f"{result['cold_among_unseen_random_recall@10']:.4f}), NDCG@10 {among['ndcg@10']:.4f}; among all "
              f"items: median rank {result['cold_median_rank']:.0f}")
        print("warm items' mean score against their log training count: correlation "
              f"{result['warm_mean_score_vs_log_count_correlation']:.2f}")
        carry = result["popularity_of_new_items"]
        if "features_cv_r2" in carry:
            print(f"log training count from warm items' content, R^2 across folds: the model's content vectors "
                  f"{carry['content_vectors_cv_r2']:.2f}, a ridge on the encoders' features {carry['features_cv_r2']:.2f}; "
                  f"unseen items' log test count against the ridge's prediction: correlation "
                  f"{carry['unseen_ridge_prediction_vs_log_test_count_correlation']:.2f}")
        print("unseen items' mean score against their log test count: correlation "
              f"{carry['unseen_mean_score_vs_log_test_count_correlation']:.2f}")
        print("\n| prior | mass factor | logit offset | unseen mass | cold R@10 | cold NDCG@10 | cold R@50 | warm R@10 "
              "| warm NDCG@10 | warm R@50 | all R@10 | all NDCG@10 |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for row in result["offsets"]:
            print(f"| {row['prior']} | {row['factor']:g} | {row['logit_offset']:.3f} | {row['unseen_mass']:.4f} | "
                  f"{row['test_cold/recall@10']:.4f} | {row['test_cold/ndcg@10']:.4f} | {row['test_cold/recall@50']:.4f} | "
                  f"{row['test_warm/recall@10']:.4f} | {row['test_warm/ndcg@10']:.4f} | {row['test_warm/recall@50']:.4f} | "
                  f"{row['test/recall@10']:.4f} | {row['test/ndcg@10']:.4f} |")
        if result["matched_cold"]:
            print("\n| cold R@10 wanted | fitted on | logit offset | model.new_item_offset | unseen mass | cold R@10 "
                  "| warm R@10 | warm NDCG@10 | all NDCG@10 |\n|---:|---|---:|---:|---:|---:|---:|---:|---:|")
            for row in result["matched_cold"]:
                if not row["reached"]:
                    print(f"| {row['cold_recall@10_wanted']:g} | {row['fitted_on']} | not reached | | | | | | |")
                    continue
                print(f"| {row['cold_recall@10_wanted']:g} | {row['fitted_on']} | {row['logit_offset']:.3f} | "
                      f"{row['new_item_offset']:.4f} | {row['unseen_mass']:.4f} | "
                      f"{row['test_cold/recall@10']:.4f} | {row['test_warm/recall@10']:.4f} | "
                      f"{row['test_warm/ndcg@10']:.4f} | {row['test/ndcg@10']:.4f} |")
    grouped = [(result, method) for result, (_, method) in zip(results, labelled) if method]
    summary = method_summary([r for r, _ in grouped], [m for _, m in grouped]) if grouped else {}
    if summary:
        print(f"\nper method over its runs (mean ± std), from {', '.join(map(str, args.from_quality))}\n")
        print(format_summary(summary))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "new_item_boost", "command": " ".join(["python -m bench.new_item_boost", *sys.argv[1:]]),
        "machine": {"python": platform.python_version(), "torch": torch.__version__},
        "runs": results, **({"summary": summary} if summary else {}),
        "seconds": round(time.perf_counter() - started, 1)}, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

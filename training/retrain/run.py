"""Incremental retraining with a promotion gate: champion -> new days -> challenger -> gate -> registry.

One retrain (`run_retrain`), under a per-model lock:
  1. The `champion` version gives the checkpoint to warm-start from and two watermarks (see training/registry.py):
     `trained_through` (newest interaction it trained on) and the newest `data_watermark` of the champion and
     the last challenger (newest interaction any retrain already looked at). Nothing newer than the latter in
     the prepared data -> an idempotent no-op.
  2. Only day partitions from the `trained_through` day on are read in full; older days are read as ids only,
     for histories and the replay sample. The newest `holdout_fraction` of the unseen interactions (by time)
     is the held-out window: neither model has trained on it.
  3. Training examples are the interactions after `trained_through` and before the window (their histories
     include older interactions) plus `replay_ratio` x as many older examples, sampled, against forgetting.
  4. The challenger warm-starts from the champion (`train.init_checkpoint`; the catalogue may have grown) for
     at most `epochs` x `steps` optimizer steps.
  5. Champion and challenger are scored by the same code (`training.offline_eval`) on the window; the
     challenger is registered and becomes `challenger`, and becomes `champion` only if its `metric` is no
     worse than the champion's minus `margin`. The decision and both scores go on the version and its run.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import pandas as pd

from pipeline.sequences import Splits
from training.retrain.config import check_gate_metric
from training.retrain.gate import PromotionDecision, decide_promotion
from training.retrain.lock import RetrainLock
from training.retrain.selection import holdout_start, incremental_splits, read_for_retrain, utc_iso

if TYPE_CHECKING:
    from training.job_config import JobConfig
    from training.registry import ModelVersionInfo, ServingModelLogger


@dataclass
class RetrainOutcome:
    status: str  # "noop" | "waiting" | "promoted" | "rejected"
    message: str
    champion: "ModelVersionInfo | None" = None
    challenger: "ModelVersionInfo | None" = None
    decision: PromotionDecision | None = None
    champion_metrics: dict = field(default_factory=dict)
    challenger_metrics: dict = field(default_factory=dict)
    train_examples: int = 0
    holdout_examples: int = 0


def lock_path(job: "JobConfig") -> Path:
    return Path(job.train.storage_path).resolve() / "locks" / f"retrain-{job.tracking.registered_model}.lock"


def challenger_config(job: "JobConfig", champion_job: "JobConfig", champion_checkpoint: Path, run_name: str) -> "JobConfig":
    """The command line's config, with the architecture of the champion (its weights must fit) and the bound."""
    return replace(
        job,
        model=champion_job.model,
        image=champion_job.image,
        text=champion_job.text,
        data=replace(job.data, max_history=champion_job.data.max_history),
        # a fixed budget of steps, no early stopping: the cosine anneals over it (plateau would end at full rate);
        # no epoch is selected, so nothing to refit (train.refit)
        train=replace(job.train, epochs=1, max_steps_per_epoch=job.retrain.steps, schedule="cosine", refit=False,
                      run_name=run_name, init_checkpoint=str(champion_checkpoint)),
    )


def run_retrain(job: "JobConfig", log: Callable[[str], None] = print, prepare: bool = False,
                serving_model: "ServingModelLogger | None" = None) -> RetrainOutcome:
    """One incremental retrain of `tracking.registered_model` (see the module docstring).

    serving_model: logs the challenger as an MLflow model too (`training.registry.ModelRegistry`; jobs.retrain
        passes `serving.pyfunc.log_recommender_model`).

    prepare: first re-prepare `data.raw_dir` into `data.prepared_dir` (under the lock), so that one scheduled
        command picks up the raw data that arrived since the last run.
    """
    from training.overrides import ConfigError
    from pipeline.sources import ITEMS_FILE, load_manifest, prepare_dataset
    from training.checkpoint import is_checkpoint, read_state
    from training.offline_eval import job_config_of
    from training.registry import CHALLENGER, CHAMPION, ModelRegistry, RegistryError
    from training.tracking import resolve_tracking_uri

    cfg = job.retrain
    try:
        check_gate_metric(cfg.metric, job.train.eval_ks)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    prepared = Path(job.data.prepared_dir).resolve()
    registry = ModelRegistry(resolve_tracking_uri(job.tracking), job.tracking.registered_model,
                             job.train.storage_path, serving_model=serving_model)
    with RetrainLock(lock_path(job), cfg.lock_stale_seconds):
        if prepare:
            started = time.perf_counter()
            report = prepare_dataset(job.data, Path(job.data.raw_dir).resolve(), prepared)
            log(f"[retrain] prepared {report.interactions_kept} interactions of {report.items_total} items into "
                f"{prepared} in {time.perf_counter() - started:.1f}s")
        manifest = load_manifest(prepared)
        champion = registry.get(CHAMPION)
        if champion is None:
            raise RegistryError(f"registered model {registry.name!r} has no {CHAMPION!r} at {registry.tracking_uri}: "
                                f"run `python -m jobs.train` first")
        if not is_checkpoint(champion.checkpoint_path):
            raise RegistryError(f"champion v{champion.version} points at {champion.checkpoint_path}, which holds no "
                                f"model.pt: checkpoints must live on storage the job's driver can read")
        last = registry.get(CHALLENGER)
        seen_through = max(champion.data_watermark, last.data_watermark if last else 0)
        log(f"[retrain] champion v{champion.version}: trained through {utc_iso(champion.trained_through)}; "
            f"data seen through {utc_iso(seen_through)}; prepared data through {utc_iso(manifest['watermark'])}")
        if manifest["watermark"] <= seen_through:
            return RetrainOutcome("noop", f"nothing newer than the watermark {utc_iso(seen_through)}: nothing to do",
                                  champion)

        champion_job = job_config_of(read_state(champion.checkpoint_path))
        frame = read_for_retrain(prepared, champion.trained_through, job.data.max_users)
        unseen = frame.timestamp.to_numpy()[frame.timestamp.to_numpy() > seen_through]
        holdout_from = holdout_start(unseen, cfg.holdout_fraction)
        if len(unseen) < cfg.min_new_interactions or holdout_from is None:
            return RetrainOutcome("waiting", f"only {len(unseen)} new interactions for this model's users "
                                  f"(at least {cfg.min_new_interactions} needed): waiting for more data",
                                  champion)
        splits = incremental_splits(frame, max_history=champion_job.data.max_history,
                                    trained_through=champion.trained_through,
                                    holdout_from=holdout_from, replay_ratio=cfg.replay_ratio, seed=job.train.seed)
        new_examples = int((splits.train.timestamp > champion.trained_through).sum())
        log(f"[retrain] held-out window from {utc_iso(holdout_from)}: {len(splits.test)} examples; training on "
            f"{new_examples} new + {len(splits.train) - new_examples} replayed examples")
        if new_examples == 0 or len(splits.test) == 0:
            return RetrainOutcome("waiting", "the new interactions form no training or held-out examples yet "
                                  "(users need a history): waiting for more data", champion)

        return _train_and_gate(job, champion_job, registry, champion, splits, manifest, frame, holdout_from,
                               new_examples, log, prepared / ITEMS_FILE)


def _train_and_gate(job: "JobConfig", champion_job: "JobConfig", registry, champion: "ModelVersionInfo",
                    splits: Splits, manifest: dict, frame: pd.DataFrame, holdout_from: int, new_examples: int,
                    log: Callable[[str], None], items_path: Path) -> RetrainOutcome:
    from training.driver import run_training
    from training.offline_eval import DecodedCatalogue, evaluate_checkpoint, load_checkpoint
    from training.registry import CHALLENGER, CHAMPION
    from training.tracking import Tracker, metric_key

    cfg = job.retrain
    run_name = f"retrain-{time.strftime('%Y%m%d-%H%M%S')}"
    challenger_job = challenger_config(job, champion_job, champion.checkpoint_path, run_name)
    log(f"[retrain] training challenger {run_name} from champion v{champion.version} "
        f"(<= {cfg.steps} steps)")
    outcome = run_training(challenger_job, log=log, splits=splits)
    if outcome.checkpoint_path is None:
        raise RuntimeError(f"retrain run {run_name} produced no checkpoint")

    num_items = int(manifest["num_items"])
    catalogue = DecodedCatalogue(items_path, num_items, batch_size=job.train.eval_batch_size,
                                 max_image_pixels=job.data.max_image_pixels)
    scores = {}
    for role, path in (("champion", champion.checkpoint_path), ("challenger", Path(outcome.checkpoint_path))):
        started = time.perf_counter()
        loaded = load_checkpoint(path, num_items)
        scores[role] = evaluate_checkpoint(loaded, catalogue, splits.test, ks=job.train.eval_ks,
                                           mask_history=job.train.eval_mask_history,
                                           batch_size=job.train.eval_batch_size)
        log(f"[retrain] {role} on the held-out window: {cfg.metric}={scores[role][cfg.metric]:.4f} "
            f"({time.perf_counter() - started:.1f}s)")
    decision = decide_promotion(scores["champion"][cfg.metric], scores["challenger"][cfg.metric],
                                metric=cfg.metric, margin=cfg.margin)

    timestamps = frame.timestamp.to_numpy()
    trained_through = int(max(champion.trained_through, timestamps[timestamps < holdout_from].max()))
    gate_tags = {
        **decision.tags(),
        "gate.champion_version": champion.version,
        "gate.holdout_from": str(holdout_from),
        "gate.holdout_examples": str(len(splits.test)),
        "gate.train_examples_new": str(new_examples),
        "gate.train_examples_replay": str(len(splits.train) - new_examples),
    }
    challenger = registry.register(
        run_id=outcome.mlflow_run_id, checkpoint_path=outcome.checkpoint_path,
        data_watermark=int(manifest["watermark"]), trained_through=trained_through,
        config_hash=challenger_job.config_hash(), metrics=scores["challenger"],
        tags={"source_job": "retrain", "parent_version": champion.version, **gate_tags},
    )
    registry.set_alias(CHALLENGER, challenger.version)
    if decision.promote:
        registry.set_alias(CHAMPION, challenger.version)

    tracker = Tracker(outcome.tracking_uri, outcome.mlflow_run_id)
    tracker.set_tags({**gate_tags, "registered_version": challenger.version})
    tracker.log_metrics({
        **{f"holdout_champion_{metric_key(k)}": v for k, v in scores["champion"].items()},
        **{f"holdout_challenger_{metric_key(k)}": v for k, v in scores["challenger"].items()},
        "gate_promoted": float(decision.promote),
    })
    status = "promoted" if decision.promote else "rejected"
    message = (f"challenger v{challenger.version} {status} ({decision.reason}); champion is "
               f"v{challenger.version if decision.promote else champion.version}")
    return RetrainOutcome(status, message, champion, challenger, decision, scores["champion"], scores["challenger"],
                          len(splits.train), len(splits.test))

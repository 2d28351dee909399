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

import fcntl
import json
import math
import os
import re
import socket
import time
import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from pipeline.owned_dirs import pid_alive
from pipeline.sequences import Examples, Splits, time_split
from pipeline.sources import INTERACTIONS_DIR, read_interactions

if TYPE_CHECKING:  # jobs.config composes RetrainConfig, so it cannot be imported at module level here
    from jobs.config import JobConfig
    from training.registry import ModelVersionInfo

_METRIC = re.compile(r"^(?:(?:recall|ndcg)@(?P<k>\d+)|mrr)$")
ID_COLUMNS = ["user_index", "item_index", "timestamp", "rating", "row_order"]


@dataclass(kw_only=True)
class RetrainConfig:
    steps: int = 200  # optimizer steps per epoch of the warm-started challenger (the bound on retrain cost)
    epochs: int = 1
    replay_ratio: float = 1.0  # older examples replayed per new training example (0 = new data only)
    holdout_fraction: float = 0.2  # newest share of the unseen interactions held out for the gate
    min_new_interactions: int = 20  # fewer unseen interactions than this: wait for more data (exit 0)
    metric: str = "ndcg@10"  # gate metric, one of recall@k / ndcg@k (k in train.eval_ks) / mrr
    margin: float = 0.0  # promote when challenger >= champion - margin
    lock_stale_seconds: float = 6 * 3600.0  # a lock older than this is taken over (its holder hung or died)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.epochs < 1:
            raise ValueError("retrain.steps and retrain.epochs must be >= 1")
        if self.replay_ratio < 0:
            raise ValueError("retrain.replay_ratio must be >= 0")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ValueError("retrain.holdout_fraction must be in (0, 1)")
        if self.min_new_interactions < 2:
            raise ValueError("retrain.min_new_interactions must be >= 2 (one to train on, one to hold out)")
        if _METRIC.match(self.metric) is None:
            raise ValueError(f"retrain.metric={self.metric!r}; use recall@K, ndcg@K or mrr")
        if self.margin < 0 or self.lock_stale_seconds <= 0:
            raise ValueError("retrain.margin must be >= 0 and retrain.lock_stale_seconds > 0")


def check_gate_metric(metric: str, eval_ks: tuple[int, ...]) -> None:
    """The gate metric must be one the evaluation computes."""
    match = _METRIC.match(metric)
    if match is None or (match["k"] is not None and int(match["k"]) not in eval_ks):
        raise ValueError(f"retrain.metric={metric!r} is not computed; train.eval_ks={list(eval_ks)}")


# --------------------------------------------------------------------------- lock


class RetrainLockedError(RuntimeError):
    """Another retrain of the same model holds the lock."""


def lock_is_stale(holder: dict | None, *, age_s: float, stale_after_s: float, hostname: str,
                  alive: Callable[[int], bool] = pid_alive) -> bool:
    """A lock is stale when older than `stale_after_s`, or when its holder ran on this host and has exited.

    `holder` None (unreadable, e.g. being written right now) is judged by age only.
    """
    if age_s > stale_after_s:
        return True
    if not holder or "pid" not in holder:
        return False
    return holder.get("host") == hostname and not alive(int(holder["pid"]))


class RetrainLock:
    """An O_EXCL lock file that keeps two retrains of one model from overlapping, with stale-lock takeover.

    Creation is atomic (O_CREAT|O_EXCL), so exactly one process gets a free lock. Taking over a stale lock is
    serialised by flock on a side file and re-checks staleness inside it, so two processes that both found
    the same dead holder cannot remove each other's fresh lock. Works on one host or a shared file system.
    """

    def __init__(self, path: Path, stale_after_s: float) -> None:
        self.path = Path(path)
        self.stale_after_s = stale_after_s
        self.hostname = socket.gethostname()
        self._token: str | None = None

    def read_holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        token = uuid.uuid4().hex
        for attempt in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if attempt == 0 and self._remove_if_stale():
                    continue
                holder = self.read_holder() or {}
                raise RetrainLockedError(
                    f"another retrain holds {self.path} (pid {holder.get('pid', '?')} on {holder.get('host', '?')} "
                    f"since {holder.get('started', '?')}); it is taken over once older than "
                    f"retrain.lock_stale_seconds={self.stale_after_s:g}"
                ) from None
            with os.fdopen(fd, "w") as handle:
                json.dump({"pid": os.getpid(), "host": self.hostname, "token": token,
                           "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}, handle)
            self._token = token
            return

    def _remove_if_stale(self) -> bool:
        with open(self.path.with_name(self.path.name + ".guard"), "a") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            try:
                age = time.time() - self.path.stat().st_mtime
            except FileNotFoundError:
                return True  # released meanwhile: try again
            holder = self.read_holder()
            if not lock_is_stale(holder, age_s=age, stale_after_s=self.stale_after_s, hostname=self.hostname):
                return False
            if not self._is_lock_file(holder):
                raise RetrainLockedError(
                    f"{self.path} is not a retrain lock (no pid/host/token), and taking the lock would delete it: "
                    f"move or delete it yourself")
            self.path.unlink(missing_ok=True)
            return True

    def _is_lock_file(self, holder: dict | None) -> bool:
        """A lock `acquire` wrote: its three keys, or empty (a holder killed between creating and writing it)."""
        if holder is not None:
            return {"pid", "host", "token"} <= holder.keys()
        try:
            return self.path.stat().st_size == 0
        except FileNotFoundError:
            return True

    def release(self) -> None:
        if self._token is not None and (self.read_holder() or {}).get("token") == self._token:
            self.path.unlink(missing_ok=True)
        self._token = None

    def __enter__(self) -> "RetrainLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


# --------------------------------------------------------------------------- data selection


def utc_day(timestamp: int) -> str:
    return datetime.fromtimestamp(int(timestamp), tz=timezone.utc).strftime("%Y-%m-%d")


def utc_iso(timestamp: int) -> str:
    return datetime.fromtimestamp(int(timestamp), tz=timezone.utc).isoformat(timespec="seconds")


def holdout_start(timestamps: np.ndarray, fraction: float) -> int | None:
    """Unseen interaction times [M] -> T: the window [T, newest] holds their newest `fraction` (at least one).

    Interactions tied at T all fall in the window; T is moved later if that would leave nothing before it.
    None when no split is possible (fewer than two distinct times).
    """
    ordered = np.sort(np.asarray(timestamps, dtype=np.int64))
    if len(ordered) < 2 or ordered[0] == ordered[-1]:
        return None
    held_out = max(1, math.ceil(fraction * len(ordered)))
    start = ordered[len(ordered) - held_out]
    if start == ordered[0]:
        start = ordered[ordered > ordered[0]][0]
    return int(start)


def concat_examples(*parts: Examples) -> Examples:
    return Examples(*(np.concatenate([getattr(p, name) for p in parts]) for name in
                      ("user", "history", "target", "timestamp", "rating")))


def incremental_splits(interactions: pd.DataFrame, *, max_history: int, trained_through: int, holdout_from: int,
                       replay_ratio: float, seed: int = 0) -> Splits:
    """Interactions (old and new) -> train: targets in (trained_through, holdout_from) + a replay sample of
    older targets; test (and validation): targets at or after holdout_from. Every history is the full
    preceding one, whatever its age."""
    by_time = time_split(interactions, max_history, holdout_from)
    before = concat_examples(by_time.train, by_time.validation)
    new = before.subset(before.timestamp > trained_through)
    old = before.subset(before.timestamp <= trained_through)
    replay_count = min(len(old), int(round(replay_ratio * len(new))))
    rng = np.random.default_rng(seed)
    replay = old.subset(np.sort(rng.choice(len(old), size=replay_count, replace=False)))
    # The gate's window doubles as validation: the loop's val_ metrics then show the gate's view per epoch.
    return Splits(train=concat_examples(new, replay), validation=by_time.test, test=by_time.test)


def _previous_day(day: str) -> str:
    return (datetime.strptime(day, "%Y-%m-%d") - timedelta(days=1)).strftime("%Y-%m-%d")


def read_for_retrain(prepared: Path, trained_through: int, max_users: int = 0) -> pd.DataFrame:
    """Day partitions from the watermark's day on (whole rows), older ones as id columns only -> one frame."""
    first_day = utc_day(trained_through)
    recent = read_interactions(prepared, after_day=_previous_day(first_day))
    older_dirs = [d for d in sorted((prepared / INTERACTIONS_DIR).glob("dt=*")) if d.name.split("=", 1)[1] < first_day]
    frames = [pq.read_table(d, columns=ID_COLUMNS).to_pandas() for d in older_dirs]
    frames.append(recent[ID_COLUMNS] if len(recent) else pd.DataFrame(columns=ID_COLUMNS))
    frame = pd.concat(frames, ignore_index=True)
    for column in ("user_index", "item_index", "timestamp", "row_order"):
        frame[column] = frame[column].astype(np.int64)
    if max_users:
        frame = frame[frame.user_index < max_users]
    return frame.reset_index(drop=True)


# --------------------------------------------------------------------------- promotion gate


@dataclass(frozen=True)
class PromotionDecision:
    promote: bool
    metric: str
    champion_score: float
    challenger_score: float
    margin: float
    reason: str

    def tags(self) -> dict[str, str]:
        return {
            "gate.decision": "promoted" if self.promote else "rejected",
            "gate.metric": self.metric,
            "gate.margin": repr(self.margin),
            "gate.champion_score": repr(self.champion_score),
            "gate.challenger_score": repr(self.challenger_score),
            "gate.reason": self.reason,
        }


def decide_promotion(champion_score: float, challenger_score: float, *, metric: str, margin: float) -> PromotionDecision:
    """Promote iff the challenger is no worse than the champion by more than `margin` (higher is better)."""
    if math.isnan(challenger_score):
        promote, reason = False, "challenger score is NaN"
    elif math.isnan(champion_score):
        promote, reason = True, "champion score is NaN"
    elif challenger_score >= champion_score - margin:
        promote, reason = True, f"{challenger_score:.6f} >= {champion_score:.6f} - {margin:g}"
    else:
        promote, reason = False, f"{challenger_score:.6f} < {champion_score:.6f} - {margin:g}"
    return PromotionDecision(promote, metric, float(champion_score), float(challenger_score), margin, reason)


# --------------------------------------------------------------------------- the retrain


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
        train=replace(job.train, epochs=job.retrain.epochs, max_steps_per_epoch=job.retrain.steps,
                      run_name=run_name, init_checkpoint=str(champion_checkpoint)),
    )


def run_retrain(job: "JobConfig", log: Callable[[str], None] = print, prepare: bool = False) -> RetrainOutcome:
    """One incremental retrain of `tracking.registered_model` (see the module docstring).

    prepare: first re-prepare `data.raw_dir` into `data.prepared_dir` (under the lock), so that one scheduled
        command picks up the raw data that arrived since the last run.
    """
    from jobs.overrides import ConfigError
    from pipeline.sources import ITEMS_FILE, load_manifest, prepare_dataset
    from training.offline_eval import job_config_of, read_checkpoint_state
    from training.registry import CHALLENGER, CHAMPION, ModelRegistry, RegistryError
    from training.tracking import resolve_tracking_uri

    cfg = job.retrain
    try:
        check_gate_metric(cfg.metric, job.train.eval_ks)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    prepared = Path(job.data.prepared_dir).resolve()
    registry = ModelRegistry(resolve_tracking_uri(job.tracking), job.tracking.registered_model,
                             job.train.storage_path)
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
        if not (champion.checkpoint_path / "model.pt").is_file():
            raise RegistryError(f"champion v{champion.version} points at {champion.checkpoint_path}, which holds no "
                                f"model.pt: checkpoints must live on storage the job's driver can read")
        last = registry.get(CHALLENGER)
        seen_through = max(champion.data_watermark, last.data_watermark if last else 0)
        log(f"[retrain] champion v{champion.version}: trained through {utc_iso(champion.trained_through)}; "
            f"data seen through {utc_iso(seen_through)}; prepared data through {utc_iso(manifest['watermark'])}")
        if manifest["watermark"] <= seen_through:
            return RetrainOutcome("noop", f"nothing newer than the watermark {utc_iso(seen_through)}: nothing to do",
                                  champion)

        champion_job = job_config_of(read_checkpoint_state(champion.checkpoint_path))
        frame = read_for_retrain(prepared, champion.trained_through, job.data.max_users)
        unseen = frame.timestamp.to_numpy()[frame.timestamp.to_numpy() > seen_through]
        holdout_from = holdout_start(unseen, cfg.holdout_fraction)
        if len(unseen) < cfg.min_new_interactions or holdout_from is None:
            return RetrainOutcome("waiting", f"only {len(unseen)} new interactions for this model's users "
                                  f"(retrain.min_new_interactions={cfg.min_new_interactions}): waiting for more data",
                                  champion)
        splits = incremental_splits(frame, max_history=champion_job.data.max_history,
                                    trained_through=champion.trained_through,
                                    holdout_from=holdout_from, replay_ratio=cfg.replay_ratio, seed=cfg.seed)
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
        f"({cfg.epochs} x <= {cfg.steps} steps)")
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

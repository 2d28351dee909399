"""The driver side of a training run: data -> examples -> MLflow run -> memory bank -> TorchTrainer -> results.

Runs locally (starts a local Ray sized for this machine) or inside `ray job submit` (joins the cluster through
RAY_ADDRESS), with no code change.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import ray
import ray.data
from ray.train import CheckpointConfig, DataConfig, FailureConfig, Result, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from training.job_config import JobConfig
from training.overrides import ConfigError, flatten
from memory.client import create_memory_bank
from pipeline.content import decoded_catalog_bytes, write_examples
from pipeline.owned_dirs import check_no_overlap, require_replaceable
from pipeline.sequences import ColdStartSplits, Examples, Splits, item_popularity, seen_items, window_examples
from pipeline.sources import ITEMS_FILE, REPORT_FILE, load_manifest, report_metrics
from pipeline.splits import build_splits
from pipeline.stages import catalog_dataset, decoded_catalog_dataset, train_dataset
from model.build import build_recommender
from training.bank_fill import fill_actor_count, fill_bank
from training.checkpoint import read_state
from training.evaluate import popularity_metrics, write_size_report
from training.gallery import GALLERY_DIR, GALLERY_USERS, write_gallery
from training.loop import RefitPlan, train_loop_per_worker
from training.trunk_cache import trunk_cache_plan
from training.trainer import (SELECTION_SCORE, StepCallback, check_catalogue_mode, check_encode_fraction, check_targets,
                              exact_catalogue)
from training.offline_eval import content_spec_of, trained_items_of
from training.tracking import Tracker

MEMORY_NAMESPACE = "mmrec"
RUN_MARKER = "mmrec_run.json"  # written into every run directory this driver creates
RUN_WHAT = "a training run directory of this product (mmrec_run.json)"


def is_run_dir(path: Path) -> bool:
    """A run directory this product made: its marker, or (runs from before the marker) its examples or Ray's
    checkpoint snapshot."""
    return any((path / name).is_file()
               for name in (RUN_MARKER, "data/train.parquet", "checkpoint_manager_snapshot.json"))


def claim_run_dir(run_dir: Path, *, prepared_dir: Path, raw_dir: Path) -> None:
    """Make sure `run_dir` is ours before anything is written into it (`UnsafePathError` otherwise).

    Ray Train's keep-last-N rotation deletes only the `checkpoint_*` folders its own snapshot in this directory
    lists, and this driver overwrites only `data/` files it wrote; so the one thing to guard is which directory
    `train.storage_path` / `train.run_name` name: new, empty, or a run of ours (resumed), and apart from the data.
    """
    for other, what in ((prepared_dir, "the prepared data data.prepared_dir"), (raw_dir, "the raw data data.raw_dir")):
        check_no_overlap(run_dir, other, what="the run directory train.storage_path/train.run_name", other_what=what)
    require_replaceable(run_dir, is_run_dir, RUN_WHAT, "written into")
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / RUN_MARKER).exists():
        (run_dir / RUN_MARKER).write_text(json.dumps({"written_by": "mmrec.train", "run_name": run_dir.name}))


@dataclass
class TrainingOutcome:
    run_name: str
    run_dir: Path
    mlflow_run_id: str
    tracking_uri: str
    metrics: dict  # the best checkpoint's (by validation): what is reported and registered
    baseline: dict
    checkpoint_path: str | None  # the best checkpoint
    last_metrics: dict = field(default_factory=dict)  # the last epoch's report (how the run ended)
    selection: "TrainingOutcome | None" = None  # with train.refit: the run that picked the refit's epochs


def init_ray(num_cpus: int | None = None) -> None:
    """Join a cluster when RAY_ADDRESS is set (ray job submit), else start a local Ray for this machine."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address="auto", logging_level="WARNING")
    else:
        # No dashboard on a local run (it costs seconds and memory); its state API is then absent, and Ray Train's
        # placement-group cleaner would warn about that every second of the run: `_quiet_state_api_warnings`.
        ray.init(num_cpus=num_cpus or max(os.cpu_count() or 2, 2), include_dashboard=False, logging_level="WARNING",
                 runtime_env={"worker_process_setup_hook": _quiet_state_api_warnings})


def _quiet_state_api_warnings() -> None:
    """Runs in every worker of a local (dashboard-less) Ray: silence the cleaner's "State API unavailable" line."""
    import logging

    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


def quiet_ray_data() -> None:
    """Our own progress lines replace Ray Data's per-operator bars, which flood logs of non-interactive jobs."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.enable_operator_progress_bars = False


def _use_gpu(job: JobConfig) -> bool:
    if job.train.use_gpu == "auto":
        return ray.cluster_resources().get("GPU", 0) >= 1
    return job.train.use_gpu == "true"


def check_cluster_fits(job: JobConfig, use_gpu: bool) -> None:
    """Fail fast when the workers asked for exceed the whole cluster (Ray Train would wait for them forever).

    Compares with the resources of the nodes up now: on an autoscaling cluster, start enough nodes first.
    """
    have = ray.cluster_resources()
    workers = job.train.num_workers
    asks = {"CPU": (workers * job.train.cpus_per_worker, f"train.cpus_per_worker={job.train.cpus_per_worker}")}
    if use_gpu:
        asks["GPU"] = (float(workers), "1 GPU each")
    for resource, (need, each) in asks.items():
        if need > have.get(resource, 0.0) + 1e-9:
            raise ConfigError(
                f"train.num_workers={workers} x {each} needs {need:g} {resource} but the Ray cluster has "
                f"{have.get(resource, 0.0):g}; lower train.num_workers (or train.cpus_per_worker, train.use_gpu)"
            )


def ordered_ingest() -> ray.data.ExecutionOptions:
    """Ray Train's ingest options with the row order kept. The seeded shuffle (`train_dataset(seed=...)`) then
    reaches the workers in the same order in every run of a seed; otherwise blocks may stream in the order their
    tasks finish. (Before the shuffle was seeded, two runs of one config and seed differed by up to 0.005
    NDCG@10: BENCHMARKS.md.)"""
    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return options


def run_training(job: JobConfig, log=print, splits: Splits | None = None,
                 callbacks: Sequence[StepCallback] = ()) -> TrainingOutcome:
    """Train one run, and with `train.refit` a second one on its training and validation examples together (the
    outcome is then the refit's, the selection run's in its `selection`). `splits` overrides the examples built
    from the prepared data (incremental retraining); `callbacks` run in every worker before each step (tests inject
    faults with `training.faults`)."""
    if job.train.refit and splits is not None:
        raise ConfigError("train.refit retrains on the job's own split (jobs.train); it takes no given examples")
    run_name = job.train.run_name or f"{job.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    selection = _run(job, run_name, log, splits, callbacks)
    if not job.train.refit:
        return selection
    if selection.checkpoint_path is None:
        raise RuntimeError(f"train.refit: the selection run {run_name} kept no checkpoint to take its epochs from")
    plan = refit_plan(selection)
    log(f"[train] refit: {plan.epochs} epoch(s) (the selection run's best) on the training and validation examples "
        f"together" + (f", the rates dropped after epoch(s) {', '.join(str(d + 1) for d in plan.drop_epochs)}"
                       if plan.drop_epochs else ""))
    prepared = Path(job.data.prepared_dir).resolve()
    refit_job = dataclasses.replace(job, train=dataclasses.replace(job.train, refit=False,
                                                                    run_name=f"{run_name}-refit"))
    outcome = _run(refit_job, refit_job.train.run_name, log, build_splits(job.data, prepared, train_on_validation=True),
                   callbacks, refit=plan)
    outcome.selection = selection
    return outcome


def refit_plan(selection: TrainingOutcome) -> RefitPlan:
    """The selection run's best epoch (1-based: the epochs a refit trains) and the rate drops before it, from its
    best checkpoint."""
    state = read_state(selection.checkpoint_path)
    best = int(state["epoch"]) + 1
    drops = state.get("early_stopping", {}).get("drop_epochs", [])
    return RefitPlan(epochs=best, drop_epochs=tuple(int(d) for d in drops if d < best - 1),
                     selection_run_id=selection.mlflow_run_id)


def _run(job: JobConfig, run_name: str, log, splits: Splits | None, callbacks: Sequence[StepCallback],
         refit: RefitPlan | None = None) -> TrainingOutcome:
    prepared = Path(job.data.prepared_dir).resolve()
    manifest = load_manifest(prepared)
    num_items = manifest["num_items"]
    storage = Path(job.train.storage_path).resolve()
    run_dir = storage / run_name
    claim_run_dir(run_dir, prepared_dir=prepared, raw_dir=Path(job.data.raw_dir).resolve())
    work = run_dir / "data"
    work.mkdir(parents=True, exist_ok=True)

    splits = splits if splits is not None else build_splits(job.data, prepared)
    log(f"[train] examples: train={len(splits.train)} validation={len(splits.validation)} test={len(splits.test)} "
        f"items={num_items}" + (" (a refit: the validation examples train too)" if refit else ""))
    if len(splits.train) == 0 or len(splits.test) == 0:
        raise ValueError("no training or test examples: check data.max_users / data.split")
    paths = {
        "validation": str(write_examples(splits.validation, work / "validation.parquet")),
        "test": str(write_examples(splits.test, work / "test.parquet")),
    }
    if isinstance(splits, ColdStartSplits):  # the loop also reports test_warm_* and test_cold_* metrics
        for name, subset in (("test_warm", splits.test_warm), ("test_cold", splits.test_cold)):
            if len(subset):  # for reading a run afterwards (bench.paired, bench.new_item_boost)
                write_examples(subset, work / f"{name}.parquet")
        # the loop scores both from its pass over the test set: which of its rows have a cold target
        np.save(work / "test_cold_rows.npy", np.isin(splits.test.target, splits.cold_items))
        paths["test_cold_rows"] = str(work / "test_cold_rows.npy")
        log(f"[train] cold start: {len(splits.cold_items)} items held out of training; "
            f"test users with a warm target {len(splits.test_warm)}, with a cold target {len(splits.test_cold)}")
    stream = splits.train
    if job.train.targets == "all":  # every history position is a loss term: non-overlapping windows suffice
        stream = window_examples(splits.train)
        log(f"[train] train.targets=all: {len(stream)} windows of up to {job.data.max_history + 1} interactions "
            f"stand for the {len(splits.train)} training examples")
    train_path = write_examples(stream, work / "train.parquet")
    popularity = item_popularity(splits.train, num_items)
    np.save(work / "popularity.npy", popularity)
    paths["popularity"] = str(work / "popularity.npy")
    seen = seen_items(splits.train, num_items)
    if job.train.init_checkpoint:  # what the checkpoint trained on stays trained (a retrain's replay is a sample)
        inherited = trained_items_of(job.train.init_checkpoint, num_items)
        if inherited is not None:
            seen |= inherited
    np.save(work / "seen.npy", seen)
    paths["seen"] = str(work / "seen.npy")
    if job.model.unseen_from_content and not seen[1:].all():
        log(f"[train] {int((~seen[1:]).sum())} items in no training example: scored by their content alone "
            f"(model.unseen_from_content)")

    tags = {"preset": job.preset, "config_hash": job.config_hash()}
    if refit is not None:  # what it retrains (the selection run) and for how long
        tags.update({"refit_of": refit.selection_run_id, "refit_epochs": str(refit.epochs)})
    tracker = Tracker.start(job.tracking, run_name, tags=tags)
    tracker.log_params(flatten(job.to_dict()))
    tracker.log_dict(job.to_dict(), "config.json")
    if (prepared / REPORT_FILE).exists():
        data_report = json.loads((prepared / REPORT_FILE).read_text())
        tracker.log_dict(data_report, "data_report.json")
        tracker.log_metrics(report_metrics(data_report))  # data.images_corrupt, data.bad_item_fraction, ...
    log(f"[train] MLflow run {tracker.run_id} at {tracker.tracking_uri}")

    init_ray()
    quiet_ray_data()
    status = "FAILED"
    bank = None
    try:
        check_cluster_fits(job, _use_gpu(job))
        bank = create_memory_bank(
            name=f"bank-{run_name}", capacity=num_items + 1, dim=job.model.dim, num_shards=job.memory.num_shards,
            namespace=MEMORY_NAMESPACE,
        )
        spec = content_spec_of(job)
        items_path = prepared / ITEMS_FILE
        # Decoded catalogue content never changes: when materialised it is decoded once and re-encoded every pass.
        started = time.perf_counter()
        # an ID-only model never reads item content: its catalogue dataset stays lazy and is never run
        materialize = job.data.materialize_catalog and bool(job.model.modalities)
        in_driver = materialize and decoded_catalog_bytes(num_items, spec) <= job.data.driver_decode_max_mb * 2**20
        if in_driver:
            catalog = decoded_catalog_dataset(items_path, job.data, spec, job.train.eval_batch_size)
        else:
            catalog = catalog_dataset(items_path, job.data, spec, job.train.eval_batch_size)
            if materialize:
                catalog = catalog.materialize()
        if materialize:
            log(f"[train] catalogue decoded once ({num_items} items, {'in the driver' if in_driver else 'Ray Data'})"
                f" in {time.perf_counter() - started:.1f}s")
        cache_plan = trunk_cache_plan(job, items_path, spec, num_items)
        log(f"[train] {cache_plan.describe()}")
        check_catalogue_mode(job, cache_plan.enabled, cache_plan.reason)
        exact = exact_catalogue(job, cache_plan.enabled)
        loss = job.model.resolved_loss(num_items, exact)
        log(f"[train] loss: {loss}" + (" (model.loss=auto)" if job.model.loss == "auto" else ""))
        check_targets(job, loss, exact)
        check_encode_fraction(job, loss, exact)
        tracker.log_params({"model.loss_resolved": loss})
        tracker.log_metrics({"trunk_cache_enabled": float(cache_plan.enabled),
                             "trunk_cache_mb": cache_plan.total_bytes / 2**20})
        datasets = {
            # with the trunk cache (or no content at all) the training stream carries ids only
            "train": train_dataset(train_path, items_path, job.data, spec, job.train.batch_size,
                                   with_history_content=job.memory.mode == "recompute",
                                   decode=bool(job.model.modalities) and not cache_plan.enabled,
                                   seed=job.train.seed),
            "catalog": catalog,
        }
        bank_prefilled = False
        init_model = work / "init_model.pt"
        resuming = (run_dir / "checkpoint_manager_snapshot.json").exists()  # Ray Train resumes this run's name
        if job.memory.fill_with_ray_data and not job.train.init_checkpoint and not resuming:
            # The run's initial weights, shared by the fill pass and the workers (which load them on a fresh start).
            torch.manual_seed(job.train.seed)
            initial = build_recommender(job.model, job.image, job.text, num_items=num_items,
                                        max_history=job.data.max_history)
            torch.save(initial.state_dict(), init_model)
            actors = fill_actor_count(job.memory.fill_actors, job.data.decode_cpus)
            written, seconds = fill_bank(catalog, job_dict=job.to_dict(), state_path=init_model, num_items=num_items,
                                         bank=bank, actors=actors, cpus_per_actor=job.data.decode_cpus,
                                         batch_size=job.train.eval_batch_size)
            bank_prefilled = True
            log(f"[train] memory bank filled by a Ray Data pass: {written} items, {actors} actor(s), {seconds:.1f}s")
        use_gpu = _use_gpu(job)
        # Ray Train 2.60 reroutes a worker's print() into its logger and, when stdout is wrapped, also prints it:
        # every progress line reached the driver twice. Plain prints (Ray forwards worker stdout) say it once.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                "job": job.to_dict(),
                "paths": paths,
                "num_items": num_items,
                "num_train_examples": len(stream),
                "bank": bank,
                "tracking_uri": tracker.tracking_uri,
                "mlflow_run_id": tracker.run_id,
                "watermark": manifest["watermark"],
                "callbacks": list(callbacks),
                "bank_prefilled": bank_prefilled,
                "trunk_cache": cache_plan.enabled,
                "init_model": str(init_model) if bank_prefilled else "",
                "refit": None if refit is None else dataclasses.asdict(refit),
            },
            scaling_config=ScalingConfig(
                num_workers=job.train.num_workers,
                use_gpu=use_gpu,
                resources_per_worker={"CPU": job.train.cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
            ),
            run_config=RunConfig(
                name=run_name,
                storage_path=str(storage),
                # the best checkpoints by validation are kept (Ray keeps the latest too, for resuming)
                checkpoint_config=CheckpointConfig(num_to_keep=job.train.keep_checkpoints,
                                                   checkpoint_score_attribute=SELECTION_SCORE,
                                                   checkpoint_score_order="max"),
                failure_config=FailureConfig(max_failures=job.train.max_failures),
            ),
            datasets=datasets,
            dataset_config=DataConfig(datasets_to_split=["train"], execution_options=ordered_ingest()),
        )
        result: Result = trainer.fit()
        best_checkpoint, metrics = best_of(result, SELECTION_SCORE)
        baseline = popularity_metrics(popularity, splits.test, ks=job.train.eval_ks, mask_history=job.train.eval_mask_history)
        tracker.log_metrics({f"baseline_popularity_test_{k}": v for k, v in baseline.items()})
        if isinstance(splits, ColdStartSplits):
            for name, subset in (("test_warm", splits.test_warm), ("test_cold", splits.test_cold)):
                if len(subset):
                    subset_baseline = popularity_metrics(popularity, subset, ks=job.train.eval_ks,
                                                         mask_history=job.train.eval_mask_history)
                    tracker.log_metrics({f"baseline_popularity_{name}_{k}": v for k, v in subset_baseline.items()})
        for path in write_size_report(metrics, run_dir / "matryoshka"):  # size x metric table + plot (Matryoshka)
            tracker.log_artifact(path, "matryoshka")
        checkpoint_path = best_checkpoint.path if best_checkpoint else None
        if checkpoint_path and not job.train.refit:  # a refit follows: its gallery is the one of the kept model
            log_gallery(tracker, Path(checkpoint_path), prepared, splits.test, run_dir / GALLERY_DIR, log=log)
        tracker.set_tags({"checkpoint_path": str(checkpoint_path), "watermark": str(manifest["watermark"]),
                          "matryoshka_sizes": ",".join(map(str, job.model.supported_sizes))})
        status = "FINISHED"
        return TrainingOutcome(run_name, run_dir, tracker.run_id, tracker.tracking_uri, metrics, baseline, checkpoint_path,
                               dict(result.metrics or {}))
    finally:
        tracker.finish(status)
        if bank is not None:
            bank.destroy()


def log_gallery(tracker: Tracker, checkpoint: Path, prepared: Path, test: Examples, out_dir: Path,
                log=print) -> None:
    """The recommendation gallery of the best checkpoint -> the run's gallery/ artifacts. A gallery that cannot be
    drawn (a poster library fault, a full disk) costs the run its gallery only: one line and a tag, not the run."""
    started = time.perf_counter()
    try:
        paths = write_gallery(checkpoint, prepared, test, out_dir)
        for path in paths:
            tracker.log_artifact(path, GALLERY_DIR)
    except Exception as err:  # noqa: BLE001 -- see the docstring
        reason = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"[:300]
        tracker.set_tags({"gallery_error": reason})
        log(f"[train] recommendation gallery skipped: {reason}")
        return
    log(f"[train] recommendation gallery ({GALLERY_USERS} test users) logged as {GALLERY_DIR}/index.html "
        f"in {time.perf_counter() - started:.1f}s")


def best_of(result: Result, metric: str):
    """The kept checkpoint with the highest `metric` and its metrics (the latest's when none reported it)."""
    scored = [(c, m) for c, m in (result.best_checkpoints or []) if m.get(metric) is not None]
    if not scored:
        return result.checkpoint, dict(result.metrics or {})
    checkpoint, metrics = max(scored, key=lambda pair: pair[1][metric])
    return checkpoint, dict(metrics)


def format_results(outcome: TrainingOutcome, ks: tuple[int, ...], mask_history: bool) -> str:
    """The best checkpoint's test metrics beside most-popular's, headline protocol first, then the other one."""
    names = [f"recall@{k}" for k in ks] + [f"ndcg@{k}" for k in ks] + ["mrr"]
    other = "unmasked" if mask_history else "masked"
    lines = [f"{'metric':<12} {'model':>10} {'popularity':>11} {f'model, {other}':>17}"]
    for name in names:
        model_value = outcome.metrics.get(f"test_{name}", float("nan"))
        lines.append(f"{name:<12} {model_value:>10.4f} {outcome.baseline.get(name, float('nan')):>11.4f} "
                     f"{outcome.metrics.get(f'test_{other}_{name}', float('nan')):>17.4f}")
    return "\n".join(lines)

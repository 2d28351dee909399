"""`train_loop_per_worker`: what every Ray Train worker runs, the glue between Ray Train and `training.trainer`.

It takes this worker's shards, restores where the attempt starts (`training.checkpoint.restore`), wraps the model
in DDP and runs the trainer's epochs. After each epoch rank 0 runs one catalogue pass (fresh vectors for every
item), which both evaluates and refreshes the bank, and reports a checkpoint (model, optimizer, config,
watermark, bank snapshot). Every rank calls `ray.train.report` (a barrier); only rank 0 writes checkpoints and
MLflow records.
"""
from __future__ import annotations

import math
import os
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import ray.train
import torch
import torch.distributed as dist

from encoders.fusion import slow_bf16
from pipeline.content import read_examples
from pipeline.sequences import Examples
from training.averaging import average_decay, load_trained_parameters
from training.checkpoint import BANK_DIR, restore, save_checkpoint
from training.job_config import JobConfig
from training.tracking import Tracker
from training.trainer import SELECTION_SCORE, EarlyStopping, EpochStats, Trainer, build_trainer


@dataclass
class WorkerPaths:
    validation: Path
    test: Path
    popularity: Path
    seen: Path | None = None  # [N+1] bool: the items in a training example (model.unseen_from_content)
    # cold-start runs (data.cold_item_fraction > 0): [len(test)] bool, the test rows whose target is cold
    test_cold_rows: Path | None = None


@dataclass(frozen=True)
class RefitPlan:
    """A refit (`train.refit`): the selection run's epochs up to its best one, retrained from scratch on the
    training and validation examples together, with the selection run's learning-rate schedule replayed (the
    cosine over the same `train.epochs`, plateau's drops after the same epochs). Its last epoch is kept: no
    validation is left to pick another."""

    epochs: int  # epochs to train: the selection run's best (1-based)
    drop_epochs: tuple[int, ...] = ()  # 0-based epochs at whose end the selection run's rates dropped
    selection_run_id: str = ""  # the selection run's MLflow run

    def lr_drops_before(self, epoch: int) -> int:
        """The rate drops in force while epoch `epoch` (0-based) trains."""
        return sum(1 for dropped in self.drop_epochs if dropped < epoch)


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def log(line: str) -> None:
    print(line, flush=True)  # Ray forwards a worker's stdout to the driver


def train_loop_per_worker(loop_config: dict) -> None:
    job = JobConfig.from_dict(loop_config["job"])
    paths = WorkerPaths(**{k: Path(v) for k, v in loop_config["paths"].items()})
    num_items, bank = loop_config["num_items"], loop_config["bank"]  # the bank client reconnects by name
    refit = RefitPlan(**loop_config["refit"]) if loop_config.get("refit") else None
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(world, 1)))  # the node's cores / workers
    torch.manual_seed(job.train.seed)
    np.random.seed(job.train.seed + rank)
    device = ray.train.torch.get_device()
    if job.model.encoder_precision == "bf16" and rank == 0 and (why := slow_bf16(device)):
        log(f"[train] warning: model.encoder_precision=bf16, but {why}: the encoders will run slower than in fp32")
    trainer = build_trainer(job, num_items, np.load(paths.popularity), bank, device=device,
                            callbacks=loop_config.get("callbacks", ()), trunk_cache=loop_config.get("trunk_cache", False),
                            seen=np.load(paths.seen) if paths.seen is not None else None)
    checkpoint = ray.train.get_checkpoint()
    with checkpoint.as_directory() if checkpoint is not None else nullcontext() as resume_dir:
        restored = restore(trainer, resume_dir=Path(resume_dir) if resume_dir else None,
                           init_checkpoint=job.train.init_checkpoint, init_model=loop_config.get("init_model", ""),
                           bank_prefilled=bool(loop_config.get("bank_prefilled")), rank=rank, log=log)
    trainer.module = ray.train.torch.prepare_model(trainer.model)

    tracker = Tracker(loop_config["tracking_uri"], loop_config["mlflow_run_id"]) if rank == 0 else None
    validation = read_examples(paths.validation)
    # rank 0 scores the test set at every new best: its examples and, in cold-start runs, its warm / cold rows
    test: tuple[Examples, dict[str, np.ndarray]] | None = None
    if rank == 0:
        cold = None if paths.test_cold_rows is None else np.load(paths.test_cold_rows)
        test = read_examples(paths.test), {} if cold is None else {"warm": ~cold, "cold": cold}
    train_shard, catalog_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("catalog")
    steps_per_epoch = math.ceil(loop_config["num_train_examples"] / world / job.train.batch_size)
    if job.train.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, job.train.max_steps_per_epoch)

    def catalogue():
        return catalog_shard.iter_torch_batches(batch_size=job.train.eval_batch_size, device=device)

    if loop_config.get("trunk_cache"):  # every rank keeps its own copy; the catalogue shard is not split
        started = time.perf_counter()
        cache = trainer.build_trunk_cache(catalogue())
        if rank == 0:
            log(f"[train] frozen-trunk cache built: {num_items} items, {cache.nbytes / 2**20:.1f} MiB, "
                f"{time.perf_counter() - started:.1f}s")
    if not restored.bank_filled:
        if rank == 0:
            content = trainer.encode_catalogue(catalogue())
            trainer.refresh_bank(content, wait=True)
            log(f"[train] memory bank filled with {num_items} items")
        _barrier()

    trainer.total_steps = job.train.epochs * steps_per_epoch  # warm-up + train.schedule over the planned run
    if job.train.average_epochs > 0:
        trainer.start_averaging(average_decay(job.train.average_epochs, steps_per_epoch), restored.trained_weights)
    elif restored.trained_weights is not None:  # resumed without averaging: on from the trained weights
        load_trained_parameters(trainer.model, restored.trained_weights)
    early = EarlyStopping(0 if refit else job.train.patience, job.train.selection_window, **restored.early_stopping)
    trainer.lr_multiplier = early.lr_multiplier  # every rank reads the same checkpoint
    for epoch in range(restored.start_epoch, refit.epochs if refit else job.train.epochs):
        if early.should_stop:  # resumed from the checkpoint that ended the run: nothing is left to train
            break
        if refit is not None:  # the selection run's drops, at the same epochs
            early.lr_drops = refit.lr_drops_before(epoch)
            trainer.lr_multiplier = early.lr_multiplier
        batches = train_shard.iter_torch_batches(batch_size=job.train.batch_size, device=device, drop_last=False)
        stats = trainer.train_epoch(batches, steps_per_epoch, catalogue=catalogue if rank == 0 else None,
                                    log=progress_printer(job, epoch, steps_per_epoch) if rank == 0 else None)
        _barrier()
        metrics = {"epoch": epoch + 1, "global_step": trainer.global_step, **stats.metrics(world),
                   # how this attempt started: epochs already done in the checkpoint it resumed from (0 = scratch)
                   "resumed_from_epoch": restored.start_epoch if restored.resumed else 0,
                   "bank_restored": float(restored.bank_filled and restored.resumed),
                   "bank_restored_exact": float(restored.bank_exact),
                   "bank_filled_by_ray_data": float(restored.filled_by_ray_data)}
        if rank == 0:
            end_of_epoch(trainer, early, metrics, catalogue, validation, test, loop_config, epoch, tracker, refit)
        else:
            ray.train.report(metrics)
        # rank 0 alone evaluates: its plateau drops of the learning rate apply on every rank
        early.lr_drops = _rank_zero_value(early.lr_drops, device)
        trainer.lr_multiplier = early.lr_multiplier
        if _rank_zero_value(early.should_stop, device):
            if rank == 0:
                log(f"[train] early stop after epoch {epoch + 1}: best validation {job.train.selection_metric} "
                    f"(mean of {early.window} epochs) {early.best_score:.4f} at epoch {early.best_epoch + 1}")
            break


def progress_printer(job: JobConfig, epoch: int, steps_per_epoch: int):
    """About ten progress lines per epoch."""
    every = max(1, steps_per_epoch // 10)

    def progress(stats: EpochStats, step: int) -> None:
        if (step + 1) % every == 0 or step + 1 == steps_per_epoch:
            log(f"[train] epoch {epoch + 1}/{job.train.epochs} step {step + 1}/{steps_per_epoch} loss "
                f"{stats.mean_loss():.4f} {stats.samples / stats.seconds():.1f} samples/s data-wait "
                f"{stats.wait_fraction(stats.seconds()):.0%}")
    return progress


def end_of_epoch(trainer: Trainer, early: EarlyStopping, metrics: dict, catalogue, validation: Examples,
                 test: tuple[Examples, dict[str, np.ndarray]], loop_config: dict, epoch: int, tracker: Tracker,
                 refit: RefitPlan | None = None) -> None:
    """Rank 0: validation (and, when it is the best so far, the test set: its examples and its parts as row masks),
    the checkpoint, MLflow. With weight averaging all of it sees the averaged weights, and the checkpoint also
    keeps the trained ones. A refit keeps its last epoch: its selection score is the epoch, and only the last is
    tested (its validation examples are training examples there, so val_* says how well it fits them)."""
    job, bank = trainer.job, trainer.bank
    started = time.perf_counter()
    with trainer.end_epoch(catalogue, validation) as ended, tempfile.TemporaryDirectory() as tmp:
        metrics.update(ended.scores)
        started = _lap(metrics, "validation", started)  # the catalogue pass(es) and validation
        best = early.update(metrics[f"val_{job.train.selection_metric}"], epoch)
        if refit is not None:
            best = epoch + 1 == refit.epochs
        if best:  # the test sets are scored for every new best, so the best checkpoint carries its own test metrics
            metrics.update(trainer.evaluate_test(ended.content, *test))
        started = _lap(metrics, "test", started)  # ~0 when the epoch is no new best
        metrics.update({SELECTION_SCORE: early.selection_score, "best_epoch": early.best_epoch + 1,
                        f"{SELECTION_SCORE}_best": early.best_score,
                        "bank_fill_ratio": bank.stats()["fill_ratio"]})
        if refit is not None:
            metrics.update({SELECTION_SCORE: float(epoch + 1), "best_epoch": epoch + 1,
                            f"{SELECTION_SCORE}_best": float(epoch + 1)})
        log("[train] " + " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                  for k, v in metrics.items()))
        save_checkpoint(Path(tmp), trainer.model, trainer.optimizer, {
            "epoch": epoch, "global_step": trainer.global_step, "config": job.to_dict(),
            "watermark": loop_config["watermark"], "num_items": trainer.num_items,
            "mlflow_run_id": loop_config["mlflow_run_id"], "early_stopping": early.state(),
            "matryoshka_sizes": list(job.model.supported_sizes),  # the sizes this checkpoint serves
            "averaged_weights": ended.trained is not None,
            # the items in no training example: scored by content alone, model.new_item_offset added everywhere
            "unseen_items": None if trainer.unseen is None else (np.flatnonzero(trainer.unseen[1:]) + 1).tolist(),
            "refit": None if refit is None else asdict(refit),  # the plan, as the driver passed it
        }, trained=ended.trained)
        bank.save(Path(tmp) / BANK_DIR)
        started = _lap(metrics, "checkpoint", started)  # written to a temporary folder
        ray.train.report(dict(metrics), checkpoint=ray.train.Checkpoint.from_directory(tmp))
        _lap(metrics, "report", started)  # Ray Train persists the checkpoint (in MLflow, not in the report)
    log(f"[train] epoch {epoch + 1} ended: validation {metrics['validation_seconds']:.1f}s, test "
        f"{metrics['test_seconds']:.1f}s, checkpoint {metrics['checkpoint_seconds']:.1f}s, "
        f"report {metrics['report_seconds']:.1f}s")
    # Logged only once the epoch's checkpoint is persisted: a crash before that re-runs the epoch on resume,
    # and logging first would have recorded it twice in MLflow.
    tracker.log_metrics(metrics, step=epoch + 1)


def _lap(metrics: dict, phase: str, since: float) -> float:
    """metrics[`<phase>_seconds`] = the seconds since `since`; -> now (the next phase's start)."""
    now = time.perf_counter()
    metrics[f"{phase}_seconds"] = now - since
    return now


def _rank_zero_value(value: int, device: torch.device) -> int:
    """Rank 0's value (an int or a flag) on every rank (only rank 0 evaluates)."""
    if not (dist.is_available() and dist.is_initialized()):
        return int(value)
    tensor = torch.tensor([int(value)], device=device)
    dist.broadcast(tensor, src=0)
    return int(tensor.item())

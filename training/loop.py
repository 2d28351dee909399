"""`train_loop_per_worker`: what every Ray Train worker runs.

Per step: the batch's target items (decoded content from Ray Data) are encoded once each with gradients;
history items are read from the memory bank; fresh vectors replace stale ones within the step and are written
back after it. After each epoch rank 0 runs one catalogue pass (fresh vectors for every item), which both
evaluates and refreshes the bank, and reports a checkpoint (model, optimizer, config, watermark, bank snapshot).
Every rank calls `ray.train.report` (a barrier); only rank 0 writes checkpoints and MLflow records.
"""
from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray.train
import torch
import torch.distributed as dist
import torch.nn.functional as F

from training.job_config import JobConfig
from model.build import build_recommender, encoder_parameters
from model.losses import CTRLoss, FullSoftmaxLoss, SampledSoftmaxLoss
from model.losses import NestedSizesLoss
from model.recommender import Recommender
from pipeline.content import read_examples
from training.checkpoint import (BANK_DIR, MODEL_FILE, OPTIMIZER_FILE, load_model_weights, load_tensors, read_state,
                                 save_checkpoint, saved_bank_capacity)
from training.evaluate import encode_catalog, evaluate_ctr, evaluate_ranking
from training.tracking import Tracker

@dataclass
class WorkerPaths:
    validation: Path
    test: Path
    popularity: Path
    # cold-start runs (data.cold_item_fraction > 0): the test examples split by warm / cold target
    test_warm: Path | None = None
    test_cold: Path | None = None


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _unwrap(model: torch.nn.Module) -> Recommender:
    return model.module if hasattr(model, "module") else model


def _set_threads(job: JobConfig, world_size: int) -> None:
    threads = job.train.torch_threads or max(1, (os.cpu_count() or 1) // max(world_size, 1))
    torch.set_num_threads(threads)


def _make_loss(job: JobConfig, popularity: np.ndarray):
    if job.model.task == "ctr":
        return CTRLoss(job.model.temperature, job.model.ctr_contrastive_weight)
    if job.model.loss == "full_softmax":
        base = FullSoftmaxLoss(job.model.temperature)
    else:
        log_prob = None
        if job.model.logq_correction:
            smoothed = popularity + 1.0
            log_prob = torch.as_tensor(np.log(smoothed / smoothed.sum()), dtype=torch.float32)
        base = SampledSoftmaxLoss(job.model.temperature, item_log_prob=log_prob, num_items=len(popularity) - 1)
    if job.model.matryoshka_sizes:  # fMRLRec: the same loss at every nested size, weighted and summed
        return NestedSizesLoss(base, job.model.matryoshka_sizes, job.model.loss_weights)
    return base


def bank_matches_snapshot(bank, directory: Path) -> float:
    """After a restore: does the live bank hold exactly the snapshot's vectors and write steps?"""
    from memory.client import LocalMemoryBankClient

    if getattr(bank, "num_shards", 1) != 1:
        return float("nan")  # the in-process reference reads single-shard snapshots only
    reference = LocalMemoryBankClient(capacity=bank.capacity, dim=bank.dim)
    reference.load(directory)
    ids = np.arange(bank.capacity)
    live, saved = bank.lookup(ids), reference.lookup(ids)
    return float(np.array_equal(live.vectors, saved.vectors) and np.array_equal(live.written_step, saved.written_step))


def train_loop_per_worker(loop_config: dict) -> None:
    job = JobConfig.from_dict(loop_config["job"])
    paths = WorkerPaths(**{k: Path(v) for k, v in loop_config["paths"].items()})
    num_items: int = loop_config["num_items"]
    bank = loop_config["bank"]  # a picklable memory-bank client; reconnects to the actors by name
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    _set_threads(job, world)
    torch.manual_seed(job.train.seed)
    np.random.seed(job.train.seed + rank)
    device = ray.train.torch.get_device()

    model = build_recommender(job.model, job.image, job.text, num_items=num_items, max_history=job.data.max_history)
    optimizer = make_optimizer(model, job)
    popularity = np.load(paths.popularity)
    loss_fn = _make_loss(job, popularity)

    start_epoch, global_step, bank_filled, bank_exact = 0, 0, False, float("nan")
    filled_by_ray_data = False
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and job.train.init_checkpoint:
        # Warm start (incremental retraining): weights and bank from another run, a fresh optimizer and epochs.
        init_dir = Path(job.train.init_checkpoint)
        new_rows = load_model_weights(model, init_dir / MODEL_FILE)
        # A grown catalogue makes the old bank snapshot the wrong size; the fill pass below covers every item.
        if rank == 0 and (init_dir / BANK_DIR).exists() and saved_bank_capacity(init_dir / BANK_DIR) == bank.capacity:
            bank.load(init_dir / BANK_DIR)
        if rank == 0:
            print(f"[train] warm start from {init_dir}" + (f" ({new_rows} new item-id rows)" if new_rows else ""),
                  flush=True)
    if checkpoint is None and not job.train.init_checkpoint and loop_config.get("init_model"):
        # the driver's initial weights, which its Ray Data pass used to fill the bank
        model.load_state_dict(load_tensors(loop_config["init_model"]))
        bank_filled = bool(loop_config.get("bank_prefilled"))
    filled_by_ray_data = bank_filled and checkpoint is None
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            ckpt_dir = Path(ckpt_dir)
            model.load_state_dict(load_tensors(ckpt_dir / MODEL_FILE))
            optimizer.load_state_dict(load_tensors(ckpt_dir / OPTIMIZER_FILE))
            state = read_state(ckpt_dir)
            start_epoch, global_step = state["epoch"] + 1, state["global_step"]
            if (ckpt_dir / BANK_DIR).exists():
                # every rank must agree that the bank is filled, or rank 0 skips the fill barrier the others wait at
                bank_filled = True
                if rank == 0:
                    bank.load(ckpt_dir / BANK_DIR)
                    bank_exact = bank_matches_snapshot(bank, ckpt_dir / BANK_DIR)
        if rank == 0:
            print(f"[train] resumed from checkpoint: epoch {start_epoch}, step {global_step}, bank restored={bank_filled}",
                  flush=True)
    ddp_model = ray.train.torch.prepare_model(model)
    model = _unwrap(ddp_model)

    tracker = Tracker(loop_config["tracking_uri"], loop_config["mlflow_run_id"]) if rank == 0 else None
    validation = read_examples(paths.validation)
    train_shard = ray.train.get_dataset_shard("train")
    catalog_shard = ray.train.get_dataset_shard("catalog")
    steps_per_epoch = math.ceil(loop_config["num_train_examples"] / world / job.train.batch_size)
    if job.train.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, job.train.max_steps_per_epoch)

    def catalogue_pass() -> torch.Tensor:
        batches = catalog_shard.iter_torch_batches(batch_size=job.train.eval_batch_size, device=device)
        return encode_catalog(model, batches, num_items, device)

    if not bank_filled:
        if rank == 0:
            started = time.perf_counter()
            content = catalogue_pass()
            bank.update(np.arange(1, num_items + 1), content[1:].cpu().numpy(), step=global_step, wait=True)
            print(f"[train] memory bank filled with {num_items} items in {time.perf_counter() - started:.1f}s", flush=True)
        _barrier()

    for epoch in range(start_epoch, job.train.epochs):
        ddp_model.train()
        stats = EpochStats()
        epoch_started = time.perf_counter()
        waited_since = time.perf_counter()
        batches = train_shard.iter_torch_batches(
            batch_size=job.train.batch_size, device=device, local_shuffle_buffer_size=None, drop_last=False
        )
        for step, batch in enumerate(batches):
            if step >= steps_per_epoch:
                break
            stats.data_wait += time.perf_counter() - waited_since
            if job.train.fail_at_step >= 0 and global_step == job.train.fail_at_step and rank == 0 \
                    and not os.environ.get("MMREC_FAULT_DONE") and _first_attempt(loop_config):
                _mark_fault_injected(loop_config)
                print(f"[train] fault injection: killing rank 0 at step {global_step}", flush=True)
                os._exit(1)
            loss, step_info = optimise(ddp_model, model, batch, bank, loss_fn, optimizer, job, num_items, device,
                                       global_step, grad_clip=job.train.grad_clip)
            global_step += 1
            if job.memory.refresh_every_steps and global_step % job.memory.refresh_every_steps == 0 and rank == 0:
                # periodic refresh: re-encode the whole catalogue so no bank entry is older than N steps
                refreshed = catalogue_pass()
                bank.update(np.arange(1, num_items + 1), refreshed[1:].cpu().numpy(), step=global_step)
                ddp_model.train()
            stats.add(loss.item(), len(batch["target"]), step_info)
            if rank == 0 and ((step + 1) % job.train.log_every == 0 or step + 1 == steps_per_epoch):
                print(f"[train] epoch {epoch + 1}/{job.train.epochs} step {step + 1}/{steps_per_epoch} "
                      f"loss {stats.mean_loss():.4f} {stats.samples / (time.perf_counter() - epoch_started):.1f} samples/s "
                      f"data-wait {stats.wait_fraction(time.perf_counter() - epoch_started):.0%}", flush=True)
            waited_since = time.perf_counter()
        bank.flush()
        _barrier()
        epoch_seconds = time.perf_counter() - epoch_started
        metrics = {
            "epoch": epoch + 1,
            # how this attempt started: epochs already done in the checkpoint it resumed from (0 = from scratch)
            "resumed_from_epoch": start_epoch if checkpoint is not None else 0,
            "bank_restored": float(bank_filled and checkpoint is not None),
            "bank_restored_exact": float(bank_exact),  # 1.0: every restored vector equals the checkpoint's
            "bank_filled_by_ray_data": float(filled_by_ray_data),  # 0.0: rank 0 filled it (or it was restored)
            "global_step": global_step,
            "train_loss": stats.mean_loss(),
            "samples_per_s": stats.samples * world / max(epoch_seconds, 1e-9),
            "data_wait_fraction": stats.wait_fraction(epoch_seconds),
            "epoch_seconds": epoch_seconds,
            **stats.bank_metrics(),
        }
        is_last = epoch == job.train.epochs - 1
        if rank == 0:
            content = catalogue_pass()
            # the same pass refreshes every bank entry, bounding staleness to one epoch
            bank.update(np.arange(1, num_items + 1), content[1:].cpu().numpy(), step=global_step, wait=True)
            metrics.update({f"val_{k}": v for k, v in _evaluate(model, content, validation, job).items()})
            if is_last:
                test = read_examples(paths.test)
                metrics.update({f"test_{k}": v for k, v in _evaluate(model, content, test, job).items()})
                for name in ("test_warm", "test_cold"):
                    if getattr(paths, name) is not None:  # full size only: keeps the Matryoshka size table clean
                        subset = evaluate_ranking(model, content, read_examples(getattr(paths, name)),
                                                  ks=job.train.eval_ks, mask_history=job.train.eval_mask_history,
                                                  batch_size=job.train.eval_batch_size)
                        metrics.update({f"{name}_{k}": v for k, v in subset.items()})
            metrics["bank_fill_ratio"] = bank.stats()["fill_ratio"]
            print("[train] " + " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()),
                  flush=True)
            with tempfile.TemporaryDirectory() as tmp:
                tmp_path = Path(tmp)
                save_checkpoint(tmp_path, model, optimizer, {
                    "epoch": epoch, "global_step": global_step, "config": job.to_dict(),
                    "watermark": loop_config["watermark"], "num_items": num_items,
                    "mlflow_run_id": loop_config["mlflow_run_id"],
                    "matryoshka_sizes": list(job.model.supported_sizes),  # the sizes this checkpoint serves
                })
                bank.save(tmp_path / BANK_DIR)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
            # Logged only once the epoch's checkpoint is persisted: a crash before that re-runs the epoch on
            # resume, and logging first would have recorded it twice in MLflow.
            tracker.log_metrics(metrics, step=epoch + 1)
        else:
            ray.train.report(metrics)


def make_optimizer(model: Recommender, job: JobConfig) -> torch.optim.Optimizer:
    """AdamW: the content backbones' trainable layers at `train.encoder_lr`, everything else at `train.lr`."""
    backbone, rest = encoder_parameters(model)
    return torch.optim.AdamW(
        [{"params": rest, "lr": job.train.lr}, {"params": backbone, "lr": job.train.encoder_lr}],
        weight_decay=job.train.weight_decay,
    )


def optimise(ddp_model, model: Recommender, batch: dict, bank, loss_fn, optimizer: torch.optim.Optimizer,
             job: JobConfig, num_items: int, device: torch.device, step: int,
             grad_clip: float) -> tuple[torch.Tensor, dict]:
    """One optimisation step as every trainer here runs it (the Ray Train loop and the in-process benchmarks):
    `train_step` (forward + loss), backward, gradient clipping when `grad_clip` > 0, the optimiser step, and the
    write-back of the batch's fresh item vectors to the bank (LEMUR: written whenever an item is encoded)."""
    loss, info = train_step(ddp_model, model, batch, bank, loss_fn, job, num_items, device, step)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(ddp_model.parameters(), grad_clip)
    optimizer.step()
    bank.update(info["unique_ids"], info["unique_content"], step=step)
    return loss, info


def train_step(ddp_model, model: Recommender, batch: dict, bank, loss_fn, job: JobConfig, num_items: int,
               device: torch.device, step: int) -> tuple[torch.Tensor, dict]:
    """One forward pass + loss for the configured memory mode.

    bank: history content from the bank (no gradient), one round-trip for history + target ids; with
    memory.encode_fraction < 1 only a random share of rows runs the encoder, the rest use bank vectors.
    recompute: every history item is encoded with gradients from the batch's decoded history content.
    """
    history = batch["history"].long()
    targets = batch["target"].long()
    recompute = job.memory.mode == "recompute"
    flat_history = history.reshape(-1).cpu().numpy()
    target_np = targets.cpu().numpy()
    lookup = bank.lookup(target_np if recompute else np.concatenate([flat_history, target_np]))
    offset = 0 if recompute else flat_history.size
    target_cached = np.asarray(lookup.vectors)[offset:]
    target_found = np.asarray(lookup.found)[offset:]
    if recompute:
        history_content = torch.zeros(*history.shape, model.item_encoder.dim, device=device)
        history_item_content = {k: batch[f"history_{k}"] for k in ("image", "image_mask", "input_ids",
                                                                   "attention_mask", "text_mask")}
    else:
        history_vectors = np.asarray(lookup.vectors)[: flat_history.size]
        history_content = torch.from_numpy(np.array(history_vectors, copy=True)).to(device).view(*history.shape, -1)
        history_item_content = None
    encode_mask = cached_content = None
    if job.memory.encode_fraction < 1.0:
        # LEMUR's encoder sampling; rows whose item has no bank vector yet are always encoded
        chosen = np.random.random_sample(len(target_np)) < job.memory.encode_fraction
        encode_mask = torch.as_tensor(chosen | ~target_found, device=device)
        cached_content = torch.from_numpy(np.array(target_cached, copy=True)).to(device)
    out = ddp_model(
        target_ids=targets,
        image=batch["image"],
        image_mask=batch["image_mask"].bool(),
        input_ids=batch["input_ids"].long(),
        attention_mask=batch["attention_mask"].long(),
        text_mask=batch["text_mask"].bool(),
        history_ids=history,
        history_content=history_content,
        encode_mask=encode_mask,
        target_cached_content=cached_content,
        history_item_content=history_item_content,
    )
    negatives = negative_ids = None
    if job.model.task == "ctr":
        labels = (batch["rating"].float() >= job.data.positive_rating).float()
        loss = loss_fn(out.user, out.positive, labels, batch["user"].long(), targets)
    else:
        if job.model.loss == "full_softmax":
            all_ids = np.arange(num_items + 1)
            table = torch.from_numpy(np.array(bank.lookup(all_ids).vectors, copy=True)).to(device)
            negatives = model.item_vectors(table, torch.arange(num_items + 1, device=device))
        elif job.model.extra_negatives:
            negative_ids_np = np.random.randint(1, num_items + 1, size=job.model.extra_negatives)
            cached = torch.from_numpy(np.array(bank.lookup(negative_ids_np).vectors, copy=True)).to(device)
            negative_ids = torch.as_tensor(negative_ids_np, device=device)
            negatives = model.item_vectors(cached, negative_ids)
        loss = loss_fn(out.user, out.positive, targets, negatives, negative_ids)
    real = flat_history > 0
    unique_ids = out.unique_ids.cpu().numpy()
    unique_content = out.unique_content.detach()
    info = {
        "unique_ids": unique_ids,
        "unique_content": unique_content.cpu().numpy(),
        "bank_seconds": bank.last_lookup_seconds,
        "encoded_items": int(unique_ids.size),
    }
    if not recompute:
        found = np.asarray(lookup.found)[: flat_history.size]
        written = np.asarray(lookup.written_step)[: flat_history.size]
        info["coverage"] = float(found[real].mean()) if real.any() else 1.0
        info["mean_age"] = float((step - written[real & found]).mean()) if (real & found).any() else 0.0
    # staleness: cosine between the cached and the fresh vector of targets re-encoded this step
    if unique_ids.size:
        pos = np.clip(np.searchsorted(unique_ids, target_np), 0, unique_ids.size - 1)
        rows = np.flatnonzero((unique_ids[pos] == target_np) & target_found)[: job.memory.staleness_sample]
        if rows.size:
            cached = torch.from_numpy(np.array(target_cached[rows], copy=True)).to(device)
            info["staleness_cosine"] = float(F.cosine_similarity(cached, unique_content[pos[rows]], dim=-1).mean())
    return loss, info


def _evaluate(model: Recommender, content: torch.Tensor, examples, job: JobConfig) -> dict[str, float]:
    metrics = evaluate_ranking(model, content, examples, ks=job.train.eval_ks, mask_history=job.train.eval_mask_history,
                               batch_size=job.train.eval_batch_size, sizes=job.model.matryoshka_sizes)
    if job.model.task == "ctr":
        metrics.update(evaluate_ctr(model, content, examples, positive_rating=job.data.positive_rating,
                                    batch_size=job.train.eval_batch_size))
    return metrics


class EpochStats:
    def __init__(self) -> None:
        self.loss_sum = 0.0
        self.steps = 0
        self.samples = 0
        self.data_wait = 0.0
        self.coverage_sum = 0.0
        self.bank_seconds = 0.0
        self.age_sum = 0.0
        self.staleness_sum = 0.0
        self.staleness_steps = 0
        self.encoded_items = 0

    def add(self, loss: float, samples: int, info: dict) -> None:
        self.loss_sum += loss
        self.steps += 1
        self.samples += samples
        self.coverage_sum += info.get("coverage", 0.0)
        self.bank_seconds += info["bank_seconds"]
        self.age_sum += info.get("mean_age", 0.0)
        self.encoded_items += info["encoded_items"]
        if "staleness_cosine" in info:
            self.staleness_sum += info["staleness_cosine"]
            self.staleness_steps += 1

    def mean_loss(self) -> float:
        return self.loss_sum / max(self.steps, 1)

    def wait_fraction(self, seconds: float) -> float:
        return self.data_wait / max(seconds, 1e-9)

    def bank_metrics(self) -> dict[str, float]:
        return {
            "bank_coverage": self.coverage_sum / max(self.steps, 1),
            "bank_lookup_ms_per_step": 1000 * self.bank_seconds / max(self.steps, 1),
            "bank_mean_age_steps": self.age_sum / max(self.steps, 1),
            "encoded_items_per_step": self.encoded_items / max(self.steps, 1),
            "bank_cosine_cached_fresh": self.staleness_sum / max(self.staleness_steps, 1) if self.staleness_steps else float("nan"),
        }


def _first_attempt(loop_config: dict) -> bool:
    marker = loop_config.get("fault_marker")
    return bool(marker) and not Path(marker).exists()


def _mark_fault_injected(loop_config: dict) -> None:
    Path(loop_config["fault_marker"]).write_text("fault injected\n")

"""Filling the memory bank with a Ray Data batch-inference pass over the whole catalogue.

Before the first training step every item needs a vector in the bank (history lookups would miss otherwise).
`fill_bank` runs the item encoder with the run's initial weights inside `map_batches` actors (one model per
actor, loaded once), each actor writing its batches straight into the bank shards: the work spreads over as
many actors as the cluster allows instead of one train worker.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import ray
import ray.data
import torch

from model.build import build_recommender
from training.checkpoint import load_tensors
from training.evaluate import encode_content_batch
from training.job_config import JobConfig


class CatalogEncoder:
    """`map_batches` callable: decoded catalogue content -> content vectors written to the bank."""

    def __init__(self, job_dict: dict, state_path: str, num_items: int, bank, step: int = 0) -> None:
        torch.set_num_threads(1)
        job = JobConfig.from_dict(job_dict)
        self.model = build_recommender(job.model, job.image, job.text, num_items=num_items,
                                       max_history=job.data.max_history)
        self.model.load_state_dict(load_tensors(state_path))
        self.model.eval()
        self.bank = bank
        self.step = step

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = np.asarray(batch["item_index"], dtype=np.int64)
        with torch.inference_mode():
            content = encode_content_batch(self.model, batch, torch.device("cpu"))
        self.bank.update(ids, content.numpy(), step=self.step, wait=True)
        return {"item_index": ids}


def fill_actor_count(requested: int, cpus_per_actor: float) -> int:
    """0 = as many actors as the cluster's CPUs allow, leaving one CPU for Ray Data's own tasks."""
    if requested > 0:
        return requested
    cpus = ray.cluster_resources().get("CPU", 1.0)
    return max(1, int((cpus - 1.0) / max(cpus_per_actor, 1.0)))


def fill_bank(catalog: ray.data.Dataset, *, job_dict: dict, state_path: Path, num_items: int, bank,
              actors: int, cpus_per_actor: float, batch_size: int) -> tuple[int, float]:
    """Encode every catalogue item with the weights at `state_path` into `bank`; returns (items, seconds)."""
    started = time.perf_counter()
    written = catalog.map_batches(
        CatalogEncoder,
        fn_constructor_kwargs={"job_dict": job_dict, "state_path": str(state_path), "num_items": num_items, "bank": bank},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus_per_actor,
    ).count()
    return written, time.perf_counter() - started

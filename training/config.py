"""Configuration of a training run: optimisation, workers, checkpoints, evaluation protocol, tracking."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

USE_GPU = ("auto", "true", "false")


@dataclass(kw_only=True)
class TrainConfig:
    epochs: int = 2
    batch_size: int = 128
    lr: float = 1e-3
    encoder_lr: float = 1e-4  # pretrained encoders learn slower than the freshly initialised parts
    max_steps_per_epoch: int = 0  # 0 = the whole epoch
    num_workers: int = 1
    use_gpu: str = "auto"  # auto: use a GPU per worker when the cluster has one
    cpus_per_worker: float = 0.25  # fractional on purpose: 2-core machines must leave Ray Data a whole CPU
    seed: int = 0
    log_every: int = 25
    eval_ks: tuple[int, ...] = (5, 10, 20, 50)
    eval_mask_history: bool = False  # fMRLRec does not mask items already in the history; MicroLens does
    storage_path: str = "runs"
    run_name: str = ""  # "" = <preset>-<timestamp>; reusing a name resumes that run from its last checkpoint
    init_checkpoint: str = ""  # warm start: a checkpoint directory whose model (and bank) start this run
    max_failures: int = 1
    fail_at_step: int = -1  # fault injection for tests: kill rank 0 at this global step of the first attempt

    # Fixed (not settings): AdamW weight decay, gradient-norm clipping, users per evaluation batch, checkpoints
    # kept per run (keep-last-N rotation), and torch threads per worker (0 = the node's cores / workers).
    weight_decay: ClassVar[float] = 0.01
    grad_clip: ClassVar[float] = 1.0
    eval_batch_size: ClassVar[int] = 256
    keep_checkpoints: ClassVar[int] = 2
    torch_threads: ClassVar[int] = 0

    def __post_init__(self) -> None:
        for key in ("epochs", "batch_size", "num_workers", "log_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"train.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("lr", "encoder_lr"):
            if getattr(self, key) <= 0:
                raise ValueError(f"train.{key} must be > 0, got {getattr(self, key)}")
        if self.use_gpu not in USE_GPU:
            raise ValueError(f"train.use_gpu={self.use_gpu!r}; valid: {', '.join(USE_GPU)}")
        if self.cpus_per_worker <= 0:
            raise ValueError("train.cpus_per_worker must be > 0")
        if self.max_steps_per_epoch < 0 or self.max_failures < 0:
            raise ValueError("train.max_steps_per_epoch and train.max_failures must be >= 0")
        if not self.eval_ks or min(self.eval_ks) < 1:
            raise ValueError("train.eval_ks must be positive cut-offs, e.g. 5,10,20,50")


@dataclass(kw_only=True)
class TrackingConfig:
    tracking_uri: str = ""  # "" = $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db
    experiment: str = "mmrec"
    artifact_root: str = "mlartifacts"  # absolute location for new experiments (relative to cwd)
    registered_model: str = "mmrec"

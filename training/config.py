"""Configuration of a training run: optimisation, workers, checkpoints, evaluation protocol, tracking."""
from __future__ import annotations

from dataclasses import dataclass

USE_GPU = ("auto", "true", "false")
# Folders of train.storage_path that the product itself owns beside the run directories.
RESERVED_STORAGE_NAMES = ("registered", "locks")


def check_plain_name(value: str, key: str, reserved: tuple[str, ...] = ()) -> None:
    """A name used as one folder under train.storage_path: no path separators, no `.`/`..`, not reserved."""
    if "/" in value or "\\" in value or value in (".", "..") or value in reserved:
        raise ValueError(f"{key}={value!r} must be a plain folder name (no '/', not '.' or '..'"
                         + (f", not {' or '.join(reserved)}" if reserved else "") + ")")


@dataclass(kw_only=True)
class TrainConfig:
    epochs: int = 2
    batch_size: int = 128
    lr: float = 1e-3
    encoder_lr: float = 1e-4  # pretrained encoders learn slower than the freshly initialised parts
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    max_steps_per_epoch: int = 0  # 0 = the whole epoch
    num_workers: int = 1
    use_gpu: str = "auto"  # auto: use a GPU per worker when the cluster has one
    cpus_per_worker: float = 0.25  # fractional on purpose: 2-core machines must leave Ray Data a whole CPU
    torch_threads: int = 0  # 0 = cores / workers on this node
    seed: int = 0
    log_every: int = 25
    eval_ks: tuple[int, ...] = (5, 10, 20, 50)
    eval_mask_history: bool = False  # fMRLRec does not mask items already in the history; MicroLens does
    eval_batch_size: int = 256
    storage_path: str = "runs"
    run_name: str = ""  # "" = <preset>-<timestamp>; reusing a name resumes that run from its last checkpoint
    init_checkpoint: str = ""  # warm start: a checkpoint directory whose model (and bank) start this run
    keep_checkpoints: int = 2
    max_failures: int = 1

    def __post_init__(self) -> None:
        for key in ("epochs", "batch_size", "num_workers", "keep_checkpoints", "eval_batch_size", "log_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"train.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("lr", "encoder_lr"):
            if getattr(self, key) <= 0:
                raise ValueError(f"train.{key} must be > 0, got {getattr(self, key)}")
        if self.use_gpu not in USE_GPU:
            raise ValueError(f"train.use_gpu={self.use_gpu!r}; valid: {', '.join(USE_GPU)}")
        if self.cpus_per_worker <= 0:
            raise ValueError("train.cpus_per_worker must be > 0")
        if self.max_steps_per_epoch < 0 or self.max_failures < 0 or self.weight_decay < 0:
            raise ValueError("train.max_steps_per_epoch, train.max_failures and train.weight_decay must be >= 0")
        if not self.eval_ks or min(self.eval_ks) < 1:
            raise ValueError("train.eval_ks must be positive cut-offs, e.g. 5,10,20,50")
        check_plain_name(self.run_name, "train.run_name", RESERVED_STORAGE_NAMES)


@dataclass(kw_only=True)
class TrackingConfig:
    tracking_uri: str = ""  # "" = $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db
    experiment: str = "mmrec"
    artifact_root: str = "mlartifacts"  # absolute location for new experiments (relative to cwd)
    registered_model: str = "mmrec"  # also a folder name: <storage_path>/registered/<name>, locks/retrain-<name>.lock

    def __post_init__(self) -> None:
        check_plain_name(self.registered_model, "tracking.registered_model")

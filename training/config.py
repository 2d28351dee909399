"""Configuration of a training run: optimisation, workers, checkpoints, evaluation protocol, tracking."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

USE_GPU = ("auto", "true", "false")
TARGETS = ("last", "all")
SCHEDULES = ("cosine", "plateau")
# Folders of train.storage_path that the product itself owns beside the run directories.
RESERVED_STORAGE_NAMES = ("registered", "locks")


def check_plain_name(value: str, key: str, reserved: tuple[str, ...] = ()) -> None:
    """A name used as one folder under train.storage_path: no path separators, no `.`/`..`, not reserved."""
    if "/" in value or "\\" in value or value in (".", "..") or value in reserved:
        raise ValueError(f"{key}={value!r} must be a plain folder name (no '/', not '.' or '..'"
                         + (f", not {' or '.join(reserved)}" if reserved else "") + ")")


@dataclass(kw_only=True)
class TrainConfig:
    epochs: int = field(
        default=2,
        metadata={"help": "the most passes over the training examples; with train.schedule=cosine also the "
                          "learning-rate schedule's horizon (a larger cap trains at a higher rate where the run "
                          "peaks), with plateau only a limit"})
    patience: int = field(
        default=0,
        metadata={"help": "stop after this many epochs without a better validation NDCG@10, averaged over the "
                          "last 3 epochs (0 = run every epoch); halfway there (patience >= 4) the learning rates "
                          "drop 10x. The best window's last epoch is the checkpoint kept and registered"})
    schedule: str = field(
        default="cosine",
        metadata={"help": "learning rate after the warm-up: cosine (decays to 10% over train.epochs) or plateau "
                          "(holds; drops 10x each time validation stalls for half of train.patience, which must be "
                          ">= 4: where early stopping ends the run, not the epoch cap)"})
    refit: bool = field(
        default=False,
        metadata={"help": "after early stopping, train again from scratch on the training and validation examples "
                          "together for the best epoch's count of epochs (the learning-rate schedule replayed) and "
                          "keep and register that model: the validation examples, the data nearest the test, then "
                          "train too (about twice the time; a second run <run_name>-refit and MLflow run)"})
    batch_size: int = field(default=128, metadata={"help": "training examples per step and worker"})
    lr: float = field(default=1e-3, metadata={"help": "learning rate of everything but the encoder backbones"})
    encoder_lr: float = field(default=1e-4, metadata={"help": "learning rate of the image and text encoder backbones"})
    average_epochs: float = field(
        default=0.0,
        metadata={"help": "evaluate, keep and register an exponential moving average of the trained weights over "
                          "about this many epochs instead of the last step's weights (0 = off); a resumed run "
                          "continues the trained ones"})
    max_steps_per_epoch: int = field(default=0, metadata={"help": "cap on steps per epoch (0 = the whole epoch)"})
    targets: str = field(
        default="last",
        metadata={"help": "last: an example's target is its only loss term; all: every history position also "
                          "predicts the item after it (SASRec's objective) and the examples are thinned to "
                          "non-overlapping windows, so an epoch predicts each training interaction once"})
    num_workers: int = field(default=1, metadata={"help": "Ray Train workers (data-parallel)"})
    use_gpu: str = field(
        default="auto", metadata={"help": "auto (a GPU per worker when the cluster has one), true or false"})
    cpus_per_worker: float = field(
        default=0.25,
        metadata={"help": "CPUs per Ray Train worker (fractional: 2-core machines must leave Ray Data a CPU)"})
    seed: int = field(
        default=0, metadata={"help": "seed of initialisation, each epoch's data order, sampling and retrain's replay "
                                     "sample: two one-worker runs of a seed on one machine train identically (to "
                                     "the last digit; tests/integration/test_train_runs.py)"})
    eval_ks: tuple[int, ...] = field(default=(5, 10, 20, 50), metadata={"help": "cut-offs k of Recall@k and NDCG@k"})
    eval_mask_history: bool = field(
        default=False,
        metadata={"help": "the headline protocol: rank without the user's history items (both are always reported)"})
    storage_path: str = field(default="runs", metadata={"help": "checkpoint root: <storage_path>/<run_name>/"})
    run_name: str = field(
        default="",
        metadata={"help": '"" = <preset>-<timestamp>; reusing a name resumes that run from its last checkpoint'})
    init_checkpoint: str = field(
        default="", metadata={"help": "warm start: a checkpoint directory whose model (and bank) start this run"})
    max_failures: int = field(
        default=1, metadata={"help": "restarts of a crashed worker group from its last checkpoint"})
    # Fixed (not settings): AdamW weight decay, gradient-norm clipping, users per evaluation batch, checkpoints
    # kept per run (keep-last-N rotation). Torch threads per worker are the node's cores / workers.
    weight_decay: ClassVar[float] = 0.01
    grad_clip: ClassVar[float] = 1.0
    eval_batch_size: ClassVar[int] = 256
    keep_checkpoints: ClassVar[int] = 2  # the best by validation and the latest are kept besides
    # The best checkpoint and early stopping go by validation averaged over the last this-many epochs (`val_selection`;
    # training.trainer.EarlyStopping says why), the kept checkpoint being the last epoch of the best window.
    selection_window: ClassVar[int] = 3
    # The learning rate rises linearly over the first 5% of a run's planned steps, at most 200 steps (plateau: 200
    # steps, at most half the planned ones, so the cap does not move it), then decays (`schedule`).
    # Without the cap a run planned long for early stopping warmed up for epochs: ID-only, 40 planned epochs of
    # 380 steps, warmed up over 760 steps and ended epoch 1 at validation NDCG@10 0.0159 (train loss 7.80).
    warmup_fraction: ClassVar[float] = 0.05
    warmup_max_steps: ClassVar[int] = 200
    final_lr_fraction: ClassVar[float] = 0.1  # ... along a cosine to this share of train.lr / train.encoder_lr

    @property
    def selection_metric(self) -> str:
        """The validation metric that picks the best checkpoint and stops training early (higher is better)."""
        return "ndcg@10" if 10 in self.eval_ks else "mrr"

    def __post_init__(self) -> None:
        for key in ("epochs", "batch_size", "num_workers"):
            if getattr(self, key) < 1:
                raise ValueError(f"train.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("lr", "encoder_lr"):
            if getattr(self, key) <= 0:
                raise ValueError(f"train.{key} must be > 0, got {getattr(self, key)}")
        if self.targets not in TARGETS:
            raise ValueError(f"train.targets={self.targets!r}; valid: {', '.join(TARGETS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"train.schedule={self.schedule!r}; valid: {', '.join(SCHEDULES)}")
        if self.use_gpu not in USE_GPU:
            raise ValueError(f"train.use_gpu={self.use_gpu!r}; valid: {', '.join(USE_GPU)}")
        if self.cpus_per_worker <= 0:
            raise ValueError("train.cpus_per_worker must be > 0")
        if self.max_steps_per_epoch < 0 or self.max_failures < 0 or self.patience < 0 or self.average_epochs < 0:
            raise ValueError("train.max_steps_per_epoch, train.max_failures, train.patience and train.average_epochs "
                             "must be >= 0")
        if not self.eval_ks or min(self.eval_ks) < 1:
            raise ValueError("train.eval_ks must be positive cut-offs, e.g. 5,10,20,50")
        check_plain_name(self.run_name, "train.run_name", RESERVED_STORAGE_NAMES)


@dataclass(kw_only=True)
class TrackingConfig:
    tracking_uri: str = field(
        default="", metadata={"help": 'MLflow tracking URI; "" = $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db'})
    experiment: str = field(default="mmrec", metadata={"help": "MLflow experiment of the runs"})
    artifact_root: str = field(
        default="mlartifacts",
        metadata={"help": "artifact location of new MLflow experiments (relative to the working directory)"})
    registered_model: str = field(
        default="mmrec",
        metadata={"help": 'MLflow registered model a finished run is registered as (also a folder name under '
                          '<storage_path>/registered/); "" = do not register'})

    def __post_init__(self) -> None:
        check_plain_name(self.registered_model, "tracking.registered_model")

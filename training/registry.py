"""The MLflow model registry of trained checkpoints: versions, their lineage tags, and the serving aliases.

A registered version points at a copy of a Ray Train checkpoint directory (its `source` and its `checkpoint_path`
tag) that the registry owns: `<train.storage_path>/registered/<model>/<run id>/<checkpoint name>`. Ray Train's
keep-last-N rotation deletes checkpoints inside its run directory (also when a run with the same name resumes),
so a registered version, above all the champion, must never point there. The copy is written to a staging folder
and renamed, so a crash mid-copy leaves no half checkpoint behind a version (the next registration removes the
staging folders of dead runs); a target that exists but is not a complete copy is refused, never replaced. A version carries, as tags, what
incremental retraining and operators need to know about it:
    data_watermark    newest interaction (unix s) in the data the version was made from, held-out window included
    trained_through   newest interaction it was trained on; the next retrain trains on what is newer than this
    git_commit, config_hash, metric.<name> (its held-out scores), and the promotion-gate record for challengers
With a `serving_model` logger (the jobs inject `serving.pyfunc.log_recommender_model`; training may not import
serving), a version's `source` is an MLflow model logged in its run (tag `pyfunc_model_uri`: `models:/m-...`), so
`mlflow.pyfunc.load_model("models:/NAME@champion")` loads it; the `checkpoint_path` tag still names the copy.
Aliases: `champion` is what serves and what the next retrain starts from; `challenger` is the latest retrain's
result, promoted or not. `models:/NAME@ALIAS` and `models:/NAME/VERSION` resolve to a checkpoint directory.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pipeline.owned_dirs import require_replaceable, staged
from training.checkpoint import STATE_FILE, is_checkpoint, read_state
from training.tracking import metric_key

CHAMPION = "champion"
CHALLENGER = "challenger"
TAG_CHECKPOINT = "checkpoint_path"
TAG_DATA_WATERMARK = "data_watermark"
TAG_TRAINED_THROUGH = "trained_through"
TAG_PYFUNC = "pyfunc_model_uri"  # the logged MLflow model a version's source is (when a serving_model logger was given)
TAG_SIZES = "matryoshka_sizes"  # the vector sizes the checkpoint serves (comma-separated; one size = no Matryoshka)
_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[\w-]+)|/(?P<version>\d+))$")


# (pinned checkpoint copy, run id, tracking URI) -> (the logged model's artifact location, its model id)
ServingModelLogger = Callable[[Path, str, str], tuple[str, str]]


class RegistryError(LookupError):
    """A registered model, version or alias that a job needs does not exist (or its checkpoint is gone)."""


@dataclass(frozen=True)
class ModelVersionInfo:
    """One registered version as the jobs use it."""

    name: str
    version: str
    checkpoint_path: Path
    run_id: str
    data_watermark: int
    trained_through: int
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def git_commit() -> str:
    """The code version: $MMREC_GIT_COMMIT (set it where the code is shipped without .git), else `git`."""
    if os.environ.get("MMREC_GIT_COMMIT"):
        return os.environ["MMREC_GIT_COMMIT"]
    for directory in (Path.cwd(), Path(__file__).resolve().parents[1]):
        try:
            out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=directory, capture_output=True, text=True,
                                 timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    return "unknown"


def served_sizes(checkpoint_path: str | Path) -> list[int]:
    """The vector sizes a checkpoint serves, from its state.json ([] for checkpoints written before they were kept)."""
    path = Path(checkpoint_path) / STATE_FILE
    state = read_state(checkpoint_path) if path.is_file() else {}
    return [int(s) for s in state.get("matryoshka_sizes", [])]


def registered_root(storage_path: str | Path, model_name: str) -> Path:
    """Where the registry keeps its own copies of registered checkpoints, outside every Ray run directory."""
    return Path(storage_path).resolve() / "registered" / model_name


def pin_checkpoint(checkpoint_path: str | Path, root: Path, run_id: str) -> Path:
    """Copy a checkpoint directory to `root/<run_id>/<its name>` (atomically; idempotent) and return the copy.

    An existing complete copy is reused, so registering the same checkpoint twice stores it once.
    """
    source = Path(checkpoint_path).resolve()
    if not is_checkpoint(source):
        raise RegistryError(f"{source} is not a training checkpoint (no model.pt): nothing to register")
    target = root / (run_id or "no-run") / source.name
    if source == target or is_checkpoint(target):
        return target
    # Anything else at the target is not ours (copies appear whole, by rename): refused, never replaced.
    require_replaceable(target, _never_owned, "a registered checkpoint copy (with model.pt)")
    with staged(target, _never_owned, "a registered checkpoint copy (with model.pt)") as staging:
        shutil.copytree(source, staging, dirs_exist_ok=True)
    return target


def _never_owned(path: Path) -> bool:
    return False


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """`models:/NAME@ALIAS` -> (NAME, ALIAS, None); `models:/NAME/3` -> (NAME, None, "3")."""
    match = _MODEL_URI.match(uri.strip())
    if match is None:
        raise RegistryError(f"not a registered-model URI: {uri!r}; expected models:/NAME@ALIAS or models:/NAME/VERSION")
    return match["name"], match["alias"], match["version"]


class ModelRegistry:
    """The registered model `name` in the MLflow registry at `tracking_uri`."""

    def __init__(self, tracking_uri: str, name: str, storage_path: str | Path | None = None, *,
                 serving_model: ServingModelLogger | None = None) -> None:
        """storage_path: the jobs' `train.storage_path`; registered checkpoints are copied under it (see
        `registered_root`). Only `register` needs it. serving_model: logs the checkpoint copy as an MLflow model
        in the run, which then is each new version's source (None: the source is the checkpoint copy)."""
        from mlflow.tracking import MlflowClient

        if not name:
            raise RegistryError("no registered model name: set tracking.registered_model")
        self.tracking_uri = tracking_uri
        self.name = name
        self.storage_path = storage_path
        self.serving_model = serving_model
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    def _ensure_model(self) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(self.name)
        except MlflowException:
            try:
                self.client.create_registered_model(
                    self.name, description="mmrec multimodal sequential recommender (Ray Train checkpoints)"
                )
            except MlflowException:
                self.client.get_registered_model(self.name)  # created concurrently: fine if it exists now

    def register(self, *, run_id: str, checkpoint_path: str | Path, data_watermark: int, trained_through: int,
                 config_hash: str, metrics: dict[str, float], tags: dict[str, str] | None = None) -> ModelVersionInfo:
        """Create a new version for a finished run's checkpoint (pinned: see `pin_checkpoint`), tagged with its
        lineage and metrics."""
        if self.storage_path is None:
            raise RegistryError("ModelRegistry(storage_path=...) is needed to register: it owns the checkpoint copy")
        checkpoint_path = pin_checkpoint(checkpoint_path, registered_root(self.storage_path, self.name), run_id)
        sizes = served_sizes(checkpoint_path)
        all_tags = {
            **({TAG_SIZES: ",".join(map(str, sizes))} if sizes else {}),
            TAG_CHECKPOINT: str(checkpoint_path),
            TAG_DATA_WATERMARK: str(int(data_watermark)),
            TAG_TRAINED_THROUGH: str(int(trained_through)),
            "git_commit": git_commit(),
            "config_hash": config_hash,
            **{f"metric.{metric_key(k)}": f"{float(v):.6g}" for k, v in metrics.items() if isinstance(v, (int, float))},
            **(tags or {}),
        }
        source, model_id = str(checkpoint_path), None
        if self.serving_model is not None:
            source, model_id = self.serving_model(checkpoint_path, run_id, self.tracking_uri)
            all_tags[TAG_PYFUNC] = f"models:/{model_id}"
        self._ensure_model()
        version = self.client.create_model_version(self.name, source=source, run_id=run_id, tags=all_tags,
                                                   model_id=model_id)
        return self._info(version)

    def set_alias(self, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(self.name, alias, version)

    def set_tags(self, version: str, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_model_version_tag(self.name, version, key, value)

    def get(self, alias: str) -> ModelVersionInfo | None:
        """The version behind `alias`, or None when the model or the alias does not exist."""
        from mlflow.exceptions import MlflowException

        try:
            version = self.client.get_model_version_by_alias(self.name, alias)
        except MlflowException:
            return None
        return self._info(version)

    def version(self, version: str) -> ModelVersionInfo:
        from mlflow.exceptions import MlflowException

        try:
            return self._info(self.client.get_model_version(self.name, version))
        except MlflowException:
            raise RegistryError(f"registered model {self.name!r} has no version {version}") from None

    def versions(self) -> list[ModelVersionInfo]:
        found = self.client.search_model_versions(f"name = '{self.name}'")
        return sorted((self._info(v) for v in found), key=lambda info: int(info.version))

    def _info(self, version) -> ModelVersionInfo:
        tags = dict(version.tags or {})
        return ModelVersionInfo(
            name=self.name,
            version=str(version.version),
            checkpoint_path=Path(tags.get(TAG_CHECKPOINT) or version.source),
            run_id=version.run_id or "",
            data_watermark=int(tags.get(TAG_DATA_WATERMARK, 0)),
            trained_through=int(tags.get(TAG_TRAINED_THROUGH, tags.get(TAG_DATA_WATERMARK, 0))),
            tags=tags,
        )


def resolve_model(uri: str, tracking_uri: str) -> ModelVersionInfo:
    """`models:/NAME@ALIAS` or `models:/NAME/VERSION` -> the version, with a checkpoint directory that exists."""
    name, alias, version = parse_model_uri(uri)
    registry = ModelRegistry(tracking_uri, name)
    if alias is not None:
        info = registry.get(alias)
        if info is None:
            raise RegistryError(f"{uri}: registered model {name!r} has no alias {alias!r} at {tracking_uri}")
    else:
        info = registry.version(version)
    if not is_checkpoint(info.checkpoint_path):
        raise RegistryError(f"{uri} (version {info.version}) points at {info.checkpoint_path}, which holds no "
                            f"model.pt: the checkpoint must live on storage this machine can read")
    return info


def register_training_run(job, *, run_id: str, checkpoint_path: str, metrics: dict[str, float],
                          serving_model: ServingModelLogger | None = None) -> tuple[ModelVersionInfo, bool]:
    """Register a full training run's checkpoint; make it `champion` when the model has none yet.
    serving_model: see `ModelRegistry` (jobs.train passes the pyfunc logger).

    A full run has seen (and trained up to) everything in its prepared data, so both watermarks are the data
    watermark recorded in the checkpoint. Returns (the new version, whether it became champion).
    """
    from training.tracking import resolve_tracking_uri

    watermark = int(read_state(checkpoint_path)["watermark"])

    registry = ModelRegistry(resolve_tracking_uri(job.tracking), job.tracking.registered_model,
                             job.train.storage_path, serving_model=serving_model)
    test_metrics = {k[len("test_"):]: v for k, v in metrics.items() if k.startswith("test_")}
    info = registry.register(run_id=run_id, checkpoint_path=checkpoint_path, data_watermark=watermark,
                             trained_through=watermark, config_hash=job.config_hash(), metrics=test_metrics,
                             tags={"source_job": "train", "preset": job.preset})
    became_champion = registry.get(CHAMPION) is None
    if became_champion:
        registry.set_alias(CHAMPION, info.version)
    return info, became_champion


def resolve_checkpoint(model_uri: str | None, checkpoint: str | None,
                       tracking_uri: str) -> tuple[Path, ModelVersionInfo | None]:
    """A job's `--model models:/...` or `--checkpoint DIR` -> (checkpoint directory, the version if registered)."""
    if bool(model_uri) == bool(checkpoint):
        raise RegistryError("give exactly one of --model models:/NAME@ALIAS and --checkpoint DIR")
    if model_uri:
        info = resolve_model(model_uri, tracking_uri)
        return info.checkpoint_path, info
    path = Path(checkpoint).resolve()
    if not is_checkpoint(path):
        raise RegistryError(f"{path} is not a training checkpoint (no model.pt)")
    return path, None

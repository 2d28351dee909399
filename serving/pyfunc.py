"""The MLflow pyfunc flavour of a trained model: `mlflow.pyfunc.load_model("models:/mmrec@champion").predict(df)`.

This module owns `RecommenderPyfunc` (an `mlflow.pyfunc.PythonModel` around `ItemRecommender`) and
`log_recommender_model`, which the registry calls (injected by the jobs: `training.registry` may not import
`serving`) so that every registered version's source is a logged MLflow model as well as a checkpoint copy.

The model is logged "from code" (`serving/pyfunc_entry.py`, no cloudpickle of the model object: loading a
tampered artifact cannot unpickle code) and holds one artifact, "bundle": `ItemRecommender.save_bundle` of the checkpoint (model.pt,
state.json, catalogue.parquet with the content vector of every catalogue item), so loading runs no image decoding
and no encoder pass. Code: the model is loaded by the installed `mmrec` package (`serving.pyfunc` is imported by
name), not by copies of our packages in the model (`code_paths`): a copy would be put first on sys.path at load
time and shadow the installed, tested code in the process that loads it. So it loads wherever mmrec is installed
(the project's environment, the serving image); `requirements.txt` pins the third-party packages it needs.

Input: a pandas DataFrame, one row per user: `history` (list of raw item ids, newest last), optional `k` (default
10), `size` (a Matryoshka size), `mode` ("exact", "hnsw" or "funnel"). Output: a DataFrame with the same rows:
`item_ids` (list of str, best first), `scores` (list of float), `unknown_history` (list of str).
"""
from __future__ import annotations

import tempfile
from importlib import metadata
from pathlib import Path

import mlflow.pyfunc
import pandas as pd

from serving.recommender import ItemRecommender, RecommendationError

BUNDLE_ARTIFACT = "bundle"
ENTRY_FILE = Path(__file__).with_name("pyfunc_entry.py")  # logged as code, not pickled (see that file)
MODEL_NAME = "recommender"  # the logged model's name in its run
_REQUIREMENTS = ("torch", "mlflow", "numpy", "pandas", "pyarrow", "faiss-cpu", "transformers", "pillow")


class RecommenderPyfunc(mlflow.pyfunc.PythonModel):
    """An `ItemRecommender` (exact index) as an MLflow pyfunc model; see the module docstring for the frames."""

    def load_context(self, context) -> None:
        self.recommender = ItemRecommender.from_bundle(context.artifacts[BUNDLE_ARTIFACT])

    # A DataFrame hint: MLflow infers no signature from it and does no schema enforcement (the rows hold lists).
    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        return predict_frame(self.recommender, model_input)


def predict_frame(recommender: ItemRecommender, frame: pd.DataFrame) -> pd.DataFrame:
    """The pyfunc contract: rows (history, k?, size?, mode?) -> rows (item_ids, scores, unknown_history).
    Rows sharing (k, size, mode) are recommended in one batch."""
    if not isinstance(frame, pd.DataFrame) or "history" not in frame.columns:
        raise RecommendationError("input must be a DataFrame with a 'history' column (lists of raw item ids)")
    requests = pd.DataFrame({
        "history": [list(h) if h is not None and not isinstance(h, str) else h for h in frame["history"]],
        "k": _column(frame, "k", 10, int),
        "size": _column(frame, "size", None, int),
        "mode": _column(frame, "mode", "exact", str),
    }, index=frame.index)
    results: dict = {}
    for (k, size, mode), group in requests.groupby(["k", "size", "mode"], dropna=False, sort=False):
        batch = recommender.recommend_batch(list(group["history"]), int(k),
                                            size=None if pd.isna(size) else int(size), mode=mode)
        results.update(zip(group.index, batch))
    ordered = [results[i] for i in frame.index]
    return pd.DataFrame({"item_ids": [r.item_ids for r in ordered], "scores": [r.scores for r in ordered],
                         "unknown_history": [r.unknown_history for r in ordered]}, index=frame.index)


def _column(frame: pd.DataFrame, name: str, default, kind: type) -> list:
    if name not in frame.columns:
        return [default] * len(frame)
    values = []
    for value in frame[name]:
        if value is None or (isinstance(value, float) and pd.isna(value)):
            values.append(default)
            continue
        try:
            values.append(kind(value))
        except (TypeError, ValueError):
            raise RecommendationError(f"column {name!r}: {value!r} is not a valid {kind.__name__}") from None
    return values


def requirements() -> list[str]:
    """The third-party packages the model needs, pinned at the installed versions (mmrec itself: see above)."""
    pinned = []
    for package in _REQUIREMENTS:
        try:
            pinned.append(f"{package}=={metadata.version(package).split('+')[0]}")
        except metadata.PackageNotFoundError:
            pinned.append(package)
    return pinned


def log_recommender_model(checkpoint_path: str | Path, run_id: str, tracking_uri: str, *,
                          prepared_dir: str | Path | None = None) -> tuple[str, str]:
    """Log the checkpoint as a pyfunc model in the run `run_id` -> (its artifact location, its model id), what
    `MlflowClient.create_model_version(source=..., model_id=...)` takes. (A `models:/m-...` source is looked up
    through MLflow's *global* tracking URI by its SQL store, so the location is passed instead.)

    The catalogue is the checkpoint config's data.prepared_dir unless `prepared_dir` is given (one catalogue pass).
    """
    from mlflow.tracking import MlflowClient
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri  # scoped: the caller's URI is kept

    recommender = ItemRecommender.from_checkpoint(checkpoint_path, prepared_dir=prepared_dir)
    with tempfile.TemporaryDirectory(prefix="mmrec-pyfunc-") as scratch:
        bundle = recommender.save_bundle(Path(scratch) / BUNDLE_ARTIFACT)
        with _use_tracking_uri(tracking_uri), mlflow.start_run(run_id=run_id):
            # Re-opening the finished run (it returns to FINISHED on exit) links the model to its training run.
            info = mlflow.pyfunc.log_model(name=MODEL_NAME, python_model=str(ENTRY_FILE),
                                           artifacts={BUNDLE_ARTIFACT: str(bundle)},
                                           pip_requirements=requirements())
    return MlflowClient(tracking_uri).get_logged_model(info.model_id).artifact_location, info.model_id

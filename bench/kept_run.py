"""A trained run as the benches that re-score runs read it (`bench.paired`, `bench.new_item_boost`,
`bench.popularity_tilt`, `bench.id_content`): the checkpoint it kept as best, loaded, with its catalogue and
the files the driver wrote beside it under `data/` (the test subsets, `popularity.npy`: each item's count as a
training target, `seen.npy`). Anything missing is one `error:` line naming the file and what needed it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:  # the training stack loads when a run does, not when a bench prints its --help
    from pipeline.sequences import Examples
    from training.offline_eval import DecodedCatalogue, LoadedCheckpoint


def kept_checkpoint(run_dir: Path, needs: str = "") -> str:
    """A run directory -> the path of the checkpoint it kept as best (highest `val_selection`, as the driver
    registers it); one `error:` line when it is not a run directory, lacks the file `needs`, or has no checkpoint."""
    from ray.train import Result

    from training.driver import RUN_MARKER, best_of
    from training.trainer import SELECTION_SCORE

    if not (run_dir / RUN_MARKER).is_file() or (needs and not (run_dir / needs).is_file()):
        raise SystemExit(f"error: {run_dir} is not a training run directory" + (f" with {needs}" if needs else ""))
    if not (run_dir / "checkpoint_manager_snapshot.json").is_file():  # Ray Train's record of the checkpoints
        raise SystemExit(f"error: {run_dir} has no checkpoint (its run ended before the first one)")
    checkpoint, _ = best_of(Result.from_path(str(run_dir.resolve())), SELECTION_SCORE)
    if checkpoint is None:
        raise SystemExit(f"error: {run_dir} has no checkpoint")
    return checkpoint.path


@dataclass
class KeptRun:
    run_dir: Path
    checkpoint: str  # the kept checkpoint's path
    loaded: LoadedCheckpoint

    @property
    def model(self):
        return self.loaded.model

    def catalogue(self) -> DecodedCatalogue:
        """The run's catalogue, decoded as the checkpoint's pipeline decodes it."""
        from pipeline.sources import ITEMS_FILE
        from training.offline_eval import DecodedCatalogue

        items = Path(self.loaded.job.data.prepared_dir) / ITEMS_FILE
        return DecodedCatalogue(items, int(self.loaded.state["num_items"]))

    def content(self) -> torch.Tensor:
        """Every catalogue item's content vector [N+1, D] from the kept model (row 0 the padding)."""
        return self.catalogue().encode(self.loaded)

    def data_file(self, name: str, why: str) -> Path:
        """The run's `data/<name>`; one `error:` line saying `why` it is needed when it is missing."""
        path = self.run_dir / "data" / name
        if not path.is_file():
            raise SystemExit(f"error: {path} is missing: {why}")
        return path

    def examples(self, subset: str) -> Examples:
        """The run's `data/<subset>.parquet` (test, test_warm, test_cold, validation, train) as `Examples`."""
        from pipeline.content import read_examples

        return read_examples(self.data_file(f"{subset}.parquet", f"the {subset} examples"))

    def training_counts(self, length: int, why: str) -> np.ndarray:
        """[length] each item's count as a training target (`data/popularity.npy`); items past the file's end,
        new since the run trained, count 0."""
        counts = np.load(self.data_file("popularity.npy", why))[:length]
        return np.concatenate([counts, np.zeros(length - len(counts), dtype=counts.dtype)])


def open_kept_run(run_dir: Path, needs: str = "") -> KeptRun:
    """A run directory -> its kept checkpoint, loaded (`kept_checkpoint`'s errors where it has none, or lacks the
    file `needs`)."""
    from training.offline_eval import load_checkpoint

    checkpoint = kept_checkpoint(run_dir, needs=needs)
    return KeptRun(run_dir=run_dir, checkpoint=checkpoint, loaded=load_checkpoint(Path(checkpoint)))

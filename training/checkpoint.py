"""The training checkpoint: its file names, how it is written, and how it is read back safely (no Ray here).

A checkpoint directory holds
    model.pt       the recommender's state dict (tensors only): the evaluated weights, an average of the trained
                   ones under `train.average_epochs` (`training.averaging`)
    trained_weights.pt  with averaging only: the raw trainable parameters a resumed run continues from
    optimizer.pt   the optimizer's state dict (tensors and numbers only)
    state.json     epoch, global step, config, watermark, metrics, served sizes, the items in no training example
                   (`unseen_items`: scored by content alone, `model.new_item_offset` added; `training.offline_eval`)
    bank/          the memory-bank snapshot (numpy .npz without pickles + meta.json)
Every torch file is loaded with `weights_only=True`: a `model.pt` from elsewhere (a registry, `--checkpoint DIR`)
cannot run code when it is opened, on any torch the project allows. A file that is not a plain tensor archive is
refused with a `CheckpointError` (one line: the path and why).
"""
from __future__ import annotations

import json
import math
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from training.averaging import TRAINED_WEIGHTS_FILE

MODEL_FILE = "model.pt"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"
BANK_DIR = "bank"
ID_EMBEDDING_KEY = "item_encoder.id_embedding.weight"


class CheckpointError(ValueError):
    """A checkpoint file cannot be used: missing, not a checkpoint, or refused by the safe loader."""


def load_tensors(path: str | Path) -> Any:
    """A torch file of tensors (a state dict) -> its contents; anything that would need to run code is refused."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{path}: refused, not a plain tensor checkpoint (loaded with weights_only=True): {reason[:200]}"
        ) from None


def save_checkpoint(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict, *,
                    trained: dict[str, torch.Tensor] | None = None) -> None:
    torch.save(model.state_dict(), directory / MODEL_FILE)
    if trained is not None:
        torch.save(trained, directory / TRAINED_WEIGHTS_FILE)
    torch.save(optimizer.state_dict(), directory / OPTIMIZER_FILE)
    (directory / STATE_FILE).write_text(json.dumps(state, indent=2))


def is_checkpoint(directory: str | Path) -> bool:
    return (Path(directory) / MODEL_FILE).is_file()


def read_state(directory: str | Path) -> dict:
    """A checkpoint's state.json (CheckpointError when the directory is not a training checkpoint)."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a training checkpoint (no {STATE_FILE})")
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None


def load_model_weights(model: torch.nn.Module, path: Path) -> int:
    """Load a saved state dict into `model`, which may have a larger catalogue than the saved one.

    The item-id embedding [N_old+1, D] fills the first rows of the model's [N+1, D]; rows of items new to the
    catalogue keep their fresh initialisation. Returns how many such new rows there are (0 = same catalogue).
    """
    state = load_tensors(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a state dict")
    new_rows = 0
    saved = state.get(ID_EMBEDDING_KEY)
    current = model.state_dict().get(ID_EMBEDDING_KEY)
    if saved is not None and current is not None and saved.shape[0] < current.shape[0]:
        merged = current.clone()
        merged[: saved.shape[0]] = saved
        state[ID_EMBEDDING_KEY] = merged
        new_rows = current.shape[0] - saved.shape[0]
    model.load_state_dict(state)
    return new_rows


def saved_bank_capacity(directory: Path) -> int | None:
    """Capacity recorded in a saved bank snapshot (None when unreadable)."""
    from memory.local import BANK_META_FILE

    try:
        return int(json.loads((directory / BANK_META_FILE).read_text())["capacity"])
    except (OSError, ValueError, KeyError):
        return None


def bank_matches_snapshot(bank, directory: Path) -> float:
    """After a restore: does the live bank hold exactly the snapshot's vectors and write steps? (nan: not checked)"""
    from memory.local import LocalMemoryBankClient

    if getattr(bank, "num_shards", 1) != 1:
        return float("nan")  # the in-process reference reads single-shard snapshots only
    reference = LocalMemoryBankClient(capacity=bank.capacity, dim=bank.dim)
    reference.load(directory)
    ids = np.arange(bank.capacity)
    live, saved = bank.lookup(ids), reference.lookup(ids)
    return float(np.array_equal(live.vectors, saved.vectors) and np.array_equal(live.written_step, saved.written_step))


@dataclass
class Restored:
    """Where a training attempt starts: from scratch, a warm start, the driver's initial weights, or a resume."""

    start_epoch: int = 0
    resumed: bool = False  # from this run's own checkpoint (a restarted or re-run attempt)
    bank_filled: bool = False  # the bank already holds every item (restored, or filled by the driver's pass)
    bank_exact: float = math.nan  # 1.0: every restored bank vector equals the checkpoint's
    filled_by_ray_data: bool = False
    early_stopping: dict = field(default_factory=dict)  # the resumed run's best score, its epoch, epochs since
    trained_weights: dict | None = None  # a resumed averaging run's raw trainable parameters (model.pt: the average)


def restore(trainer, *, resume_dir: Path | None, init_checkpoint: str = "", init_model: str = "",
            bank_prefilled: bool = False, rank: int = 0, log: Callable[[str], None] = print) -> Restored:
    """Load what this attempt starts from into `trainer` (its model, optimizer, global step and bank).

    resume_dir: this run's latest checkpoint (model, optimizer, epoch, step, bank). Otherwise init_checkpoint:
    another run's weights and bank (incremental retraining; a grown catalogue keeps new items' fresh id rows and
    skips the wrong-sized bank). Otherwise init_model: the driver's initial weights, whose Ray Data pass already
    filled the bank (`bank_prefilled`). Only rank 0 touches the bank.
    """
    model, bank, restored = trainer.model, trainer.bank, Restored()
    if resume_dir is None and init_checkpoint:
        init_dir = Path(init_checkpoint)
        new_rows = load_model_weights(model, init_dir / MODEL_FILE)
        if rank == 0 and (init_dir / BANK_DIR).exists() and saved_bank_capacity(init_dir / BANK_DIR) == bank.capacity:
            bank.load(init_dir / BANK_DIR)  # the fill pass still runs: it covers every item of a grown catalogue
        if rank == 0:
            log(f"[train] warm start from {init_dir}" + (f" ({new_rows} new item-id rows)" if new_rows else ""))
    elif resume_dir is None and init_model:
        model.load_state_dict(load_tensors(init_model))
        restored.bank_filled = restored.filled_by_ray_data = bank_prefilled
    elif resume_dir is not None:
        model.load_state_dict(load_tensors(resume_dir / MODEL_FILE))
        trainer.optimizer.load_state_dict(load_tensors(resume_dir / OPTIMIZER_FILE))
        state = read_state(resume_dir)
        restored.start_epoch, trainer.global_step, restored.resumed = state["epoch"] + 1, state["global_step"], True
        restored.early_stopping = state.get("early_stopping", {})
        if (resume_dir / TRAINED_WEIGHTS_FILE).is_file():
            restored.trained_weights = load_tensors(resume_dir / TRAINED_WEIGHTS_FILE)
        if (resume_dir / BANK_DIR).exists():
            # every rank must agree that the bank is filled, or rank 0 skips the fill barrier the others wait at
            restored.bank_filled = True
            if rank == 0:
                bank.load(resume_dir / BANK_DIR)
                restored.bank_exact = bank_matches_snapshot(bank, resume_dir / BANK_DIR)
        if rank == 0:
            log(f"[train] resumed from checkpoint: epoch {restored.start_epoch}, step {trainer.global_step}, "
                f"bank restored={restored.bank_filled}")
    return restored

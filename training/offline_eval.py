"""Offline evaluation of a saved checkpoint against the current catalogue, in this process (no Ray).

This module owns: loading a checkpoint for a catalogue that may have grown since it was trained (new items get
content vectors from the item encoder and a zero id vector: scored by content alone, as the items no training
example held), decoding the catalogue once and encoding it with
any number of models, and full-ranking metrics of a checkpoint on given examples. The retrain's promotion gate
and `jobs.evaluate` both score through `evaluate_checkpoint`, so champion and challenger are measured by the
same code on the same item table. Both add the checkpoint's `model.new_item_offset` to the scores of the items it
never trained on (`LoadedCheckpoint.unseen`), as training's evaluation and serving do.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from encoders.config import resolve_text_model_path
from training.job_config import JobConfig
from model.build import build_recommender
from model.config import NEW_ITEM_OFFSET_RANGE
from model.recommender import Recommender
from pipeline.sequences import Examples
from pipeline.content import ContentSpec, decode_catalog
from training.evaluate import encode_catalog, evaluate_ranking, item_offsets
from training.checkpoint import MODEL_FILE, load_model_weights, read_state


@dataclass
class LoadedCheckpoint:
    model: Recommender  # eval mode, CPU, sized for the catalogue it was loaded for
    job: JobConfig  # the config it was trained with
    state: dict  # its state.json
    new_items: int  # catalogue rows the checkpoint never saw
    unseen: np.ndarray  # [N+1] bool: items in none of its training examples, those rows included (row 0 False)

    def item_offset(self, offset: float | None = None) -> torch.Tensor | None:
        """The per-item score offsets [N+1] of `offset` (default: its config's model.new_item_offset) on the
        unseen items, or None where nothing is added (`training.evaluate.item_offsets`)."""
        return item_offsets(self.unseen, self.job.model.new_item_offset if offset is None else offset)


def _known_keys_only(cls: type, data: dict, prefix: str = "") -> tuple[dict, list[str]]:
    """Drop keys `cls` (a config dataclass) no longer has -> (the rest, the dropped dotted keys)."""
    import dataclasses
    import typing

    types_by_name = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kept, dropped = {}, []
    for key, value in data.items():
        if key not in names:
            dropped.append(prefix + key)
        elif dataclasses.is_dataclass(types_by_name[key]) and isinstance(value, dict):
            kept[key], inner = _known_keys_only(types_by_name[key], value, f"{prefix}{key}.")
            dropped += inner
        else:
            kept[key] = value
    return kept, dropped


def job_config_of(state: dict) -> JobConfig:
    """The config saved in a checkpoint's state.json. Keys this code no longer has (a checkpoint from an older
    version) are dropped with a warning, so a champion stays loadable after a config change."""
    import logging

    config, dropped = _known_keys_only(JobConfig, state["config"])
    if dropped:
        logging.getLogger(__name__).warning("checkpoint config keys unknown to this code, ignored: %s", dropped)
    return JobConfig.from_dict(config)


def load_checkpoint(checkpoint_dir: Path, num_items: int | None = None) -> LoadedCheckpoint:
    """A checkpoint directory -> its model for a catalogue of `num_items` (default: the one it trained on)."""
    checkpoint_dir = Path(checkpoint_dir)
    state = read_state(checkpoint_dir)
    job = job_config_of(state)
    trained_items = int(state["num_items"])
    num_items = trained_items if num_items is None else num_items
    if num_items < trained_items:
        raise ValueError(f"the catalogue has {num_items} items, fewer than the {trained_items} the checkpoint in "
                         f"{checkpoint_dir} was trained on: item indices are not the same")
    model = build_recommender(job.model, job.image, job.text, num_items=num_items, max_history=job.data.max_history)
    new_items = load_model_weights(model, checkpoint_dir / MODEL_FILE)
    if new_items:
        # Serving a model to items it never trained on: content only (a random id vector would be noise).
        with torch.no_grad():
            model.item_encoder.id_embedding.weight[trained_items + 1 :].zero_()
    return LoadedCheckpoint(model.eval(), job, state, num_items - trained_items,
                            unseen_rows(state, trained_items, num_items))


def trained_items_of(checkpoint_dir: str | Path, num_items: int) -> np.ndarray | None:
    """[num_items+1] bool: the items in a checkpoint's training examples, or None where it does not record them
    (saved before `unseen_items`). A run warm-started from it (`train.init_checkpoint`, the retrain's challenger)
    counts these as seen too: their trained id rows are not zeroed for being absent from its own examples."""
    state = read_state(checkpoint_dir)
    if state.get("unseen_items") is None:
        return None
    trained = ~unseen_rows(state, int(state["num_items"]), max(num_items, int(state["num_items"])))
    trained[0] = False
    return trained[: num_items + 1]


def unseen_rows(state: dict, trained_items: int, num_items: int) -> np.ndarray:
    """[num_items+1] bool: the items in none of a checkpoint's training examples (its state.json's `unseen_items`)
    and the items past the catalogue it trained on (new since). A checkpoint saved before `unseen_items` was
    recorded knows only the latter: said once in the log when its model.new_item_offset is not 0."""
    import logging

    unseen = np.zeros(num_items + 1, dtype=bool)
    unseen[trained_items + 1:] = True
    listed = state.get("unseen_items")
    if listed is None:
        if state.get("config", {}).get("model", {}).get("new_item_offset", 0):
            logging.getLogger(__name__).warning(
                "this checkpoint does not record which items were in no training example: model.new_item_offset "
                "applies only to the %d items added since it was trained", num_items - trained_items)
        return unseen
    listed = np.asarray(listed, dtype=np.int64)
    if len(listed) and (listed.min() < 1 or listed.max() > trained_items):
        raise ValueError(f"state.json's unseen_items are not item indices in 1..{trained_items}")
    unseen[listed] = True
    return unseen


def content_spec_of(job: JobConfig) -> ContentSpec:
    return ContentSpec(job.image.image_size, job.text.max_length, resolve_text_model_path(job.text.path))


class DecodedCatalogue:
    """Every catalogue item's decoded pixels and tokens, decoded once per content spec, encodable by any model."""

    def __init__(self, items_path: Path, num_items: int, batch_size: int = 256, max_image_pixels: int = 40_000_000):
        self.items_path = Path(items_path)
        self.num_items = num_items
        self.batch_size = batch_size
        self.max_image_pixels = max_image_pixels
        self._decoded: dict[ContentSpec, list[dict[str, torch.Tensor]]] = {}

    def batches(self, spec: ContentSpec) -> list[dict[str, torch.Tensor]]:
        if spec not in self._decoded:
            self._decoded[spec] = [
                {key: torch.from_numpy(np.asarray(value)) for key, value in batch.items()}
                for batch in decode_catalog(self.items_path, spec, self.batch_size, self.max_image_pixels)
            ]
        return self._decoded[spec]

    def encode(self, loaded: LoadedCheckpoint) -> torch.Tensor:
        """-> content table [N+1, D] (row 0 = padding) of every item, by this checkpoint's item encoder."""
        return encode_catalog(loaded.model, self.batches(content_spec_of(loaded.job)), self.num_items,
                              torch.device("cpu"))


def evaluate_checkpoint(loaded: LoadedCheckpoint, catalogue: DecodedCatalogue, examples: Examples, *,
                        ks: Sequence[int], mask_history: bool, batch_size: int = 256,
                        sizes: Sequence[int] = (), new_item_offset: float | None = None,
                        by_target: bool = False, content: torch.Tensor | None = None) -> dict[str, float]:
    """Full-ranking Recall@k / NDCG@k / MRR of `examples` over the whole catalogue (names as in training), with
    `new_item_offset` (default: the checkpoint's model.new_item_offset) on the unseen items' scores. by_target:
    also the examples whose target is an unseen item (`new_target_*`, with their count `new_target_examples`) and
    the others (`seen_target_*`), at full size: what choosing new_item_offset trades. content: the catalogue as
    `catalogue.encode(loaded)` made it already (else encoded here)."""
    if len(examples) == 0:
        raise ValueError("no examples to evaluate on")
    if content is None:
        content = catalogue.encode(loaded)
    offset = loaded.item_offset(new_item_offset)
    metrics = evaluate_ranking(loaded.model, content, examples, ks=tuple(ks), mask_history=mask_history,
                               batch_size=batch_size, sizes=sizes, item_offset=offset)
    if by_target:
        new = loaded.unseen[np.asarray(examples.target)]
        metrics["new_target_examples"] = float(new.sum())
        for name, rows in (("new_target", new), ("seen_target", ~new)):
            if rows.any():
                part = evaluate_ranking(loaded.model, content, examples.subset(rows), ks=tuple(ks),
                                        mask_history=mask_history, batch_size=batch_size, item_offset=offset)
                metrics.update({f"{name}_{k}": v for k, v in part.items()})
    return metrics


def fit_new_item_offset(loaded: LoadedCheckpoint, content: torch.Tensor, examples: Examples, recall: float, *,
                        mask_history: bool, batch_size: int = 256, iterations: int = 24) -> tuple[float, int]:
    """The smallest `model.new_item_offset` (within its range, to 4 / 2**iterations) at which Recall@10 of the
    `examples` whose target is an item in no training example reaches `recall` -> (offset, how many such examples).
    Lifting every unseen item by one offset keeps their order among themselves and only moves them past the others,
    so that recall does not fall as the offset rises: bisection finds the level. ValueError (one line) where no
    example has such a target or the recall is out of reach within the range. Content `[N+1, D]` as
    `DecodedCatalogue.encode` makes it."""
    new = loaded.unseen[np.asarray(examples.target)]
    if not new.any():
        raise ValueError(f"none of the {len(examples)} examples has a target in no training example: nothing to "
                         "fit new items' level on (a time split's validation window holds such examples)")
    targets = examples.subset(new)

    def recall_at(offset: float) -> float:
        return evaluate_ranking(loaded.model, content, targets, ks=(10,), mask_history=mask_history,
                                batch_size=batch_size, item_offset=loaded.item_offset(offset))["recall@10"]

    low, high = NEW_ITEM_OFFSET_RANGE
    try:
        return lowest_reaching(recall_at, recall, low, high, iterations), int(new.sum())
    except ValueError as err:
        raise ValueError(f"new items' Recall@10 of {recall:g} on {int(new.sum())} examples: {err}") from None


def lowest_reaching(value_at: Callable[[float], float], target: float, low: float, high: float,
                    iterations: int) -> float:
    """The smallest x in [low, high] at which a non-decreasing `value_at` reaches `target`: `low` where it is
    reached there, else by bisection to within (high - low) / 2**iterations above it. ValueError where even
    value_at(high) is short of it."""
    if (top := value_at(high)) < target:
        raise ValueError(f"{target:g} is out of reach: {top:.4f} at {high:g}, the top of the range")
    if value_at(low) >= target:
        return low
    for _ in range(iterations):
        middle = (low + high) / 2
        low, high = (low, middle) if value_at(middle) >= target else (middle, high)
    return high


def checkpoint_job_config(checkpoint_dir: Path, overrides: Sequence[str] = ()) -> JobConfig:
    """The config a checkpoint was trained with, with `--set` overrides on top (data location, tracking, ...)."""
    from training.job_config import validate
    from training.overrides import apply_overrides

    job = job_config_of(read_state(checkpoint_dir))
    return validate(apply_overrides(job, list(overrides)))

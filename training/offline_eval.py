"""Offline evaluation of a saved checkpoint against the current catalogue, in this process (no Ray).

This module owns: loading a checkpoint for a catalogue that may have grown since it was trained (new items get
content vectors from the item encoder and a zero id vector: scored by content alone, as the items no training
example held), decoding the catalogue once and encoding it with
any number of models, and full-ranking metrics of a checkpoint on given examples. The retrain's promotion gate
and `jobs.evaluate` both score through `evaluate_checkpoint`, so champion and challenger are measured by the
same code on the same item table.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from encoders.config import resolve_text_model_path
from training.job_config import JobConfig
from model.build import build_recommender
from model.recommender import Recommender
from pipeline.sequences import Examples
from pipeline.content import ContentSpec, decode_catalog
from training.evaluate import encode_catalog, evaluate_ranking
from training.checkpoint import MODEL_FILE, load_model_weights, read_state


@dataclass
class LoadedCheckpoint:
    model: Recommender  # eval mode, CPU, sized for the catalogue it was loaded for
    job: JobConfig  # the config it was trained with
    state: dict  # its state.json
    new_items: int  # catalogue rows the checkpoint never saw


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
    return LoadedCheckpoint(model.eval(), job, state, num_items - trained_items)


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
                        sizes: Sequence[int] = ()) -> dict[str, float]:
    """Full-ranking Recall@k / NDCG@k / MRR of `examples` over the whole catalogue (names as in training)."""
    if len(examples) == 0:
        raise ValueError("no examples to evaluate on")
    content = catalogue.encode(loaded)
    return evaluate_ranking(loaded.model, content, examples, ks=tuple(ks), mask_history=mask_history,
                            batch_size=batch_size, sizes=sizes)


def checkpoint_job_config(checkpoint_dir: Path, overrides: Sequence[str] = ()) -> JobConfig:
    """The config a checkpoint was trained with, with `--set` overrides on top (data location, tracking, ...)."""
    from training.job_config import validate
    from training.overrides import apply_overrides

    job = job_config_of(read_state(checkpoint_dir))
    return validate(apply_overrides(job, list(overrides)))

"""The frozen-trunk cache: each encoder's frozen part run once per item, only the trained top run per step.

When only the top layers of an encoder train, what its frozen part (stem, embeddings, lower blocks) makes of an
item is a pure function of the item's content (`PartiallyTrainableEncoder.trunk`). The cache holds that output
for every catalogue item, as one tensor per field indexed by item id ([N+1, ...], row 0 = padding):
`image_trunk` (the last frozen block's feature map, or the pooled features when nothing trains), `text_trunk`
(the hidden states entering the first trained layer [T, H], or the pooled [H]) and the small per-item inputs the
top still needs (masks, token ids). Training then looks the targets' (and, with memory.mode=recompute, the
history items') rows up instead of decoding and encoding them, and each catalogue pass runs only the top.
With everything frozen the cache is the whole encoder: the frozen two-stage baseline becomes vectors computed once.

It is rebuilt at the start of every training attempt from that attempt's own model (the frozen weights cannot
change within a run), so a changed encoder or frozen depth always gets a fresh one. It is off, and the run says
why, where it cannot be exact: an encoder without a frozen trunk (unfreeze_top=-1) or that cannot be split, a trunk
that is not deterministic (train and eval mode disagree on the probe items), or a catalogue whose cache would
exceed `memory.trunk_cache_max_mb`.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from encoders.fusion import ItemEncoder
from model.build import build_recommender
from pipeline.content import ContentSpec, decode_catalog
from training.job_config import JobConfig

# Decoded-content fields an item encoder takes (as the pipeline delivers them).
RAW_CONTENT_FIELDS = ("image", "image_mask", "input_ids", "attention_mask", "text_mask")


@dataclass(frozen=True)
class CachePlan:
    """Whether a run caches its trunks, and why not when it does not."""

    enabled: bool
    reason: str  # why it is off ("" when on)
    bytes_per_item: int
    total_bytes: int

    def describe(self) -> str:
        if not self.enabled:
            return f"frozen-trunk cache off: {self.reason}"
        return (f"frozen-trunk cache on: {self.bytes_per_item / 1024:.1f} KiB per item, "
                f"{self.total_bytes / 2**20:.1f} MiB in all")


def _to_tensors(batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(batch[k]).to(device) for k in RAW_CONTENT_FIELDS}


def plan_trunk_cache(encoder: ItemEncoder, probe: dict, num_items: int, *, wanted: bool,
                     max_mb: float) -> CachePlan:
    """Run the trunk on a few decoded items (`probe`, a catalogue batch) and decide: supported, deterministic
    (train and eval mode give the same trunk output) and small enough for `num_items` + 1 rows."""
    if not wanted:
        return CachePlan(False, "memory.trunk_cache=false", 0, 0)
    unsupported = encoder.trunk_cache_unsupported()
    if unsupported:
        return CachePlan(False, unsupported, 0, 0)
    tensors = _to_tensors(probe, torch.device("cpu"))
    was_training = encoder.training
    try:
        encoder.train()
        in_training = encoder.content_trunk(**tensors)
        encoder.eval()
        in_eval = encoder.content_trunk(**tensors)
    finally:
        encoder.train(was_training)
    per_item = sum(value.element_size() * value[0].numel() for value in in_eval.values())
    total = per_item * (num_items + 1)
    if any(not torch.equal(in_training[k], in_eval[k]) for k in in_eval):
        return CachePlan(False, "the trunk's output differs between training and evaluation mode (not "
                                "deterministic)", per_item, total)
    if total > max_mb * 2**20:
        return CachePlan(False, f"it would take {total / 2**20:.0f} MiB for {num_items} items "
                                f"({per_item} bytes each), over memory.trunk_cache_max_mb={max_mb:g}", per_item, total)
    return CachePlan(True, "", per_item, total)


class TrunkCache:
    """Every item's trunk fields, one tensor [N+1, ...] per field (row 0 = padding)."""

    def __init__(self, fields: dict[str, torch.Tensor], encoders_frozen: bool = False) -> None:
        self.fields = fields
        # no encoder parameter trains: the cache holds whole encoders' outputs, and fresh vectors for the whole
        # catalogue are only a projection away
        self.encoders_frozen = encoders_frozen

    @classmethod
    def build(cls, encoder: ItemEncoder, batches: Iterable[dict], num_items: int,
              device: torch.device) -> TrunkCache:
        """Decoded catalogue batches (item_index + content) -> the cache, on `device`."""
        was_training = encoder.training
        encoder.eval()  # the trunk is frozen: eval mode only makes certain that nothing random runs
        fields: dict[str, torch.Tensor] = {}
        seen = torch.zeros(num_items + 1, dtype=torch.bool, device=device)
        try:
            for batch in batches:
                ids = torch.as_tensor(batch["item_index"]).to(device)
                trunk = encoder.content_trunk(**_to_tensors(batch, device))
                for key, value in trunk.items():
                    if key not in fields:
                        fields[key] = torch.zeros(num_items + 1, *value.shape[1:], dtype=value.dtype, device=device)
                    fields[key][ids] = value
                seen[ids] = True
        finally:
            encoder.train(was_training)
        missing = int((~seen[1:]).sum())
        if missing:
            raise RuntimeError(f"the trunk cache's catalogue pass did not cover {missing} of {num_items} items")
        encoders = [e for e in (encoder.image_encoder, encoder.text_encoder) if e is not None]
        return cls(fields, not any(p.requires_grad for e in encoders for p in e.parameters()))

    def lookup(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """item ids [*] -> trunk fields [*, ...] (what `ItemEncoder.encode_trunk` and `Recommender.forward` take)."""
        return {key: table[ids] for key, table in self.fields.items()}

    def every_item(self) -> dict[str, torch.Tensor]:
        """Every row [N+1, ...] per field (row 0, the padding, zeros): `lookup` of every id in order, without
        copying the tables (39 MiB a step for the `movielens` preset's side networks, ~15 ms on 2 cores). Read only."""
        return dict(self.fields)

    def batches(self, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        """The whole catalogue as trunk-field batches with item_index, for a catalogue pass (only the top runs)."""
        num_rows = next(iter(self.fields.values())).shape[0]
        device = next(iter(self.fields.values())).device
        for start in range(1, num_rows, batch_size):
            ids = torch.arange(start, min(start + batch_size, num_rows), device=device)
            yield {"item_index": ids, **self.lookup(ids)}

    @property
    def nbytes(self) -> int:
        return sum(table.element_size() * table.numel() for table in self.fields.values())


def trunk_cache_plan(job: JobConfig, items_path: Path, spec: ContentSpec, num_items: int) -> CachePlan:
    """The driver's decision for a run: the run's item encoder (built as the workers build it) probed on the
    first few catalogue items."""
    if not job.memory.trunk_cache:
        return CachePlan(False, "memory.trunk_cache=false", 0, 0)
    if not job.model.modalities:
        return CachePlan(False, "the model has no content encoders (ID-only): there is nothing to cache", 0, 0)
    if all(getattr(job, name).unfreeze_top == -1 for name in job.model.modalities):
        return CachePlan(False, "every encoder layer trains (unfreeze_top=-1): there is no frozen trunk", 0, 0)
    model = build_recommender(job.model, job.image, job.text, num_items=num_items, max_history=job.data.max_history)
    probe = next(decode_catalog(items_path, spec, batch_size=4, max_image_pixels=job.data.max_image_pixels))
    return plan_trunk_cache(model.item_encoder, probe, num_items, wanted=True, max_mb=job.memory.trunk_cache_max_mb)

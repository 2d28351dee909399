"""Full-ranking evaluation over the whole catalogue (no sampled negatives).

Item vectors always come from a fresh catalogue pass (`encode_catalog`), never from the memory bank, so a
checkpoint is judged on what it would serve. Row 0 of every item table is padding and is never ranked.

Matryoshka models are scored at every supported size from one catalogue pass: full normalised vectors are
truncated and renormalised (`model.recommender.at_size`), and each metric gets a `@s<size>` twin
(`ndcg@10@s64`) beside the unsuffixed full-size one. `size_table` / `write_size_report` turn those keys into
the size x metric table (JSON + CSV) and the NDCG-vs-size plot that the driver logs to MLflow.

`model.new_item_offset` is added to the cosine score of every item in no training example wherever items are
ranked (`item_offsets`: the per-item row every ranking here takes as `item_offset`), so evaluation scores what
serving (`serving.recommender`) returns.
"""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch

from model.recommender import Recommender, at_size
from pipeline.sequences import Examples
from training.metrics import RankingAccumulator, auc, grouped_auc, history_mask, target_ranks


@torch.inference_mode()
def encode_content_batch(model: Recommender, batch: dict, device: torch.device) -> torch.Tensor:
    """One catalogue batch (numpy or torch) -> content vectors [n, D]: decoded content (image [n,3,S,S], masks [n],
    tokens [n,T]) or trunk-cache fields (`training.trunk_cache`). Every catalogue pass (training, the Ray Data bank
    fill, offline evaluation, export, benchmarks) encodes through this one function."""
    return model.item_encoder.encode_fields(
        {k: torch.as_tensor(v).to(device) for k, v in batch.items() if k != "item_index"})


def encode_catalog(model: Recommender, batches: Iterable[dict[str, torch.Tensor]], num_items: int,
                   device: torch.device) -> torch.Tensor:
    """Catalogue content batches (from `pipeline.stages.catalog_dataset`) -> content table [N+1, D], row 0 = 0."""
    was_training = model.training
    model.eval()
    table = torch.zeros(num_items + 1, model.item_encoder.dim, device=device)
    seen = torch.zeros(num_items + 1, dtype=torch.bool, device=device)
    for batch in batches:
        ids = torch.as_tensor(batch["item_index"]).to(device)
        table[ids] = encode_content_batch(model, batch, device)
        seen[ids] = True
    model.train(was_training)
    missing = int((~seen[1:]).sum())
    if missing:
        raise RuntimeError(f"catalogue pass did not cover {missing} of {num_items} items")
    return table


def item_offsets(unseen: np.ndarray | torch.Tensor | None, offset: float,
                 device: torch.device | str = "cpu") -> torch.Tensor | None:
    """unseen [N+1] bool (True: the item is in no training example) and `model.new_item_offset` -> the score offset
    of every item [N+1] (the offset on unseen items, 0 elsewhere and on row 0, the padding), or None where nothing
    would be added (offset 0, no unseen item, or unseen not known)."""
    if unseen is None or offset == 0:
        return None
    flags = torch.as_tensor(np.asarray(unseen, dtype=bool)).clone()
    flags[0] = False
    if not flags.any():
        return None
    return (flags.to(torch.float32) * float(offset)).to(device)


def _offset_scores(scores: torch.Tensor, item_offset: torch.Tensor | None) -> torch.Tensor:
    """scores [U, N+1] (cosines) + the per-item offsets [N+1], then column 0 (padding) = -inf"""
    if item_offset is not None:
        scores = scores + item_offset.to(scores.device, scores.dtype)[None, :]
    scores[:, 0] = float("-inf")
    return scores


@torch.inference_mode()
def score_users(model: Recommender, content: torch.Tensor, history: torch.Tensor,
                size: int | None = None, item_offset: torch.Tensor | None = None) -> torch.Tensor:
    """content [N+1, D], history [U, L] -> scores [U, N+1] (column 0 = -inf), with vectors at `size` if given;
    item_offset [N+1]: added to every user's scores (`item_offsets`)"""
    ids = torch.arange(content.shape[0], device=content.device)
    items = model.item_vectors(content, ids, size)  # [N+1, size or D]
    user = model.user_vectors(history, content[history], size)  # [U, size or D]
    return _offset_scores(user @ items.T, item_offset)


def _batch_ranks(model: Recommender, content: torch.Tensor, examples: Examples, *,
                 readings: Sequence[tuple[int | None, bool]], batch_size: int,
                 exclude_items: torch.Tensor | None = None,
                 item_offset: torch.Tensor | None = None) -> Iterator[tuple[slice, dict[tuple[int | None, bool], torch.Tensor]]]:
    """(the batch's rows of `examples`, {(size, mask_history): 0-based target ranks}) for every batch, one entry per
    reading (size None = full). The sequence model runs once a batch and the scores once a size, whatever the
    number of readings: a second protocol costs a mask, not a pass. exclude_items [N+1] bool: items no target is
    ranked against (as the history under mask_history); item_offset [N+1]: added to every score at every size."""
    device = content.device
    items = model.item_vectors(content, torch.arange(content.shape[0], device=device))  # [N+1, D]
    sizes = dict.fromkeys(size for size, _ in readings)
    items_at = {size: items if size is None else at_size(items, size) for size in sizes}
    never = None if exclude_items is None else exclude_items.to(device)[None, :]
    for start in range(0, len(examples), batch_size):
        rows = slice(start, min(start + batch_size, len(examples)))
        history = torch.as_tensor(examples.history[rows], device=device)
        targets = torch.as_tensor(examples.target[rows], device=device)
        user = model.user_vectors(history, content[history])  # [U, D], the sequence model runs once
        excludes = {}  # mask_history -> [U, N+1] like scores, or None
        for masked in dict.fromkeys(masked for _, masked in readings):
            exclude = history_mask(history, content.shape[0], pad_id=0) if masked else None
            if never is not None:
                exclude = never.expand(len(targets), -1) if exclude is None else exclude | never
            excludes[masked] = exclude
        ranks = {}
        for size, sized_items in items_at.items():
            scores = _offset_scores((user if size is None else at_size(user, size)) @ sized_items.T, item_offset)
            for reading in readings:
                if reading[0] == size:
                    ranks[reading] = target_ranks(scores, targets, excludes[reading[1]])
        yield rows, ranks


@torch.inference_mode()
def example_ranks(model: Recommender, content: torch.Tensor, examples: Examples, *, mask_history: bool,
                  batch_size: int = 256, exclude_items: torch.Tensor | None = None,
                  item_offset: torch.Tensor | None = None) -> np.ndarray:
    """Each example's 0-based target rank over the catalogue, in `examples`' order (what `evaluate_ranking`
    averages; for per-user statistics such as bench/paired.py's). exclude_items [N+1] bool: items left out of
    every ranking (a target is never left out of its own); item_offset [N+1]: as `evaluate_ranking`."""
    was_training = model.training
    model.eval()
    ranks = [r[(None, mask_history)] for _, r in _batch_ranks(
        model, content, examples, readings=((None, mask_history),), batch_size=batch_size,
        exclude_items=exclude_items, item_offset=item_offset)]
    model.train(was_training)
    return torch.cat(ranks).cpu().numpy() if ranks else np.zeros(0, dtype=np.int64)


@torch.inference_mode()
def evaluate_ranking(model: Recommender, content: torch.Tensor, examples: Examples, *, ks: tuple[int, ...],
                     mask_history: bool, batch_size: int = 256, sizes: Sequence[int] = (),
                     item_offset: torch.Tensor | None = None) -> dict[str, float]:
    """Recall@k, NDCG@k and MRR of `examples` (one target each) ranked against every catalogue item.

    With `sizes`, every metric is also reported at each size s under `<metric>@s<s>` (vectors truncated to s
    and renormalised); the unsuffixed keys are the full-size ones. item_offset [N+1]: added to every item's
    score (`item_offsets`: `model.new_item_offset` on the items in no training example).
    """
    return evaluate_protocols(model, content, examples, ks=ks, headline_mask=mask_history, batch_size=batch_size,
                              sizes=sizes, item_offset=item_offset, both=False)[""]


@torch.inference_mode()
def evaluate_protocols(model: Recommender, content: torch.Tensor, examples: Examples, *, ks: tuple[int, ...],
                       headline_mask: bool, batch_size: int = 256, sizes: Sequence[int] = (),
                       item_offset: torch.Tensor | None = None, subsets: Mapping[str, np.ndarray] | None = None,
                       both: bool = True) -> dict[str, dict[str, float]]:
    """`evaluate_ranking` of `examples` and of row subsets of them, under both protocols, from one pass of the
    sequence model: {"": metrics of every example, name: metrics of the rows where subsets[name] ([len(examples)]
    bool) is True}. Each holds the headline protocol's metrics (`headline_mask`: the history masked or not)
    unprefixed and, with `both`, the other protocol's as `masked_*` / `unmasked_*`; the whole set's also at every
    size in `sizes` (`<metric>@s<s>`). A subset with no rows is left out."""
    was_training = model.training
    model.eval()
    full_dim = content.shape[1]
    ks = tuple(ks)
    protocols = (headline_mask, not headline_mask) if both else (headline_mask,)
    extra = tuple(s for s in dict.fromkeys(sizes) if s != full_dim)
    readings = (*((None, masked) for masked in protocols), *((s, headline_mask) for s in extra))
    subsets = {name: torch.as_tensor(np.asarray(rows, dtype=bool)) for name, rows in (subsets or {}).items()}
    for name, rows in subsets.items():
        if rows.shape != (len(examples),):
            raise ValueError(f"subset {name!r} has {tuple(rows.shape)} rows, the examples {len(examples)}")
    accumulators = {(name, reading): RankingAccumulator(ks=ks)
                    for name in ("", *subsets) for reading in readings if name == "" or reading[0] is None}
    for rows, ranks in _batch_ranks(model, content, examples, readings=readings, batch_size=batch_size,
                                    item_offset=item_offset):
        for reading, batch in ranks.items():
            accumulators["", reading].update(batch)
            if reading[0] is None:
                for name, member in subsets.items():
                    chosen = member[rows].to(batch.device)
                    if chosen.any():
                        accumulators[name, reading].update(batch[chosen])
    model.train(was_training)
    out: dict[str, dict[str, float]] = {}
    for name in ("", *subsets):
        if name and accumulators[name, (None, headline_mask)].count == 0:
            continue  # (no examples at all raises, as RankingAccumulator.compute does)
        metrics = accumulators[name, (None, headline_mask)].compute()
        if name == "":
            for size in sizes:
                at = metrics if size == full_dim else accumulators["", (size, headline_mask)].compute()
                metrics.update({f"{key}@s{size}": value for key, value in list(at.items()) if "@s" not in key})
        if both:
            other = accumulators[name, (None, not headline_mask)].compute()
            metrics.update({f"{'unmasked' if headline_mask else 'masked'}_{key}": v for key, v in other.items()})
        out[name] = metrics
    return out


_SIZED_KEY = re.compile(r"^(?P<name>.+)@s(?P<size>\d+)$")


def size_table(metrics: dict[str, float], prefix: str = "test_") -> list[dict[str, float]]:
    """Per-size keys (`<prefix><metric>@s<size>`) -> rows [{"size": s, "<metric>": value, ...}] by size."""
    rows: dict[int, dict[str, float]] = {}
    for key, value in metrics.items():
        if not key.startswith(prefix):
            continue
        match = _SIZED_KEY.match(key[len(prefix):])
        if match:
            size = int(match["size"])
            rows.setdefault(size, {"size": size})[match["name"]] = float(value)
    return [rows[size] for size in sorted(rows)]


def write_size_report(metrics: dict[str, float], directory: Path, prefix: str = "test_",
                      plot_metric: str = "ndcg@10") -> list[Path]:
    """Write matryoshka_sizes.json / .csv (size x metric) and ndcg_vs_size.png into `directory`; -> the paths.

    Returns [] when `metrics` holds no per-size keys (not a Matryoshka run).
    """
    rows = size_table(metrics, prefix)
    if not rows:
        return []
    directory.mkdir(parents=True, exist_ok=True)
    names = [name for name in rows[0] if name != "size"]
    json_path = directory / "matryoshka_sizes.json"
    json_path.write_text(json.dumps({"split": prefix.rstrip("_"), "rows": rows}, indent=2))
    csv_path = directory / "matryoshka_sizes.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["size", *names])
        writer.writeheader()
        writer.writerows(rows)
    paths = [json_path, csv_path]
    if plot_metric in names:
        import matplotlib

        matplotlib.use("Agg")  # headless workers and CI have no display
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(5, 3.5))
        axis.plot([r["size"] for r in rows], [r[plot_metric] for r in rows], marker="o")
        axis.set_xscale("log", base=2)
        axis.set_xticks([r["size"] for r in rows], [str(r["size"]) for r in rows])
        axis.set_xlabel("embedding size")
        axis.set_ylabel(f"{prefix.rstrip('_')} {plot_metric}")
        axis.set_title(f"{plot_metric} vs Matryoshka size (one model)")
        axis.grid(alpha=0.3)
        figure.tight_layout()
        plot_path = directory / f"{plot_metric.replace('@', '_at_')}_vs_size.png"
        figure.savefig(plot_path, dpi=100)
        plt.close(figure)
        paths.append(plot_path)
    return paths


def popularity_metrics(popularity: np.ndarray, examples: Examples, *, ks: tuple[int, ...],
                       mask_history: bool) -> dict[str, float]:
    """The most-popular baseline under the same protocol: every user gets items ranked by training count.

    Ties in count are broken by item index (a fixed order), so the baseline gets no tie bonus.
    """
    num_items = len(popularity) - 1
    order_bonus = -np.arange(num_items + 1) / (10.0 * (num_items + 1))
    base = torch.as_tensor(popularity + order_bonus, dtype=torch.float64)
    base[0] = float("-inf")
    acc = RankingAccumulator(ks=ks)
    for start in range(0, len(examples), 1024):
        history = torch.as_tensor(examples.history[start : start + 1024])
        targets = torch.as_tensor(examples.target[start : start + 1024])
        scores = base.expand(len(targets), -1)
        exclude = history_mask(history, num_items + 1, pad_id=0) if mask_history else None  # [U, N+1]
        acc.update(target_ranks(scores, targets, exclude))
    return acc.compute()


@torch.inference_mode()
def evaluate_ctr(model: Recommender, content: torch.Tensor, examples: Examples, *, positive_rating: float,
                 batch_size: int = 256) -> dict[str, float]:
    """Click metrics of (history, candidate) pairs: AUC, and grouped AUC per user (weighted and unweighted).

    Labels: rating >= positive_rating. LEMUR's QAUC groups by query; with no query in the data, by user.
    """
    was_training = model.training
    model.eval()
    scores = []
    for start in range(0, len(examples), batch_size):
        history = torch.as_tensor(examples.history[start : start + batch_size], device=content.device)
        targets = torch.as_tensor(examples.target[start : start + batch_size], device=content.device)
        user = model.user_vectors(history, content[history])
        item = model.item_vectors(content[targets], targets)
        scores.append((user * item).sum(-1).cpu().numpy())
    model.train(was_training)
    labels = (examples.rating >= positive_rating).astype(np.int64)
    score = np.concatenate(scores) if scores else np.zeros(0)
    out: dict[str, float] = {}
    if 0 < labels.sum() < len(labels):
        out["auc"] = float(auc(labels, score))
    weighted = grouped_auc(labels, score, examples.user, weighted=True)
    unweighted = grouped_auc(labels, score, examples.user, weighted=False)
    out.update(gauc=float(weighted["gauc"]), gauc_unweighted=float(unweighted["gauc"]),
               gauc_groups=float(weighted["groups_used"]))
    return out

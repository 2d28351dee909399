"""The trainer: plain PyTorch (no Ray). It owns the step, the epoch, the catalogue pass and evaluation.

Its parts come in by injection (`build_trainer` is the one place where the config picks them):
- an *objective* (`model.losses`: sampled or full softmax, CTR; Matryoshka wraps any of them),
- a *negatives* source (`InBatchNegatives`, `UniformNegatives`, `CatalogueNegatives`): extra candidates for
  the objective beyond the batch's own positives,
- a *history-content* source (`BankHistory`: LEMUR's memory bank; `RecomputeHistory`: every history item
  encoded with gradients, the costly baseline),
- the memory bank itself, through `memory.local.ItemBank`: one lookup (history, target and negative ids
  together) and one asynchronous write per step.
Whoever runs it (the Ray Train worker in `training.loop`, a benchmark, a test) feeds it batches and decides
where checkpoints and metrics go. Step callbacks (`callbacks`) see every global step before it runs: tests
inject faults through them.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import ClassVar
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from memory.local import ItemBank, LookupResult
from model.build import build_recommender, encoder_parameters
from model.losses import build_objective
from model.recommender import Recommender, gather_rows
from pipeline.sequences import Examples
from training.evaluate import encode_catalog, evaluate_ctr, evaluate_protocols, evaluate_ranking, item_offsets
from training.job_config import JobConfig
from training.averaging import WeightAverage
from training.overrides import ConfigError
from training.trunk_cache import RAW_CONTENT_FIELDS, TrunkCache

StepCallback = Callable[[int], None]  # called with the global step before that step runs


def _writable(array: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.array(array, copy=True)).to(device)


# --------------------------------------------------------------------------- history content


@dataclass
class HistoryContent:
    """What a step knows before its forward pass: history content and the bank's view of its targets."""

    history_content: torch.Tensor  # [B, L, D] (zeros when recomputed)
    history_item_content: dict | None  # decoded content of every history item (recompute only)
    target_cached: np.ndarray  # [B, D] the bank's vectors of the targets
    target_found: np.ndarray  # [B] whether the bank had them
    history_lookup: LookupResult | None  # the bank's view of the history items (bank mode only)
    negative_cached: np.ndarray | None = None  # [K, D] the bank's vectors of the step's negative ids


def _one_lookup(bank: ItemBank, *parts: np.ndarray) -> list[LookupResult]:
    """The step's single bank round-trip: several id arrays looked up at once, split back per array."""
    result = bank.lookup(np.concatenate(parts))
    bounds = np.cumsum([0] + [len(p) for p in parts])
    arrays = [np.asarray(a) for a in (result.vectors, result.written_step, result.found)]
    return [LookupResult(*(a[lo:hi] for a in arrays)) for lo, hi in zip(bounds[:-1], bounds[1:])]


class BankHistory:
    """LEMUR: history items' content comes from the memory bank, no gradient; one lookup for the step's history,
    target and negative ids."""

    def fetch(self, batch: dict, bank: ItemBank, dim: int, device: torch.device, negative_ids: np.ndarray,
              content_of: Callable[[dict, str], dict]) -> HistoryContent:
        history = batch["history"].long()
        past, targets, negatives = _one_lookup(bank, history.reshape(-1).cpu().numpy(),
                                               batch["target"].long().cpu().numpy(), negative_ids)
        return HistoryContent(_writable(past.vectors, device).view(*history.shape, -1), None, targets.vectors,
                              targets.found, past, negatives.vectors)


class RecomputeHistory:
    """Every history item is encoded with gradients (the costly baseline the bank replaces): its decoded content,
    or its trunk-cache rows; the bank still serves the targets' cached vectors and the negatives, in one lookup.
    Where the step makes every item's content anyway, the trainer reads history items from that table instead
    (`Trainer.one_table_a_step`)."""

    def fetch(self, batch: dict, bank: ItemBank, dim: int, device: torch.device, negative_ids: np.ndarray,
              content_of: Callable[[dict, str], dict]) -> HistoryContent:
        history = batch["history"].long()
        targets, negatives = _one_lookup(bank, batch["target"].long().cpu().numpy(), negative_ids)
        return HistoryContent(torch.zeros(*history.shape, dim, device=device), content_of(batch, "history"),
                              targets.vectors, targets.found, None, negatives.vectors)


class CatalogueHistory:
    """memory.mode=catalogue: the step makes every item's content at once (`Trainer.catalogue_table`), so history
    items are read from that table; the bank serves only the targets' cached vectors (the staleness statistic)."""

    def fetch(self, batch: dict, bank: ItemBank, dim: int, device: torch.device, negative_ids: np.ndarray,
              content_of: Callable[[dict, str], dict]) -> HistoryContent:
        history = batch["history"].long()
        (targets,) = _one_lookup(bank, batch["target"].long().cpu().numpy())
        return HistoryContent(torch.zeros(*history.shape, dim, device=device), None, targets.vectors,
                              targets.found, None, None)


HISTORY_SOURCES = {"bank": BankHistory, "recompute": RecomputeHistory, "catalogue": CatalogueHistory}
ONE_TABLE_HISTORY = CatalogueHistory()  # wherever a step makes one table of every item (`Trainer.one_table_a_step`)


# --------------------------------------------------------------------------- negatives


# A negatives source picks the step's extra candidate ids (`ids`, before the step's bank lookup) and turns their
# content [K, D] (the bank's, or fresh from the trunk cache) into item vectors for the objective (`vectors`:
# (vectors, ids passed to the objective)).


class InBatchNegatives:
    """No extra candidates: the other rows' positives are the negatives (inside the objective)."""

    def ids(self, num_items: int) -> np.ndarray:
        return np.zeros(0, dtype=np.int64)

    def vectors(self, model: Recommender, ids: np.ndarray, content: torch.Tensor, device: torch.device):
        return None, None


@dataclass
class UniformNegatives:
    """`count` items drawn uniformly from the catalogue, their vectors from the bank (no gradient to content)."""

    count: int

    def ids(self, num_items: int) -> np.ndarray:
        return np.random.randint(1, num_items + 1, size=self.count)

    def vectors(self, model: Recommender, ids: np.ndarray, content: torch.Tensor, device: torch.device):
        ids_t = torch.as_tensor(ids, device=device)
        return model.item_vectors(content, ids_t), ids_t


class CatalogueNegatives:
    """The whole catalogue [N+1, D] (full softmax; row 0 = padding): content from the bank, or, where the trainer
    can compute every item's content exactly each step (`exact_catalogue`), fresh and with gradients."""

    def ids(self, num_items: int) -> np.ndarray:
        return np.arange(num_items + 1)

    def vectors(self, model: Recommender, ids: np.ndarray, content: torch.Tensor, device: torch.device):
        return model.item_vectors(content, torch.as_tensor(ids, device=device)), None


# --------------------------------------------------------------------------- epoch statistics


@dataclass
class EpochStats:
    loss_sum: float = 0.0
    last_loss: float = float("nan")
    steps: int = 0
    samples: int = 0
    data_wait: float = 0.0
    coverage_sum: float = 0.0
    bank_seconds: float = 0.0
    bank_write_seconds: float = 0.0  # the write-back (asynchronous with one worker, ordered with several)
    age_sum: float = 0.0
    staleness_sum: float = 0.0
    staleness_steps: int = 0
    encoded_items: int = 0
    grad_norm_sum: float = 0.0  # global gradient norm before clipping, summed over the steps (when clipping is on)
    encoder_grad_norm_sum: float = 0.0  # ... of the encoders' trained layers alone
    norm_steps: int = 0
    encoder_norm_steps: int = 0
    clipped_steps: int = 0
    step_seconds: float = 0.0  # time inside `Trainer.step` (no data wait, no periodic refresh)
    first_step_seconds: float = 0.0  # of which the first step (one-off allocations; benchmarks leave it out)
    started: float = field(default_factory=time.perf_counter)

    def add(self, loss: float, samples: int, info: dict) -> None:
        self.last_loss = loss
        self.loss_sum += loss
        self.steps += 1
        self.samples += samples
        self.coverage_sum += info.get("coverage", 0.0)
        self.bank_seconds += info["bank_seconds"]
        self.bank_write_seconds += info.get("bank_write_seconds", 0.0)
        self.age_sum += info.get("mean_age", 0.0)
        self.encoded_items += info["encoded_items"]
        if "staleness_cosine" in info:
            self.staleness_sum += info["staleness_cosine"]
            self.staleness_steps += 1
        if "grad_norm" in info:
            self.grad_norm_sum += info["grad_norm"]
            self.norm_steps += 1
            self.clipped_steps += int(info["grad_clipped"])
        if "encoder_grad_norm" in info:
            self.encoder_grad_norm_sum += info["encoder_grad_norm"]
            self.encoder_norm_steps += 1

    def mean_loss(self) -> float:
        return self.loss_sum / max(self.steps, 1)

    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def wait_fraction(self, seconds: float) -> float:
        return self.data_wait / max(seconds, 1e-9)

    def metrics(self, world_size: int = 1) -> dict[str, float]:
        """The epoch's training metrics (samples/s over every worker, assuming equal shards)."""
        seconds = self.seconds()
        return {"train_loss": self.mean_loss(), "samples_per_s": self.samples * world_size / max(seconds, 1e-9),
                "data_wait_fraction": self.wait_fraction(seconds), "epoch_seconds": seconds, **self.bank_metrics(),
                **self.gradient_metrics()}

    def gradient_metrics(self) -> dict[str, float]:
        """Mean gradient norms before clipping (rank 0's), and the share of steps that clipped (none: empty)."""
        if not self.norm_steps:
            return {}
        metrics = {"grad_norm": self.grad_norm_sum / self.norm_steps,
                   "grad_clipped_fraction": self.clipped_steps / self.norm_steps}
        if self.encoder_norm_steps:
            metrics["encoder_grad_norm"] = self.encoder_grad_norm_sum / self.encoder_norm_steps
        return metrics

    def bank_metrics(self) -> dict[str, float]:
        steps = max(self.steps, 1)
        return {
            "bank_coverage": self.coverage_sum / steps,
            "bank_lookup_ms_per_step": 1000 * self.bank_seconds / steps,
            "bank_write_ms_per_step": 1000 * self.bank_write_seconds / steps,
            "bank_mean_age_steps": self.age_sum / steps,
            "encoded_items_per_step": self.encoded_items / steps,
            "bank_cosine_cached_fresh": (self.staleness_sum / self.staleness_steps if self.staleness_steps
                                         else float("nan")),
        }


# --------------------------------------------------------------------------- the trainer


class Trainer:
    """Steps, epochs, catalogue passes and evaluation of one recommender, on whatever device it sits on.

    `module` is what runs the forward pass (the model, or its DistributedDataParallel wrapper); `model` is the
    plain `Recommender` inside it.
    """

    def __init__(self, model: Recommender, optimizer: torch.optim.Optimizer, objective, negatives, history,
                 bank: ItemBank, job: JobConfig, num_items: int, *, device: torch.device = torch.device("cpu"),
                 module: torch.nn.Module | None = None, callbacks: Sequence[StepCallback] = (),
                 seen: np.ndarray | None = None) -> None:
        self.model, self.module = model, module if module is not None else model
        # the items in a training example [N+1]; under model.unseen_from_content the others' id vectors are zeroed
        # at every catalogue pass, so they are scored by content alone (`Recommender.zero_unseen_ids`)
        self.seen = torch.as_tensor(seen, device=device) if seen is not None and job.model.unseen_from_content \
            else None
        # the items in no training example (saved in the checkpoint: `unseen_items`) and the score offset every
        # ranking gives them (model.new_item_offset; None when 0)
        self.unseen = None if seen is None else ~np.asarray(seen, dtype=bool)
        self.item_offset = item_offsets(self.unseen, job.model.new_item_offset, device)
        self.optimizer, self.objective, self.negatives, self.history = optimizer, objective, negatives, history
        self.bank, self.job, self.num_items, self.device = bank, job, num_items, device
        self.callbacks = list(callbacks)
        # the encoders' trained parameters, whose gradient norm a step logs (found by module, not by the
        # optimizer's group order)
        self.encoder_params = encoder_parameters(model)[0]
        self.trunk_cache: TrunkCache | None = None  # set: item content comes from it, only encoder tops run
        self.global_step = 0
        self.total_steps = 0  # > 0: warm-up + decay (train.schedule) of every group's learning rate over these steps
        self.lr_multiplier = 1.0  # on top of the schedule: EarlyStopping's drops on a plateau
        self.average: WeightAverage | None = None  # set: the evaluated and kept weights are its average
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])

    # ---- item content

    def item_content(self, batch: dict, which: str) -> dict[str, torch.Tensor]:
        """The content fields of the batch's `target` ([B]) or `history` ([B, L]) items: their trunk-cache rows
        when the cache is on (the batch then carries ids only), else the decoded content the pipeline added."""
        if not self.model.item_encoder.has_content:  # ID-only: no content, the stream carries ids only
            return {"item_ids": batch[which].long()}
        if self.trunk_cache is not None:
            return self.trunk_cache.lookup(batch[which].long().to(self.device))
        prefix = "" if which == "target" else "history_"
        return {k: batch[prefix + k] for k in RAW_CONTENT_FIELDS}

    @property
    def _negatives_from_bank(self) -> bool:
        """Whether the negatives' content is the bank's. It is not for ID-only models (no content: zeros) nor for
        frozen encoders on the trunk cache (fresh), and then the step does not ask the bank for it."""
        encoder = self.model.item_encoder
        return encoder.has_content and not (self.trunk_cache is not None and (
            self.trunk_cache.encoders_frozen or self.job.memory.mode == "catalogue"))

    @property
    def one_table_a_step(self) -> bool:
        """Whether a step makes every item's content once (`catalogue_table`) and reads its history items, targets
        and candidates from that table: memory.mode=catalogue, and memory.mode=recompute wherever the step makes
        every item's content anyway (frozen encoders on the trunk cache, with or without side networks, under
        the full softmax). There it is the same loss and the same gradients as encoding the history items apart
        (tests/unit/test_trainer.py), with the encoders' tops (the side networks) run once a step instead of
        twice."""
        mode = self.job.memory.mode
        return mode == "catalogue" or (mode == "recompute" and self.trunk_cache is not None
                                       and isinstance(self.negatives, CatalogueNegatives)
                                       and not self._negatives_from_bank)

    def catalogue_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`one_table_a_step`: every item's content [N+1, D] (row 0 = padding), from the trunk cache through the
        encoders' trained tops, with gradients, once per step, twice: (through the fusion's dropout, without it).
        History items read the first; every positive and every full-softmax candidate reads the second, as in
        two_stage_frozen's loss. Candidates through dropout buried new items: a frozen content-only model kept
        cold Recall@10 0.0034 on them against 0.0124 with clean candidates, and end to end 0.0087 against 0.0206,
        though they were the better regulariser for warm items (BENCHMARKS.md, session 21)."""
        if not self.model.item_encoder.has_content:
            zeros = self._cached_content(torch.arange(self.num_items + 1, device=self.device), dropout=False)
            return zeros, zeros
        return self.model.item_encoder.encode_trunk_twice(self.trunk_cache.every_item())

    def _cached_content(self, ids: torch.Tensor, dropout: bool) -> torch.Tensor:
        """[K] item ids -> their content [K, D] from the trunk cache through the encoders' tops, with gradients
        (zeros for ID-only models)."""
        if not self.model.item_encoder.has_content or not len(ids):
            return torch.zeros(len(ids), self.model.item_encoder.dim, device=self.device)
        return self.model.item_encoder.encode_trunk(self.trunk_cache.lookup(ids), dropout=dropout)

    def _negative_content(self, fetched: HistoryContent, ids: np.ndarray) -> torch.Tensor:
        """The negatives' content [K, D]: zeros for ID-only models; fresh through the encoders' tops (with
        gradients) when every encoder is frozen and cached (a projection of cached features: cheap for the whole
        catalogue); else the bank's. Like the bank's vectors the fresh ones are made without dropout (on every
        item's 1,664 features it cost more than the projection itself: 53 ms against 13 ms a step on 2 cores)."""
        if self._negatives_from_bank:
            return _writable(fetched.negative_cached, self.device)
        return self._cached_content(torch.as_tensor(ids, device=self.device), dropout=False)

    def build_trunk_cache(self, catalogue_batches: Iterable[dict]) -> TrunkCache:
        """Run every item's frozen trunk once (`training.trunk_cache`); from then on steps and catalogue passes
        run only the encoders' trained tops."""
        self.trunk_cache = TrunkCache.build(self.model.item_encoder, catalogue_batches, self.num_items, self.device)
        return self.trunk_cache

    # ---- one step

    def forward_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """One forward pass + objective. -> (loss, info: the fresh item vectors to write back and bank stats)."""
        job, model, device = self.job, self.model, self.device
        targets = batch["target"].long()
        target_np = targets.cpu().numpy()
        negative_ids = self.negatives.ids(self.num_items)  # before the step's one bank lookup
        one_table = self.one_table_a_step
        history = ONE_TABLE_HISTORY if one_table else self.history
        fetched = history.fetch(batch, self.bank, model.item_encoder.dim, device,
                                negative_ids if self._negatives_from_bank else negative_ids[:0], self.item_content)
        table, clean_table = self.catalogue_table() if one_table else (None, None)
        encode_mask = cached_content = None
        if job.memory.encode_fraction < 1.0 and table is None:
            # LEMUR's encoder sampling; rows whose item has no bank vector yet are always encoded
            chosen = np.random.random_sample(len(target_np)) < job.memory.encode_fraction
            encode_mask = torch.as_tensor(chosen | ~fetched.target_found, device=device)
            cached_content = _writable(fetched.target_cached, device)
        out = self.module(
            target_ids=targets, content={} if table is not None else self.item_content(batch, "target"),
            history_ids=batch["history"].long(),
            history_content=fetched.history_content, encode_mask=encode_mask, target_cached_content=cached_content,
            history_item_content=fetched.history_item_content, all_positions=job.train.targets == "all",
            content_table=table, candidate_table=clean_table,
        )
        if job.model.task == "ctr":
            labels = (batch["rating"].float() >= job.data.positive_rating).float()
            loss = self.objective(out.user, out.positive, labels, batch["user"].long(), targets)
        else:
            negative_content = gather_rows(clean_table, torch.as_tensor(negative_ids, device=device)) \
                if table is not None else self._negative_content(fetched, negative_ids)
            negatives, negative_ids_t = self.negatives.vectors(model, negative_ids, negative_content, device)
            loss = self.objective(out.user, out.positive, out.positive_ids, negatives, negative_ids_t)
        unique_ids = out.unique_ids.cpu().numpy()
        unique_content = out.unique_content.detach()
        encoded = int(unique_ids.size) if table is None else self.num_items  # catalogue mode: the whole table
        info = {"unique_ids": unique_ids, "unique_content": unique_content.cpu().numpy(),
                "bank_seconds": self.bank.last_lookup_seconds, "encoded_items": encoded}
        if fetched.history_lookup is not None:
            real = batch["history"].reshape(-1).cpu().numpy() > 0
            found, written = fetched.history_lookup.found, fetched.history_lookup.written_step
            info["coverage"] = float(found[real].mean()) if real.any() else 1.0
            seen = real & found
            info["mean_age"] = float((self.global_step - written[seen]).mean()) if seen.any() else 0.0
        # staleness: cosine between the cached and the fresh vector of targets re-encoded this step
        if unique_ids.size:
            pos = np.clip(np.searchsorted(unique_ids, target_np), 0, unique_ids.size - 1)
            fresh_and_cached = np.flatnonzero((unique_ids[pos] == target_np) & fetched.target_found)
            rows = fresh_and_cached[: job.memory.staleness_sample]
            if rows.size:
                cached = _writable(fetched.target_cached[rows], device)
                info["staleness_cosine"] = float(F.cosine_similarity(cached, unique_content[pos[rows]], dim=-1).mean())
        return loss, info

    def step(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """forward + objective, backward, clipping, the optimiser step, and the write-back of the batch's fresh
        item vectors to the bank (LEMUR: an item's vector is written whenever it is encoded)."""
        for callback in self.callbacks:
            callback(self.global_step)
        loss, info = self.forward_loss(batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.job.train.grad_clip > 0:
            # the norms before clipping: one clip over every parameter scales the recommender's step by the
            # encoders' gradients too, so both are logged (`grad_norm`, `encoder_grad_norm`, `grad_clipped_fraction`)
            encoder_grads = [p.grad for p in self.encoder_params if p.grad is not None]
            if encoder_grads:
                info["encoder_grad_norm"] = float(torch.nn.utils.get_total_norm(encoder_grads))
            norm = float(torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.job.train.grad_clip))
            info["grad_norm"], info["grad_clipped"] = norm, norm > self.job.train.grad_clip
        if self.total_steps or self.lr_multiplier != 1.0:
            train = self.job.train
            scale = lr_scale(self.global_step, self.total_steps, train.warmup_fraction, train.final_lr_fraction,
                             train.warmup_max_steps, decay=train.schedule == "cosine") if self.total_steps else 1.0
            for group in self.optimizer.param_groups:
                group["lr"] = group["initial_lr"] * scale * self.lr_multiplier
        self.optimizer.step()
        if self.average is not None:
            self.average.update(self.model)
        started = time.perf_counter()
        self._write_back(info["unique_ids"], info["unique_content"])
        info["bank_write_seconds"] = time.perf_counter() - started
        self.global_step += 1
        return loss, info

    def _write_back(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """The step's fresh item vectors into the bank. One worker writes asynchronously (its own next lookup
        already sees the write: Ray keeps one caller's order). Several workers write in rank order, each waiting for
        its write, with a barrier after each, so every write of a step lands before any worker's next lookup and an
        item that several workers encoded keeps the highest rank's vector: a seed trains the same bits again (two
        two-worker runs differed from the first epoch when the writes raced, tests/integration/test_train_runs.py)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            self.bank.update(ids, vectors, step=self.global_step)
            return
        for writer in range(dist.get_world_size()):
            if writer == dist.get_rank():
                self.bank.update(ids, vectors, step=self.global_step, wait=True)
            dist.barrier()

    # ---- one epoch

    def train_epoch(self, batches: Iterable[dict], max_steps: int, *,
                    catalogue: Callable[[], Iterable[dict]] | None = None,
                    log: Callable[[EpochStats, int], None] | None = None) -> EpochStats:
        """Up to `max_steps` steps over `batches`; `catalogue` (a source of decoded catalogue batches) serves the
        periodic bank refresh (`memory.refresh_every_steps`); `log(stats, step)` after each step."""
        self.module.train()
        stats = EpochStats()
        waited_since = time.perf_counter()
        refresh_every = self.job.memory.refresh_every_steps
        for step, batch in enumerate(batches):
            if step >= max_steps:
                break
            stepped = time.perf_counter()
            stats.data_wait += stepped - waited_since
            loss, info = self.step(batch)
            stats.step_seconds += time.perf_counter() - stepped
            if step == 0:
                stats.first_step_seconds = stats.step_seconds
            if refresh_every and self.global_step % refresh_every == 0 and catalogue is not None:
                # periodic refresh: re-encode the whole catalogue so no bank entry is older than N steps
                self.refresh_bank(self.encode_catalogue(catalogue()))
                self.module.train()
            stats.add(loss.item(), len(batch["target"]), info)
            if log is not None:
                log(stats, step)
            waited_since = time.perf_counter()
        self.bank.flush()
        return stats

    # ---- the catalogue and evaluation

    def encode_catalogue(self, batches: Iterable[dict]) -> torch.Tensor:
        """Decoded catalogue batches -> content table [N+1, D] (row 0 = padding), no gradient. With the trunk cache
        the batches are not read: the cache's rows go through the encoders' tops."""
        if not self.model.item_encoder.has_content:  # ID-only: nothing to read
            return torch.zeros(self.num_items + 1, self.model.item_encoder.dim, device=self.device)
        if self.trunk_cache is not None:
            batches = self.trunk_cache.batches(self.job.train.eval_batch_size)
        return encode_catalog(self.model, batches, self.num_items, self.device)

    def refresh_bank(self, content: torch.Tensor, wait: bool = False) -> None:
        """Write every item's fresh content vector [N+1, D] to the bank at the current step."""
        self.bank.update(np.arange(1, self.num_items + 1), content[1:].cpu().numpy(), step=self.global_step,
                         wait=wait)

    def start_averaging(self, decay: float, trained: dict[str, torch.Tensor] | None = None) -> None:
        """From now on the evaluated and kept weights are an average of the trained ones (`training.averaging`).
        `trained`: a resumed run's raw trainable parameters (the model holds its checkpoint's averaged weights)."""
        self.average = WeightAverage(self.model, decay, updates=self.global_step)
        if trained is not None:
            self.average.load_trained(self.model, trained)

    def _catalogue_content(self, catalogue: Callable[[], Iterable[dict]]) -> torch.Tensor:
        """A catalogue pass with the model's current weights (unseen items' id vectors zeroed)."""
        content = self.encode_catalogue(catalogue())
        if self.seen is not None:
            self.model.zero_unseen_ids(self.seen)
        return content

    @contextmanager
    def end_epoch(self, catalogue: Callable[[], Iterable[dict]], validation: Examples) -> Iterator[EpochEnd]:
        """The end of an epoch: a catalogue pass refreshes every bank entry (staleness bounded to one epoch) and the
        `val_*` metrics are scored. Within the block the model holds the weights that are evaluated and kept (the
        average when there is one: a second catalogue pass makes its content table), so the test sets and the
        checkpoint are made there; the trained weights come back on leaving. `catalogue()`: a fresh pass's batches.
        With averaging, `val_trained_*` also scores the trained weights (headline protocol, full size): what the
        average buys, epoch by epoch, on the same trajectory."""
        content = self._catalogue_content(catalogue)
        self.refresh_bank(content, wait=True)  # the trained weights' vectors: what the steps compare with
        if self.average is None:
            yield EpochEnd(self._val_metrics(content, validation), content)
            return
        job = self.job
        trained_scores = evaluate_ranking(self.model, content, validation, ks=job.train.eval_ks,
                                          mask_history=job.train.eval_mask_history,
                                          batch_size=job.train.eval_batch_size, item_offset=self.item_offset)
        with self.average.applied(self.model) as trained:
            content = self._catalogue_content(catalogue)  # ID-only: zeros, no batches read
            scores = {**self._val_metrics(content, validation),
                      **{f"val_trained_{k}": v for k, v in trained_scores.items()}}
            yield EpochEnd(scores, content, trained)

    def _val_metrics(self, content: torch.Tensor, validation: Examples) -> dict[str, float]:
        return {f"val_{k}": v for k, v in self.evaluate(content, validation).items()}

    def evaluate_test(self, content: torch.Tensor, test: Examples,
                      subsets: Mapping[str, np.ndarray] | None = None) -> dict[str, float]:
        """`test_*` metrics (at every Matryoshka size) and, for each subset ([len(test)] bool rows, e.g. the warm
        and cold targets), `test_<name>_*` at full size, all from one pass of the sequence model."""
        return {f"test_{k}": v for k, v in self.evaluate(content, test, subsets=subsets).items()}

    def evaluate(self, content: torch.Tensor, examples: Examples, *, all_sizes: bool = True,
                 subsets: Mapping[str, np.ndarray] | None = None) -> dict[str, float]:
        """Full-ranking metrics (and AUC / GAUC for CTR) of `examples` against the content table, under both
        protocols: the headline one (`train.eval_mask_history`) unprefixed, the other as `masked_*` / `unmasked_*`
        (full size only), and the same of each row subset as `<name>_*` (`evaluate_protocols`). Rankings add
        `model.new_item_offset` to the unseen items' scores (AUC / GAUC do not)."""
        job = self.job
        scored = evaluate_protocols(self.model, content, examples, ks=job.train.eval_ks,
                                    headline_mask=job.train.eval_mask_history, batch_size=job.train.eval_batch_size,
                                    sizes=job.model.matryoshka_sizes if all_sizes else (),
                                    item_offset=self.item_offset, subsets=subsets)
        metrics = scored.pop("")
        if job.model.task == "ctr" and all_sizes:
            metrics.update(evaluate_ctr(self.model, content, examples, positive_rating=job.data.positive_rating,
                                        batch_size=job.train.eval_batch_size))
        for name, part in scored.items():
            metrics.update({f"{name}_{k}": v for k, v in part.items()})
        return metrics


@dataclass
class EpochEnd:
    """What `Trainer.end_epoch` yields: validation metrics, the evaluated weights' content table [N+1, D], and with
    weight averaging the raw trained parameters (for the checkpoint: a resumed run continues from them)."""

    scores: dict[str, float]
    content: torch.Tensor
    trained: dict[str, torch.Tensor] | None = None


SELECTION_SCORE = "val_selection"  # the reported metric that picks the checkpoint: EarlyStopping.selection_score


@dataclass
class EarlyStopping:
    """The selection score (validation score averaged over the last `window` epochs), its best so far, that epoch,
    and epochs since: stop after `patience` epochs without a better one (0 = never). Saved in every checkpoint's
    state.json, so a resumed run stops where an unbroken one would.

    Why a mean: with 943 validation users one epoch's NDCG@10 jitters by +-0.003-0.005 around the curve, as much as
    the gaps between methods; picking the single best epoch picked the luckiest one, and its luck also stopped the
    run (BENCHMARKS.md: end to end's best was a lone high epoch 6, its run ended at 16). A mean of 3 epochs is
    ~1.7x less noisy, and the checkpoint kept is the last epoch of the best window."""

    patience: int
    window: int = 1
    best_score: float = -math.inf
    best_epoch: int = -1
    stale_epochs: int = 0
    lr_drops: int = 0
    recent: list[float] = field(default_factory=list)  # the last `window` raw validation scores
    drop_epochs: list[int] = field(default_factory=list)  # the epochs (0-based) at whose end the rates dropped

    # Halfway through the patience without a better score the learning rates drop by this factor (patience >= 4;
    # with train.schedule=plateau the only decay): the cosine is planned over `train.epochs`, the most allowed, and
    # a run that early stopping ends after a fraction of them would otherwise never anneal (BENCHMARKS.md: runs
    # stopped at 16-40 of 100 epochs at >= 90% of the peak rate, their best epoch a single high validation score).
    lr_drop_factor: ClassVar[float] = 0.1

    def update(self, score: float, epoch: int) -> bool:
        """Record an epoch's raw validation score -> whether the selection score is the best so far."""
        self.recent = [*self.recent, score][-self.window:]
        if self.selection_score > self.best_score:
            self.best_score, self.best_epoch, self.stale_epochs = self.selection_score, epoch, 0
            return True
        self.stale_epochs += 1
        if self.patience >= 4 and self.stale_epochs == self.patience // 2:
            self.lr_drops += 1
            self.drop_epochs = [*self.drop_epochs, epoch]
        return False

    @property
    def selection_score(self) -> float:
        """The mean of the last `window` scores (fewer in the first epochs)."""
        return sum(self.recent) / len(self.recent) if self.recent else -math.inf

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.stale_epochs >= self.patience

    @property
    def lr_multiplier(self) -> float:
        return self.lr_drop_factor ** self.lr_drops

    def state(self) -> dict:
        return {"best_score": self.best_score, "best_epoch": self.best_epoch, "stale_epochs": self.stale_epochs,
                "lr_drops": self.lr_drops, "recent": list(self.recent), "drop_epochs": list(self.drop_epochs)}


def lr_scale(step: int, total: int, warmup_fraction: float, final_fraction: float,
             warmup_max_steps: int | None = None, *, decay: bool = True) -> float:
    """Learning-rate multiplier at `step` of `total` planned steps: linear warm-up over the first `warmup_fraction`
    of the steps (at most `warmup_max_steps`), then a cosine from 1 down to `final_fraction` at the last step (and
    after it). Without `decay` (train.schedule=plateau: EarlyStopping's drops are the decay) the warm-up is
    `warmup_max_steps`, at most half of `total`, and the rate then holds at 1: no step's rate depends on `total`
    once the run is planned longer than twice the warm-up."""
    if decay:
        warmup = max(1, min(int(warmup_fraction * total), warmup_max_steps or total))
    else:
        warmup = max(1, min(warmup_max_steps or total, total // 2))
    if step < warmup:
        return (step + 1) / warmup
    if not decay:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: Recommender, job: JobConfig) -> torch.optim.Optimizer:
    """AdamW: the content backbones' trainable layers at `train.encoder_lr`, everything else at `train.lr`."""
    backbone, rest = encoder_parameters(model)
    return torch.optim.AdamW(
        [{"params": rest, "lr": job.train.lr}, {"params": backbone, "lr": job.train.encoder_lr}],
        weight_decay=job.train.weight_decay,
    )


def exact_catalogue(job: JobConfig, trunk_cache: bool) -> bool:
    """Does a step compute every catalogue item's vector exactly? ID-only models (the id table), and, with the
    trunk cache on, models whose encoders are all frozen (a projection of cached features: cheap) or that run the
    whole catalogue through their trained tops each step (memory.mode=catalogue: costly)."""
    return not job.model.modalities or (trunk_cache and (job.memory.mode == "catalogue" or all(
        getattr(job, modality).unfreeze_top == 0 for modality in job.model.modalities)))


def check_catalogue_mode(job: JobConfig, trunk_cache: bool, why_off: str = "") -> None:
    """memory.mode=catalogue makes every item's content from the trunk cache each step: refused without it."""
    if job.memory.mode == "catalogue" and job.model.modalities and not trunk_cache:
        raise ConfigError("memory.mode=catalogue needs the frozen-trunk cache, which is off"
                          + (f" ({why_off})" if why_off else "") + "; use memory.mode=recompute or bank")


def check_targets(job: JobConfig, loss: str, exact: bool) -> None:
    """`train.targets=all` scores every history position's next item: every vector in the loss must be fresh,
    or the model learns to tell fresh vectors from the bank's instead of ranking. So either the full softmax
    over an exact catalogue (ID-only, frozen encoders on the trunk cache, memory.mode=catalogue), or the sampled
    softmax over the step's own items with history items made fresh (`memory.mode=recompute` or catalogue),
    never the bank's."""
    if job.train.targets != "all":
        return
    if job.memory.encode_fraction < 1.0:
        raise ConfigError("train.targets=all scores every history position, so every positive must be fresh; "
                          "memory.encode_fraction < 1 would read the rest from the bank: use train.targets=last")
    if loss == "full_softmax" and not exact:
        raise ConfigError("train.targets=all with model.loss=full_softmax needs every item's vector fresh each step "
                          "(ID-only, frozen encoders on the trunk cache, or memory.mode=catalogue); else use "
                          "model.loss=auto (the sampled softmax) and memory.mode=recompute")
    if loss == "sampled_softmax" and job.memory.mode == "bank":
        raise ConfigError("train.targets=all with the sampled softmax needs memory.mode=recompute (history items "
                          "are positives too, and the bank's vectors would be stale ones)")


def check_encode_fraction(job: JobConfig, loss: str, exact: bool) -> None:
    """`memory.encode_fraction < 1` samples which of a step's targets run through the encoders, the rest read from
    the bank. Refused where a step makes every item's vector once from the trunk cache instead
    (`Trainer.one_table_a_step` under memory.mode=recompute: frozen encoders, exact full softmax), since it
    would be ignored there, as it would by an ID-only model (no encoder); memory.mode=catalogue refuses it in its
    own config (`MemoryConfig`)."""
    if job.memory.encode_fraction == 1.0:
        return
    if not job.model.modalities:
        raise ConfigError("memory.encode_fraction < 1 would be ignored: an ID-only model (model.modalities empty) "
                          "has no encoder to sample; leave it at 1")
    if job.memory.mode == "recompute" and exact and loss == "full_softmax":
        raise ConfigError("memory.encode_fraction < 1 would be ignored: with frozen encoders on the trunk cache "
                          "and the full softmax a step makes every item's vector once, with nothing to sample; "
                          "leave it at 1 or use memory.mode=bank")


def make_negatives(job: JobConfig, num_items: int, exact: bool = False):
    """The config's negatives source: the whole catalogue for the full softmax, else in-batch (CTR: always)."""
    if job.model.task == "ctr":
        return InBatchNegatives()
    if job.model.resolved_loss(num_items, exact) == "full_softmax":
        return CatalogueNegatives()
    return UniformNegatives(job.model.extra_negatives) if job.model.extra_negatives else InBatchNegatives()


def build_trainer(job: JobConfig, num_items: int, popularity: np.ndarray, bank: ItemBank, *,
                  device: torch.device = torch.device("cpu"), model: Recommender | None = None,
                  callbacks: Sequence[StepCallback] = (), trunk_cache: bool = False,
                  seen: np.ndarray | None = None) -> Trainer:
    """The config's parts -> a Trainer (a fresh model from `build_recommender` unless one is given). `trunk_cache`:
    whether the run will build one (`Trainer.build_trunk_cache`); with every encoder frozen it makes the full
    softmax exact, which `model.loss=auto` then picks. `seen` [N+1] bool: the items in a training example
    (`pipeline.sequences.seen_items`), for `model.unseen_from_content`; None: every item is treated as seen."""
    if model is None:
        model = build_recommender(job.model, job.image, job.text, num_items=num_items,
                                  max_history=job.data.max_history)
    model = model.to(device)
    check_catalogue_mode(job, trunk_cache)
    exact = exact_catalogue(job, trunk_cache)
    loss = job.model.resolved_loss(num_items, exact)
    check_targets(job, loss, exact)
    check_encode_fraction(job, loss, exact)
    return Trainer(model, make_optimizer(model, job),
                   build_objective(job.model, popularity, exact, all_positions=job.train.targets == "all", seen=seen),
                   make_negatives(job, num_items, exact), HISTORY_SOURCES[job.memory.mode](), bank, job, num_items,
                   device=device, callbacks=callbacks, seen=seen)

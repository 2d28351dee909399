"""The frozen-trunk cache: training speed with and without it, end to end and frozen two-stage, in one run.

    python -m bench.trunk_cache                      # both setups, 6 uncached and 40 cached steps each, ~10 min
    python -m bench.trunk_cache --setups all_positions --uncached-steps 3 --cached-steps 20   # quicker
    python -m bench.trunk_cache --precisions fp32,bf16 --out bench/results/trunk_cache_bf16.json   # each row in both

The product's own trainer (`training.trainer`) runs in this process on real ml100k_mm batches with an in-process
bank, as `bench/memory_bank.py` does. The model is the `movielens` preset's (EfficientNet-Lite0 at 64 px + MiniLM
at 32 tokens, dim 128, SASRec), trained in one of two setups, each pinned here (not read from the preset, which
moves):
- one_target: LEMUR's setup (the preset's before session 12, and `movielens_e2e`'s): one target per example,
  history from the memory bank, batches of 128 examples;
- all_positions: the `movielens` preset's own since session 12: a loss at every history position
  (`train.targets=all`), every history item recomputed through the encoders (`memory.mode=recompute`), batches
  of 64 windows of up to 51 interactions;
and four encoder regimes:
- end_to_end: the top block of each encoder trains (image.unfreeze_top=1, text.unfreeze_top=1),
- end_to_end_sampled (one_target only): the same with LEMUR's encoder sampling (`memory.encode_fraction=0.2`:
  a fifth of the targets run the encoders, the others read the bank),
- side_network: the encoders frozen, a side network over every layer's pooled output trained beside them
  (`model.side_network=64`, `encoders.side`, after IISAN): uncached, every step runs the whole frozen encoders;
  cached, only the side network runs (in all_positions, once a step over the whole catalogue, whose table the
  history items read: `Trainer.one_table_a_step`),
- frozen: nothing in the encoders trains (unfreeze_top=0), only the fusion and the recommender.
Each runs uncached (batches are decoded beforehand, but every step runs the whole encoders) and cached
(`memory.trunk_cache`: the trunk's output looked up per item, only the tops run). Step time excludes data
loading. An epoch is estimated as (training examples or windows / batch) x step time + one catalogue pass; the
cache's one-off build (one catalogue pass through the trunks) is reported beside it.
`--precisions fp32,bf16` measures every row at each `model.encoder_precision` (the backbones under bfloat16
autocast), in one run, and adds each row's bf16 / fp32 samples/s.
Goals (#19): cached end-to-end samples/s >= 5x uncached; an end-to-end epoch <= 1.5x a frozen two-stage epoch.
Prints a table and writes bench/results/trunk_cache.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from bench.memory_bank import bench_prepared, sampled_batches
from memory.local import LocalMemoryBankClient
from model.config import PRECISIONS
from pipeline.content import ItemContentDecoder
from pipeline.sequences import leave_one_out, window_examples
from pipeline.sources import ITEMS_FILE, load_manifest, read_interactions
from training.job_config import build_config
from training.offline_eval import DecodedCatalogue, content_spec_of
from training.trainer import build_trainer

REPO = Path(__file__).resolve().parents[1]
SETUPS = {"one_target": ["memory.mode=bank", "train.targets=last", "train.batch_size=128"],
          "all_positions": ["memory.mode=recompute", "train.targets=all", "train.batch_size=64"]}
REGIMES = {"end_to_end": ["image.unfreeze_top=1", "text.unfreeze_top=1", "model.side_network=0"],
           "end_to_end_sampled": ["image.unfreeze_top=1", "text.unfreeze_top=1", "model.side_network=0",
                                  "memory.encode_fraction=0.2"],
           "side_network": ["image.unfreeze_top=0", "text.unfreeze_top=0", "model.side_network=64"],
           "frozen": ["image.unfreeze_top=0", "text.unfreeze_top=0", "model.side_network=0"]}
SAMPLING_NEEDS_BANK = {"end_to_end_sampled"}


def id_batches(train, batch_size: int, seed: int):
    """What the training stream carries when the cache is on: ids only."""
    rng = np.random.default_rng(seed)
    while True:
        rows = rng.integers(0, len(train), batch_size)
        yield {"target": torch.as_tensor(train.target[rows]), "history": torch.as_tensor(train.history[rows]),
               "rating": torch.as_tensor(train.rating[rows]), "user": torch.as_tensor(train.user[rows])}


def measure(job, cached: bool, train, prepared: Path, num_items: int, steps: int, popularity) -> dict:
    torch.manual_seed(0)
    np.random.seed(0)
    spec = content_spec_of(job)
    catalogue = DecodedCatalogue(prepared / ITEMS_FILE, num_items)
    trainer = build_trainer(job, num_items, popularity, LocalMemoryBankClient(capacity=num_items + 1,
                                                                               dim=job.model.dim), trunk_cache=cached)
    row: dict = {"cached": cached}
    if cached:
        started = time.perf_counter()
        cache = trainer.build_trunk_cache(catalogue.batches(spec))
        row["cache_build_s"] = time.perf_counter() - started
        row["cache_mb"] = cache.nbytes / 2**20
        batches = id_batches(train, job.train.batch_size, 0)
    else:
        decoder = ItemContentDecoder(str(prepared / ITEMS_FILE), "target", spec.image_size, spec.tokenizer_path,
                                     spec.max_length)
        decoder.with_history_content = job.memory.mode == "recompute"
        batches = sampled_batches(decoder, train, job.train.batch_size, 0)
    started = time.perf_counter()
    trainer.refresh_bank(trainer.encode_catalogue(catalogue.batches(spec)), wait=True)
    row["catalogue_pass_s"] = time.perf_counter() - started
    stats = trainer.train_epoch(batches, steps)
    row["step_s"] = (stats.step_seconds - stats.first_step_seconds) / max(steps - 1, 1)
    row["samples_per_s"] = job.train.batch_size / row["step_s"]
    row["steps"] = steps
    row["epoch_s"] = len(train) / job.train.batch_size * row["step_s"] + row["catalogue_pass_s"]
    return row


def format_table(rows: list[dict]) -> str:
    lines = [f"{'setup':<13} {'regime':<18} {'prec':<4} {'cache':<5} {'samples/s':>10} {'step s':>7} "
             f"{'catalogue s':>11} {'epoch min':>9} {'build s':>7} {'MiB':>6}"]
    for r in rows:
        lines.append(f"{r['setup']:<13} {r['regime']:<18} {r['precision']:<4} {'on' if r['cached'] else 'off':<5} "
                     f"{r['samples_per_s']:>10.1f} {r['step_s']:>7.3f} {r['catalogue_pass_s']:>11.1f} "
                     f"{r['epoch_s'] / 60:>9.1f} "
                     f"{r.get('cache_build_s', float('nan')):>7.1f} {r.get('cache_mb', float('nan')):>6.1f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "ml100k_mm"))
    parser.add_argument("--uncached-steps", type=int, default=6)
    parser.add_argument("--cached-steps", type=int, default=40)
    parser.add_argument("--setups", default=",".join(SETUPS), help=f"comma list of {', '.join(SETUPS)}")
    parser.add_argument("--regimes", default=",".join(REGIMES), help=f"comma list of {', '.join(REGIMES)}")
    parser.add_argument("--precisions", default="fp32",
                        help="comma list of model.encoder_precision values to measure every row at "
                             f"({', '.join(PRECISIONS)})")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "trunk_cache.json"))
    args = parser.parse_args()
    setups, regimes, precisions = ([name for name in value.split(",") if name]
                                   for value in (args.setups, args.regimes, args.precisions))
    for names, valid, what in ((setups, SETUPS, "setups"), (regimes, REGIMES, "regimes"),
                               (precisions, PRECISIONS, "precisions")):
        if unknown := set(names) - set(valid):
            parser.error(f"unknown {what} {sorted(unknown)}; valid: {', '.join(valid)}")
    torch.set_num_threads(2)
    prepared = bench_prepared(args.data)
    num_items = load_manifest(prepared)["num_items"]
    train = leave_one_out(read_interactions(prepared), 50).train
    popularity = np.bincount(train.target, minlength=num_items + 1).astype(float)
    rows, summary = [], {"training_examples": len(train), "training_windows": len(window_examples(train))}
    for setup, precision in ((s, p) for s in setups for p in precisions):
        for regime in regimes:
            job = build_config("movielens", [*SETUPS[setup], *REGIMES[regime], f"model.encoder_precision={precision}"])
            if regime in SAMPLING_NEEDS_BANK and job.memory.mode != "bank":
                continue
            examples = window_examples(train) if job.train.targets == "all" else train
            for cached in (False, True):
                row = {"setup": setup, "regime": regime, "precision": precision,
                       **measure(job, cached, examples, prepared, num_items,
                                 args.cached_steps if cached else args.uncached_steps, popularity)}
                if precision != "fp32":
                    fp32 = next((r for r in rows if (r["setup"], r["regime"], r["cached"], r["precision"])
                                 == (setup, regime, cached, "fp32")), None)
                    if fp32 is not None:
                        row["vs_fp32_samples_per_s"] = row["samples_per_s"] / fp32["samples_per_s"]
                rows.append(row)
                print(f"{setup} {regime} {precision} cache={'on' if cached else 'off'}: "
                      f"{row['samples_per_s']:.1f} samples/s, epoch {row['epoch_s'] / 60:.1f} min", flush=True)
        by = {(r["regime"], r["cached"]): r for r in rows if r["setup"] == setup and r["precision"] == precision}
        key = setup if precision == "fp32" else f"{setup}_{precision}"
        if not {("end_to_end", True), ("end_to_end", False), ("frozen", True), ("frozen", False)} <= set(by):
            continue  # the ratios need both regimes, cached and not
        summary[key] = {
            "cached_vs_uncached_end_to_end_samples_per_s": by["end_to_end", True]["samples_per_s"]
            / by["end_to_end", False]["samples_per_s"],
            "end_to_end_vs_frozen_epoch_cached": by["end_to_end", True]["epoch_s"] / by["frozen", True]["epoch_s"],
            "end_to_end_vs_frozen_epoch_uncached": by["end_to_end", False]["epoch_s"] / by["frozen", False]["epoch_s"],
        }
        if ("side_network", True) in by:
            summary[key]["side_network_cached_vs_uncached_samples_per_s"] = \
                by["side_network", True]["samples_per_s"] / by["side_network", False]["samples_per_s"]
            summary[key]["side_network_vs_frozen_epoch_cached"] = \
                by["side_network", True]["epoch_s"] / by["frozen", True]["epoch_s"]
        if ("end_to_end_sampled", True) in by:
            summary[key]["sampled_end_to_end_vs_frozen_epoch_cached"] = \
                by["end_to_end_sampled", True]["epoch_s"] / by["frozen", True]["epoch_s"]
            summary[key]["sampled_cached_vs_end_to_end_uncached_samples_per_s"] = \
                by["end_to_end_sampled", True]["samples_per_s"] / by["end_to_end", False]["samples_per_s"]
    print(format_table(rows))
    print(json.dumps(summary, indent=2))
    result = {"rows": rows, "summary": summary, "settings": vars(args), "machine": platform.platform(),
              "threads": torch.get_num_threads()}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

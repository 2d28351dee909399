"""LEMUR's memory bank vs re-encoding every history item: training speed and quality, in one run.

    python -m bench.memory_bank                       # full table (speed with pretrained encoders, quality with built-in)
    python -m bench.memory_bank --speed-steps 2 --quality-steps 60   # quicker

Both parts run the product's own trainer (`training.trainer`, what Ray Train workers run) in one
process, on real decoded ml100k_mm batches, with an in-process bank (`LocalMemoryBankClient`): Ray start-up
would otherwise dominate and the comparison is about encoder cost per step.
Speed: EfficientNet-Lite0 at 96 px + MiniLM at 32 tokens, everything unfrozen, batch 16, history 10/20/50:
`recompute` (every history item encoded with gradients) vs `bank` with encode_fraction 1.0 and 0.2.
Quality: built-in encoders, the same number of steps for each mode, validation NDCG@10 (full ranking).
Prints a table and writes bench/results/memory_bank.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from encoders.config import resolve_text_model_path
from training.job_config import build_config
from memory.local import LocalMemoryBankClient
from model.build import build_recommender
from pipeline.config import DataConfig
from pipeline.sequences import leave_one_out, time_split
from pipeline.sources import ITEMS_FILE, load_manifest, prepare_dataset, read_interactions
from pipeline.content import ItemContentDecoder
from training.evaluate import encode_catalog, evaluate_ctr
from training.offline_eval import DecodedCatalogue, content_spec_of
from training.trainer import build_trainer

REPO = Path(__file__).resolve().parents[1]
MODES = [("recompute", 1.0), ("bank", 1.0), ("bank", 0.2)]


def catalogue(model, items_path: Path, job, num_items: int) -> torch.Tensor:
    """Every item's content vector [N+1, D]: the product's in-process catalogue pass (decoded once per spec)."""
    decoded = _DECODED.setdefault(str(items_path), DecodedCatalogue(items_path, num_items))
    return encode_catalog(model, decoded.batches(content_spec_of(job)), num_items, torch.device("cpu"))


_DECODED: dict[str, DecodedCatalogue] = {}
_FILLED: dict[tuple, dict] = {}


def initial_bank(job, model, items_path: Path, num_items: int) -> LocalMemoryBankClient:
    """The bank filled with the initial item encoder; the same seed gives the same encoder, so fill it once."""
    key = (job.image.kind, job.image.image_size, job.text.kind, job.text.max_length, job.model.dim)
    bank = LocalMemoryBankClient(capacity=num_items + 1, dim=job.model.dim)
    if key not in _FILLED:
        bank.update(np.arange(1, num_items + 1), catalogue(model, items_path, job, num_items)[1:].numpy(), step=0)
        _FILLED[key] = bank.bank.state_dict()
    bank.bank.load_state_dict({k: np.array(v, copy=True) for k, v in _FILLED[key].items()})
    return bank


def bench_prepared(raw_dir: str) -> Path:
    """ml100k_mm prepared once for the in-process benchmarks (reused across them)."""
    prepared = Path("/tmp/mmrec-bench/prepared")
    if not (prepared / "manifest.json").exists():
        prepare_dataset(DataConfig(), Path(raw_dir), prepared)
    return prepared


def sampled_batches(decoder: ItemContentDecoder, train, batch_size: int, seed: int):
    """Endless training batches: rows drawn with replacement, decoded as the Ray Data stage decodes them."""
    rng = np.random.default_rng(seed)
    while True:
        rows = rng.integers(0, len(train), batch_size)
        raw = decoder({"target": train.target[rows], "history": train.history[rows], "rating": train.rating[rows],
                       "user": train.user[rows]})
        yield {k: torch.as_tensor(v) for k, v in raw.items()}


def run_mode(job, mode, fraction, train, decoder, items_path, num_items, steps, batch_size, popularity, seed=0):
    """`steps` steps of the product's trainer in this process -> (trainer, samples/s of the steps after the first)."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    job.memory.mode, job.memory.encode_fraction = mode, fraction
    job.train.grad_clip = 0.0  # as measured (BENCHMARKS.md); (train.weight_decay 0.01 = AdamW's default, as used)
    decoder.with_history_content = mode == "recompute"
    model = build_recommender(job.model, job.image, job.text, num_items=num_items, max_history=job.data.max_history)
    bank = initial_bank(job, model, items_path, num_items)
    trainer = build_trainer(job, num_items, popularity, bank, model=model)
    stats = trainer.train_epoch(sampled_batches(decoder, train, batch_size, seed), steps)
    timed_steps = steps - 1 if steps > 1 else 1  # the first step pays one-off allocation costs
    seconds = stats.step_seconds - (stats.first_step_seconds if steps > 1 else 0.0)
    return trainer, timed_steps * batch_size / max(seconds, 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "ml100k_mm"))
    parser.add_argument("--speed-steps", type=int, default=3)
    parser.add_argument("--histories", default="10,20,50")
    parser.add_argument("--quality-steps", type=int, default=150)
    parser.add_argument("--parts", default="speed,quality,ctr", help="which parts to run (comma list)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "memory_bank.json"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    prepared = bench_prepared(args.data)
    num_items = load_manifest(prepared)["num_items"]
    interactions = read_interactions(prepared)
    results = {"speed": [], "quality": [], "ctr": []}
    parts = set(args.parts.split(","))

    speed_job = build_config("movielens", ["image.image_size=96", "image.unfreeze_top=-1", "text.unfreeze_top=-1",
                                           "model.side_network=0", "model.use_id_embedding=false"])
    for length in [int(x) for x in args.histories.split(",")] if "speed" in parts else []:
        speed_job.data.max_history = length
        train = leave_one_out(interactions, length).train
        decoder = ItemContentDecoder(str(prepared / ITEMS_FILE), "target", 96, resolve_text_model_path("minilm"), 32)
        popularity = np.bincount(train.target, minlength=num_items + 1).astype(float)
        row = {"history": length}
        for mode, fraction in MODES:
            _, rate = run_mode(speed_job, mode, fraction, train, decoder, prepared / ITEMS_FILE, num_items,
                               args.speed_steps, 16, popularity)
            row[f"{mode}@{fraction}"] = rate
            print(f"speed L={length} {mode} f={fraction}: {rate:.2f} samples/s", flush=True)
        row["bank_vs_recompute"] = row["bank@1.0"] / row["recompute@1.0"]
        results["speed"].append(row)

    quality_job = build_config("tiny", ["data.max_history=20", "train.lr=3e-3"])
    splits = leave_one_out(interactions, 20)
    decoder = ItemContentDecoder(str(prepared / ITEMS_FILE), "target", quality_job.image.image_size,
                                 resolve_text_model_path("minilm"), quality_job.text.max_length)
    popularity = np.bincount(splits.train.target, minlength=num_items + 1).astype(float)
    for mode, fraction in MODES if "quality" in parts else []:
        trainer, rate = run_mode(quality_job, mode, fraction, splits.train, decoder, prepared / ITEMS_FILE, num_items,
                                 args.quality_steps, 64, popularity)
        metrics = trainer.evaluate(trainer.encode_catalogue(
            _DECODED[str(prepared / ITEMS_FILE)].batches(content_spec_of(quality_job))), splits.validation)
        results["quality"].append({"mode": mode, "encode_fraction": fraction, "steps": args.quality_steps,
                                   "samples_per_s": rate, "val_ndcg@10": metrics["ndcg@10"], "val_recall@10": metrics["recall@10"]})
        print(f"quality {mode} f={fraction}: NDCG@10 {metrics['ndcg@10']:.4f} ({rate:.1f} samples/s)", flush=True)

    # LEMUR's CTR objective: time split (test = every interaction from 1998-03-01), grouped AUC per user
    ctr_job = build_config("tiny", ["data.max_history=20", "train.lr=3e-3", "model.task=ctr"])
    split_at = int(np.datetime64("1998-03-01T00:00:00").astype("datetime64[s]").astype(np.int64))
    ctr_splits = time_split(interactions, 20, split_at)
    for mode, fraction in MODES if "ctr" in parts else []:
        trainer, rate = run_mode(ctr_job, mode, fraction, ctr_splits.train, decoder, prepared / ITEMS_FILE, num_items,
                                 args.quality_steps, 64, popularity)
        content = trainer.encode_catalogue(_DECODED[str(prepared / ITEMS_FILE)].batches(content_spec_of(ctr_job)))
        metrics = evaluate_ctr(trainer.model, content, ctr_splits.test, positive_rating=4.0)
        results["ctr"].append({"mode": mode, "encode_fraction": fraction, "steps": args.quality_steps,
                               "samples_per_s": rate, **{f"test_{k}": v for k, v in metrics.items()}})
        print(f"ctr {mode} f={fraction}: GAUC {metrics['gauc']:.4f} AUC {metrics.get('auc', float('nan')):.4f}", flush=True)

    print("\nTraining samples/s (EfficientNet-Lite0 96px + MiniLM 32 tok, all unfrozen, batch 16)")
    print(f"{'history':>8} {'recompute':>10} {'bank f=1':>10} {'bank f=0.2':>11} {'bank/recompute':>15}")
    for row in results["speed"]:
        print(f"{row['history']:>8} {row['recompute@1.0']:>10.2f} {row['bank@1.0']:>10.2f} {row['bank@0.2']:>11.2f} "
              f"{row['bank_vs_recompute']:>14.1f}x")
    print(f"\nValidation NDCG@10 after {args.quality_steps} steps (built-in encoders, batch 64, history 20)")
    for row in results["quality"]:
        print(f"{row['mode']:>10} f={row['encode_fraction']:<4} NDCG@10 {row['val_ndcg@10']:.4f} "
              f"Recall@10 {row['val_recall@10']:.4f} {row['samples_per_s']:.1f} samples/s")
    print(f"\nCTR task after {args.quality_steps} steps (time split at 1998-03-01, labels rating >= 4)")
    for row in results["ctr"]:
        print(f"{row['mode']:>10} f={row['encode_fraction']:<4} GAUC {row['test_gauc']:.4f} "
              f"(unweighted {row['test_gauc_unweighted']:.4f}) AUC {row.get('test_auc', float('nan')):.4f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # a partial run (--parts) updates only its own sections of an existing results file
    merged = json.loads(out.read_text()) if out.exists() else {}
    merged.update({part: rows for part, rows in results.items() if part in parts})
    out.write_text(json.dumps(merged, indent=2))


if __name__ == "__main__":
    main()

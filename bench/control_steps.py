"""Does end to end exact differ from its frozen control only in what training the tops does? Their first steps, side by side.

    python -m bench.control_steps --prepared-dir <prepared ml100k_mm>       # 3 variants x 12 steps, ~4 min
    python -m bench.control_steps --prepared-dir <prepared ml100k_mm> --steps 30

`bench.quality`'s end_to_end_exact and its control two_stage_frozen_catalogue (the time split at 1998-03-01, the
same budget settings as `bench.quality`'s defaults, seed 0) each take the same real training windows through the
product's trainer in this process, after the same seeding, from the same initial weights:
- control: frozen encoders (unfreeze_top=0), the catalogue loss;
- end to end, tops at a learning rate of 1e-12: the tops run (in training mode, without the pretrained dropout,
  as every top-layers-only encoder does: `encoders.config.keeps_dropout`) but cannot move, so every difference
  from the control is in how the two pipelines compute the same thing (the trunk cache split at a different
  layer) or in the one gradient clip that both the tops' and the recommender's gradients share;
- end to end at `train.encoder_lr` 1e-4.
Per step: the training loss, the gradient norm before clipping and the encoders' share of it. Prints a table and
writes bench/results/control_steps.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np
import torch

from bench.quality import method_config
from memory.local import LocalMemoryBankClient
from pipeline.sequences import item_popularity, seen_items, window_examples
from pipeline.sources import ITEMS_FILE, load_manifest
from pipeline.splits import build_splits
from training.offline_eval import DecodedCatalogue, content_spec_of
from training.trainer import build_trainer

RESULTS = Path(__file__).resolve().parent / "results" / "control_steps.json"
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "control (frozen, catalogue loss)": ("two_stage_frozen_catalogue", []),
    "end to end, tops at lr 1e-12": ("end_to_end_exact", ["train.encoder_lr=1e-12"]),
    "end to end, encoder_lr 1e-4": ("end_to_end_exact", []),
}


def run_variant(method: str, overrides: list[str], args: argparse.Namespace) -> dict:
    """`args.steps` steps of one variant -> its per-step losses and gradient norms."""
    quality_args = argparse.Namespace(
        prepared_dir=args.prepared_dir, steps=0, epochs=30, patience=10, batch_size=64, image_size=32, text_length=16,
        cold_fraction=0.1, storage_path="runs/bench-control-steps", experiment="mmrec-bench-control-steps",
        overrides=[f"data.time_split_at={args.time_split_at}", *overrides])
    job = method_config(method, 0, quality_args)
    prepared = Path(job.data.prepared_dir)
    num_items = load_manifest(prepared)["num_items"]
    splits = build_splits(job.data, prepared)
    windows = window_examples(splits.train)  # the preset trains at every history position (train.targets=all)
    torch.manual_seed(0)
    np.random.seed(0)
    bank = LocalMemoryBankClient(capacity=num_items + 1, dim=job.model.dim)
    trainer = build_trainer(job, num_items, item_popularity(splits.train, num_items), bank, trunk_cache=True,
                            seen=seen_items(splits.train, num_items))
    catalogue = DecodedCatalogue(prepared / ITEMS_FILE, num_items)
    trainer.build_trunk_cache(catalogue.batches(content_spec_of(job)))
    trainer.refresh_bank(trainer.encode_catalogue(catalogue.batches(content_spec_of(job))), wait=True)
    rows = np.random.default_rng(0).integers(0, len(windows), (args.steps, job.train.batch_size))
    torch.manual_seed(1)
    np.random.seed(1)
    trainer.module.train()
    steps = []
    for chosen in rows:
        batch = {name: torch.as_tensor(getattr(windows, name)[chosen]) for name in ("target", "history", "rating", "user")}
        loss, info = trainer.step(batch)
        steps.append({"loss": loss.item(), "grad_norm": info["grad_norm"], "clipped": bool(info["grad_clipped"]),
                      "encoder_grad_norm": info.get("encoder_grad_norm", 0.0)})
    return {"method": method, "overrides": overrides, "steps": steps}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.control_steps", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepared-dir", default="prepared/ml100k_mm")
    parser.add_argument("--time-split-at", default="1998-03-01")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    if not (Path(args.prepared_dir) / ITEMS_FILE).is_file():
        parser.error(f"--prepared-dir {args.prepared_dir} holds no prepared dataset (run python -m jobs.prepare)")
    torch.set_num_threads(2)
    results = {}
    for name, (method, overrides) in VARIANTS.items():
        results[name] = run_variant(method, overrides, args)
        print(f"{name}: done", flush=True)
    control = [step["loss"] for step in results[next(iter(VARIANTS))]["steps"]]
    print("| variant | loss at steps 1 / 6 / last | largest loss gap from the control | mean gradient norm "
          "| encoders' mean norm | steps clipped |")
    print("|---|---|---|---:|---:|---:|")
    for name, result in results.items():
        losses = [step["loss"] for step in result["steps"]]
        gap = max(abs(a - b) for a, b in zip(losses, control))
        result["largest_gap_from_control"] = gap
        picks = " / ".join(f"{losses[i]:.4f}" for i in sorted({0, min(5, len(losses) - 1), len(losses) - 1}))
        print(f"| {name} | {picks} | {gap:.4f} | {np.mean([s['grad_norm'] for s in result['steps']]):.3f} "
              f"| {np.mean([s['encoder_grad_norm'] for s in result['steps']]):.3f} "
              f"| {sum(s['clipped'] for s in result['steps'])} / {len(losses)} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "control_steps", "command": "python -m bench.control_steps " + " ".join(sys.argv[1:]),
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "variants": results}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

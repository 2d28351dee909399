"""Benchmark: do two models still differ once each ranks with the popularity tilt its validation prefers?

    python -m bench.popularity_tilt RUN_DIR [RUN_DIR ...] --out bench/results/popularity_tilt.json

Each argument is a run directory of `jobs.train` / `bench.quality` (its kept checkpoint, `data/popularity.npy`,
`data/validation.parquet`, `data/test_warm.parquet`). For each run the kept checkpoint ranks, among the items of
some training example only (as `bench.paired --among-seen`: the new items, whose level no loss sets, left out),
the examples whose target is such an item, with `beta * log(1 + training count)` added to every item's score
(cosine units) for each beta of a grid: the validation examples choose the run's beta (the largest NDCG@10; of
equal ones the smallest |beta|), and the warm test examples are scored at beta 0 and at that beta.

Why: among the seen items the side networks with ids rank popular targets better than frozen encoders and rare
ones worse (BENCHMARKS.md, session 40). If that were only a different popularity level, one tilt per model,
chosen on validation, would take it out, as one offset per model takes out the new items' level.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results" / "popularity_tilt.json"
BETAS = tuple(round(float(beta), 4) for beta in np.linspace(-0.04, 0.04, 33))


def tilt_curve(users: torch.Tensor, items: torch.Tensor, targets: torch.Tensor, log_counts: torch.Tensor,
               among: torch.Tensor, betas=BETAS, chunk: int = 1024) -> list[float]:
    """users [U, D], items [N+1, D], targets [U], log_counts [N+1], among [N+1] bool (the items ranked) -> the
    examples' NDCG@10 with `beta * log_counts` added to every score, one value per beta."""
    from bench.new_item_boost import ranks_with_offset
    from bench.paired import per_user

    curve = []
    for beta in betas:
        boost = beta * log_counts
        ranks = torch.cat([ranks_with_offset(users[start:start + chunk], items, targets[start:start + chunk],
                                             boost, among) for start in range(0, len(targets), chunk)])
        curve.append(float(per_user(ranks.numpy(), "ndcg@10").mean()))
    return curve


def chosen_beta(curve: list[float], betas=BETAS) -> float:
    """The beta of the curve's largest value; of equal ones the smallest |beta| (no tilt unless it helps)."""
    if len(curve) != len(betas) or not len(curve):
        raise ValueError(f"need one value per beta ({len(betas)}), got {len(curve)}")
    top = max(curve)
    return min((beta for beta, value in zip(betas, curve) if value == top), key=abs)


def measure_run(run_dir: Path) -> dict:
    from bench.kept_run import open_kept_run

    run = open_kept_run(run_dir, needs="data/test_warm.parquet")
    model = run.model.eval()
    content = run.content()
    counts = run.training_counts(len(content), "the tilt needs the run's training counts")
    seen = torch.as_tensor(counts > 0)  # the padding, row 0, is no training target
    items = model.item_vectors(content, torch.arange(len(content)))
    log_counts = torch.as_tensor(np.log1p(counts), dtype=items.dtype)
    row = {"run": run_dir.name, "checkpoint": Path(run.checkpoint).name}
    for name in ("validation", "test_warm"):
        examples = run.examples(name)
        rows = np.flatnonzero(counts[np.asarray(examples.target)] > 0)
        histories = torch.as_tensor(examples.history[rows]).split(1024)
        users = torch.cat([model.user_vectors(history, content[history]) for history in histories])
        targets = torch.as_tensor(np.asarray(examples.target)[rows])
        row[name] = {"examples": int(len(rows)), "ndcg@10": tilt_curve(users, items, targets, log_counts, seen)}
    beta = chosen_beta(row["validation"]["ndcg@10"])
    test = row["test_warm"]["ndcg@10"]
    row.update({"beta": beta, "test_warm_ndcg@10_untilted": test[BETAS.index(0.0)],
                "test_warm_ndcg@10_tilted": test[BETAS.index(beta)]})
    return row


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.popularity_tilt", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    started = time.perf_counter()
    torch.set_grad_enabled(False)
    rows = []
    print("| run | beta (validation) | warm test NDCG@10 among the seen items: untilted | tilted |\n|---|---:|---:|---:|")
    for run_dir in args.runs:
        row = measure_run(run_dir)
        rows.append(row)
        print(f"| {row['run']} | {row['beta']:+.4f} | {row['test_warm_ndcg@10_untilted']:.4f} | "
              f"{row['test_warm_ndcg@10_tilted']:.4f} |", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "popularity_tilt", "command": " ".join(["python -m bench.popularity_tilt", *sys.argv[1:]]),
        "machine": {"python": platform.python_version(), "torch": torch.__version__}, "betas": list(BETAS),
        "runs": rows, "seconds": round(time.perf_counter() - started, 1)}, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

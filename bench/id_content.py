"""How much of a hybrid model's item vectors is id and how much content, and can content predict the id part?

    python -m bench.id_content RUN_DIR [RUN_DIR ...] [--out bench/results/id_content.json]

Each argument is a run directory of `jobs.train` / `bench.quality` with item-id embeddings and content. For the
checkpoint the run kept (as `bench.paired` picks it), every catalogue item's content vector is encoded and set
beside its id vector (the model scores `normalize(content + id)`). Per run: the mean ratio of id-vector norm to
content-vector norm for warm items (in a training example) and cold ones (in none: in runs made before session
27 their id rows are a ridge regression from content fitted on the warm items, since then zero), the mean cosine
between a warm item's id and content vectors, and the 5-fold cross-validated R^2 of that ridge on the warm items
(how much of an id vector content can predict, so how much a cold item's predicted row can carry). Prints a table
and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "id_content.json"


def ridge_cv_r2(x: np.ndarray, y: np.ndarray, ridge: float = 1e-2, folds: int = 5, seed: int = 0) -> float:
    """[M, D] features, [M, E] targets -> the cross-validated R^2 of a ridge with an intercept, penalised as the
    product's fill of unseen id rows did before session 27 (ridge x the mean diagonal of the Gram matrix)."""
    order = np.random.default_rng(seed).permutation(len(x))
    sse = sst = 0.0
    for fold in range(folds):
        held = order[fold::folds]
        fit = np.setdiff1d(order, held)
        features = np.c_[x[fit], np.ones(len(fit))]
        gram = features.T @ features
        weights = np.linalg.solve(gram + ridge * gram.diagonal().mean() * np.eye(len(gram)), features.T @ y[fit])
        predicted = np.c_[x[held], np.ones(len(held))] @ weights
        sse += float(((y[held] - predicted) ** 2).sum())
        sst += float(((y[held] - y[fit].mean(axis=0)) ** 2).sum())
    return 1.0 - sse / sst


def id_content_row(run_dir: Path) -> dict:
    from bench.kept_run import open_kept_run

    run = open_kept_run(run_dir, needs="data/seen.npy")
    table = run.model.item_encoder.id_embedding
    if table is None or not run.model.item_encoder.has_content:
        raise SystemExit(f"error: {run_dir} is not a hybrid model (it needs both id embeddings and content)")
    content = run.content().double().numpy()
    ids = table.weight.detach().double().numpy()
    warm = np.load(run_dir / "data" / "seen.npy").astype(bool)
    warm[0] = False
    cold = ~warm
    cold[0] = False
    content_norm, id_norm = np.linalg.norm(content, axis=1), np.linalg.norm(ids, axis=1)
    cosine = (content[warm] * ids[warm]).sum(axis=1) / (content_norm[warm] * id_norm[warm])
    return {"run": run_dir.name, "checkpoint": run.checkpoint, "warm_items": int(warm.sum()),
            "cold_items": int(cold.sum()),
            "id_over_content_norm_warm": float(np.mean(id_norm[warm] / content_norm[warm])),
            "id_over_content_norm_cold": float(np.mean(id_norm[cold] / content_norm[cold])) if cold.any() else None,
            "cosine_id_content_warm": float(cosine.mean()),
            "ridge_cv_r2_content_to_id": ridge_cv_r2(content[warm], ids[warm])}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.id_content", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    rows = [id_content_row(run) for run in args.runs]
    print("| run | id / content norm, warm | cold (predicted rows) | cos(id, content), warm | ridge CV R^2 content -> id |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        cold = row["id_over_content_norm_cold"]
        print(f"| {row['run']} | {row['id_over_content_norm_warm']:.3f} | "
              f"{'–' if cold is None else f'{cold:.3f}'} | {row['cosine_id_content_warm']:.3f} | "
              f"{row['ridge_cv_r2_content_to_id']:.3f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "id_content", "command": "python -m bench.id_content " + " ".join(
        sys.argv[1:]), "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "runs": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

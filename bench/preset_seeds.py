"""The `movielens` preset over several seeds, with its side network and without: test metrics per run, mean ± std.

    python -m bench.preset_seeds --prepared-dir <prepared ml100k_mm> --seeds 0,1,2      # trains: ~10 min a run
    python -m bench.preset_seeds --variants frozen --seeds 3,4 --resume                 # adds runs to the JSON
    python -m bench.preset_seeds --collect side=RUN,RUN frozen=RUN                      # runs already tracked

Each run is what a user runs, `python -m jobs.train --preset movielens --set data.prepared_dir=DIR --set
train.seed=S --set train.run_name=NAME` (variant `frozen` adds `--set model.side_network=0`; `--set` passes more
overrides to every run), in its own process; its test metrics, best epoch and epoch times are read back from
the MLflow store the preset logs to (`tracking.tracking_uri`, default ./mlflow.db). The leave-one-out test set
(943 users, one target each) moves a run's NDCG@10 by more than the gaps between these variants, so the
question this answers is the spread over seeds, not any one pair. Ratios are to RecBole's SASRec on the same
split (bench/results/peers.json). Prints a table and writes bench/results/preset_seeds.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {"side": [], "frozen": ["model.side_network=0"]}
METRICS = ("test_ndcg_at_10", "test_recall_at_10", "test_mrr", "test_masked_ndcg_at_10")


def train(variant: str, seed: int, args: argparse.Namespace) -> str:
    name = f"preset-{variant}-s{seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    overrides = [f"data.prepared_dir={args.prepared_dir}", f"train.seed={seed}", f"train.run_name={name}",
                 *VARIANTS[variant], *args.overrides]
    command = [sys.executable, "-m", "jobs.train", "--preset", "movielens"]
    for override in overrides:
        command += ["--set", override]
    print(f"[preset_seeds] {variant} seed {seed}: {' '.join(command[1:])}", flush=True)
    log = Path(args.log_dir) / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        code = subprocess.call(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    if code:
        raise SystemExit(f"[preset_seeds] {name} failed (exit {code}); its output: {log}")
    return name


def read_run(client, experiments: list[str], name: str) -> dict:
    """A finished run's record, found by its run name in any of `experiments` (ids)."""
    found = client.search_runs(experiments, filter_string=f"attributes.run_name = '{name}'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    if not found:
        raise SystemExit(f"[preset_seeds] no run named {name!r} in the tracking store")
    run = found[0]
    missing = [key for key in METRICS if key not in run.data.metrics]
    if missing:
        raise SystemExit(f"[preset_seeds] run {name!r} has no {', '.join(missing)} (did it finish?)")
    epochs = [m.value for m in client.get_metric_history(run.info.run_id, "epoch_seconds")]
    return {"run_name": name, "mlflow_run_id": run.info.run_id, "seed": int(run.data.params["train.seed"]),
            "memory_mode": run.data.params.get("memory.mode"),
            **{key: run.data.metrics[key] for key in METRICS},
            "best_epoch": int(run.data.metrics.get("best_epoch", 0)), "epochs": len(epochs),
            "median_epoch_s": statistics.median(epochs) if epochs else None,
            "wall_s": (run.info.end_time - run.info.start_time) / 1000 if run.info.end_time else None}


def summarise(runs: list[dict], peer: float | None) -> dict:
    summary = {}
    for variant in dict.fromkeys(r["variant"] for r in runs):
        mine = [r for r in runs if r["variant"] == variant]
        stats = {key: {"mean": statistics.fmean(r[key] for r in mine), "std": statistics.pstdev(r[key] for r in mine)}
                 for key in METRICS}
        stats["runs"] = len(mine)
        if peer:
            ndcg = [r["test_ndcg_at_10"] for r in mine]
            stats["vs_recbole_sasrec_mean"] = statistics.fmean(ndcg) / peer
            stats["vs_recbole_sasrec_lowest"] = min(ndcg) / peer
        summary[variant] = stats
    return summary


def format_table(runs: list[dict]) -> str:
    lines = [f"{'variant':<8} {'seed':>4} {'mode':<10} {'NDCG@10':>8} {'R@10':>7} {'MRR':>7} {'masked':>7} "
             f"{'best/run':>8} {'epoch s':>7} {'wall s':>7}"]
    for r in runs:
        lines.append(f"{r['variant']:<8} {r['seed']:>4} {r['memory_mode'] or '':<10} {r['test_ndcg_at_10']:>8.4f} "
                     f"{r['test_recall_at_10']:>7.4f} {r['test_mrr']:>7.4f} {r['test_masked_ndcg_at_10']:>7.4f} "
                     f"{r['best_epoch']:>3}/{r['epochs']:<4} {r['median_epoch_s'] or float('nan'):>7.1f} "
                     f"{r['wall_s'] or float('nan'):>7.0f}")
    return "\n".join(lines)


def recbole_sasrec_ndcg() -> float | None:
    path = REPO / "bench" / "results" / "peers.json"
    if not path.exists():
        return None
    runs = [r for r in json.loads(path.read_text())["runs"] if r["model"] == "SASRec"]
    return statistics.fmean(r["test"]["ndcg@10"] for r in runs) if runs else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepared-dir", help="a prepared ml100k_mm (python -m jobs.prepare --preset movielens)")
    parser.add_argument("--seeds", default="0,1,2", help="train.seed values (comma list)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="an extra override for every run (repeatable)")
    parser.add_argument("--collect", nargs="+", metavar="VARIANT=RUN,RUN", default=[],
                        help="read runs already in the tracking store instead of training")
    parser.add_argument("--resume", action="store_true", help="keep the runs already in OUT and add these")
    parser.add_argument("--tracking-uri", default=f"sqlite:///{REPO / 'mlflow.db'}")
    parser.add_argument("--log-dir", default=str(REPO / "runs" / "preset_seeds"))
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "preset_seeds.json"))
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    if unknown := set(variants) - set(VARIANTS):
        parser.error(f"unknown variants {sorted(unknown)}; valid: {', '.join(VARIANTS)}")
    if not args.collect and not args.prepared_dir:
        parser.error("--prepared-dir is needed to train (or --collect runs already tracked)")
    wanted = [(v, name) for item in args.collect for v, names in [item.split("=", 1)] for name in names.split(",")]
    if unknown := {v for v, _ in wanted} - set(VARIANTS):
        parser.error(f"unknown variants {sorted(unknown)} in --collect; valid: {', '.join(VARIANTS)}")
    if not args.collect:
        wanted = [(v, train(v, int(s), args)) for v in variants for s in args.seeds.split(",") if s.strip()]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=args.tracking_uri)
    out = Path(args.out)
    runs = json.loads(out.read_text())["runs"] if args.resume and out.exists() else []
    known = {r["run_name"] for r in runs}
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs += [{"variant": v, **read_run(client, experiments, name)} for v, name in wanted if name not in known]
    runs.sort(key=lambda r: (list(VARIANTS).index(r["variant"]), r["seed"], r["run_name"]))
    peer = recbole_sasrec_ndcg()
    result = {"benchmark": "preset_seeds", "command": " ".join(sys.argv), "recbole_sasrec_test_ndcg_at_10": peer,
              "summary": summarise(runs, peer), "runs": runs}
    print(format_table(runs))
    print(json.dumps(result["summary"], indent=2))
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

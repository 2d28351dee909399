"""Benchmark: RecBole 1.2.1's SASRec and GRU4Rec on exactly our data and split, trained to their own early stopping.

    python -m bench.peers                                    # SASRec then GRU4Rec, seed 0, 2 threads
    python -m bench.peers --models SASRec --threads 1 --resume
    python -m bench.peers --check-only                       # write the atomic file and check the split, no RecBole

What is compared. Our protocol on ml100k_mm: leave-one-out by time (ties in raw file order), each user's last
interaction is the test target and the one before it the validation target, up to 50 history items, full
ranking over all 1,682 items, history items not masked. RecBole gets the same thing:

- Data: the product's own prepared tables (`pipeline.sources.prepare_dataset` / `read_interactions`) written as
  one atomic `.inter` file (`user_id:token item_id:token timestamp:float`, every rating an interaction), rows in
  our order (`pipeline.sequences.order_interactions`: user, timestamp, raw row order).
- Split: `eval_args: {split: {LS: valid_and_test}, order: TO, group_by: user, mode: full}`. RecBole turns the
  float timestamp into a float32 tensor (`Dataset._dataframe_to_interaction`), which at ~8.9e8 s keeps only
  64-second steps, and then sorts with a *stable* argsort. So the raw-row-order tie-break cannot ride in the
  timestamp (a `timestamp + row * 1e-6` field rounds away); it rides in the file order instead: the rows are
  written in our order, float32 rounding never reverses two timestamps, and the stable sort keeps file order
  among equal keys. `check_split` replays that ordering from the written file and requires the last /
  second-to-last interaction per user (and the <= 50 history items before each) to equal our `leave_one_out`
  test / validation examples; after training, the split RecBole really built is compared the same way. Either
  mismatch stops the benchmark.
- Evaluation: full ranking (`mode: full`); RecBole's sequential full-sort evaluation does not mask history items
  (its `FullSortEvalDataLoader` passes no history index for sequential models, unlike for general ones), which
  is our unmasked protocol. Metrics: NDCG@10, Recall@10, Recall@50 and MRR over the whole ranking (RecBole's
  MRR@k is truncated at k, so k = the catalogue size gives the untruncated MRR we report).
- Training: cross-entropy over the full catalogue (`loss_type: CE`, no negative sampling), history 50,
  batch 256, Adam lr 1e-3, validation NDCG@10 after every epoch, RecBole's own early stopping with its default
  `stopping_step: 10` (training stops after 11 epochs without a new best; the best epoch's checkpoint is tested).
  The default patience, rather than a shorter one, because a noisy validation curve on 943 users can dip for a
  few epochs before a new best, and this is RecBole's result, not one we tuned.

RecBole needs old numpy/pandas, so it lives in its own venv (default .peers-venv at the repo root, created on first use
with torch CPU from `--torch-spec`, refused if the torch found is a CUDA build) and runs in a subprocess
(`bench/peers_runner.py`) with `TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1` (torch >= 2.6's `weights_only` default
breaks RecBole's reload of its best checkpoint) and `--threads` torch/OMP threads. Results go to
bench/results/peers.json, rewritten after each model so a killed run keeps what finished (`--resume` skips them).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import DataConfig
from pipeline.sequences import PAD, Examples, leave_one_out, order_interactions
from pipeline.sources import prepare_dataset, read_interactions

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "peers.json"
RUNNER = ROOT / "bench" / "peers_runner.py"
# At the repo root, not under bench/: the layering check reads every .py file under each package folder.
DEFAULT_VENV = ROOT / ".peers-venv"
DATASET = "ml100k_mm"
RECBOLE_VERSION = "1.2.1"
# RecBole 1.2.1's stack needs numpy < 2 (np.bool8) and pkg_resources; pandas >= 2.3 and scipy >= 1.14 want numpy 2
# (RAY_NOTES.md). RAY_NOTES's "setuptools<70" cannot be installed beside torch 2.13 (it requires setuptools >= 77.0.3);
# setuptools 80 still ships pkg_resources. RecBole itself pins ray <= 2.6.3, which pip brings in (it is never imported:
# see bench/peers_runner.py).
RECBOLE_PINS = (f"recbole=={RECBOLE_VERSION}", "setuptools>=77.0.3,<81", "numpy<2", "pandas<2.3", "scipy<1.14")
INSTALLED_MARKER = ".peers-installed"
MAX_HISTORY = 50
METRICS = ("ndcg@10", "recall@10", "mrr", "recall@50")


class SplitMismatch(RuntimeError):
    """RecBole would train or evaluate on a different split than ours."""


# ---------------------------------------------------------------------------------------------------------
# The peers: RecBole model name + its hyperparameters (everything else is the shared protocol below)
# ---------------------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class PeerModel:
    recbole_model: str
    params: dict = field(default_factory=dict)


MODELS: dict[str, PeerModel] = {
    # ID only, 64-d, 2 layers, 2 heads; RecBole's defaults otherwise (inner 256, dropout 0.5, GELU).
    "SASRec": PeerModel(recbole_model="SASRec", params={"hidden_size": 64, "n_layers": 2, "n_heads": 2}),
    # 64-d item embedding and GRU state (RecBole's default state is 128), 1 layer, dropout 0.3 (its default).
    "GRU4Rec": PeerModel(recbole_model="GRU4Rec", params={"embedding_size": 64, "hidden_size": 64, "num_layers": 1}),
}


def protocol_config(*, data_path: Path, checkpoint_dir: Path, num_items: int, seed: int, epochs: int,
                    stopping_step: int, batch_size: int, learning_rate: float) -> dict:
    """RecBole's config for our protocol (see the module docstring); model hyperparameters are added per model."""
    return {
        "data_path": str(data_path),
        "checkpoint_dir": str(checkpoint_dir),
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "USER_ID_FIELD": "user_id",
        "ITEM_ID_FIELD": "item_id",
        "TIME_FIELD": "timestamp",
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"},
        "MAX_ITEM_LIST_LENGTH": MAX_HISTORY,
        "loss_type": "CE",
        "train_neg_sample_args": None,
        "metrics": ["NDCG", "Recall", "MRR"],
        "topk": [10, 50, num_items],  # MRR@num_items = MRR over the whole catalogue
        "valid_metric": "NDCG@10",
        "metric_decimal_place": 6,  # default 4; only the reported precision (and ties at the 5th decimal)
        "epochs": epochs,
        "stopping_step": stopping_step,
        "eval_step": 1,
        "train_batch_size": batch_size,
        "eval_batch_size": 1024,
        "learning_rate": learning_rate,
        "seed": seed,
        "reproducibility": True,
        "use_gpu": False,
        "show_progress": False,
        "log_wandb": False,
        "worker": 0,
    }


# ---------------------------------------------------------------------------------------------------------
# Pure parts: our split in RecBole's atomic format, and the check that RecBole would build the same split
# ---------------------------------------------------------------------------------------------------------


def atomic_frame(interactions: pd.DataFrame) -> pd.DataFrame:
    """Prepared interactions -> the `.inter` rows: raw user / item tokens and timestamp, in our order."""
    ordered = order_interactions(interactions)
    return pd.DataFrame({"user_id:token": ordered.user_id.astype(str).to_numpy(),
                         "item_id:token": ordered.item_id.astype(str).to_numpy(),
                         "timestamp:float": ordered.timestamp.to_numpy(np.int64)})


def write_atomic_inter(interactions: pd.DataFrame, path: Path) -> Path:
    """Write RecBole's `<dataset>.inter` (tab-separated, typed header) for these interactions; returns `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".inter.tmp")
    atomic_frame(interactions).to_csv(tmp, sep="\t", index=False)
    os.replace(tmp, path)
    return path


def recbole_sequences(inter_path: Path) -> dict[str, list[str]]:
    """Replay RecBole 1.2.1's ordering of an atomic file -> {user token: item tokens, oldest first}.

    It reads the timestamp as float64, stores it as a float32 tensor, and sorts with numpy's stable argsort
    by (user, time) (`SequentialDataset.data_augmentation`), then by time alone (`Dataset.build`, order TO),
    which keeps each user's order. Equal float32 keys therefore keep their order in the file.
    """
    frame = pd.read_csv(inter_path, sep="\t", dtype={"user_id:token": str, "item_id:token": str,
                                                     "timestamp:float": np.float64})
    users = frame["user_id:token"].to_numpy()
    items = frame["item_id:token"].to_numpy()
    time_key = frame["timestamp:float"].to_numpy(np.float64).astype(np.float32)
    user_codes = pd.factorize(users)[0]
    order = np.argsort(time_key, kind="stable")
    order = order[np.argsort(user_codes[order], kind="stable")]
    sequences: dict[str, list[str]] = {}
    for user, item in zip(users[order], items[order]):
        sequences.setdefault(user, []).append(item)
    return sequences


def recbole_split(sequences: dict[str, list[str]], max_history: int = MAX_HISTORY) -> dict[str, dict]:
    """Per-user sequences -> RecBole's LS valid_and_test examples {"validation"|"test": {user: {target, history}}}.

    RecBole first makes one example per interaction after a user's first, then leaves the last 2 of those out
    (`_split_index_by_leave_one_out`, at most `count - 1` of them, test first): a user with n >= 4 interactions
    has both, n = 3 only a test example, n <= 2 neither.
    """
    split: dict[str, dict] = {"validation": {}, "test": {}}
    for user, items in sequences.items():
        for name, position, needs in (("test", len(items) - 1, 3), ("validation", len(items) - 2, 4)):
            if len(items) >= needs:
                split[name][user] = {"target": items[position],
                                     "history": items[max(0, position - max_history):position]}
    return split


def our_split(interactions: pd.DataFrame, max_history: int = MAX_HISTORY) -> dict[str, dict]:
    """Our `leave_one_out` validation / test examples in raw tokens {"validation"|"test": {user: {target, history}}}."""
    splits = leave_one_out(interactions, max_history)
    user_token = dict(zip(interactions.user_index.astype(np.int64), interactions.user_id.astype(str)))
    item_token = dict(zip(interactions.item_index.astype(np.int64), interactions.item_id.astype(str)))

    def tokens(examples: Examples) -> dict[str, dict]:
        return {user_token[int(user)]: {"target": item_token[int(target)],
                                        "history": [item_token[int(i)] for i in history if i != PAD]}
                for user, target, history in zip(examples.user, examples.target, examples.history)}

    return {"validation": tokens(splits.validation), "test": tokens(splits.test)}


def compare_splits(theirs: dict[str, dict], ours: dict[str, dict], what: str) -> dict:
    """Count agreements of two {"validation"|"test": {user: {target, history}}}; raise `SplitMismatch` on any difference."""
    summary: dict = {"source": what}
    problems = []
    for name in ("validation", "test"):
        a, b = theirs[name], ours[name]
        missing, extra = sorted(set(b) - set(a)), sorted(set(a) - set(b))
        common = sorted(set(a) & set(b))
        targets_differ = [u for u in common if a[u]["target"] != b[u]["target"]]
        histories_differ = [u for u in common if a[u]["history"] != b[u]["history"]]
        summary[name] = {"users": len(b), "targets_equal": len(common) - len(targets_differ),
                         "histories_equal": len(common) - len(histories_differ)}
        for label, users in (("users only in ours", missing), ("users only in RecBole's", extra),
                             ("different targets", targets_differ), ("different histories", histories_differ)):
            if users:
                problems.append(f"{name}: {len(users)} {label} (e.g. users {users[:5]})")
    if problems:
        raise SplitMismatch(f"{what} differs from our leave_one_out split: " + "; ".join(problems))
    summary["equal"] = True
    return summary


def check_split(inter_path: Path, interactions: pd.DataFrame, max_history: int = MAX_HISTORY) -> dict:
    """The split RecBole will build from `inter_path` == our leave_one_out split of `interactions`, or `SplitMismatch`."""
    return compare_splits(recbole_split(recbole_sequences(inter_path), max_history), our_split(interactions, max_history),
                          what=f"RecBole's split replayed from {inter_path.name}")


# ---------------------------------------------------------------------------------------------------------
# RecBole's venv and one run in it
# ---------------------------------------------------------------------------------------------------------


def ensure_venv(venv: Path, torch_spec: str, log=print) -> Path:
    """RecBole's own venv (created once, reused while its marker file exists) -> its python."""
    python = venv / "bin" / "python"
    if (venv / INSTALLED_MARKER).exists() and python.exists():
        return python
    log(f"[peers] creating {venv} (torch from {torch_spec!r}, recbole {RECBOLE_VERSION}); a few minutes")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)  # an unfinished venv is completed, not redone
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, torch_spec], check=True)
    probe = subprocess.run([str(python), "-c", "import torch; print(torch.__version__); print(torch.version.cuda)"],
                           check=True, capture_output=True, text=True).stdout.split()
    torch_version, cuda = probe[0], probe[1]
    if cuda != "None":
        raise RuntimeError(f"{torch_spec!r} installed a CUDA build of torch ({torch_version}, CUDA {cuda}) into {venv}; "
                           f"pass --torch-spec with a CPU build (e.g. a local torch-*+cpu wheel) and delete {venv}")
    constraints = venv / "torch-constraint.txt"
    constraints.write_text(f"torch=={torch_version}\n")  # RecBole's deps must not swap torch for another build
    subprocess.run([*pip, "-c", str(constraints), *RECBOLE_PINS], check=True)
    version = subprocess.run([str(python), "-c", "import recbole; print(recbole.__version__)"],
                             check=True, capture_output=True, text=True).stdout.strip()
    if version != RECBOLE_VERSION:
        raise RuntimeError(f"{venv} has recbole {version}, expected {RECBOLE_VERSION}")
    freeze = subprocess.run([str(python), "-m", "pip", "freeze"], check=True, capture_output=True, text=True).stdout
    (venv / INSTALLED_MARKER).write_text(freeze)
    return python


def run_recbole(python: Path, model: str, config: dict, run_dir: Path, threads: int,
                time_budget_s: float | None = None) -> dict:
    """One RecBole fit + test in a subprocess of its venv -> the runner's result dict (see bench/peers_runner.py)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    spec, out = run_dir / "run_spec.json", run_dir / "result.json"
    spec.write_text(json.dumps({"model": model, "dataset": DATASET, "threads": threads, "config": config,
                                "time_budget_s": time_budget_s}, indent=2))
    out.unlink(missing_ok=True)
    env = {**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1", "OMP_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads), "PYTHONNOUSERSITE": "1"}
    env.pop("PYTHONPATH", None)  # nothing of the product's environment inside RecBole's
    # cwd = run_dir: RecBole writes ./log and ./log_tensorboard relative to it.
    code = subprocess.run([str(python), str(RUNNER), "--spec", str(spec), "--out", str(out)], cwd=run_dir,
                          env=env, check=False).returncode
    if code != 0 or not out.exists():
        raise RuntimeError(f"RecBole {model} failed (exit {code}); see the log under {run_dir / 'log'}")
    return json.loads(out.read_text())


def pick_metrics(result: dict[str, float], num_items: int) -> dict[str, float]:
    """RecBole's result keys (`ndcg@10`, `mrr@<N>`...) -> ours (`ndcg@10`, `mrr`...)."""
    return {"ndcg@10": result["ndcg@10"], "recall@10": result["recall@10"], "recall@50": result["recall@50"],
            "mrr": result[f"mrr@{num_items}"]}


def format_table(runs: list[dict]) -> str:
    header = (f"{'model':<10}{'seed':>5}" + "".join(f"{'test ' + m:>16}" for m in METRICS)
              + f"{'best val ndcg@10':>18}{'best ep':>8}{'epochs':>7}{'stopped by':>16}{'s/epoch':>9}{'wall s':>8}")
    lines = [header]
    for run in runs:
        lines.append(f"{run['model']:<10}{run['seed']:>5}" + "".join(f"{run['test'][m]:>16.4f}" for m in METRICS)
                     + f"{run['best_valid']['ndcg@10']:>18.4f}{run['best_epoch']:>8}{run['epochs_run']:>7}"
                     + f"{run['stopped_by']:>16}{run['train_seconds_per_epoch']:>9.0f}{run['wall_seconds']:>8.0f}")
    return "\n".join(lines)


def summarise(runs: list[dict]) -> dict[str, dict]:
    """Per model: its seeds, and the mean and std (over seeds, ddof=0 as bench.quality's) of every test metric,
    of the best epoch, the epochs run and the wall time."""
    summary: dict[str, dict] = {}
    for model in dict.fromkeys(run["model"] for run in runs):
        mine = [run for run in runs if run["model"] == model]
        columns = {f"test_{m}": [run["test"][m] for run in mine] for m in METRICS}
        columns.update({key: [run[key] for run in mine] for key in ("best_epoch", "epochs_run", "wall_seconds")})
        summary[model] = {"seeds": [run["seed"] for run in mine],
                          **{key: {"mean": float(np.mean(values)), "std": float(np.std(values))}
                             for key, values in columns.items()}}
    return summary


def format_summary(summary: dict[str, dict]) -> str:
    lines = ["| model | seeds | " + " | ".join(f"test {m}" for m in METRICS) + " | best epoch | epochs run | wall s |",
             "|---|---|" + "---:|" * (len(METRICS) + 3)]
    for model, entry in summary.items():
        cells = [f"{entry[f'test_{m}']['mean']:.4f} ± {entry[f'test_{m}']['std']:.4f}" for m in METRICS]
        cells += [f"{entry[key]['mean']:.1f} ± {entry[key]['std']:.1f}" for key in ("best_epoch", "epochs_run")]
        cells.append(f"{entry['wall_seconds']['mean']:.0f}")
        lines.append(f"| {model} | {', '.join(map(str, entry['seeds']))} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_markdown(runs: list[dict]) -> str:
    header = ("| model | seed | test NDCG@10 | test Recall@10 | test MRR | test Recall@50 | best val NDCG@10 (epoch) "
              "| epochs run | stopped by | train s/epoch | wall s |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        t = run["test"]
        lines.append(f"| {run['model']} | {run['seed']} | {t['ndcg@10']:.4f} | {t['recall@10']:.4f} | {t['mrr']:.4f} "
                     f"| {t['recall@50']:.4f} | {run['best_valid']['ndcg@10']:.4f} ({run['best_epoch']}) "
                     f"| {run['epochs_run']} | {run['stopped_by']} | {run['train_seconds_per_epoch']:.0f} "
                     f"| {run['wall_seconds']:.0f} |")
    return "\n".join(lines)


def merge_runs(mine: list[dict], on_disk: list[dict]) -> list[dict]:
    """Runs of this invocation plus those another one (same --out, --resume) wrote meanwhile; ours win a clash."""
    keys = {(run["model"], run["seed"]) for run in mine}
    merged = mine + [run for run in on_disk if (run["model"], run["seed"]) not in keys]
    order = list(MODELS)
    return sorted(merged, key=lambda run: (run["seed"], order.index(run["model"]) if run["model"] in order else 99))


def write_results(path: Path, payload: dict, merge: bool) -> None:
    """Atomically (re)write the results; with `merge`, keep runs that are in the file but not in `payload`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if merge and path.exists():
        payload["runs"][:] = merge_runs(payload["runs"], json.loads(path.read_text()).get("runs", []))
    payload["summary"] = summarise(payload["runs"])
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)


def load_interactions(args: argparse.Namespace) -> tuple[pd.DataFrame, Path]:
    """The product's prepared interactions (preparing `--raw-dir` into the work dir unless `--prepared-dir`)."""
    if args.prepared_dir:
        prepared = Path(args.prepared_dir).resolve()
    else:
        prepared = (args.work_dir / "prepared" / DATASET).resolve()
        report = prepare_dataset(DataConfig(), Path(args.raw_dir), prepared)
        print(f"[peers] prepared {args.raw_dir} -> {prepared}: {report.interactions_kept} interactions, "
              f"{report.users} users, {report.items_total} items", flush=True)
    return read_interactions(prepared), prepared


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    parser.add_argument("--seeds", default="0", help="RecBole seeds (comma list)")
    parser.add_argument("--raw-dir", default=str(ROOT.parent / "shared" / "data" / DATASET))
    parser.add_argument("--prepared-dir", default="", help="an existing prepared dataset (default: prepare --raw-dir)")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "peers",
                        help="prepared data, the atomic file, RecBole's logs and checkpoints")
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    parser.add_argument("--torch-spec", default="torch==2.13.0",
                        help="pip requirement for torch in RecBole's venv (must resolve to a CPU build)")
    parser.add_argument("--threads", type=int, default=2, help="torch / OMP threads for RecBole")
    parser.add_argument("--epochs", type=int, default=100, help="upper bound; early stopping ends runs first")
    parser.add_argument("--stopping-step", type=int, default=10, help="RecBole's patience (its default: 10)")
    parser.add_argument("--time-budget-min", type=float, default=0.0,
                        help="stop a model's training after the last epoch that fits in this many minutes and test its "
                             "best checkpoint so far (recorded as stopped_by=time_budget); 0 = no budget")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--resume", action="store_true",
                        help="keep the (model, seed) runs already in --out, and merge in runs that another "
                             "invocation with the same --out writes meanwhile")
    parser.add_argument("--check-only", action="store_true", help="write the atomic file, check the split, stop")
    args = parser.parse_args()
    models = [m for m in args.models.split(",") if m]
    unknown = set(models) - set(MODELS)
    if unknown:
        parser.error(f"unknown models {sorted(unknown)}; valid: {', '.join(MODELS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.work_dir = args.work_dir.resolve()

    interactions, prepared = load_interactions(args)
    data_path = args.work_dir / "atomic"
    inter_path = write_atomic_inter(interactions, data_path / DATASET / f"{DATASET}.inter")
    num_items = int(interactions.item_id.nunique())
    split_check = check_split(inter_path, interactions)  # raises SplitMismatch
    print(f"[peers] wrote {inter_path} ({len(interactions)} rows, {num_items} items); split check: {split_check}",
          flush=True)
    if args.check_only:
        return 0

    previous = json.loads(args.out.read_text()) if args.resume and args.out.exists() else {}
    runs: list[dict] = previous.get("runs", [])
    if runs:
        print(f"[peers] resuming: {[(r['model'], r['seed']) for r in runs]} from {args.out}", flush=True)
    python = ensure_venv(args.venv.resolve(), args.torch_spec)
    ours = our_split(interactions)
    common = {"seed": None, "epochs": args.epochs, "stopping_step": args.stopping_step,
              "batch_size": args.batch_size, "learning_rate": args.lr}
    payload = {
        "benchmark": "peers",
        "command": "python -m bench.peers " + " ".join(sys.argv[1:]),
        "protocol": {"data": DATASET, "prepared_dir": str(prepared), "split": "leave_one_out (RecBole LS valid_and_test, TO)",
                     "ranking": f"full, all {num_items} items", "history_masked": False, "max_history": MAX_HISTORY,
                     "loss": "full-catalogue cross-entropy", "valid_metric": "NDCG@10",
                     "early_stopping": {"stopping_step": args.stopping_step, "max_epochs": args.epochs,
                                        "time_budget_min": args.time_budget_min or None},
                     "batch_size": args.batch_size, "learning_rate": args.lr, "threads": args.threads,
                     "models": {m: MODELS[m].params for m in MODELS}},
        "split_check": split_check,
        "runs": runs,
    }
    for seed in seeds:
        for model in models:
            if any(r["model"] == model and r["seed"] == seed for r in runs):
                continue
            peer = MODELS[model]
            run_dir = args.work_dir / f"{model}-s{seed}"
            config = {**protocol_config(data_path=data_path, checkpoint_dir=run_dir / "saved", num_items=num_items,
                                        **{**common, "seed": seed}), **peer.params}
            print(f"[peers] {model} seed {seed}: training to early stopping (stopping_step={args.stopping_step}, "
                  f"{args.threads} threads)", flush=True)
            started = time.perf_counter()
            result = run_recbole(python, peer.recbole_model, config, run_dir, args.threads,
                                 time_budget_s=args.time_budget_min * 60 or None)
            wall = time.perf_counter() - started
            built = compare_splits(result.pop("split"), ours, what=f"the split RecBole built for {model}")
            if result["num_items"] != num_items:
                raise SplitMismatch(f"RecBole ranks {result['num_items']} items, we rank {num_items}")
            curve = result["curve"]
            runs.append({
                "model": model, "seed": seed,
                "test": pick_metrics(result["test"], num_items),
                "best_valid": pick_metrics(result["best_valid"], num_items),
                "best_epoch": result["best_epoch"], "epochs_run": result["epochs_run"],
                "stopped_by": result["stopped_by"], "time_budget_s": result["time_budget_s"],
                "valid_ndcg@10_by_epoch": [round(e["valid"]["ndcg@10"], 6) for e in curve],
                "train_loss_by_epoch": [round(e["train_loss"], 4) for e in curve],
                "train_seconds_per_epoch": float(np.mean([e["train_seconds"] for e in curve])),
                "wall_seconds": wall, "recbole_seconds": result["seconds"],
                "recbole_version": result["recbole_version"], "torch_version": result["torch_version"],
                "torch_threads": result["torch_threads"], "trainable_parameters": result["trainable_parameters"],
                "recbole_split_check": built,
                "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                            "load_average_at_end": list(os.getloadavg()), "nice": os.nice(0)},
                "config": result["config"],
            })
            print(f"[peers] {model} seed {seed}: test " + " ".join(f"{m}={runs[-1]['test'][m]:.4f}" for m in METRICS)
                  + f"; best valid ndcg@10 {runs[-1]['best_valid']['ndcg@10']:.4f} at epoch {result['best_epoch']} "
                  f"of {result['epochs_run']} (stopped by {result['stopped_by']}); {wall:.0f}s", flush=True)
            write_results(args.out, payload, merge=args.resume)  # after every model: a killed run keeps what finished
    write_results(args.out, payload, merge=args.resume)
    print("\n" + format_table(payload["runs"]) + "\n\n" + format_markdown(payload["runs"]) + "\n\n"
          + format_summary(payload["summary"]) + f"\n\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

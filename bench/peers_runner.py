"""Train and test one RecBole model on our atomic file; run by `bench.peers` inside RecBole's own venv.

    <peers-venv>/bin/python bench/peers_runner.py --spec run_spec.json --out result.json

Imports only the standard library, torch and RecBole (never the product: its numpy/pandas are too new for
RecBole 1.2.1). `run_spec.json` holds {"model": "SASRec", "dataset": "ml100k_mm", "threads": 2, "config": {...}}
with `config` RecBole's own config dict. The result JSON holds RecBole's validation curve, its best epoch,
its test metrics from that epoch's checkpoint, timings, and the split RecBole actually built (user token ->
validation / test target and history tokens), so the driver can check it against ours.

Not `recbole.quick_start.run_recbole`: that module imports `ray.tune` at import time, and we want the
per-epoch curve and the built split, which it does not return. An optional `time_budget_s` leaves `fit` after
the last epoch that fits in it (recorded as `stopped_by: time_budget`, never passed off as early stopping); the
test then uses the best checkpoint so far, as RecBole would.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


class TimeBudgetReached(Exception):
    """Raised from RecBole's end-of-epoch callback to leave `Trainer.fit` when `time_budget_s` is spent."""


def built_split(eval_data) -> dict[str, dict]:
    """A full-sort eval dataloader -> {user token: {"target": item token, "history": [item tokens, oldest first]}}."""
    dataset = eval_data._dataset
    features = dataset.inter_feat
    users = dataset.id2token(dataset.uid_field, features[dataset.uid_field].numpy())
    targets = dataset.id2token(dataset.iid_field, features[dataset.iid_field].numpy())
    lists = features[dataset.item_id_list_field].numpy()
    lengths = features[dataset.item_list_length_field].numpy()
    out = {}
    for user, target, items, length in zip(users, targets, lists, lengths):
        history = dataset.id2token(dataset.iid_field, items[: int(length)]).tolist()
        out[str(user)] = {"target": str(target), "history": [str(item) for item in history]}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--spec", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    spec = json.loads(args.spec.read_text())

    import torch

    torch.set_num_threads(int(spec["threads"]))
    torch.set_num_interop_threads(1)

    import recbole
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import get_model, get_trainer, init_logger, init_seed

    started = time.perf_counter()
    config = Config(model=spec["model"], dataset=spec["dataset"], config_dict=spec["config"])
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    data_seconds = time.perf_counter() - started

    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)

    # Record every epoch without changing the loop: wrap the two methods `Trainer.fit` calls.
    curve: list[dict] = []
    train_epoch, valid_epoch = trainer._train_epoch, trainer._valid_epoch

    def timed_train_epoch(*a, **k):
        begun = time.perf_counter()
        loss = train_epoch(*a, **k)
        curve.append({"epoch": len(curve) + 1, "train_loss": float(loss if not isinstance(loss, tuple) else sum(loss)),
                      "train_seconds": time.perf_counter() - begun})
        return loss

    def timed_valid_epoch(*a, **k):
        begun = time.perf_counter()
        score, result = valid_epoch(*a, **k)
        curve[-1].update(valid_seconds=time.perf_counter() - begun, valid={k: float(v) for k, v in result.items()})
        print(f"[peers] {spec['model']} epoch {len(curve)}: loss {curve[-1]['train_loss']:.4f} "
              f"train {curve[-1]['train_seconds']:.0f}s valid {config['valid_metric']}={score:.4f}", flush=True)
        return score, result

    best_epochs: list[int] = []  # RecBole saves a checkpoint whenever early_stopping says "update" (>= best)
    budget = spec.get("time_budget_s")  # None: train until RecBole's early stopping (or max epochs)

    def on_epoch_end(epoch_idx: int, valid_score: float) -> None:
        if trainer.cur_step == 0:
            best_epochs.append(epoch_idx + 1)
        early_stop_now = trainer.cur_step > trainer.stopping_step  # fit() breaks right after this callback
        epoch_seconds = curve[-1]["train_seconds"] + curve[-1]["valid_seconds"]
        if budget and not early_stop_now and time.perf_counter() - fit_started + epoch_seconds > budget:
            raise TimeBudgetReached  # another epoch would overrun the budget; the best checkpoint is saved

    trainer._train_epoch, trainer._valid_epoch = timed_train_epoch, timed_valid_epoch
    fit_started = time.perf_counter()
    try:
        trainer.fit(train_data, valid_data, saved=True, show_progress=False, callback_fn=on_epoch_end)
        stopped_by = "max_epochs" if len(curve) == config["epochs"] else "early_stopping"
    except TimeBudgetReached:
        stopped_by = "time_budget"
        print(f"[peers] {spec['model']}: stopped after epoch {len(curve)}: the time budget of {budget:.0f}s "
              f"would not fit another epoch (best so far: epoch {best_epochs[-1]})", flush=True)
    best_valid_score, best_valid_result = trainer.best_valid_score, trainer.best_valid_result
    fit_seconds = time.perf_counter() - fit_started
    test_started = time.perf_counter()
    test_result = trainer.evaluate(test_data, load_best_model=True, show_progress=False)
    test_seconds = time.perf_counter() - test_started

    result = {
        "model": spec["model"],
        "recbole_version": recbole.__version__,
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "num_items": int(dataset.item_num - 1),  # RecBole's item_num counts its padding id 0
        "num_users": int(dataset.user_num - 1),
        "num_interactions": int(dataset.inter_num),
        "trainable_parameters": int(sum(p.numel() for p in model.parameters() if p.requires_grad)),
        "best_valid_score": float(best_valid_score),
        "best_valid": {k: float(v) for k, v in (best_valid_result or {}).items()},
        "best_epoch": best_epochs[-1] if best_epochs else None,
        "epochs_run": len(curve),
        "stopped_by": stopped_by,
        "time_budget_s": budget,
        "test": {k: float(v) for k, v in test_result.items()},
        "curve": curve,
        "seconds": {"data": data_seconds, "fit": fit_seconds, "test": test_seconds,
                    "total": time.perf_counter() - started},
        "config": {key: _plain(config[key]) for key in sorted(spec["config"])},
        "split": {"validation": built_split(valid_data), "test": built_split(test_data)},
    }
    args.out.write_text(json.dumps(result, indent=1))
    return 0


def _plain(value):
    """A RecBole config value -> something json can write (enums and devices as text)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


if __name__ == "__main__":
    raise SystemExit(main())

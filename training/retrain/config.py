"""The `retrain` section of the job config, and the check that its gate metric is one evaluation computes."""
from __future__ import annotations

import re
from dataclasses import dataclass

_METRIC = re.compile(r"^(?:(?:recall|ndcg)@(?P<k>\d+)|mrr)$")


@dataclass(kw_only=True)
class RetrainConfig:
    steps: int = 200  # optimizer steps per epoch of the warm-started challenger (the bound on retrain cost)
    epochs: int = 1
    replay_ratio: float = 1.0  # older examples replayed per new training example (0 = new data only)
    holdout_fraction: float = 0.2  # newest share of the unseen interactions held out for the gate
    min_new_interactions: int = 20  # fewer unseen interactions than this: wait for more data (exit 0)
    metric: str = "ndcg@10"  # gate metric, one of recall@k / ndcg@k (k in train.eval_ks) / mrr
    margin: float = 0.0  # promote when challenger >= champion - margin
    lock_stale_seconds: float = 6 * 3600.0  # a lock older than this is taken over (its holder hung or died)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.epochs < 1:
            raise ValueError("retrain.steps and retrain.epochs must be >= 1")
        if self.replay_ratio < 0:
            raise ValueError("retrain.replay_ratio must be >= 0")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ValueError("retrain.holdout_fraction must be in (0, 1)")
        if self.min_new_interactions < 2:
            raise ValueError("retrain.min_new_interactions must be >= 2 (one to train on, one to hold out)")
        if _METRIC.match(self.metric) is None:
            raise ValueError(f"retrain.metric={self.metric!r}; use recall@K, ndcg@K or mrr")
        if self.margin < 0 or self.lock_stale_seconds <= 0:
            raise ValueError("retrain.margin must be >= 0 and retrain.lock_stale_seconds > 0")


def check_gate_metric(metric: str, eval_ks: tuple[int, ...]) -> None:
    """The gate metric must be one the evaluation computes."""
    match = _METRIC.match(metric)
    if match is None or (match["k"] is not None and int(match["k"]) not in eval_ks):
        raise ValueError(f"retrain.metric={metric!r} is not computed; train.eval_ks={list(eval_ks)}")

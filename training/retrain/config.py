"""The `retrain` section of the job config, and the check that its gate metric is one evaluation computes."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar

_METRIC = re.compile(r"^(?:(?:recall|ndcg)@(?P<k>\d+)|mrr)$")


@dataclass(kw_only=True)
class RetrainConfig:
    steps: int = field(
        default=200,
        metadata={"help": "optimizer steps of the warm-started challenger (the bound on a retrain's cost)"})
    replay_ratio: float = field(
        default=1.0, metadata={"help": "older examples replayed per new training example (0 = new data only)"})
    holdout_fraction: float = field(
        default=0.2, metadata={"help": "newest share of the unseen interactions held out for the promotion gate"})
    metric: str = field(
        default="ndcg@10", metadata={"help": "gate metric: recall@k or ndcg@k (k in train.eval_ks) or mrr"})
    margin: float = field(default=0.0, metadata={"help": "promote when challenger >= champion - margin"})

    # Fixed (not settings): fewer unseen interactions than this: wait for more data (exit 0); a lock older than
    # this is taken over (its holder hung or died). The replay sample is seeded by train.seed.
    min_new_interactions: ClassVar[int] = 20
    lock_stale_seconds: ClassVar[float] = 6 * 3600.0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError("retrain.steps must be >= 1")
        if self.replay_ratio < 0:
            raise ValueError("retrain.replay_ratio must be >= 0")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ValueError("retrain.holdout_fraction must be in (0, 1)")
        if _METRIC.match(self.metric) is None:
            raise ValueError(f"retrain.metric={self.metric!r}; use recall@K, ndcg@K or mrr")
        if self.margin < 0:
            raise ValueError("retrain.margin must be >= 0")


def check_gate_metric(metric: str, eval_ks: tuple[int, ...]) -> None:
    """The gate metric must be one the evaluation computes."""
    match = _METRIC.match(metric)
    if match is None or (match["k"] is not None and int(match["k"]) not in eval_ks):
        raise ValueError(f"retrain.metric={metric!r} is not computed; train.eval_ks={list(eval_ks)}")

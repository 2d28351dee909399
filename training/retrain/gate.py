"""The promotion gate: the challenger replaces the champion only if it scores no worse (within a margin)."""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class PromotionDecision:
    promote: bool
    metric: str
    champion_score: float
    challenger_score: float
    margin: float
    reason: str

    def tags(self) -> dict[str, str]:
        return {
            "gate.decision": "promoted" if self.promote else "rejected",
            "gate.metric": self.metric,
            "gate.margin": repr(self.margin),
            "gate.champion_score": repr(self.champion_score),
            "gate.challenger_score": repr(self.challenger_score),
            "gate.reason": self.reason,
        }


def decide_promotion(champion_score: float, challenger_score: float, *, metric: str, margin: float) -> PromotionDecision:
    """Promote iff the challenger is no worse than the champion by more than `margin` (higher is better)."""
    if math.isnan(challenger_score):
        promote, reason = False, "challenger score is NaN"
    elif math.isnan(champion_score):
        promote, reason = True, "champion score is NaN"
    elif challenger_score >= champion_score - margin:
        promote, reason = True, f"{challenger_score:.6f} >= {champion_score:.6f} - {margin:g}"
    else:
        promote, reason = False, f"{challenger_score:.6f} < {champion_score:.6f} - {margin:g}"
    return PromotionDecision(promote, metric, float(champion_score), float(challenger_score), margin, reason)

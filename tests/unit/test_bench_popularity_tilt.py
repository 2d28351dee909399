"""bench.popularity_tilt: the tilted ranking and the beta validation chooses."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bench.popularity_tilt import BETAS, chosen_beta, tilt_curve

# items 1-4 seen 1, 5, 20 and 100 times, item 5 in no training example; row 0 is padding
COUNTS = np.array([0, 1, 5, 20, 100, 0])
SEEN = torch.as_tensor(COUNTS > 0)
LOG_COUNTS = torch.as_tensor(np.log1p(COUNTS), dtype=torch.float32)


def _curve(targets: list[int], among=SEEN) -> list[float]:
    users = torch.zeros(len(targets), 4)  # every score is the tilt alone
    items = torch.nn.functional.normalize(torch.randn(len(COUNTS), 4, generator=torch.Generator().manual_seed(0)))
    return tilt_curve(users, items, torch.tensor(targets), LOG_COUNTS, among)


def test_a_positive_tilt_lifts_popular_targets_and_a_negative_one_rare_ones():
    last_of_four = 1 / math.log2(5)  # 0-based rank 3 among the four seen items
    popular, rare = _curve([4]), _curve([1])
    assert popular[BETAS.index(0.04)] == pytest.approx(1.0) and popular[BETAS.index(-0.04)] == pytest.approx(last_of_four)
    assert rare[BETAS.index(-0.04)] == pytest.approx(1.0) and rare[BETAS.index(0.04)] == pytest.approx(last_of_four)


def test_items_outside_the_ranked_set_do_not_compete():
    # under a negative tilt the unseen item 5 (tilt 0) would outrank the rare target (tilt < 0) were it ranked
    everything = torch.ones(len(COUNTS), dtype=torch.bool)
    everything[0] = False
    assert _curve([1])[0] == pytest.approx(1.0)
    assert _curve([1], among=everything)[0] == pytest.approx(1 / math.log2(3))


def test_the_chosen_beta_is_the_best_and_of_equal_ones_the_least_tilt():
    curve = [0.0] * len(BETAS)
    curve[BETAS.index(0.02)] = curve[BETAS.index(-0.01)] = 0.5
    assert chosen_beta(curve) == -0.01
    assert chosen_beta(_curve([4, 1])) == 0.0  # untilted, every item ties and ties count for the target
    curve[BETAS.index(0.03)] = 0.6
    assert chosen_beta(curve) == 0.03
    with pytest.raises(ValueError, match="one value per beta"):
        chosen_beta(curve[:-1])

"""bench/id_content.py's plain function: the cross-validated ridge R^2."""
import numpy as np
import pytest

from bench.id_content import ridge_cv_r2


def test_ridge_cv_r2_is_one_for_a_linear_map_and_near_zero_for_noise():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 8))
    assert ridge_cv_r2(x, x @ rng.normal(size=(8, 4)) + 3.0, ridge=1e-8) == pytest.approx(1.0, abs=1e-6)
    assert abs(ridge_cv_r2(x, rng.normal(size=(400, 4)))) < 0.05

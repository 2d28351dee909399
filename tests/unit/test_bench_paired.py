"""bench/paired.py's plain functions: per-user metric values, the paired bootstrap, popularity groups."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.paired import compare_runs, paired_bootstrap, per_user, popularity_buckets, run_ranks
from training.metrics import ranking_metrics


def test_per_user_values_average_to_the_ranking_metrics():
    ranks = np.array([0, 1, 4, 9, 10, 57, 3, 0, 1681])
    expected = ranking_metrics(torch.as_tensor(ranks), ks=(10,))
    for metric in ("ndcg@10", "recall@10", "mrr"):
        assert per_user(ranks, metric).mean() == pytest.approx(expected[metric])
    with pytest.raises(ValueError, match="ndcg@k, recall@k, mrr"):
        per_user(ranks, "auc")


def test_paired_bootstrap_resolves_a_consistent_gap_and_not_a_coin_flip():
    rng = np.random.default_rng(1)
    a = (rng.random(900) < 0.15).astype(float)  # hits of 900 users
    better = a.copy()
    better[np.flatnonzero(a == 0)[:30]] = 1.0  # 30 more hits, none lost: +0.033, every resample > 0
    result = paired_bootstrap(a, better, resamples=2000)
    assert result["difference"] == pytest.approx(30 / 900)
    assert 0 < result["low"] < result["difference"] < result["high"] and result["share_positive"] == 1.0
    # 30 hits gained and 30 others lost: no difference, an interval around 0
    swapped = better.copy()
    swapped[np.flatnonzero(a == 1)[:30]] = 0.0
    result = paired_bootstrap(a, swapped, resamples=2000)
    assert result["difference"] == 0 and result["low"] < 0 < result["high"]
    assert 0.3 < result["share_positive"] < 0.7
    with pytest.raises(ValueError, match="equal-length"):
        paired_bootstrap(a, a[:10])


def test_users_with_several_examples_are_resampled_whole():
    from bench.paired import standard_error

    rng = np.random.default_rng(2)
    a = (rng.random(300) < 0.15).astype(float)
    b = (rng.random(300) < 0.25).astype(float)
    one_each = np.arange(300)
    # one example per user: clustering changes nothing
    assert standard_error(b, one_each) == pytest.approx(standard_error(b))
    # every example repeated 5 times for its user: 5x the rows but no new information
    a5, b5, users5 = np.repeat(a, 5), np.repeat(b, 5), np.repeat(one_each, 5)
    assert standard_error(b5, users5) == pytest.approx(standard_error(b), rel=0.01)
    assert standard_error(b5) < 0.5 * standard_error(b)  # counted as independent rows it would look 2.2x surer
    clustered = paired_bootstrap(a5, b5, resamples=2000, users=users5)
    single = paired_bootstrap(a, b, resamples=2000)
    assert clustered["high"] - clustered["low"] == pytest.approx(single["high"] - single["low"], rel=0.15)


def test_popularity_buckets_split_rarest_first_without_splitting_ties():
    index, ranges = popularity_buckets(np.arange(10), 2)
    assert index.tolist() == [0] * 5 + [1] * 5 and ranges == [(0, 4), (5, 9)]
    counts = np.array([100, 0, 0, 3, 0, 0, 1, 2, 4, 5, 100, 100])  # order kept: index follows the input
    index, ranges = popularity_buckets(counts, 4)
    assert ranges == [(0, 2), (3, 5), (100, 100)]  # four zeros cannot fill a quarter alone: one group fewer
    assert index.tolist() == [2, 0, 0, 1, 0, 0, 0, 0, 1, 1, 2, 2]
    for bucket, (low, high) in enumerate(ranges):  # every count of a group lies in its range, and only there
        assert ((counts >= low) & (counts <= high)).sum() == (index == bucket).sum()
    assert popularity_buckets(np.zeros(5), 3)[1] == [(0, 0)]
    with pytest.raises(ValueError, match="buckets >= 1"):
        popularity_buckets(np.arange(4), 0)


def test_a_run_stopped_before_its_first_checkpoint_is_one_error_line(tmp_path):
    from training.driver import RUN_MARKER

    (tmp_path / "data").mkdir()
    (tmp_path / RUN_MARKER).write_text("{}")
    (tmp_path / "data" / "validation.parquet").write_bytes(b"")
    with pytest.raises(SystemExit, match="has no checkpoint"):
        run_ranks(tmp_path, "validation", mask_history=False)


def test_compare_runs_gives_each_later_run_its_gap_from_the_first():
    users = np.repeat(np.arange(50), 2)
    ranks = np.random.default_rng(0).integers(0, 30, size=100)
    runs = [{"run": "a", "ranks": ranks}, {"run": "b", "ranks": ranks // 2}, {"run": "c", "ranks": ranks}]
    chosen = np.ones(100, dtype=bool)
    first, better, same = compare_runs(runs, chosen, "recall@10", users, resamples=200)
    assert "difference" not in first and first["mean"] == pytest.approx((ranks < 10).mean())
    assert better["difference"] == pytest.approx(((ranks // 2) < 10).mean() - (ranks < 10).mean())
    assert better["low"] > 0 and same["difference"] == 0.0 == same["low"] == same["high"]


def test_among_seen_is_refused_outside_the_warm_subset(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "bench.paired", str(tmp_path), str(tmp_path), "--among-seen",
                           "--subset", "test_cold", "--out", str(tmp_path / "o.json")],
                          check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "--among-seen compares warm targets" in done.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "o.json").exists()


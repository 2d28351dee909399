"""bench/new_item_boost.py: the offset that gives unseen items a chosen softmax mass, and ranks under an offset."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.new_item_boost import (
    content_prior,
    offset_for_mass,
    ranks_with_offset,
    ridge_cv,
    ridge_fit,
    ridge_predict,
    unseen_mass,
)


def _logits(rows: int = 64, items: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, items + 1, generator=generator) * 3
    logits[:, 0] = float("-inf")
    unseen = torch.zeros(items + 1, dtype=torch.bool)
    unseen[1:9] = True  # 8 of 40 items
    return logits, unseen


def test_the_offset_reaches_the_target_mass_and_the_mass_rises_with_it():
    logits, unseen = _logits()
    masses = [unseen_mass(logits, unseen, offset) for offset in (-2.0, 0.0, 2.0)]
    assert masses[0] < masses[1] < masses[2]
    for target in (0.05, 0.2, 0.6):
        offset = offset_for_mass(logits, unseen, target)
        assert unseen_mass(logits, unseen, offset) == pytest.approx(target, abs=1e-6)
    at_zero = unseen_mass(logits, unseen, 0.0)
    assert offset_for_mass(logits, unseen, at_zero) == pytest.approx(0.0, abs=1e-6)


def test_an_unreachable_or_meaningless_target_is_refused():
    logits, unseen = _logits()
    for target in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="target mass"):
            offset_for_mass(logits, unseen, target)
    with pytest.raises(ValueError, match="no unseen items"):
        offset_for_mass(logits, torch.zeros_like(unseen), 0.5)


def test_ranks_under_an_offset_and_among_a_subset():
    items = torch.eye(4)  # row 0 = padding, items 1..3
    user = torch.tensor([[0.0, 1.0, 0.5, 0.2]])  # scores: item1 1.0, item2 0.5, item3 0.2
    target = torch.tensor([3])
    none = torch.zeros(4)
    assert ranks_with_offset(user, items, target, none).tolist() == [2]
    lifted = torch.tensor([0.0, 0.0, 0.0, 0.9])  # item 3 -> 1.1: first
    assert ranks_with_offset(user, items, target, lifted).tolist() == [0]
    tie = torch.tensor([0.0, 0.0, 0.0, 0.3])  # item 3 -> 0.5, tied with item 2: ties count for the target
    assert ranks_with_offset(user, items, target, tie).tolist() == [1]
    among = torch.tensor([False, False, True, True])
    assert ranks_with_offset(user, items, target, none, among=among).tolist() == [1]


def test_a_directory_that_is_no_run_is_one_error_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "bench.new_item_boost", str(tmp_path), "--out", str(tmp_path / "o.json")],
                          check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [f"error: {tmp_path} is not a training run directory with data/test_cold.parquet"]
    assert not (tmp_path / "o.json").exists()


@pytest.mark.parametrize("levels", ["0.02,x", "0", "1.5"])
def test_a_bad_cold_recall_level_is_refused_before_any_run_is_read(tmp_path, levels):
    done = subprocess.run([sys.executable, "-m", "bench.new_item_boost", str(tmp_path), "--match-cold", levels],
                          check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--match-cold" in done.stderr.strip().splitlines()[-1]


def test_ridge_cv_tells_a_learnable_target_from_noise():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(400, 20)) * 5.0
    weights = rng.normal(size=20)
    linear = features @ weights + 3.0 + rng.normal(size=400) * 0.1
    ridge, r2 = ridge_cv(features, linear)
    assert r2 > 0.99
    assert ridge == 1e-3  # the least shrinkage of the grid fits a noiseless linear target best
    noise_r2 = ridge_cv(features, rng.normal(size=400))[1]
    assert noise_r2 < 0.05
    with pytest.raises(ValueError, match="too few"):
        ridge_cv(features[:8], linear[:8])


def test_ridge_shrinks_the_slopes_but_not_the_intercept():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(200, 5))
    target = features[:, 0] * 2.0 + 7.0
    loose = ridge_fit(features, target, 1e-6)
    assert loose[0] == pytest.approx(2.0, abs=1e-3) and loose[-1] == pytest.approx(7.0, abs=1e-3)
    shrunk = ridge_fit(features, target, 1e6)
    assert np.abs(shrunk[:-1]).max() < 1e-3
    assert ridge_predict(shrunk, features) == pytest.approx(np.full(200, target.mean()), abs=1e-2)


def test_the_content_prior_spreads_only_the_unseen_items_by_what_a_log_count_is_worth():
    rng = np.random.default_rng(2)
    items = 30
    log_counts = np.r_[0.0, rng.uniform(1, 5, items)]
    unseen = np.zeros(items + 1, dtype=bool)
    unseen[1:7] = True
    log_counts[unseen] = 0.0
    warm = ~unseen
    warm[0] = False
    logits = torch.as_tensor(0.5 + 2.0 * log_counts[None, :] + rng.normal(size=(200, items + 1)) * 0.01)
    predicted = np.r_[0.0, rng.uniform(1, 5, items)]
    shape, slope = content_prior(logits, log_counts, predicted, warm, unseen)
    assert slope == pytest.approx(2.0, abs=0.01)
    assert (shape[~unseen] == 0).all()
    assert shape[unseen].mean() == pytest.approx(0.0, abs=1e-12)
    assert shape[unseen] == pytest.approx(slope * (predicted[unseen] - predicted[unseen].mean()))


def test_the_offset_for_a_cold_recall_is_the_smallest_that_reaches_it():
    from bench.new_item_boost import offset_for_recall

    def recall_at(offset: float) -> float:  # a non-decreasing step function: 0.1 per unit above -3, up to 1
        return min(1.0, max(0.0, 0.1 * np.floor(offset + 3)))

    for target in (0.1, 0.35, 1.0):
        offset = offset_for_recall(recall_at, target)
        assert recall_at(offset) >= target and recall_at(offset - 1e-6) < target
    assert offset_for_recall(recall_at, 0.0) == -30.0  # reached everywhere: the lowest offset
    with pytest.raises(ValueError, match="out of reach"):
        offset_for_recall(lambda offset: 0.5, 0.6)


@pytest.mark.parametrize("size", ["0", "-32"])
def test_a_size_below_one_is_refused_before_any_run_is_read(tmp_path, size):
    done = subprocess.run([sys.executable, "-m", "bench.new_item_boost", str(tmp_path), f"--size={size}"],
                          check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--size must be >= 1" in done.stderr.strip().splitlines()[-1]


def _result(warm: float, cold: float, matched: list[tuple[float, float | None]]) -> dict:
    """A measure_run result with only what method_summary reads: its row as trained, each matched level's row
    (None: not reached) and the cold targets' recall among the unseen items."""
    row = {"test_warm/ndcg@10": warm, "test_warm/recall@10": 2 * warm, "test_cold/recall@10": cold,
           "test/ndcg@10": warm - 0.01}
    return {"offsets": [{"factor": 0.0, **row}, {"factor": 1.0, **row, "test_warm/ndcg@10": 0.0}],
            "cold_among_unseen": {"recall@10": cold * 10},
            "matched_cold": [{"cold_recall@10_wanted": level, "reached": False} if got is None else
                             {"cold_recall@10_wanted": level, "reached": True, **row, "test_warm/ndcg@10": got}
                             for level, got in matched]}


def test_the_summary_over_seeds_is_per_method_as_trained_and_at_each_reached_cold_level():
    from bench.new_item_boost import format_summary, method_summary

    results = [_result(0.08, 0.0, [(0.006, 0.084), (0.03, 0.082)]), _result(0.07, 0.07, [(0.006, 0.076), (0.03, 0.075)]),
               _result(0.06, 0.0, [(0.006, 0.086), (0.03, None)]), _result(0.05, 0.07, [(0.006, 0.074), (0.03, 0.073)])]
    summary = method_summary(results, ["e2e", "frozen", "e2e", "frozen"])
    assert list(summary) == ["e2e", "frozen"]
    e2e, frozen = summary["e2e"], summary["frozen"]
    assert e2e["runs"] == 2 and e2e["as_trained"]["test_warm/ndcg@10"] == {"mean": 0.07, "std": 0.01, "n": 2}
    assert e2e["at_cold"]["0.006"]["test_warm/ndcg@10"] == {"mean": 0.085, "std": 0.001, "n": 2}
    assert "0.03" not in e2e["at_cold"] and e2e["not_reached"] == {"0.03": 1}  # one seed short: no mean
    assert frozen["at_cold"]["0.03"]["test_warm/ndcg@10"]["mean"] == 0.074 and frozen["not_reached"] == {}
    assert frozen["cold_among_unseen_recall@10"]["mean"] == 0.7
    table = format_summary(summary)
    assert "| e2e | 2 | cold R@10 0.03 | not reached by 1 run(s) |" in table
    assert "| frozen | 2 | cold R@10 0.006 | 0.0750 ± 0.0010 |" in table
    # an offset fitted on validation is its own level, beside the one fitted on test
    for result, got in zip(results, (0.080, 0.070, 0.078, 0.072)):
        result["matched_cold"].append({**result["matched_cold"][0], "fitted_on": "validation", "reached": True,
                                       "test_warm/ndcg@10": got})
    again = method_summary(results, ["e2e", "frozen", "e2e", "frozen"])
    from_validation = again["e2e"]["at_cold"]["0.006 from validation"]
    assert from_validation["test_warm/ndcg@10"] == {"mean": 0.079, "std": 0.001, "n": 2}
    assert again["e2e"]["at_cold"]["0.006"] == e2e["at_cold"]["0.006"]
    assert "| frozen | 2 | cold R@10 0.006 from validation | 0.0710 ± 0.0010 |" in format_summary(again)


def test_runs_from_a_quality_result_are_its_trained_run_directories_and_a_bad_file_is_one_error_line(tmp_path):
    from bench.new_item_boost import labelled_quality_runs, runs_from_quality

    good = tmp_path / "quality.json"
    good.write_text(json.dumps({"runs": [{"method": "popularity", "seed": 0},
                                         {"method": "id_only", "seed": 0, "run_dir": "/r/a"},
                                         {"method": "id_only", "seed": 1, "run_dir": "/r/b"}]}))
    assert runs_from_quality(good) == [(Path("/r/a"), "id_only"), (Path("/r/b"), "id_only")]
    other = tmp_path / "sampled.json"
    other.write_text(json.dumps({"runs": [{"method": "id_only", "seed": 0, "run_dir": "/r/c"}]}))
    assert labelled_quality_runs([good]) == runs_from_quality(good)  # one file: the methods' own names
    assert labelled_quality_runs([good, other]) == [(Path("/r/a"), "id_only [quality]"),
                                                    (Path("/r/b"), "id_only [quality]"),
                                                    (Path("/r/c"), "id_only [sampled]")]
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"runs": [{"method": "popularity", "seed": 0}]}))
    with pytest.raises(ValueError, match="names no trained run directory"):
        runs_from_quality(empty)
    (tmp_path / "broken.json").write_text("{not json")
    for bad in (tmp_path / "missing.json", tmp_path / "broken.json"):
        done = subprocess.run([sys.executable, "-m", "bench.new_item_boost", "--from-quality", str(bad)],
                              check=False, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].startswith(
            "python -m bench.new_item_boost: error: --from-quality: cannot read the runs of")
    done = subprocess.run([sys.executable, "-m", "bench.new_item_boost"], check=False, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].endswith(
        "name run directories or --from-quality FILE")

"""bench.matryoshka's comparison: seed averaging, relative gaps, cost ratio, and refusal to mix settings."""
from __future__ import annotations

import json

import pytest

from bench.matryoshka import combine, compare


def _run(kind: str, dim: int, seed: int, ndcg: dict[int, float], cpu: float) -> dict:
    return {"kind": kind, "dim": dim, "sizes": sorted(ndcg), "seed": seed, "train_wall_s": 2 * cpu, "train_cpu_s": cpu,
            "final_loss": 1.0, "per_size": {str(s): {"ndcg@10": v, "recall@10": 2 * v, "mrr": v} for s, v in ndcg.items()}}


def _settings(seed: int, **changes: object) -> dict:
    return {"sizes": "32,128", "steps": 100, "steps_per_epoch": 50, "batch_size": 8, "max_history": 20,
            "loss": "sampled_softmax", "sequence_model": "lru", "modalities": "text", "encoders": "builtin",
            "weights": "", "seed": seed, **changes}


def test_compare_averages_seeds_and_sums_single_costs() -> None:
    runs = [_run("matryoshka", 128, 0, {32: 0.040, 128: 0.050}, cpu=100.0),
            _run("matryoshka", 128, 1, {32: 0.044, 128: 0.052}, cpu=120.0),
            _run("single", 32, 0, {32: 0.050}, cpu=10.0), _run("single", 32, 1, {32: 0.046}, cpu=30.0),
            _run("single", 128, 0, {128: 0.050}, cpu=200.0)]
    result = compare(runs)
    small, large = result["comparison"]
    assert (small["size"], small["matryoshka_runs"], small["single_runs"]) == (32, 2, 2)
    assert small["matryoshka_ndcg@10"] == pytest.approx(0.042) and small["single_ndcg@10"] == pytest.approx(0.048)
    assert small["matryoshka_ndcg@10_std"] == pytest.approx(0.002 * 2**0.5)  # sample std of 0.040, 0.044
    assert small["relative_ndcg_gap"] == pytest.approx(-0.125)
    assert large["relative_ndcg_gap"] == pytest.approx(0.02) and large["single_ndcg@10_std"] == 0.0
    summary = result["summary"]
    # one Matryoshka run (mean 110 cpu s) vs one run per size (mean 20 + 200)
    assert summary["cost_ratio_cpu"] == pytest.approx(110 / 220)
    assert not summary["all_sizes_within_3pct"] and not summary["goal_met"]


def test_compare_without_both_kinds_has_no_summary() -> None:
    assert compare([_run("single", 32, 0, {32: 0.05}, 1.0)]) == {"comparison": [], "summary": None}


def test_goal_needs_every_size_within_three_percent_and_half_the_cost() -> None:
    runs = [_run("matryoshka", 128, 0, {32: 0.0486, 128: 0.051}, cpu=49.0),
            _run("single", 32, 0, {32: 0.050}, cpu=50.0), _run("single", 128, 0, {128: 0.050}, cpu=50.0)]
    assert compare(runs)["summary"]["goal_met"]  # -2.8% and +2% at 0.49x
    runs[0]["train_cpu_s"] = 51.0
    assert not compare(runs)["summary"]["goal_met"]


def test_combine_merges_files_and_refuses_other_settings(tmp_path) -> None:
    paths = []
    for seed, runs, settings in [
        (0, [_run("matryoshka", 128, 0, {32: 0.04, 128: 0.05}, 100.0)], _settings(0, weights="1,2")),
        (1, [_run("single", 32, 1, {32: 0.05}, 10.0), _run("single", 128, 1, {128: 0.05}, 90.0),
             _run("single", 512, 1, {512: 0.06}, 900.0)], _settings(1, sizes="32,128,512")),
    ]:
        path = tmp_path / f"seed{seed}.json"
        path.write_text(json.dumps({"settings": settings, "runs": runs}))
        paths.append(str(path))
    result = combine(paths)
    assert result["settings"]["seed"] == [0, 1] and result["settings"]["weights"] == "1,2"
    assert [row["size"] for row in result["comparison"]] == [32, 128]  # the 512 single is not a size it serves
    assert result["summary"]["cost_ratio_cpu"] == pytest.approx(100 / 100)

    other = tmp_path / "other.json"
    other.write_text(json.dumps({"settings": _settings(2, steps=200), "runs": []}))
    with pytest.raises(SystemExit, match="steps"):
        combine([paths[0], str(other)])
    other.write_text(json.dumps({"settings": _settings(2, weights=""), "runs": [
        _run("matryoshka", 128, 2, {32: 0.04, 128: 0.05}, 100.0)]}))
    with pytest.raises(SystemExit, match="not one method"):
        combine([paths[0], str(other)])


def test_combine_takes_only_the_single_size_runs_of_singles_from_files(tmp_path) -> None:
    mine, theirs = tmp_path / "mine.json", tmp_path / "theirs.json"
    mine.write_text(json.dumps({"settings": _settings(0, weights="0.25,0.5,1"), "runs": [
        _run("matryoshka", 128, 0, {32: 0.06, 128: 0.05}, 100.0)]}))
    theirs.write_text(json.dumps({"settings": _settings(0), "runs": [  # another method's Matryoshka + singles
        _run("matryoshka", 128, 0, {32: 0.01, 128: 0.01}, 500.0),
        _run("single", 32, 0, {32: 0.05}, 10.0), _run("single", 128, 0, {128: 0.05}, 90.0)]}))
    with pytest.raises(SystemExit, match="not one method"):
        combine([str(mine), str(theirs)])
    result = combine([str(mine)], singles_from=[str(theirs)])
    assert [r["kind"] for r in result["runs"]] == ["matryoshka", "single", "single"]
    assert result["settings"]["weights"] == "0.25,0.5,1" and result["settings"]["singles_from"] == [str(theirs)]
    small, large = result["comparison"]
    assert small["relative_ndcg_gap"] == pytest.approx(0.2) and large["relative_ndcg_gap"] == pytest.approx(0.0)
    assert result["summary"]["cost_ratio_cpu"] == pytest.approx(1.0)  # 100 vs 10 + 90: the other model is not counted
    with pytest.raises(SystemExit, match=r"\('single', 32, 0\).*count twice"):
        combine([str(mine)], singles_from=[str(theirs), str(theirs)])

"""bench/quality.py: what `--resume` keeps and refuses (runs of another protocol), and its Matryoshka methods."""
from __future__ import annotations

import argparse
import json
import os

import pytest

from bench.quality import (MATRYOSHKA_SIZES, interrupted_run, method_config, method_overrides, resumed_runs,
                           run_protocol, size_summary, summarise, format_table)


def _args(tmp_path, **changes) -> argparse.Namespace:
    values = dict(prepared_dir=str(tmp_path / "prepared"), steps=0, epochs=30, patience=10, batch_size=64,
                  image_size=32, text_length=16, cold_fraction=0.1, storage_path=str(tmp_path / "runs"),
                  experiment="x", overrides=["data.time_split_at=1998-03-01"])
    return argparse.Namespace(**{**values, **changes})


def _protocol(tmp_path, **changes) -> dict:
    args = _args(tmp_path, **changes)
    return run_protocol(method_config("id_only", 0, args), args)


def test_the_protocol_names_what_makes_numbers_comparable_and_not_where_runs_are_stored(tmp_path):
    protocol = _protocol(tmp_path)
    assert protocol["split"] == "time, at 1998-03-01" and protocol["epochs"] == 30
    assert _protocol(tmp_path, storage_path="elsewhere", experiment="y") == protocol
    assert _protocol(tmp_path, epochs=25) != protocol
    windowed = _protocol(tmp_path, overrides=["data.time_split_at=1998-03-01", "data.validation_from=1998-02-15"])
    assert windowed["split"] == "time, at 1998-03-01, validation window from 1998-02-15"


def test_resume_keeps_the_partial_runs_first_then_a_finished_outs(tmp_path):
    protocol, out = _protocol(tmp_path), tmp_path / "q.json"
    partial = out.with_suffix(".partial.json")
    assert resumed_runs(out, partial, protocol) == ([], None)
    out.write_text(json.dumps({"protocol": {**protocol, "methods": {}, "test_users": {}},
                               "runs": [{"method": "id_only", "seed": 0}]}))
    assert resumed_runs(out, partial, protocol) == ([{"method": "id_only", "seed": 0}], out)
    partial.write_text(json.dumps({"protocol": protocol, "runs": [{"method": "id_only", "seed": 1}]}))
    assert resumed_runs(out, partial, protocol) == ([{"method": "id_only", "seed": 1}], partial)
    partial.write_text(json.dumps([{"method": "x", "seed": 2}]))  # written before the protocol was stored in it
    assert resumed_runs(out, partial, protocol) == ([{"method": "x", "seed": 2}], partial)


def test_resume_refuses_runs_of_another_protocol_in_one_line(tmp_path):
    out = tmp_path / "q.json"
    earlier = {**_protocol(tmp_path, epochs=25)}
    del earlier["prepared_dir"]  # a result written before the prepared directory was stored: not compared
    out.write_text(json.dumps({"protocol": earlier, "runs": [{"method": "id_only", "seed": 0}]}))
    with pytest.raises(ValueError, match=r"another protocol \(epochs 25, here 30\); use another --out") as error:
        resumed_runs(out, out.with_suffix(".partial.json"), _protocol(tmp_path))
    assert "\n" not in str(error.value)
    out.write_text(json.dumps({"protocol": _protocol(tmp_path, prepared_dir="/elsewhere"), "runs": []}))
    with pytest.raises(ValueError, match="prepared_dir '/elsewhere'"):
        resumed_runs(out, out.with_suffix(".partial.json"), _protocol(tmp_path))
    out.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read"):
        resumed_runs(out, out.with_suffix(".partial.json"), _protocol(tmp_path))


def test_the_matryoshka_methods_are_one_nested_model_and_its_single_size_twins(tmp_path):
    args = _args(tmp_path)
    nested = method_config("matryoshka_lru", 0, args).model
    assert (nested.dim, nested.matryoshka_sizes, nested.sequence_model, nested.side_network) == \
        (512, (32, 128, 512), "lru", 64)
    for size in MATRYOSHKA_SIZES:
        single = method_config(f"lru_{size}", 0, args).model
        assert (single.dim, single.matryoshka_sizes, single.sequence_model, single.num_layers) == \
            (size, (), "lru", nested.num_layers)


def test_size_summary_averages_each_size_over_the_runs_that_all_have_it():
    runs = [[{"size": 32, "ndcg@10": 0.02}, {"size": 512, "ndcg@10": 0.06}],
            [{"size": 32, "ndcg@10": 0.04}, {"size": 128, "ndcg@10": 0.05}, {"size": 512, "ndcg@10": 0.08}]]
    summary = size_summary(runs)
    assert list(summary) == ["32", "512"]
    assert summary["32"]["ndcg@10"] == pytest.approx({"mean": 0.03, "std": 0.01})
    assert summary["512"]["ndcg@10"]["mean"] == pytest.approx(0.07)


def test_refitted_runs_are_summarised_with_their_selection_runs_beside():
    from bench.quality import METRICS, SUBSETS

    def record(seed: int, refit: float, chosen: float | None) -> dict:
        metrics = lambda value: {subset: {name: value for name in METRICS} for subset in SUBSETS}  # noqa: E731
        run = {"method": "id_only", "seed": seed, "wall_seconds": 100.0 + seed, "metrics": metrics(refit)}
        return run if chosen is None else {**run, "selection": {"metrics": metrics(chosen)}}

    summary = summarise([record(0, 0.06, 0.05), record(1, 0.08, 0.05)])["id_only"]
    assert summary["test_warm"]["ndcg@10"] == pytest.approx({"mean": 0.07, "std": 0.01})
    assert summary["selection"]["test_warm"]["ndcg@10"] == pytest.approx({"mean": 0.05, "std": 0.0})
    assert "(its selection runs)" in format_table({"id_only": summary})
    # a method with a run that was not refitted has no selection entry (a mean over some seeds would mislead)
    assert "selection" not in summarise([record(0, 0.06, 0.05), record(1, 0.08, None)])["id_only"]


def test_other_sizes_are_methods_by_name_and_other_names_are_refused(tmp_path):
    args = _args(tmp_path)
    nested = method_config("matryoshka_lru_32_64_128", 0, args).model
    assert (nested.dim, nested.matryoshka_sizes, nested.matryoshka_weights) == (128, (32, 64, 128), (0.25, 0.5, 1.0))
    assert method_config("lru_64", 0, args).model.dim == 64
    assert method_overrides("matryoshka_lru") == method_overrides("matryoshka_lru_32_128_512")
    for name in ("lru_", "lru_64x", "matryoshka_lru_", "popularity"):
        with pytest.raises(KeyError):
            method_overrides(name)


def test_the_sampled_end_to_end_method_is_end_to_end_with_a_fifth_of_its_targets_encoded(tmp_path):
    args = _args(tmp_path, overrides=["memory.mode=bank", "train.targets=last"])
    full, sampled = (method_config(name, 0, args) for name in ("end_to_end", "end_to_end_sampled"))
    assert (full.memory.encode_fraction, sampled.memory.encode_fraction) == (1.0, 0.2)
    assert (sampled.image.unfreeze_top, sampled.text.unfreeze_top, sampled.model) == \
        (full.image.unfreeze_top, full.text.unfreeze_top, full.model)


def test_resume_continues_the_run_in_flight_from_its_last_checkpoint_counting_its_time_up_to_it(tmp_path):
    partial, runs = tmp_path / "q.partial.json", tmp_path / "runs"
    assert interrupted_run(partial, runs) is None  # no partial file
    flight = {"method": "end_to_end", "seed": 1, "run_name": "quality-end_to_end-s1-x", "started_at": 1000.0}
    partial.write_text(json.dumps({"protocol": {}, "runs": [], "in_flight": flight}))
    assert interrupted_run(partial, runs) is None  # killed before its first checkpoint: trained again, new name
    checkpoint = runs / flight["run_name"] / "checkpoint_2026-12-06_10-00-00.000000"
    checkpoint.mkdir(parents=True)
    os.utime(checkpoint, (1600.0, 1600.0))
    assert interrupted_run(partial, runs) == {**{k: flight[k] for k in ("method", "seed", "run_name")},
                                              "seconds": 600.0}
    assert method_config("end_to_end", 1, _args(tmp_path), flight["run_name"]).train.run_name == flight["run_name"]
    partial.write_text(json.dumps({"protocol": {}, "runs": []}))  # the last run finished: nothing in flight
    assert interrupted_run(partial, runs) is None


def test_resume_with_nothing_left_to_train_writes_the_result_without_starting_ray(tmp_path, prepared_dir):
    """Every (method, seed) asked for is in the partial file: the result is written from it alone. RAY_ADDRESS
    names no cluster, so starting Ray would fail the command."""
    import subprocess
    import sys

    from bench.quality import METRICS, SUBSETS

    args = _args(tmp_path, prepared_dir=str(prepared_dir), overrides=[])
    protocol = run_protocol(method_config("id_only", 0, args), args)
    metrics = {subset: {name: 0.05 for name in METRICS} for subset in SUBSETS}
    runs = [{"method": method, "seed": 0, "wall_seconds": 60.0, "metrics": metrics} for method in ("id_only",
                                                                                                  "popularity")]
    out = tmp_path / "q.json"
    out.with_suffix(".partial.json").write_text(json.dumps({"protocol": protocol, "runs": runs}))
    done = subprocess.run(
        [sys.executable, "-m", "bench.quality", "--prepared-dir", str(prepared_dir), "--methods", "id_only",
         "--seeds", "0", "--epochs", "30", "--storage-path", str(tmp_path / "runs"), "--out", str(out), "--resume"],
        check=False, capture_output=True, text=True, timeout=120,  # Ray to a dead address hangs
        env={**os.environ, "RAY_ADDRESS": "127.0.0.1:1"})
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert [(run["method"], run["seed"]) for run in result["runs"]] == [("popularity", 0), ("id_only", 0)]
    assert result["summary"]["id_only"]["test"]["ndcg@10"] == {"mean": 0.05, "std": 0.0}
    assert not out.with_suffix(".partial.json").exists()

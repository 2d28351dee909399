"""bench.peers' pure parts: our split in RecBole's atomic format, and the check that RecBole builds the same split.

No RecBole here: `recbole_sequences` replays its ordering (float32 timestamps, stable sorts), and these tests pin
what that replay must do; the benchmark itself also compares against the split RecBole really built.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bench.peers import (
    SplitMismatch,
    check_split,
    compare_splits,
    format_summary,
    merge_runs,
    our_split,
    recbole_sequences,
    recbole_split,
    summarise,
    write_atomic_inter,
)
from pipeline.sequences import order_interactions
from pipeline.sources import read_interactions

HEADER = "user_id:token\titem_id:token\ttimestamp:float"


@pytest.fixture(scope="module")
def real_slice(prepared_dir) -> pd.DataFrame:
    """The first 60 users of the real ml100k_mm, in raw file order (as `read_interactions` returns it)."""
    interactions = read_interactions(prepared_dir)
    return interactions[interactions.user_index < 60].reset_index(drop=True)


def test_atomic_file_has_typed_header_and_our_order(real_slice, tmp_path) -> None:
    path = write_atomic_inter(real_slice, tmp_path / "d" / "d.inter")
    assert path.read_text().splitlines()[0] == HEADER
    written = pd.read_csv(path, sep="\t", dtype=str)
    ordered = order_interactions(real_slice)
    assert len(written) == len(real_slice)
    assert written["user_id:token"].tolist() == ordered.user_id.astype(str).tolist()
    assert written["item_id:token"].tolist() == ordered.item_id.astype(str).tolist()
    assert written["timestamp:float"].astype(np.int64).tolist() == ordered.timestamp.tolist()


def test_split_check_passes_on_a_real_slice(real_slice, tmp_path) -> None:
    path = write_atomic_inter(real_slice, tmp_path / "d" / "d.inter")
    summary = check_split(path, real_slice)
    users = real_slice.user_id.nunique()
    assert summary["equal"]
    for name in ("validation", "test"):
        assert summary[name] == {"users": users, "targets_equal": users, "histories_equal": users}


def test_a_tie_break_inside_the_timestamp_does_not_survive_float32(real_slice, tmp_path) -> None:
    """Raw file order with `timestamp + row * 1e-6`: RecBole's float32 keys (64 s steps here) reorder rows."""
    path = tmp_path / "raw" / "raw.inter"
    path.parent.mkdir()
    pd.DataFrame({"user_id:token": real_slice.user_id, "item_id:token": real_slice.item_id,
                  "timestamp:float": [f"{t + r * 1e-6:.6f}" for t, r in zip(real_slice.timestamp, real_slice.row_order)]}
                 ).to_csv(path, sep="\t", index=False)
    with pytest.raises(SplitMismatch, match="different targets"):
        check_split(path, real_slice)


def test_replay_keeps_file_order_among_equal_float32_keys_and_leaves_out_like_recbole(tmp_path) -> None:
    path = tmp_path / "t.inter"
    # x2 is 10 s later than x1 but first in the file: both round to the same float32 key, and RecBole's stable
    # sort keeps the file order, even against time. That is why the file must already be in our order.
    rows = [("a", "x2", 890000010), ("a", "x1", 890000000),
            ("a", "x0", 880000000), ("a", "x3", 890000100), ("a", "x4", 890001000),
            ("b", "y1", 5), ("b", "y2", 6), ("b", "y3", 7),  # 3 interactions: a test example only
            ("c", "z1", 1), ("c", "z2", 2)]  # 2 interactions: neither
    path.write_text(HEADER + "\n" + "".join(f"{u}\t{i}\t{t}\n" for u, i, t in rows))
    sequences = recbole_sequences(path)
    assert np.float32(890000010) == np.float32(890000000)
    assert sequences == {"a": ["x0", "x2", "x1", "x3", "x4"], "b": ["y1", "y2", "y3"], "c": ["z1", "z2"]}
    split = recbole_split(sequences, max_history=2)
    assert split["test"] == {"a": {"target": "x4", "history": ["x1", "x3"]}, "b": {"target": "y3", "history": ["y1", "y2"]}}
    assert split["validation"] == {"a": {"target": "x3", "history": ["x2", "x1"]}}


def test_compare_splits_names_what_differs(real_slice) -> None:
    ours = our_split(real_slice)
    theirs = {name: {u: dict(e) for u, e in examples.items()} for name, examples in ours.items()}
    assert compare_splits(theirs, ours, "same")["equal"]
    user = min(theirs["test"])
    theirs["test"][user]["target"] = "not-an-item"
    with pytest.raises(SplitMismatch, match=r"test: 1 different targets \(e.g. users \['" + user):
        compare_splits(theirs, ours, "changed")
    del theirs["validation"][user]
    with pytest.raises(SplitMismatch, match="1 users only in ours"):
        compare_splits(theirs, ours, "missing")


def test_merge_runs_keeps_other_invocations_runs_and_prefers_ours() -> None:
    mine = [{"model": "GRU4Rec", "seed": 0, "v": "mine"}]
    on_disk = [{"model": "SASRec", "seed": 0, "v": "disk"}, {"model": "GRU4Rec", "seed": 0, "v": "old"}]
    assert merge_runs(mine, on_disk) == [{"model": "SASRec", "seed": 0, "v": "disk"},
                                         {"model": "GRU4Rec", "seed": 0, "v": "mine"}]


def _run(model: str, seed: int, ndcg: float, best_epoch: int, wall: float) -> dict:
    return {"model": model, "seed": seed, "best_epoch": best_epoch, "epochs_run": best_epoch + 11,
            "wall_seconds": wall, "test": {"ndcg@10": ndcg, "recall@10": 2 * ndcg, "mrr": ndcg, "recall@50": 0.4}}


def test_summarise_gives_each_model_its_seeds_mean_and_population_std() -> None:
    runs = [_run("SASRec", 0, 0.06, 8, 3000.0), _run("GRU4Rec", 0, 0.07, 15, 2000.0),
            _run("SASRec", 1, 0.08, 12, 1000.0)]
    summary = summarise(runs)
    assert list(summary) == ["SASRec", "GRU4Rec"]
    sasrec = summary["SASRec"]
    assert sasrec["seeds"] == [0, 1]
    assert sasrec["test_ndcg@10"] == pytest.approx({"mean": 0.07, "std": 0.01})
    assert sasrec["test_recall@10"] == pytest.approx({"mean": 0.14, "std": 0.02})
    assert sasrec["best_epoch"] == pytest.approx({"mean": 10.0, "std": 2.0})
    assert sasrec["epochs_run"]["mean"] == pytest.approx(21.0)
    assert sasrec["wall_seconds"] == pytest.approx({"mean": 2000.0, "std": 1000.0})
    assert summary["GRU4Rec"]["test_ndcg@10"] == pytest.approx({"mean": 0.07, "std": 0.0})
    table = format_summary(summary)
    assert "| SASRec | 0, 1 | 0.0700 ± 0.0100 | 0.1400 ± 0.0200 |" in table
    assert "| GRU4Rec | 0 | 0.0700 ± 0.0000 |" in table

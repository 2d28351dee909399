"""The cold-start split: seeded held-out items never reach training; evaluation keeps full histories."""
import numpy as np
import pandas as pd
import pytest

from pipeline.config import DataConfig
from pipeline.sequences import cold_start_split, leave_one_out, sample_cold_items, time_split


def frame(rows):
    df = pd.DataFrame(rows, columns=["user_index", "item_index", "timestamp"])
    df["row_order"] = np.arange(len(df))
    df["rating"] = 4.0
    return df


def _items(examples) -> set[int]:
    return set(examples.target.tolist()) | set(examples.history.reshape(-1).tolist()) - {0}


def test_sample_cold_items_is_seeded_and_sized():
    first = sample_cold_items(1682, 0.1, seed=0)
    assert len(first) == 168 and len(np.unique(first)) == 168
    assert first.min() >= 1 and first.max() <= 1682  # never the padding index 0
    assert np.array_equal(first, sample_cold_items(1682, 0.1, seed=0))
    assert not np.array_equal(first, sample_cold_items(1682, 0.1, seed=1))
    assert len(sample_cold_items(1682, 0.0, seed=0)) == 0
    with pytest.raises(ValueError):
        sample_cold_items(10, 1.0, seed=0)


def test_hand_made_frame_removes_cold_items_from_training_only():
    # user 0: 1 2 3 4 5 6 (val 5, test 6); user 1: 7 3 8 9 (val 8, test 9); user 2: 3 1 (train only)
    df = frame([(0, i, 10 * i) for i in range(1, 7)] + [(1, 7, 1), (1, 3, 2), (1, 8, 3), (1, 9, 4)]
               + [(2, 3, 1), (2, 1, 2)])
    split = cold_start_split(df, max_history=3, cold_items=np.array([3, 9]))
    plain = leave_one_out(df, max_history=3)
    # training region of user 0 is 1 2 3 4 -> without 3: 1 2 4 -> targets 2, 4 (history has no 3)
    # user 1 region 7 3 -> 7 -> no target; user 2 region 3 1 -> 1 -> no target
    assert split.train.target.tolist() == [2, 4]
    assert split.train.history.tolist() == [[0, 0, 1], [0, 1, 2]]
    assert 3 not in _items(split.train) and 9 not in _items(split.train)
    # evaluation examples are the plain ones, histories included (3 stays in them: they are only evaluated)
    assert split.validation.history.tolist() == plain.validation.history.tolist() == [[2, 3, 4], [0, 7, 3]]
    assert split.test.target.tolist() == plain.test.target.tolist() == [6, 9]
    assert split.test_cold.target.tolist() == [9] and split.test_cold.user.tolist() == [1]
    assert split.test_warm.target.tolist() == [6] and split.test_warm.user.tolist() == [0]
    assert split.cold_items.tolist() == [3, 9]


def test_no_cold_items_reproduces_the_plain_splits():
    df = frame([(u, int(i), int(t)) for u in range(4) for t, i in enumerate(np.random.default_rng(u).integers(1, 9, 7))])
    plain = leave_one_out(df, max_history=4)
    split = cold_start_split(df, max_history=4, cold_items=np.array([], dtype=np.int64))
    for name in ("user", "history", "target", "timestamp"):
        assert np.array_equal(getattr(split.train, name), getattr(plain.train, name))
    assert len(split.test_cold) == 0 and len(split.test_warm) == len(plain.test)


def test_time_split_with_cold_items():
    # user 0: 1 2 3 4 5 at t=10..50, split at 35 -> region 1 2 (3 is validation), test 4 5
    df = frame([(0, i, 10 * i) for i in range(1, 6)])
    split = cold_start_split(df, max_history=4, cold_items=np.array([1, 5]), split_at=35)
    plain = time_split(df, max_history=4, split_at=35)
    assert plain.train.target.tolist() == [2]
    assert len(split.train) == 0  # region 1 2 without 1 leaves a single row: no target with a history
    assert split.validation.target.tolist() == [3]
    assert split.test.target.tolist() == [4, 5]
    assert split.test_cold.target.tolist() == [5] and split.test_warm.target.tolist() == [4]
    kept = cold_start_split(df, max_history=4, cold_items=np.array([5]), split_at=35)
    assert kept.train.target.tolist() == [2] and kept.train.history.tolist() == [[0, 0, 0, 1]]


def test_time_split_validation_window_with_cold_items():
    # user 0: 1..6 at t=10..60, window from 25, split at 45: trains 1 2, validates 3 4, tests 5 6
    df = frame([(0, i, 10 * i) for i in range(1, 7)])
    split = cold_start_split(df, max_history=4, cold_items=np.array([4]), split_at=45, validation_from=25)
    assert split.train.target.tolist() == [2]
    assert split.validation.target.tolist() == [3, 4]  # the plain split's window, cold targets included
    assert split.test.history.tolist() == [[1, 2, 3, 4], [2, 3, 4, 5]]
    assert split.test_cold.target.tolist() == [] and split.test_warm.target.tolist() == [5, 6]
    split = cold_start_split(df, max_history=4, cold_items=np.array([1]), split_at=45, validation_from=25)
    assert len(split.train) == 0  # the training region 1 2 without 1 leaves one row


def test_a_refit_trains_on_the_validation_rows_without_their_cold_items():
    # leave-one-out: user 0 1..6 (val 5, test 6), user 1 7 3 8 9 (val 8, test 9); cold 3 and 9
    df = frame([(0, i, 10 * i) for i in range(1, 7)] + [(1, 7, 1), (1, 3, 2), (1, 8, 3), (1, 9, 4)])
    split = cold_start_split(df, max_history=3, cold_items=np.array([3, 9]), train_on_validation=True)
    assert split.train.target.tolist() == [2, 4, 5, 8]  # 5 and 8 (the validation targets) now train
    assert split.train.history.tolist() == [[0, 0, 1], [0, 1, 2], [1, 2, 4], [0, 0, 7]]  # no 3 in any
    plain = cold_start_split(df, max_history=3, cold_items=np.array([3, 9]))
    assert split.validation.target.tolist() == plain.validation.target.tolist() == [5, 8]
    assert split.test_cold.target.tolist() == [9] and split.test_warm.target.tolist() == [6]
    # the time split's window: 1..6 at t=10..60, window from 25, split at 45, cold 4 -> trains 2 3, tests 5 6
    timed = frame([(0, i, 10 * i) for i in range(1, 7)])
    split = cold_start_split(timed, max_history=4, cold_items=np.array([4]), split_at=45, validation_from=25,
                             train_on_validation=True)
    assert split.train.target.tolist() == [2, 3] and split.validation.target.tolist() == [3, 4]
    assert split.test.target.tolist() == [5, 6]


def test_validation_window_config_is_checked():
    config = DataConfig(time_split_at="1998-03-01", validation_from="1998-02-15")
    assert config.validation_from == "1998-02-15"
    with pytest.raises(ValueError, match="needs data.time_split_at"):
        DataConfig(validation_from="1998-02-15")
    with pytest.raises(ValueError, match="must be before data.time_split_at"):
        DataConfig(time_split_at="1998-03-01", validation_from="1998-03-01")
    with pytest.raises(ValueError, match="is not an ISO date"):
        DataConfig(time_split_at="1998-03-01", validation_from="February")


def test_cold_fraction_config_is_checked():
    assert DataConfig(cold_item_fraction=0.1).cold_item_fraction == 0.1
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="cold_item_fraction"):
            DataConfig(cold_item_fraction=bad)


def test_real_data_cold_split(prepared_dir):
    from pipeline.sources import load_manifest, read_interactions

    interactions = read_interactions(prepared_dir)
    num_items = load_manifest(prepared_dir)["num_items"]
    cold = sample_cold_items(num_items, 0.1, seed=0)
    split = cold_start_split(interactions, max_history=50, cold_items=cold)
    plain = leave_one_out(interactions, max_history=50)

    assert len(cold) == round(0.1 * num_items) == 168
    assert not _items(split.train) & set(cold.tolist())  # no cold item in any training history or target
    assert np.array_equal(split.test.history, plain.test.history)  # evaluation keeps full histories
    assert np.array_equal(split.validation.target, plain.validation.target)
    # warm / cold partition the 943 test users by target
    assert len(split.test_warm) + len(split.test_cold) == len(split.test) == 943
    assert np.isin(split.test_cold.target, cold).all() and not np.isin(split.test_warm.target, cold).any()
    assert len(split.test_cold) > 0
    # expected training size, counted independently: per user, non-cold rows before validation, minus one
    ordered = interactions.sort_values(["user_index", "timestamp", "row_order"], kind="stable")
    expected = 0
    for _, rows in ordered.groupby("user_index", sort=False):
        region = rows.item_index.to_numpy()[:-2] if len(rows) >= 3 else rows.item_index.to_numpy()
        expected += max(int((~np.isin(region, cold)).sum()) - 1, 0)
    assert len(split.train) == expected < len(plain.train)


def test_driver_build_splits_wires_the_config(prepared_dir):
    from training.job_config import build_config
    from pipeline.sequences import ColdStartSplits
    from pipeline.splits import build_splits

    job = build_config("tiny", [f"data.prepared_dir={prepared_dir}", "data.cold_item_fraction=0.1"])
    split = build_splits(job.data, prepared_dir)
    assert isinstance(split, ColdStartSplits)
    assert np.array_equal(split.cold_items, sample_cold_items(1682, 0.1, seed=job.data.cold_seed))
    assert not _items(split.train) & set(split.cold_items.tolist())
    assert len(split.test) == job.data.max_users == len(split.test_warm) + len(split.test_cold)
    plain = build_splits(build_config("tiny", [f"data.prepared_dir={prepared_dir}"]).data, prepared_dir)
    assert not isinstance(plain, ColdStartSplits) and len(plain.train) > len(split.train)

import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.content import read_examples, write_examples
from pipeline.sequences import (cold_start_split, item_popularity, leave_one_out, order_interactions, sample_cold_items,
                                time_split, window_examples)


def frame(rows):
    df = pd.DataFrame(rows, columns=["user_index", "item_index", "timestamp"])
    df["row_order"] = np.arange(len(df))
    df["rating"] = 4.0
    return df


def test_timestamp_ties_keep_file_order():
    df = frame([(0, 5, 100), (0, 3, 100), (0, 9, 50), (0, 7, 100)])
    assert order_interactions(df).item_index.tolist() == [9, 5, 3, 7]


def test_leave_one_out_targets_and_left_padded_histories():
    df = frame([(0, i, t) for i, t in zip([1, 2, 3, 4, 5], [10, 20, 20, 30, 40])] + [(1, 7, 5), (1, 8, 6)])
    splits = leave_one_out(df, max_history=3)
    assert splits.test.target.tolist() == [5] and splits.validation.target.tolist() == [4]
    assert splits.test.history.tolist() == [[2, 3, 4]]
    assert splits.validation.history.tolist() == [[1, 2, 3]]
    # train targets: positions 1..n-3 of user 0; user 1 (2 items) only trains
    assert splits.train.target.tolist() == [2, 3, 8]
    assert splits.train.history.tolist() == [[0, 0, 1], [0, 1, 2], [0, 0, 7]]
    assert splits.train.user.tolist() == [0, 0, 1]


def test_leave_one_out_on_real_data_counts(prepared_dir):
    from pipeline.sources import read_interactions

    interactions = read_interactions(prepared_dir)
    splits = leave_one_out(interactions, max_history=50)
    users = interactions.user_index.nunique()
    assert len(splits.test) == len(splits.validation) == users == 943
    assert len(splits.train) == len(interactions) - 3 * users  # each user's first item is never a target
    # no history ever contains the user's own target position or later
    assert (splits.test.history[:, -1] > 0).all()


def test_time_split_partitions_by_time():
    df = frame([(0, 1, 10), (0, 2, 20), (0, 3, 30), (0, 4, 40), (0, 5, 50)])
    splits = time_split(df, max_history=4, split_at=35)
    assert splits.train.target.tolist() == [2]
    assert splits.validation.target.tolist() == [3]
    assert splits.test.target.tolist() == [4, 5]
    assert splits.test.history.tolist() == [[0, 1, 2, 3], [1, 2, 3, 4]]


def test_time_split_validation_window_validates_every_interaction_in_it_and_trains_before_it():
    # user 0: t=10..50; user 1 starts inside the window (its first item has no history: no example)
    df = frame([(0, i, 10 * i) for i in range(1, 6)] + [(1, 7, 30), (1, 8, 35), (1, 9, 60)])
    splits = time_split(df, max_history=4, split_at=45, validation_from=25)
    assert splits.train.target.tolist() == [2]  # t=20; without the window 3 (t=30) and 4 (t=40) would train
    assert splits.validation.target.tolist() == [3, 4, 8]
    assert splits.validation.history.tolist() == [[0, 0, 1, 2], [0, 1, 2, 3], [0, 0, 0, 7]]
    assert splits.test.target.tolist() == [5, 9]
    assert splits.test.history.tolist() == [[1, 2, 3, 4], [0, 0, 7, 8]]  # the window is history at test time
    with pytest.raises(ValueError, match="before the split"):
        time_split(df, max_history=4, split_at=45, validation_from=45)


def test_time_split_validation_window_on_real_data_partitions_the_targets(prepared_dir):
    from pipeline.sources import read_interactions

    interactions = read_interactions(prepared_dir)
    split_at, start = 889_000_000, 886_000_000  # 1998-03-04 and 1998-01-29 (UTC)
    windowed, plain = time_split(interactions, 50, split_at, start), time_split(interactions, 50, split_at)
    assert windowed.train.timestamp.max() < start <= windowed.validation.timestamp.min()
    assert windowed.validation.timestamp.max() < split_at
    assert len(windowed.validation) > 10 * len(plain.validation)
    # every example of the plain split's training and validation is in exactly one of the window's
    assert len(windowed.train) + len(windowed.validation) == len(plain.train) + len(plain.validation)
    for name in ("user", "history", "target", "timestamp"):
        assert np.array_equal(getattr(windowed.test, name), getattr(plain.test, name))


def test_a_refit_split_trains_on_the_validation_examples_and_keeps_validation_and_test():
    df = frame([(0, i, t) for i, t in zip([1, 2, 3, 4, 5], [10, 20, 20, 30, 40])] + [(1, 7, 5), (1, 8, 6)])
    refit, plain = leave_one_out(df, 3, train_on_validation=True), leave_one_out(df, 3)
    assert refit.train.target.tolist() == [2, 3, 4, 8]  # user 0's validation target 4 now trains, in time order
    assert refit.train.history.tolist() == [[0, 0, 1], [0, 1, 2], [1, 2, 3], [0, 0, 7]]
    windowed = frame([(0, i, 10 * i) for i in range(1, 6)] + [(1, 7, 30), (1, 8, 35), (1, 9, 60)])
    for split, kwargs in ((leave_one_out, {}), (time_split, {"split_at": 45}),
                          (time_split, {"split_at": 45, "validation_from": 25})):
        data = df if split is leave_one_out else windowed
        plain, refit = split(data, 4, **kwargs), split(data, 4, **kwargs, train_on_validation=True)
        for name in ("user", "history", "target", "timestamp"):
            assert np.array_equal(getattr(refit.validation, name), getattr(plain.validation, name))
            assert np.array_equal(getattr(refit.test, name), getattr(plain.test, name))
        # exactly the training and validation examples, each user's consecutive and in time order
        assert len(refit.train) == len(plain.train) + len(plain.validation)
        order = np.lexsort((refit.train.timestamp, refit.train.user))
        assert np.array_equal(order, np.arange(len(refit.train)))
    window = time_split(windowed, 4, split_at=45, validation_from=25, train_on_validation=True)
    assert window.train.target.tolist() == [2, 3, 4, 8]  # every target before T but each user's first
    assert window.test.target.tolist() == [5, 9]


def test_popularity_counts_train_targets():
    df = frame([(0, 1, 1), (0, 2, 2), (0, 2, 3), (0, 3, 4), (0, 1, 5), (0, 1, 6)])
    pop = item_popularity(leave_one_out(df, 3).train, num_items=4)
    assert pop.tolist() == [0, 0, 2, 1, 0]


def test_windows_tile_each_users_training_sequence_from_its_end():
    df = frame([(0, i, 10 * i) for i in range(1, 10)] + [(1, 20, 1), (1, 21, 2), (1, 22, 3), (1, 23, 4)])
    train = leave_one_out(df, max_history=3).train  # user 0 trains on targets 2..7, user 1 on 21
    windows = window_examples(train)
    assert windows.target.tolist() == [4, 7, 21]  # every 3rd example counted back from each user's last one
    assert windows.history.tolist() == [[1, 2, 3], [4, 5, 6], [0, 0, 20]]


def test_windows_predict_every_training_target_exactly_once_on_real_data(prepared_dir):
    """With a loss at every history position (train.targets=all), the windows' next items are exactly the
    training targets, per user: plain leave-one-out, the time split and the cold-start split."""
    from pipeline.sources import read_interactions

    interactions = read_interactions(prepared_dir)
    num_items = int(interactions.item_index.max())
    cold = sample_cold_items(num_items, 0.1, seed=0)
    for train in (leave_one_out(interactions, 50).train, time_split(interactions, 50, 888_000_000).train,
                  cold_start_split(interactions, 50, cold).train):
        windows = window_examples(train)
        inner = windows.history[:, :-1] > 0
        predicted = np.concatenate([windows.history[:, 1:][inner], windows.target])
        users = np.concatenate([np.broadcast_to(windows.user[:, None], inner.shape)[inner], windows.user])
        assert len(windows) < len(train) / 20
        expected = sorted(zip(train.user.tolist(), train.target.tolist()))
        assert sorted(zip(users.tolist(), predicted.tolist())) == expected


def test_examples_read_back_equal_and_writable_so_torch_makes_tensors_without_a_warning(tmp_path):
    examples = leave_one_out(frame([(u, i, t) for u in range(3) for t, i in enumerate((4, 2, 7, 5))]),
                             max_history=3).test
    back = read_examples(write_examples(examples, tmp_path / "test.parquet"))
    for name in ("user", "history", "target", "timestamp", "rating"):
        array = getattr(back, name)
        assert np.array_equal(array, getattr(examples, name), equal_nan=True) and array.flags.writeable, name
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # arrow's zero-copy views are read-only: torch.as_tensor would warn
        assert torch.as_tensor(back.target).tolist() == examples.target.tolist()

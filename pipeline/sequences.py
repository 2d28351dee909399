"""Time-ordered user histories and the train/validation/test examples built from them.

An example is (user, history of the previous <= L items, target item). Histories are LEFT-padded with 0 so
the most recent item sits at position L-1. Order within a user is (timestamp, raw row order), stably:
half of MovieLens ratings tie on timestamp, and the raw order is the only honest tie-breaker.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

PAD = 0


@dataclass
class Examples:
    user: np.ndarray  # [M] int64 user_index
    history: np.ndarray  # [M, L] int64 item_index, left-padded with 0
    target: np.ndarray  # [M] int64
    timestamp: np.ndarray  # [M] int64 (of the target)
    rating: np.ndarray  # [M] float32 (nan when unknown)

    def __len__(self) -> int:
        return len(self.target)

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "user": self.user,
                "history": list(self.history),
                "target": self.target,
                "timestamp": self.timestamp,
                "rating": self.rating,
            }
        )

    @classmethod
    def from_frame(cls, frame: pd.DataFrame) -> "Examples":
        history = np.stack(frame.history.to_numpy()) if len(frame) else np.zeros((0, 1), np.int64)
        return cls(
            user=frame.user.to_numpy(np.int64),
            history=history.astype(np.int64),
            target=frame.target.to_numpy(np.int64),
            timestamp=frame.timestamp.to_numpy(np.int64),
            rating=frame.rating.to_numpy(np.float32),
        )

    def subset(self, mask: np.ndarray) -> "Examples":
        return Examples(self.user[mask], self.history[mask], self.target[mask], self.timestamp[mask], self.rating[mask])


@dataclass
class Splits:
    train: Examples
    validation: Examples
    test: Examples


def order_interactions(interactions: pd.DataFrame) -> pd.DataFrame:
    """Sort by (user, timestamp, raw row order); the sort is stable so equal keys keep file order."""
    return interactions.sort_values(["user_index", "timestamp", "row_order"], kind="stable").reset_index(drop=True)


def _histories(items: np.ndarray, user_start: np.ndarray, positions: np.ndarray, max_history: int) -> np.ndarray:
    """For flat positions g (into the ordered item array), the previous <= L items of the same user.

    items [T], user_start [T] (flat index where each row's user begins), positions [M] -> [M, L] left-padded.
    """
    offsets = np.arange(-max_history, 0, dtype=np.int64)  # [L]
    idx = positions[:, None] + offsets[None, :]  # [M, L]
    valid = idx >= user_start[positions][:, None]
    return np.where(valid, items[np.clip(idx, 0, None)], PAD).astype(np.int64)


def _flat(ordered: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    users = ordered.user_index.to_numpy(np.int64)
    change = np.r_[True, users[1:] != users[:-1]]
    starts = np.flatnonzero(change)
    counts = np.diff(np.r_[starts, len(users)])
    user_start = np.repeat(starts, counts)
    position_in_user = np.arange(len(users)) - user_start
    return user_start, position_in_user, np.repeat(counts, counts)


def _examples(ordered: pd.DataFrame, positions: np.ndarray, user_start: np.ndarray, max_history: int) -> Examples:
    items = ordered.item_index.to_numpy(np.int64)
    rating = ordered.rating.to_numpy(np.float32) if "rating" in ordered else np.full(len(items), np.nan, np.float32)
    return Examples(
        user=ordered.user_index.to_numpy(np.int64)[positions],
        history=_histories(items, user_start, positions, max_history),
        target=items[positions],
        timestamp=ordered.timestamp.to_numpy(np.int64)[positions],
        rating=rating[positions],
    )


def leave_one_out(interactions: pd.DataFrame, max_history: int, train_on_validation: bool = False) -> Splits:
    """Last interaction of each user = test, second to last = validation, earlier ones (after the first) = train.

    Users with fewer than 3 interactions contribute only training examples. `train_on_validation` (a refit after
    selection, `train.refit`): the validation examples also train (validation is still returned, for reporting).
    """
    ordered = order_interactions(interactions)
    user_start, pos, count = _flat(ordered)
    has_eval = count >= 3
    is_test = has_eval & (pos == count - 1)
    is_val = has_eval & (pos == count - 2)
    is_train = (pos >= 1) & ~is_test & (train_on_validation | ~is_val)
    return Splits(
        train=_examples(ordered, np.flatnonzero(is_train), user_start, max_history),
        validation=_examples(ordered, np.flatnonzero(is_val), user_start, max_history),
        test=_examples(ordered, np.flatnonzero(is_test), user_start, max_history),
    )


def time_split(interactions: pd.DataFrame, max_history: int, split_at: int,
               validation_from: int | None = None, train_on_validation: bool = False) -> Splits:
    """Test on every interaction at or after `split_at` (unix s), each with its full preceding history.

    Without `validation_from`: train on the targets before `split_at` except each user's last one there, which is
    validation (one example per user). With it (< `split_at`): a validation window, every interaction in
    [validation_from, split_at) is a validation example and only the targets before `validation_from` train, so
    validation is drawn like the test (all users' interactions of a period) and no validation target trains.
    `train_on_validation` (a refit after selection): every target before `split_at` trains, the validation
    examples included (validation is still returned, for reporting).
    """
    ordered = order_interactions(interactions)
    user_start, pos, _ = _flat(ordered)
    ts = ordered.timestamp.to_numpy(np.int64)
    before = ts < split_at
    if validation_from is not None:
        if validation_from >= split_at:
            raise ValueError(f"validation window start {validation_from} must be before the split {split_at}")
        trains = ts < validation_from
    else:
        trains = before & ~_last_of_user(ordered.user_index.to_numpy(np.int64), before)  # the last is validation
    is_val = before & ~trains & (pos >= 1)
    if train_on_validation:
        trains = before
    return Splits(
        train=_examples(ordered, np.flatnonzero(trains & (pos >= 1)), user_start, max_history),
        validation=_examples(ordered, np.flatnonzero(is_val), user_start, max_history),
        test=_examples(ordered, np.flatnonzero(~before & (pos >= 1)), user_start, max_history),
    )


def _last_of_user(users: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """[T] user ids in user order, [T] bool -> [T] bool: each user's last row among `rows`."""
    chosen = np.flatnonzero(rows)
    last = np.zeros(len(users), dtype=bool)
    if len(chosen):
        u = users[chosen]
        last[chosen[np.r_[u[1:] != u[:-1], True]]] = True
    return last


def window_examples(train: Examples) -> Examples:
    """Training examples for a loss at every history position (`train.targets=all`): per user, every L-th
    example counted back from the user's last one (L = the history length), so that the kept examples' histories
    plus targets tile the user's training sequence without overlap and each training target is predicted once.

    Needs the examples of a user consecutive and in time order, as every split here builds them.
    """
    if not len(train):
        return train
    users = train.user
    last = np.r_[users[1:] != users[:-1], True]
    last_row = np.flatnonzero(last)
    counts = np.diff(np.r_[-1, last_row])
    rows_to_end = np.repeat(last_row, counts) - np.arange(len(users))  # 0 for each user's last example
    return train.subset(rows_to_end % train.history.shape[1] == 0)


def item_popularity(train: Examples, num_items: int) -> np.ndarray:
    """Target counts per item index [N+1] (index 0 = padding, always 0): the popularity baseline and logQ."""
    return np.bincount(train.target, minlength=num_items + 1).astype(np.float64)


def seen_items(train: Examples, num_items: int) -> np.ndarray:
    """Whether each item index [N+1] occurs in a training example, as its target or in its history (index 0, the
    padding, never does)."""
    seen = np.zeros(num_items + 1, dtype=bool)
    seen[train.target] = True
    seen[train.history.ravel()] = True
    seen[0] = False
    return seen


@dataclass
class ColdStartSplits(Splits):
    """Splits whose training side never sees `cold_items`; evaluation keeps full histories.

    `test` is every test example; `test_warm` / `test_cold` partition it by whether the target is cold.
    """

    cold_items: np.ndarray  # [C] sorted item_index values held out of training
    test_warm: Examples
    test_cold: Examples


def sample_cold_items(num_items: int, fraction: float, seed: int) -> np.ndarray:
    """A seeded random `fraction` of the catalogue item indices 1..num_items -> [round(fraction * N)] sorted."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"cold item fraction must be in [0, 1), got {fraction}")
    count = int(round(fraction * num_items))
    chosen = np.random.default_rng(seed).choice(np.arange(1, num_items + 1), size=count, replace=False)
    return np.sort(chosen).astype(np.int64)


def cold_start_split(interactions: pd.DataFrame, max_history: int, cold_items: np.ndarray,
                     split_at: int | None = None, validation_from: int | None = None,
                     train_on_validation: bool = False) -> ColdStartSplits:
    """Leave-one-out (or, with `split_at`, the time split, with `validation_from` its validation window) with
    `cold_items` held out of training entirely.

    Validation and test are exactly those of the plain split (full histories: they are only evaluated).
    Training uses each user's training region (the rows before their validation target) with every
    interaction on a cold item removed, so no cold item is ever a training target or in a training history;
    every remaining position after the first is a training example, as in the plain split. With no cold
    items the training examples equal the plain split's. `train_on_validation` (a refit after selection): the
    training region also holds the validation rows.
    """
    ordered = order_interactions(interactions)
    if split_at is None:
        full = leave_one_out(ordered, max_history)
        _, pos, count = _flat(ordered)
        region = ~((count >= 3) & (pos >= count - (1 if train_on_validation else 2)))  # not test (or validation)
    else:
        full = time_split(ordered, max_history, split_at, validation_from)
        ts = ordered.timestamp.to_numpy(np.int64)
        if train_on_validation:
            region = ts < split_at
        elif validation_from is not None:
            region = ts < validation_from  # the window and the test period are evaluated only
        else:  # the last row before split_at of a user is its validation target; rows after it are test
            before = ts < split_at
            region = before & ~_last_of_user(ordered.user_index.to_numpy(np.int64), before)
    cold_items = np.unique(np.asarray(cold_items, dtype=np.int64))
    keep = region & ~np.isin(ordered.item_index.to_numpy(np.int64), cold_items)
    training_rows = ordered[keep].reset_index(drop=True)
    user_start, pos_in_region, _ = _flat(training_rows)
    train = _examples(training_rows, np.flatnonzero(pos_in_region >= 1), user_start, max_history)
    is_cold = np.isin(full.test.target, cold_items)
    return ColdStartSplits(
        train=train, validation=full.validation, test=full.test, cold_items=cold_items,
        test_warm=full.test.subset(~is_cold), test_cold=full.test.subset(is_cold),
    )

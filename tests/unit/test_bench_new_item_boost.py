"""bench/new_item_boost.py: the offset that gives unseen items a chosen softmax mass, and ranks under an offset."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from bench.new_item_boost import offset_for_mass, ranks_with_offset, unseen_mass


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
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [f"error: {tmp_path} is not a training run directory with data/test_cold.parquet"]
    assert not (tmp_path / "o.json").exists()

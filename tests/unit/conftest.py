"""Fixtures of the unit tests that share the 200-item raw slice (tests/unit/raw_slice.py)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.unit.raw_slice import NUM_ITEMS


@pytest.fixture(scope="session")
def pristine_slice(real_slice) -> Path:
    """Items 1..200 with their images, and every interaction naming them (about 30k rows), copied once."""
    return real_slice("ml100k_slice", NUM_ITEMS)


@pytest.fixture
def raw(pristine_slice: Path, tmp_path: Path) -> Path:
    """A private copy of the slice that a test may damage."""
    return Path(shutil.copytree(pristine_slice, tmp_path / "raw"))

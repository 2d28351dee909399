"""Property-based fuzzing of `python -m jobs.prepare`: whatever the raw files hold, the user sees exit 0 or a one-line
error (exit 2), never a traceback, and on success every raw row is kept or counted under a reason.

Two kinds of input, both run through the real entry point in this process (argv set, stdout/stderr captured):
random CSV text for interactions.csv and items.csv, and random byte mutations of a small real slice of ml100k_mm
(items 1..50 with their posters, the interactions of 20 users). Derandomized, so CI sees the same examples.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pipeline.sources import REPORT_FILE
from tests.unit.test_data_safety_reads import assert_one_line_error, run_prepare_cli

NUM_ITEMS, NUM_USERS = 50, 20
# Sized so the file's tests take ~20 s on 2 busy CPU cores (the bound: 60 s).
FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
INTERACTION_DROPS = ("interactions_malformed_rows", "interactions_bad_timestamp", "interactions_implausible_timestamp",
                     "interactions_bad_user", "interactions_unknown_item", "interactions_duplicate")


@pytest.fixture(scope="module")
def small_slice(real_slice) -> Path:
    """Items 1..50 (rows and posters) and the interactions of the first 20 users with them (~250 rows, ~36 days)."""
    root = real_slice("fuzz_slice", NUM_ITEMS, NUM_USERS)
    (root.parent / "outside.jpg").write_bytes((root / "images" / "1.jpg").read_bytes())  # a target for ../ paths
    return root


def reference_rows(data: bytes) -> int:
    """Data rows of a CSV file by the rule the report promises, read the slow obvious way (the reference).

    A record is what Python's csv module reads from the UTF-8 text (bad bytes replaced); blank lines are none.
    A record with as many fields as the header is one row; any other record (or one the csv module refuses)
    counts every file line it spans. For text without quotes that is simply its non-empty lines after the header.
    """
    text = data.decode("utf-8-sig", errors="replace")
    reader = csv.reader(io.StringIO(text, newline=""))
    width, rows, last_line = None, 0, 0
    while True:
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error:
            record = None
        first_line, last_line = last_line + 1, reader.line_num
        if record == []:
            continue
        if width is None:
            width = len(record) if record is not None else -1
            if record is None:
                break
            continue
        rows += 1 if record is not None and len(record) == width else last_line - first_line + 1
    if '"' not in text:
        lines = [line for line in re.split(r"\r\n|\r|\n", text) if line]
        assert rows == max(len(lines) - 1, 0)
    return rows


def check_prepare(raw: Path, overrides: tuple[str, ...] = ()) -> None:
    """Run prepare on `raw` like a user and assert the contract: exit 0 with every row accounted for, or exit 2."""
    out = raw.parent / "prepared"
    code, stdout, stderr = run_prepare_cli(raw, out, *overrides)
    event(f"exit {code}")
    if code != 0:
        assert_one_line_error(code, stderr)
        return
    assert "Traceback" not in stderr, stderr
    report = json.loads((out / REPORT_FILE).read_text())
    interaction_rows = reference_rows((raw / "interactions.csv").read_bytes())
    assert report["interactions_total"] == interaction_rows
    assert report["interactions_kept"] + sum(report.get(key, 0) for key in INTERACTION_DROPS) == interaction_rows, report
    item_rows = reference_rows((raw / "items.csv").read_bytes())
    assert report["items_total"] + report["items_duplicate_id"] + report.get("items_malformed_rows", 0) == item_rows, report


def _copy_slice(small_slice: Path, into: Path) -> Path:
    raw = into / "raw"
    shutil.copytree(small_slice, raw, copy_function=os.link)  # hard links: posters are never written to
    os.link(small_slice.parent / "outside.jpg", into / "outside.jpg")  # what `../outside.jpg` would reach
    for name in ("items.csv", "interactions.csv"):  # the CSVs are rewritten: real copies
        (raw / name).unlink()
        shutil.copyfile(small_slice / name, raw / name)
    return raw


# --- (a) random CSV text ---------------------------------------------------------------------------------------------

_NUMBERS = st.sampled_from(["881250949", "891717742", "881250949000", "881250949000000", "881250949000000000",
                            "inf", "-inf", "nan", "NaN", "1e300", "-1e300", "-1", "0", "-0", "1e19", "3.5",
                            "99999999999999999999999", "1997-12-04T15:55:49Z", "1998-02-30", "0x10", " 42 ", ""])
_IDS = st.integers(min_value=-3, max_value=NUM_ITEMS + 10).map(str)
_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
_IMAGE_PATHS = st.sampled_from(["images/1.jpg", "images/2.jpg", "../outside.jpg", "/etc/passwd", "/dev/zero",
                                "images", "images/../items.csv", "images/404.jpg", "", "  ", "\\images\\1.jpg"])
_FIELD = st.one_of(_IDS, _NUMBERS, _TEXT, _IMAGE_PATHS, st.floats().map(repr), st.integers().map(str))


_INTERACTION_FIELDS = {"user_id": st.integers(1, 8).map(str), "item_id": st.integers(1, NUM_ITEMS).map(str),
                       "rating": st.integers(1, 5).map(str),
                       "timestamp": st.integers(874_724_710, 893_286_638).map(str)}  # ml100k's time range
_ITEM_FIELDS = {"item_id": st.integers(1, NUM_ITEMS + 3).map(str), "title": _TEXT, "genres": _TEXT,
                "description": _TEXT, "image": st.integers(1, NUM_ITEMS).map("images/{}.jpg".format)}
_CANONICAL = {"interactions": _INTERACTION_FIELDS, "items": _ITEM_FIELDS}


def _header(canonical: list[str]):
    return st.one_of(
        st.just(canonical),
        st.just(canonical),
        st.just(canonical),
        st.permutations(canonical),
        st.lists(st.sampled_from([*canonical, "extra", ""]), min_size=0, max_size=len(canonical) + 2),
        st.lists(_TEXT, max_size=4),
    )


@st.composite
def csv_text(draw, table: str) -> str:
    """A CSV file: a (mostly valid) header; rows mostly plausible, some of random fields and random widths;
    quoted properly or joined raw."""
    fields = _CANONICAL[table]
    header = draw(_header(list(fields)))
    width = len(header)
    plausible = st.tuples(*[fields.get(name, _FIELD) for name in header]).map(list)
    rows = draw(st.lists(
        st.one_of(plausible, plausible, plausible, st.lists(_FIELD, min_size=width, max_size=width),
                  st.lists(_FIELD, max_size=width + 2)),
        max_size=30))
    ending = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    if draw(st.booleans()):  # properly quoted
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator=ending).writerows([header, *rows])
        return buffer.getvalue()
    # joined raw: quotes and line breaks in fields break the structure on purpose
    return "".join(",".join(row) + ending for row in [header, *rows])


# The default budgets, or none: without budgets, prepare must still account for every row of a garbage file.
_BUDGETS = st.sampled_from([(), ("data.max_bad_fraction=1.0", "data.max_dropped_fraction=1.0")])


@settings(FUZZ, max_examples=60)
@given(
    which=st.sampled_from(["interactions", "items", "both"]),
    interactions=csv_text("interactions"),
    items=csv_text("items"),
    budgets=_BUDGETS,
)
def test_random_csv_text_gives_exit_0_with_every_row_counted_or_a_one_line_error(small_slice, which, interactions,
                                                                                  items, budgets):
    with tempfile.TemporaryDirectory() as tmp:
        raw = _copy_slice(small_slice, Path(tmp))
        if which in ("interactions", "both"):
            (raw / "interactions.csv").write_text(interactions, encoding="utf-8", newline="")
        if which in ("items", "both"):
            (raw / "items.csv").write_text(items, encoding="utf-8", newline="")
        check_prepare(raw, budgets)


# --- (b) byte mutations of the real files ----------------------------------------------------------------------------

_TOKENS = [b'"', b",", b"\n", b"\r", b"\x00", b"\xff\xfe", b"\xef\xbb\xbf", b"inf", b"1e300", b"-", b"000000",
           b"../", b"/etc/passwd", b"..", b"nan", b",,,,", b'"\n"']
_MUTATION = st.tuples(
    st.sampled_from(["flip", "insert", "token", "delete", "truncate"]),
    st.integers(min_value=0, max_value=3000),  # the first ~40 lines of interactions, the first rows of items
    st.binary(min_size=1, max_size=8),
    st.sampled_from(_TOKENS),
)


def mutate(data: bytes, mutations: list[tuple]) -> bytes:
    for kind, position, blob, token in mutations:
        position = min(position, len(data))
        if kind == "flip" and position < len(data):
            data = data[:position] + bytes([data[position] ^ (1 << (blob[0] % 8))]) + data[position + 1:]
        elif kind == "insert":
            data = data[:position] + blob + data[position:]
        elif kind == "token":
            data = data[:position] + token + data[position:]
        elif kind == "delete":
            data = data[:position] + data[position + len(blob) * 8:]
        elif kind == "truncate":
            data = data[:position]
    return data


@FUZZ
@given(
    targets=st.sampled_from([("interactions.csv",), ("items.csv",), ("interactions.csv", "items.csv")]),
    mutations=st.lists(_MUTATION, min_size=1, max_size=6),
    budgets=_BUDGETS,
)
def test_byte_mutations_of_the_real_files_give_exit_0_with_every_row_counted_or_a_one_line_error(small_slice, targets,
                                                                                                 mutations, budgets):
    with tempfile.TemporaryDirectory() as tmp:
        raw = _copy_slice(small_slice, Path(tmp))
        for name in targets:
            (raw / name).write_bytes(mutate((raw / name).read_bytes(), mutations))
        check_prepare(raw, budgets)

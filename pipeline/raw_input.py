"""Reading untrusted raw files: CSV records, image files named by the data, and timestamps in any unit.

Everything here treats the raw dataset as hostile input. Nothing raises on content: a CSV record with the wrong
number of fields is returned as a counted, line-numbered skip; an image path that leaves the dataset directory is
refused without being opened; a timestamp that cannot be read becomes NaN and an implausible one is flagged.
Only problems that make a whole file unusable (no such file, empty file, no header) raise `DataError`, with a
one-line message. `pipeline.sources` turns these results into the data report.
"""
from __future__ import annotations

import csv
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import TIMESTAMP_UNITS  # noqa: F401  (re-exported: the one list of units)


class DataError(ValueError):
    """The raw data cannot be used as given (schema problems, too much bad content)."""


# --- CSV records -------------------------------------------------------------------------------------------------

@dataclass
class CsvTable:
    """The well-formed data records of one CSV file, column by column, and an account of the malformed ones.

    `records` counts data rows as the budget sees them: one per well-formed record, plus every physical line
    spanned by a malformed one (a stray quote that swallows the next 500 lines charges 500 rows, not 1), so
    `len(line_numbers) + malformed_rows == records`.
    """

    header: list[str]
    columns: dict[str, list[str]]  # requested column -> one value per well-formed record
    line_numbers: list[int]  # 1-based file line where each well-formed record starts
    records: int = 0
    malformed_rows: int = 0
    malformed_lines: list[int] = field(default_factory=list)  # first file line of each malformed record


def _open_text(path: Path, what: str):
    # utf-8-sig drops a byte-order mark; undecodable bytes become U+FFFD (counted by the callers that care).
    # newline="" lets the csv module see quoted line breaks and lone \r line ends itself.
    try:
        return open(path, encoding="utf-8-sig", errors="replace", newline="")
    except FileNotFoundError:
        raise DataError(f"{what} file not found: {path}") from None
    except OSError as err:
        raise DataError(f"cannot read {what} file {path}: {err.strerror or err}") from None


def _records(handle, path: Path, what: str):
    """Yield (first file line, last file line, fields) per record; fields is None for a record the csv module refuses.

    Blank lines are skipped (as pandas does). Records come in chunks from a plain `for` over the reader: this
    runs once per raw row, so it stays free of per-row try blocks and generator hops.
    """
    reader = csv.reader(handle)
    last_line = 0
    while True:
        try:
            for record in reader:
                first_line, last_line = last_line + 1, reader.line_num
                if record:
                    yield first_line, last_line, record
            return
        except csv.Error:  # a field over the csv module's size limit (128 KiB): the record is unusable
            first_line, last_line = last_line + 1, reader.line_num
            yield first_line, last_line, None
        except OSError as err:
            raise DataError(f"cannot read {what} file {path}: {err.strerror or err}") from None


def read_csv_header(path: Path, what: str) -> list[str]:
    """The column names of a CSV file (first non-blank record), or `DataError` when the file has none."""
    with _open_text(path, what) as handle:
        for _, _, record in _records(handle, path, what):
            if record is None:
                break
            return record
    raise DataError(f"{path}: {what} is empty (no readable header line)")


def read_csv_table(path: Path, what: str, wanted: list[str]) -> CsvTable:
    """Read the `wanted` columns of every record that has exactly as many fields as the header.

    A duplicated column name resolves to its first occurrence (as pandas does). A wanted name absent from the
    header raises DataError.
    """
    with _open_text(path, what) as handle:
        records = _records(handle, path, what)
        header = next(records, (0, 0, None))[2]
        if header is None:
            raise DataError(f"{path}: {what} is empty (no readable header line)")
        position: dict[str, int] = {}
        for index, name in enumerate(header):
            position.setdefault(name, index)
        absent = [name for name in wanted if name not in position]
        if absent:
            raise DataError(f"{path}: {what} is missing required column(s) {absent}; found {header[:30]}")
        width = len(header)
        rows: list[list[str]] = []
        line_numbers: list[int] = []
        malformed_rows, malformed_lines = 0, []
        for first_line, last_line, record in records:
            if record is not None and len(record) == width:
                rows.append(record)
                line_numbers.append(first_line)
            else:
                malformed_rows += last_line - first_line + 1
                malformed_lines.append(first_line)
    by_position = list(zip(*rows)) if rows else [()] * width  # transpose in C: [records][fields] -> [fields][records]
    return CsvTable(
        header=header,
        columns={name: list(by_position[position[name]]) for name in wanted},
        line_numbers=line_numbers,
        records=len(line_numbers) + malformed_rows,
        malformed_rows=malformed_rows,
        malformed_lines=malformed_lines,
    )


# --- files named by the data -------------------------------------------------------------------------------------

FILE_OK = "ok"
FILE_MISSING = "missing"  # no such regular file, or it cannot be read
FILE_OUTSIDE = "outside_dataset"  # the path leaves the dataset directory: refused, never opened
FILE_TOO_LARGE = "too_large"  # more bytes than the cap: refused from its size, never read whole

_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)


def read_file_inside(root: Path, relative: str, max_bytes: int) -> tuple[bytes | None, str]:
    """Bytes of `root / relative` if that file lies inside `root` (an already resolved directory) -> (data, status).

    The path is resolved with every symbolic link followed; a result outside `root` (`../`, an absolute path, a
    link pointing out) is refused before anything at that location is opened or stat'ed for its own sake, so the
    answer is FILE_OUTSIDE whether or not something exists there. Inside, the size is checked with stat before
    reading and the read itself is bounded, so a huge or growing file is refused without being read whole.
    O_NOFOLLOW refuses a link swapped in after the check; O_NONBLOCK keeps a FIFO from blocking the open.
    """
    try:
        target = Path(os.path.realpath(os.path.join(root, relative)))
    except (OSError, ValueError):  # a NUL byte or similar: a path no file can have
        return None, FILE_MISSING
    if target == root or not target.is_relative_to(root):
        return (None, FILE_MISSING) if target == root else (None, FILE_OUTSIDE)
    try:
        info = os.stat(target)
        if not stat.S_ISREG(info.st_mode):
            return None, FILE_MISSING
        if info.st_size > max_bytes:
            return None, FILE_TOO_LARGE
        descriptor = os.open(target, _OPEN_FLAGS)
        with os.fdopen(descriptor, "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                return None, FILE_MISSING
            data = handle.read(max_bytes + 1)
    except (OSError, ValueError):
        return None, FILE_MISSING
    if len(data) > max_bytes:  # it grew since the stat
        return None, FILE_TOO_LARGE
    return data, FILE_OK


# --- timestamps ----------------------------------------------------------------------------------------------------

_UNIT_DIVISOR = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}
# Magnitude bounds for `auto`: 1e11 s is the year 5138 and 1e11 ms is 1973, so real epoch times of any era between
# are told apart by their size alone (the same for ms/us and us/ns).
_AUTO_UPPER_BOUNDS = ((1e11, "s"), (1e14, "ms"), (1e17, "us"))
FUTURE_SLACK_S = 86_400  # clocks disagree by hours, not by more than a day
FAR_AFTER_REST_S = 10 * 365 * 86_400  # more than 10 years after the 99th percentile of the column
_EXACT_INT = r"[+-]?[0-9]{1,18}"  # fits int64: parsed exactly, not through float


def detect_timestamp_unit(values: pd.Series) -> str:
    """`auto` -> a unit: numbers (at least half the non-empty values) by the magnitude of their median, else ISO."""
    present = values[values != ""]
    if present.empty:
        return "s"
    numbers = pd.to_numeric(present, errors="coerce").to_numpy(dtype=np.float64)
    if np.isnan(numbers).sum() * 2 > len(numbers):
        return "iso"
    finite = np.abs(numbers[np.isfinite(numbers)])
    if finite.size == 0:
        return "s"
    magnitude = float(np.median(finite))
    for bound, unit in _AUTO_UPPER_BOUNDS:
        if magnitude < bound:
            return unit
    return "ns"


def timestamps_to_seconds(values: pd.Series, unit: str) -> np.ndarray:
    """Raw timestamp strings -> [N] float64 whole seconds since the epoch (UTC); NaN where a value cannot be read.

    Numeric units floor to whole seconds; integers up to 18 digits are divided exactly (not through float), so
    a nanosecond value lands on the same second as its seconds twin. `inf`, `-inf` and huge numbers stay as they
    are (non-finite or implausibly large) for `implausible_timestamps` to flag. `iso` reads ISO 8601 dates and
    date-times; a value without an offset is UTC.
    """
    values = values.astype(str).str.strip()
    seconds = np.full(len(values), np.nan)
    if unit == "iso":
        parsed = pd.to_datetime(values, errors="coerce", utc=True, format="ISO8601")
        ok = parsed.notna().to_numpy()
        epoch = pd.Timestamp(0, tz="UTC")
        seconds[ok] = ((parsed[ok] - epoch) // pd.Timedelta(seconds=1)).to_numpy(dtype=np.float64)
        return seconds
    divisor = _UNIT_DIVISOR[unit]
    exact = values.str.fullmatch(_EXACT_INT).to_numpy(dtype=bool)
    if exact.any():
        seconds[exact] = (values[exact].astype(np.int64).to_numpy() // divisor).astype(np.float64)
    rest = ~exact
    if rest.any():
        with np.errstate(invalid="ignore", over="ignore"):
            seconds[rest] = np.floor(pd.to_numeric(values[rest], errors="coerce").to_numpy(np.float64) / divisor)
    return seconds


def implausible_timestamps(seconds: np.ndarray, now: float | None = None) -> np.ndarray:
    """[N] seconds (NaN = unreadable, not judged here) -> [N] bool: which readable values cannot be true.

    Implausible: non-finite (inf), negative (before 1970), later than `now` + 1 day (the future), or more than
    10 years after the 99th percentile of the column's other values (a unit slip such as milliseconds among
    seconds lands tens of thousands of years out). The percentile is taken over the values that pass the first
    three rules, so a few wild values cannot drag it along.
    """
    now = time.time() if now is None else now
    readable = ~np.isnan(seconds)
    with np.errstate(invalid="ignore"):
        bad = readable & (~np.isfinite(seconds) | (seconds < 0) | (seconds > now + FUTURE_SLACK_S))
    rest = seconds[readable & ~bad]
    if rest.size:
        with np.errstate(invalid="ignore"):
            bad |= readable & (seconds > np.percentile(rest, 99) + FAR_AFTER_REST_S)
    return bad

"""The few rules for deleting or replacing a directory: the product removes only what it recognisably wrote.

Every place that deletes or replaces a directory (prepare's output and its `<out>.old` backup, export `--out`,
the registry's checkpoint copies, a training run directory, and the staging folders of all of them) asks here:
    may_replace(path, owned)   it does not exist, is empty, or `owned(path)` says this product wrote it
    check_no_overlap(a, b)     neither is the other, inside the other, or containing the other (after resolve)
    new_staging_dir(target)    `.<target name>.staging-<pid>-<random>` beside target, with a marker file that names
                               the run (host, pid) and the target
    remove_dead_staging(target)  removes the staging folders of `target` left by runs that died on this host;
                               a folder without our marker, or of a run still alive, or of another host, stays
    swap_in(staging, target, owned)  replace target by a finished staging folder with two renames (target ->
                               `<target>.old`, staging -> target); `recover_interrupted_swap` undoes a crash between
A staging folder of a run on another host (a shared file system) is left alone: this host cannot tell whether that
run is alive. The marker is removed just before the final rename, so results never carry it.
Refusals raise `UnsafePathError`: one line that names the path and says what to do; the jobs print it as
`error: ...` and exit 2.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

STAGING_MARKER = ".mmrec-staging.json"
WRITTEN_BY = "written_by"  # the manifest key that names the job which wrote a directory

Owned = Callable[[Path], bool]


class UnsafePathError(ValueError):
    """A directory the product was asked to delete, replace or write into is not recognisably its own."""


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


def read_json(path: Path) -> dict | None:
    """A JSON object file -> dict; None when missing, unreadable or not an object."""
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return payload if isinstance(payload, dict) else None


def only_expected_entries(directory: Path, expected: Callable[[str], bool]) -> bool:
    """Every entry directly inside `directory` has a name the product writes there."""
    return all(expected(entry.name) for entry in directory.iterdir())


def is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and next(path.iterdir(), None) is None


def may_replace(path: Path, owned: Owned) -> bool:
    """May the product delete or replace `path`? Only when it is absent, an empty directory, or owned."""
    if not os.path.lexists(path):
        return True
    if path.is_symlink() or not path.is_dir():
        return False
    return is_empty_dir(path) or owned(path)


def require_replaceable(path: Path, owned: Owned, what: str, action: str = "replaced") -> None:
    """Raise `UnsafePathError` unless `may_replace(path, owned)`. `what` names what the product writes there."""
    if may_replace(path, owned):
        return
    kind = "a directory" if path.is_dir() and not path.is_symlink() else "a file or link"
    raise UnsafePathError(
        f"{path} is {kind} that is not {what}, and it would be {action}: choose an empty or new directory, or "
        f"move or delete it yourself"
    )


def check_no_overlap(path: Path, other: Path, *, what: str, other_what: str) -> None:
    """Refuse when `path` (what the product writes) is, is inside, or contains `other` (what it must not touch)."""
    a, b = Path(path).resolve(), Path(other).resolve()
    if a == b:
        relation = "is"
    elif b in a.parents:
        relation = "is inside"
    elif a in b.parents:
        relation = "contains"
    else:
        return
    raise UnsafePathError(f"{what} {a} {relation} {other_what} {b}: point {what} at a separate directory")


def _staging_prefix(target: Path) -> str:
    return f".{target.name}.staging-"


def new_staging_dir(target: Path) -> Path:
    """A fresh staging folder beside `target` (same file system, so the final rename is atomic), marked as ours."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f"{_staging_prefix(target)}{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()
    (staging / STAGING_MARKER).write_text(json.dumps(
        {WRITTEN_BY: "mmrec", "target": target.name, "host": socket.gethostname(), "pid": os.getpid()}))
    return staging


def is_staging_dir(path: Path) -> bool:
    """A staging folder made by `new_staging_dir` (of any run), not yet swapped in."""
    return (read_json(path / STAGING_MARKER) or {}).get(WRITTEN_BY) == "mmrec"


def _is_dead_staging(path: Path, target: Path, alive: Callable[[int], bool]) -> bool:
    marker = read_json(path / STAGING_MARKER)
    if not marker or marker.get(WRITTEN_BY) != "mmrec" or marker.get("target") != target.name:
        return False  # not a staging folder of ours for this target: never touched
    if marker.get("host") != socket.gethostname() or not isinstance(marker.get("pid"), int):
        return False  # another machine's run may still be writing it
    return marker["pid"] != os.getpid() and not alive(marker["pid"])


def remove_dead_staging(target: Path, alive: Callable[[int], bool] = pid_alive) -> list[Path]:
    """Remove the staging folders of `target` whose run died on this host; -> the folders removed."""
    if not target.parent.is_dir():
        return []
    removed = []
    prefix = _staging_prefix(target)  # matched literally: a target name may hold glob characters
    for path in sorted(p for p in target.parent.iterdir() if p.name.startswith(prefix)):
        if path.is_dir() and not path.is_symlink() and _is_dead_staging(path, target, alive):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def discard_staging(staging: Path) -> None:
    """Remove the staging folder this run created (after a failure; a no-op once it was swapped in)."""
    shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def staged(target: Path, owned: Owned, what: str) -> Iterator[Path]:
    """A marked staging folder beside `target` to fill inside the block (dead runs' leftovers are removed first).
    When the block ends normally the folder replaces `target` (`swap_in`: only if `target` is ours); in every case
    nothing of it is left behind."""
    remove_dead_staging(target)
    staging = new_staging_dir(target)
    try:
        yield staging
        swap_in(staging, target, owned, what)
    finally:
        discard_staging(staging)


def backup_path(target: Path) -> Path:
    return target.with_name(target.name + ".old")


def _remove_owned(path: Path, owned: Owned, what: str) -> None:
    require_replaceable(path, owned, what)
    if path.is_dir():
        shutil.rmtree(path)


def swap_in(staging: Path, target: Path, owned: Owned, what: str) -> None:
    """Replace `target` by the finished `staging` folder: target -> `<target>.old`, staging -> target, drop the old.

    Both `target` and a leftover `<target>.old` are removed only when `may_replace` allows (else `UnsafePathError`,
    before anything moved). A crash between the two renames leaves `<target>.old`: `recover_interrupted_swap`.
    """
    backup = backup_path(target)
    require_replaceable(target, owned, what)
    replacing = os.path.lexists(target)
    if replacing:
        _remove_owned(backup, owned, what)
    (staging / STAGING_MARKER).unlink()  # the marker is for staging leftovers only, not part of the result
    if replacing:
        os.replace(target, backup)
        os.replace(staging, target)
        shutil.rmtree(backup)
    else:
        os.replace(staging, target)


def recover_interrupted_swap(target: Path, owned: Owned) -> bool:
    """Put back `<target>.old` when a crash hit between the two renames of `swap_in` (and it is ours)."""
    backup = backup_path(target)
    if not os.path.lexists(target) and backup.is_dir() and not backup.is_symlink() and owned(backup):
        os.replace(backup, target)
        return True
    return False


def names_matching(prefixes: Iterable[str], exact: Iterable[str]) -> Callable[[str], bool]:
    """A predicate for `only_expected_entries`: the name is in `exact` or starts with one of `prefixes`."""
    prefixes, exact = tuple(prefixes), frozenset(exact)
    return lambda name: name in exact or name.startswith(prefixes)

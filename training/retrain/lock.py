"""A lock file that keeps two retrains of one model from overlapping, with stale-lock takeover."""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from pipeline.owned_dirs import pid_alive


class RetrainLockedError(RuntimeError):
    """Another retrain of the same model holds the lock."""


def lock_is_stale(holder: dict | None, *, age_s: float, stale_after_s: float, hostname: str,
                  alive: Callable[[int], bool] = pid_alive) -> bool:
    """A lock is stale when older than `stale_after_s`, or when its holder ran on this host and has exited.

    `holder` None (unreadable, e.g. being written right now) is judged by age only.
    """
    if age_s > stale_after_s:
        return True
    if not holder or "pid" not in holder:
        return False
    return holder.get("host") == hostname and not alive(int(holder["pid"]))


class RetrainLock:
    """An O_EXCL lock file that keeps two retrains of one model from overlapping, with stale-lock takeover.

    Creation is atomic (O_CREAT|O_EXCL), so exactly one process gets a free lock. Taking over a stale lock is
    serialised by flock on a side file and re-checks staleness inside it, so two processes that both found
    the same dead holder cannot remove each other's fresh lock. Works on one host or a shared file system.
    """

    def __init__(self, path: Path, stale_after_s: float) -> None:
        self.path = Path(path)
        self.stale_after_s = stale_after_s
        self.hostname = socket.gethostname()
        self._token: str | None = None

    def read_holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        token = uuid.uuid4().hex
        for attempt in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if attempt == 0 and self._remove_if_stale():
                    continue
                holder = self.read_holder() or {}
                raise RetrainLockedError(
                    f"another retrain holds {self.path} (pid {holder.get('pid', '?')} on {holder.get('host', '?')} "
                    f"since {holder.get('started', '?')}); it is taken over once older than "
                    f"{self.stale_after_s:g} s"
                ) from None
            with os.fdopen(fd, "w") as handle:
                json.dump({"pid": os.getpid(), "host": self.hostname, "token": token,
                           "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}, handle)
            self._token = token
            return

    def _remove_if_stale(self) -> bool:
        with open(self.path.with_name(self.path.name + ".guard"), "a") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            try:
                age = time.time() - self.path.stat().st_mtime
            except FileNotFoundError:
                return True  # released meanwhile: try again
            holder = self.read_holder()
            if not lock_is_stale(holder, age_s=age, stale_after_s=self.stale_after_s, hostname=self.hostname):
                return False
            if not self._is_lock_file(holder):
                raise RetrainLockedError(
                    f"{self.path} is not a retrain lock (no pid/host/token), and taking the lock would delete it: "
                    f"move or delete it yourself")
            self.path.unlink(missing_ok=True)
            return True

    def _is_lock_file(self, holder: dict | None) -> bool:
        """A lock `acquire` wrote: its three keys, or empty (a holder killed between creating and writing it)."""
        if holder is not None:
            return {"pid", "host", "token"} <= holder.keys()
        try:
            return self.path.stat().st_size == 0
        except FileNotFoundError:
            return True

    def release(self) -> None:
        if self._token is not None and (self.read_holder() or {}).get("token") == self._token:
            self.path.unlink(missing_ok=True)
        self._token = None

    def __enter__(self) -> "RetrainLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

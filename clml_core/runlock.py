"""The lock of a run folder: one training process owns a folder at a time.

``train.lock`` in the folder holds the owner's pid, host and start time. The lock itself is an ``flock`` on that
file, which the operating system drops when the owner dies however it dies (SIGKILL, a node lost), so a lock left
behind by a dead process is stale by construction: the next run takes it over and says whose it was. ``flock``
works on local disks and on NFS (Linux); where ``fcntl`` does not exist, the file is created exclusively and a lock
whose process is gone from this host counts as stale.
"""

from __future__ import annotations

import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = "train.lock"


class FolderInUseError(RuntimeError):
    """Another live process trains into this run folder."""


def _owner_text(owner: dict[str, Any]) -> str:
    if not owner:
        return "another process"
    return f"pid {owner.get('pid')} on host {owner.get('host')} (since {owner.get('started_utc')})"


def _read_owner(path: Path) -> dict[str, Any]:
    try:
        owner = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def _alive_here(owner: dict[str, Any]) -> bool:
    """Whether the owner is a live process on this host (True when that cannot be told)."""
    if owner.get("host") != platform.node() or not isinstance(owner.get("pid"), int):
        return True
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """Held while a process trains into ``folder``; :meth:`release` (or the process ending) frees it.

    Attributes:
        stale_owner: the owner recorded in a stale lock this one took over (empty if there was none).
    """

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / LOCK_NAME
        self.stale_owner: dict[str, Any] = {}
        me = {
            "pid": os.getpid(),
            "host": platform.node(),
            "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        self._fd = self._acquire_flock(me) if fcntl is not None else self._acquire_exclusive(me)

    def _acquire_flock(self, me: dict[str, Any]) -> int:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                owner = _read_owner(self.path)
                raise FolderInUseError(
                    f"{self.path.parent} is in use: {_owner_text(owner)} trains into it ({self.path})"
                ) from None
            try:
                same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same_file = False
            if same_file:  # not a file its previous owner unlinked while we waited for it
                break
            os.close(fd)
        self.stale_owner = _read_owner(self.path)
        data = json.dumps(me).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)
        return fd

    def _acquire_exclusive(self, me: dict[str, Any]) -> int:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            owner = _read_owner(self.path)
            if _alive_here(owner):
                raise FolderInUseError(
                    f"{self.path.parent} is in use: {_owner_text(owner)} trains into it; if that process is gone, "
                    f"delete {self.path}"
                ) from None
            self.stale_owner = owner
            self.path.unlink()
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        os.write(fd, json.dumps(me).encode())
        os.fsync(fd)
        return fd

    def describe_stale(self) -> str:
        """A line about the stale lock taken over, or "" when there was none."""
        if not self.stale_owner:
            return ""
        return f"took over the stale lock {self.path} of {_owner_text(self.stale_owner)}: that process is gone"

    def release(self) -> None:
        """Remove the lock file and free the lock (the file goes first, so no waiter takes an orphaned file)."""
        if self._fd < 0:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = -1

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

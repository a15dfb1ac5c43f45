"""One writer per run directory: ``runs/<name>/run.lock``.

The process that runs a fine-tune, an RL run or a tune trial holds the lock of its run
directory for the whole run (:func:`hold_run_dir`); a second one on the same directory is
refused with :class:`RunDirInUse`, naming the holder. The lock is a small JSON file (pid,
host, start time, a token) created in one step by a hard link of a complete temporary
file: ``link(2)`` fails when the name exists, atomically on local file systems and on NFS
(where ``flock``/``fcntl`` locks depend on the lock daemon and the mount options, and an
``O_EXCL`` create was not atomic before NFSv3), and the file is never seen half written.
File systems without hard links get ``O_CREAT | O_EXCL``. Unlike a kernel lock, the file
outlives a killed process; so a lock whose process is gone is taken over, with a warning,
when it is this host's (same host name: its pid is not running, or the host has rebooted
since). A lock from another host is never broken automatically: the message says which
file to delete once that process is known to be gone.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: the lock file in a run directory
LOCK_FILE = "run.lock"
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
_NO_LINKS = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK)


class RunDirInUse(FileExistsError):
    """Another process holds the run directory's lock (the message names it)."""


def _boot_id() -> str:
    try:
        return _BOOT_ID.read_text().strip()
    except OSError:
        return ""


def _pid_running(pid: int) -> bool:
    """Whether a process ``pid`` runs on this host (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read(path: Path) -> dict[str, Any] | None:
    """The lock's holder; None when there is no lock, {} when it cannot be read."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        holder = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _create(path: Path, data: bytes) -> bool:
    """Create ``path`` holding ``data`` in one step; False when it exists already."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:  # on NFS a retried link can report its own success as EEXIST
        return os.stat(tmp).st_nlink == 2
    except OSError as exc:
        if exc.errno not in _NO_LINKS:
            raise
    finally:
        tmp.unlink(missing_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return True


class RunDirLock:
    """The lock of ``run_dir`` for this process: :meth:`acquire`, :meth:`release`."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "boot_id": _boot_id(),
            "started": datetime.now().astimezone().isoformat(timespec="seconds"),
            "token": uuid.uuid4().hex,
        }

    def acquire(self) -> RunDirLock:
        """Take the lock (taking over this host's stale one); RunDirInUse when held."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        data = json.dumps(self.me, indent=1).encode()
        for _ in range(5):
            if _create(self.path, data):
                return self
            holder = _read(self.path)
            if holder is None:  # released in between: try again
                continue
            if not self._stale(holder):
                raise RunDirInUse(self._in_use(holder))
            self._take_over(holder)
        raise RunDirInUse(
            f"{self.run_dir}: could not take {self.path}: other processes keep taking it"
        )

    def release(self) -> None:
        """Delete the lock if it is still this process's (left alone, with a warning, if not)."""
        holder = _read(self.path)
        if holder and holder.get("token") == self.me["token"]:
            self.path.unlink(missing_ok=True)
        else:
            log.warning(
                "%s: the lock is no longer this process's (%s); left as it is", self.path, holder
            )

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _stale(self, holder: dict[str, Any]) -> bool:
        """This host's lock whose process is gone (not running, or from before a reboot)."""
        pid = holder.get("pid")
        if holder.get("host") != self.me["host"] or not isinstance(pid, int):
            return False
        rebooted = bool(holder.get("boot_id")) and bool(self.me["boot_id"])
        rebooted = rebooted and holder["boot_id"] != self.me["boot_id"]
        return rebooted or not _pid_running(pid)

    def _take_over(self, holder: dict[str, Any]) -> None:
        """Remove the stale lock ``holder``; one that changed meanwhile is put back."""
        aside = self.path.with_name(f".{self.path.name}.stale-{self.me['token']}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:  # another process took it over first
            return
        try:
            if _read(aside) != holder:  # a live holder's, taken since we read it
                _create(self.path, aside.read_bytes())
                return
        finally:
            aside.unlink(missing_ok=True)
        log.warning(
            "%s: taking over the lock of pid %s on this host (since %s): that process is gone",
            self.run_dir,
            holder["pid"],
            holder.get("started", "?"),
        )

    def _in_use(self, holder: dict[str, Any]) -> str:
        """The refusal: who holds the run directory and what to do."""
        if not holder:
            return (
                f"{self.run_dir} is in use: its lock {self.path} cannot be read; if no "
                f"process uses this run directory, delete {self.path} and rerun"
            )
        pid, host = holder.get("pid", "?"), holder.get("host", "?")
        head = f"{self.run_dir} is in use by pid {pid} on host {host} since {holder.get('started', '?')}"
        if host == self.me["host"]:
            return (
                f"{head}; that pid is running on this host: wait for it to end or stop it, "
                f"or choose another run.name (if that pid is another program now, delete "
                f"{self.path} and rerun)"
            )
        return (
            f"{head}; if that process is gone, delete {self.path} and rerun (a lock from "
            "another host is never broken automatically)"
        )


@contextmanager
def hold_run_dir(run_dir: str | os.PathLike) -> Iterator[Path]:
    """Hold ``run_dir``'s lock for the block (created if missing); released when the block
    ends, by an error too. RunDirInUse (a FileExistsError) when another process holds it."""
    with RunDirLock(run_dir):
        yield Path(run_dir)


def lock_token(run_dir: str | os.PathLike) -> str | None:
    """The token of ``run_dir``'s lock as it is now (None: no lock, or unreadable)."""
    holder = _read(Path(run_dir) / LOCK_FILE)
    return holder.get("token") if holder else None


def holder_gone(run_dir: str | os.PathLike, token: str) -> str:
    """Why the driver that held ``run_dir``'s lock with ``token`` no longer does ("" while
    it does): the lock is gone or another's, or its process on this host has ended.

    A process of that driver's run (a learner rank) asks before it writes: Ray's workers can
    outlive a driver killed with SIGKILL by the rest of an iteration."""
    path = Path(run_dir) / LOCK_FILE
    holder = _read(path)
    if not holder or holder.get("token") != token:
        return f"{path} is no longer this run's driver's lock (taken over, or removed)"
    pid = holder.get("pid")
    if holder.get("host") == socket.gethostname() and isinstance(pid, int):
        same_boot = holder.get("boot_id", "") in ("", _boot_id())
        if not same_boot or not _pid_running(pid):
            return f"the driver that holds {path} (pid {pid} on this host) has ended"
    return ""

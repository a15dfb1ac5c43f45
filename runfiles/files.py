"""Atomic files, folder commits and the ``latest`` pointer (see the package docstring)."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: The file in a checkpoint root that names the newest committed checkpoint.
LATEST = "latest"
_BACKUP = ".old-"
_UMASK = os.umask(0)
os.umask(_UMASK)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # a platform without directory fds: rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            if p.is_symlink():
                continue
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(Path(dirpath))


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary file name beside ``path`` to write to; renamed onto ``path`` (after an
    fsync) when the block ends without an error, deleted when it raises.

        with atomic_path(out) as tmp:
            pq.write_table(table, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; files get the usual mode
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (temporary file, fsync, rename)."""
    return atomic_write_bytes(path, text.encode(encoding))


# --------------------------------------------------------------------------- folders


@functools.cache
def _renameat2() -> Any:
    """libc's renameat2 (Linux), or None where there is none."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name or not hasattr(os, "uname") or os.uname().sysname != "Linux":
        return None
    fn = getattr(ctypes.CDLL(libc_name, use_errno=True), "renameat2", None)
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the
    system or file system cannot."""
    fn = _renameat2()
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"exchanging {a} and {b}: {os.strerror(err)}")


def _remove(path: Path) -> None:
    """Hook between "new folder in place" and "old folder removed" (the tests crash here)."""
    shutil.rmtree(path, ignore_errors=True)


def commit_folder(tmp: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Put the complete folder ``tmp`` at ``dest`` (a sibling), replacing what is there.

    Everything in ``tmp`` is fsynced first. Where ``dest`` exists, the two are exchanged in
    one step (Linux ``renameat2``), so ``dest`` is never missing; elsewhere the old folder
    is renamed aside to ``.<name>.old-*`` first and :func:`recover_folder` (run here first,
    so the next commit finds it) puts it back if the process died before the new one was
    in place. The old copy is deleted only after the new one is in place.
    """
    tmp, dest = Path(tmp), Path(dest)
    recover_folder(dest)
    _fsync_tree(tmp)
    if not dest.exists():
        os.rename(tmp, dest)
        _fsync_dir(dest.parent)
        return dest
    if _exchange(tmp, dest):
        _fsync_dir(dest.parent)
        _remove(tmp)  # tmp now holds the old folder
        return dest
    backup = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}{_BACKUP}"))
    backup.rmdir()
    os.rename(dest, backup)
    os.rename(tmp, dest)
    _fsync_dir(dest.parent)
    _remove(backup)
    return dest


def recover_folder(dest: str | os.PathLike) -> bool:
    """After a crash inside :func:`commit_folder`'s fallback: if ``dest`` is missing and an
    old copy was set aside, put the newest one back. True when something was restored."""
    dest = Path(dest)
    if dest.exists() or not dest.parent.is_dir():
        return False
    backups = sorted(dest.parent.glob(f".{dest.name}{_BACKUP}*"), key=lambda p: p.stat().st_mtime)
    if not backups:
        return False
    os.rename(backups[-1], dest)
    return True


def check_format(
    meta: Any, fmt: str, version: int, where: str, what: str, advice: str = ""
) -> dict[str, Any]:
    """``meta`` (a file's parsed metadata) if it says ``{"format": fmt, "version": v}`` with
    ``v <= version`` (this medrl reads it); ValueError naming ``where`` otherwise."""
    if (
        not isinstance(meta, dict)
        or meta.get("format") != fmt
        or not isinstance(meta.get("version"), int)
    ):
        raise ValueError(f"{where}: not a medrl {what} (metadata {meta!r})")
    if meta["version"] > version:
        raise ValueError(
            f"{where}: {what} format version {meta['version']} is newer than this medrl "
            f"reads ({version}){'; ' + advice if advice else ''}"
        )
    return meta


def require_empty_folder(dest: str | os.PathLike, note: str = "") -> Path:
    """``dest`` as a Path, if it does not exist or is an empty folder (a folder written
    once, such as a rating round, is never replaced); FileExistsError otherwise."""
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise FileExistsError(f"{dest}: exists and is not an empty directory{note}")
    return dest


@contextmanager
def staged_folder(dest: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder beside ``dest`` to fill; committed to ``dest`` by
    :func:`commit_folder` when the block ends without an error, deleted when it raises.

        with staged_folder(run / "generator") as tmp:
            pipe.save_pretrained(tmp)
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.tmp-"))
    try:
        yield tmp
        commit_folder(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _is_temporary(name: str) -> bool:
    """A name :func:`staged_folder` (``.<name>.tmp-*``), :func:`atomic_path` (``.<name>.*.tmp``)
    or :func:`commit_folder` (``.<name>.old-*``) gives what it has not finished."""
    return name.startswith(".") and (".tmp-" in name or name.endswith(".tmp") or _BACKUP in name)


def clean_temporaries(root: str | os.PathLike) -> list[Path]:
    """Remove what interrupted writes left in ``root`` (not below it): the temporary folders
    and files of unfinished commits, and old copies set aside by :func:`commit_folder`
    once their folder is in place (:func:`recover_folder` puts one back first where its
    folder is missing). Safe only while nothing else writes into ``root``: at a run's
    start, under its lock (:mod:`runfiles.lock`). Returns what was removed (logged)."""
    root = Path(root)
    if not root.is_dir():
        return []
    for backup in [p for p in root.iterdir() if _BACKUP in p.name and p.name.startswith(".")]:
        recover_folder(root / backup.name[1:].split(_BACKUP)[0])
    removed = sorted(p for p in root.iterdir() if _is_temporary(p.name))
    for path in removed:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    if removed:
        names = ", ".join(p.name for p in removed)
        log.warning("%s: removed what interrupted writes left: %s", root, names)
    return removed


# --------------------------------------------------------------------------- checkpoints


def list_checkpoints(root: str | os.PathLike, pattern: str = "step-*") -> list[Path]:
    """The committed checkpoint folders of ``root`` (``step-*``), oldest first; the
    temporary folders of commits in progress (``.step-*``) are not among them."""
    root = Path(root)
    return sorted(p for p in root.glob(pattern) if p.is_dir() and not p.name.startswith("."))


def prune_checkpoints(root: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest ``keep`` committed checkpoints of ``root``, oldest first."""
    steps = list_checkpoints(root)
    for old in steps[: max(0, len(steps) - keep)]:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- latest


def _check_name(root: Path, name: str, where: str) -> Path:
    if not name or name != name.strip() or "/" in name or "\\" in name or name in (".", ".."):
        raise ValueError(f"{where}: {name!r} is not a checkpoint name in {root}")
    path = root / name
    if path.resolve().parent != root.resolve():
        raise ValueError(f"{where}: {name!r} leads outside {root}")
    return path


def write_latest(root: str | os.PathLike, name: str) -> Path:
    """Point ``root/latest`` at the committed checkpoint ``root/name`` (atomically)."""
    root = Path(root)
    path = _check_name(root, name, "write_latest")
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint to point {root / LATEST} at")
    atomic_write_text(root / LATEST, name + "\n")
    return path


def read_latest(root: str | os.PathLike) -> Path | None:
    """The checkpoint ``root/latest`` names; None when there is no pointer yet.

    Raises:
        ValueError: the pointer is empty, names a path outside ``root`` or not a plain name.
        FileNotFoundError: it names a checkpoint that does not exist.
    """
    root = Path(root)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = _check_name(root, pointer.read_text(encoding="utf-8").strip(), str(pointer))
    if not path.is_dir():
        raise FileNotFoundError(f"{pointer} names {path.name}, which does not exist")
    return path

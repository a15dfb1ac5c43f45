"""The ground floor: how every medrl package writes its run files.

One atomic file writer (:func:`atomic_write_text`, :func:`atomic_write_bytes`,
:func:`atomic_path` for writers that need a file name), one folder commit
(:func:`staged_folder` / :func:`commit_folder`) that never deletes the old copy before the
new one is in place, and the ``latest`` pointer of a checkpoint root
(:func:`write_latest`, :func:`read_latest`), validated on the way in and out, and a
run's ``metrics.jsonl`` (:func:`append_metrics`, :func:`read_metrics`), one writer per
run directory (:func:`hold_run_dir`, :mod:`runfiles.lock`) and the sweep of what
interrupted writes left (:func:`clean_temporaries`). The config base
every package declares its settings with is :mod:`runfiles.config`. Everything
is fsynced before it is renamed into place, so what a reader finds after a crash is
either the old file or folder or the new one, never a part of either.

It imports nothing of medrl: ``runfiles`` <- ``generators`` <- ``rewards`` <- ``rl`` <-
``cluster``.
"""

from runfiles.files import (
    LATEST,
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
    check_format,
    clean_temporaries,
    commit_folder,
    list_checkpoints,
    prune_checkpoints,
    read_latest,
    recover_folder,
    require_empty_folder,
    staged_folder,
    write_latest,
)
from runfiles.lock import LOCK_FILE, RunDirInUse, hold_run_dir, holder_gone, lock_token
from runfiles.metrics import METRICS_FILE, append_metrics, is_number, read_metrics

__all__ = [
    "LATEST",
    "LOCK_FILE",
    "METRICS_FILE",
    "RunDirInUse",
    "append_metrics",
    "is_number",
    "read_metrics",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_format",
    "clean_temporaries",
    "commit_folder",
    "hold_run_dir",
    "holder_gone",
    "lock_token",
    "list_checkpoints",
    "prune_checkpoints",
    "read_latest",
    "recover_folder",
    "require_empty_folder",
    "staged_folder",
    "write_latest",
]

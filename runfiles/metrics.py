"""A run's ``metrics.jsonl``: one JSON object a line, appended as the run goes.

Every package writes it with :func:`append_metrics` and reads it with :func:`read_metrics`,
under one policy: a line that is not a JSON object (a line torn by a crash mid-append, or
damaged by hand) is skipped with a warning that names the file and line, so one bad line
never hides the rest of a long run.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def is_number(value: Any) -> bool:
    """A metric value that is a number (int or float, not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def append_metrics(path: str | os.PathLike, records: Iterable[Mapping[str, Any]]) -> int:
    """Append ``records`` to ``path`` (one line each, flushed and fsynced); how many."""
    lines = [json.dumps(dict(r), default=str) + "\n" for r in records]
    if not lines:
        return 0
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write("".join(lines))
        fh.flush()
        os.fsync(fh.fileno())
    return len(lines)


def read_metrics(path: str | os.PathLike | None, stage: str | None = None) -> list[dict[str, Any]]:
    """The records of ``path`` (those of one ``stage`` when given); [] when there is no file."""
    if path is None or not Path(path).is_file():
        return []
    out = []
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            rec = None
        if not isinstance(rec, dict):
            log.warning("%s line %d: not a JSON object, skipped", path, n)
            continue
        if stage is None or rec.get("stage") == stage:
            out.append(rec)
    return out

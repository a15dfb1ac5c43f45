"""The RL records a run leaves in metrics.jsonl, read back: the held-out reward curve by
adapter version, and the number checks that metrics read from JSON need.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from runfiles import METRICS_FILE, is_number, read_metrics

log = logging.getLogger(__name__)


def eval_curve(records: Sequence[dict[str, Any]]) -> list[float]:
    """Held-out reward by adapter version (``eval_reward`` of iteration k scores version
    k; the final record, iteration ``rl.iterations``, the exported adapter). A resumed
    run's records repeat iterations: the latest wins. Empty with ``rl.eval_prompts=0``."""
    by_version = {r["iteration"]: r.get("eval_reward") for r in records}
    return [by_version[k] for k in sorted(by_version) if finite(by_version[k])]


def finite(value: Any) -> bool:
    """A real number, not NaN or infinite (metrics read back from JSON)."""
    return is_number(value) and math.isfinite(value)


def read_rl_records(run_dir: Path) -> list[dict[str, Any]]:
    """The RL records of the run's metrics.jsonl (runfiles.read_metrics)."""
    return read_metrics(Path(run_dir) / METRICS_FILE, stage="rl")

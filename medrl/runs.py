"""Run directories: ``runs/<name>/`` holds config.yaml, checkpoints/, samples/, tb/,
metrics.jsonl, report.html and export/. The same run name resumes."""

from __future__ import annotations

import logging
from pathlib import Path

import yaml

from medrl.config import RunConfig, save_config, to_dict

log = logging.getLogger(__name__)


def prepare_run_dir(cfg: RunConfig) -> Path:
    """Create (or reopen) the run directory and write the resolved config into it.

    A reopened run keeps its earlier config as ``config.previous.yaml`` when the new one
    differs, so what changed between invocations stays visible.
    """
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    current = run_dir / "config.yaml"
    new = to_dict(cfg)
    if current.is_file():
        old = yaml.safe_load(current.read_text())
        if old != new:
            log.info("run %s: config changed since the last invocation", cfg.run.name)
            save_config_text = yaml.safe_dump(old, sort_keys=False)
            (run_dir / "config.previous.yaml").write_text(save_config_text)
        else:
            log.info("run %s: reopening %s", cfg.run.name, run_dir)
    save_config(cfg, current)
    return run_dir

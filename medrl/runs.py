"""Run directories: ``runs/<name>/`` holds config.yaml, checkpoints/, samples/, tb/,
metrics.jsonl, report.html and export/. The same run name resumes; one process at a time
writes a run directory (:func:`open_run`)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from medrl.config import RunConfig, save_config, to_dict
from runfiles import hold_run_dir

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


@contextmanager
def open_run(cfg: RunConfig) -> Iterator[Path]:
    """The run directory for this process, for the block: its lock taken first
    (:func:`runfiles.hold_run_dir`: a second driver on it is refused, naming the holder),
    then :func:`prepare_run_dir`. The lock is released when the block ends, by an error
    too. Every command that runs in a run directory (``medrl finetune``, ``rl train``,
    each ``tune`` trial, ``demo``) holds it so, in its driver process."""
    with hold_run_dir(cfg.run_dir):
        yield prepare_run_dir(cfg)


def finetune_run(cfg: RunConfig, run_dir: Path | None = None):
    """``medrl finetune`` on a composed config: the run's folder opened (:func:`open_run`)
    unless given (its caller holds it then), the generator fine-tuned with the model, data,
    finetune and sampling sections, the resolved config stored with it. Returns
    :func:`generators.finetune.finetune`'s result."""
    from generators.finetune import finetune

    if run_dir is None:
        with open_run(cfg) as opened:
            return finetune_run(cfg, opened)
    sections = (cfg.model, cfg.data, cfg.finetune, cfg.sampling)
    expert = None
    if cfg.finetune.align_weight > 0:  # generators cannot load a reward model: it is handed in
        from generators.model import resolve_device
        from rewards.scorers import load_selector

        where = cfg.finetune.align_expert or run_dir / "rewards"
        expert = load_selector(where, "finetune.align_expert", resolve_device(cfg.run.device))
    return finetune(
        run_dir, *sections, seed=cfg.run.seed, device=cfg.run.device,
        resolved_config=to_dict(cfg), expert=expert,
    )  # fmt: skip


def print_proxy_and_gold(records: list[dict], run_dir: Path) -> None:
    """Proxy and gold by adapter version, the hacking verdict, and where rl/best is."""
    from eval.overoptimisation import format_version_table, proxy_gold_verdict

    lines = format_version_table(records)
    if not lines:
        return
    print("held-out evaluation by adapter version (proxy = reward models; gold = rl.gold):")
    print("\n".join(lines))
    print(f"verdict: {proxy_gold_verdict(records)['text']}")
    meta = run_dir / "rl" / "best" / "adapter_config.json"
    if meta.is_file():
        best = json.loads(meta.read_text())
        print(
            f"best adapter: {meta.parent} (version {best['version']}, "
            f"{best['selected_by']} {best['score']:.4f})"
        )

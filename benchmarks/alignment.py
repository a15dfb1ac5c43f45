"""Does the alignment policy learn the image-prompt match? One command, the numbers of docs/rewards.md.

    OMP_NUM_THREADS=1 python benchmarks/alignment.py /tmp/align-work [rewards.key=value ...]

Writes (once; reused when present) under the work folder: the demo rating pool
(``rewards.simulated.write_demo_pool(size=64, seed=0)``, 480 phantoms, 719 pairs rated by
the SIMULATED expert) and its SQLite store, and the demo fine-tuning manifest
(``write_demo_dataset(count=384, size=64, seed=0)``, ingested). Then trains both reward
models with ``medrl.rewards.train_rewards`` exactly as ``medrl rewards train`` does
(``configs/demo.yaml`` plus ``rewards.pretrain_manifest`` pointing at that manifest and
``rewards.compare_objectives=false``, then the overrides) and prints the held-out table,
the eye-swap check and the targets of issue 10:

- held-out Spearman of the alignment score against the simulated prompt-faithfulness
  ratings >= 0.6;
- an eye mismatch detected (the eye-swapped prompt scores below the true one, or below
  0.5) on >= 90% of the held-out pairs rated fully faithful;
- and the seconds spent on the alignment policy (pre-training included).

Compare variants with overrides, e.g. ``rewards.fusion=concat``,
``rewards.pretrain_epochs=0``, ``rewards.alignment_objective=reinforce``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medrl.config import load_config  # noqa: E402


def prepare(work: Path) -> tuple[Path, Path]:
    """The rating store and the manifest under ``work`` (made when missing)."""
    from generators.datasets import ingest_csv
    from generators.phantom_dataset import write_demo_dataset
    from rewards.ratings import ingest_ratings
    from rewards.simulated import write_demo_pool

    work.mkdir(parents=True, exist_ok=True)
    db, manifest = work / "ratings.db", work / "demo" / "manifest.parquet"
    if not (work / "pool" / "ratings.csv").is_file():
        write_demo_pool(work / "pool", size=64, seed=0)
    if not db.is_file():
        ingest_ratings(work / "pool" / "ratings.csv", db)
    if not (work / "demo" / "data.csv").is_file():
        write_demo_dataset(work / "demo", count=384, size=64, seed=0)
    if not manifest.is_file():
        ingest_csv(work / "demo" / "data.csv", root=work / "demo", out=manifest)
    return db, manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path, help="work folder (data made here once)")
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--out", type=Path, help="reward models folder (default: work/rewards)")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides (rewards.*)")
    args = parser.parse_intermixed_args()
    logging.basicConfig(level=logging.WARNING)
    import torch

    from rewards.training import train_rewards
    from rewards.training_report import format_report

    torch.set_num_threads(1)
    db, manifest = prepare(args.work)
    overrides = [
        f"rewards.pretrain_manifest={manifest}",
        "rewards.compare_objectives=false",
        *args.overrides,
    ]
    cfg = load_config(args.config, overrides).rewards
    started = time.perf_counter()
    report = train_rewards(db, db.parent / "pool", args.out or args.work / "rewards", cfg)
    seconds = time.perf_counter() - started
    print(format_report(report))
    ali = report["results"][cfg.objective]["alignment"]
    swap = ali["eye_swap"]
    rho = ali["spearman"]
    summary = {
        "fusion": ali["fusion"],
        "objective": ali["objective"],
        "pretrain_epochs": ali["pretrain"].get("epochs", 0),
        "heldout_spearman": rho,
        "eye_swap_detected": swap["detected"],
        "eye_swap_lower": swap["lower"],
        "eye_swap_pairs": swap["n"],
        "alignment_seconds": ali["seconds"],
        "selector_seconds": report["results"][cfg.objective]["selector"]["seconds"],
        "total_seconds": round(seconds, 1),
    }
    print(json.dumps(summary))
    ok_rho = rho is not None and rho >= 0.6
    ok_swap = swap["detected"] is not None and swap["detected"] >= 0.9
    print(
        f"targets: Spearman >= 0.6 {'met' if ok_rho else 'NOT met'} ({rho}); eye mismatch "
        f"detected >= 90% {'met' if ok_swap else 'NOT met'} ({swap['detected']}); "
        f"alignment policy {ali['seconds']} s"
    )


if __name__ == "__main__":
    main()

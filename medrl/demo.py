"""``medrl demo``: the whole path on the embedded default, on this machine's CPU.

Steps (each skipped or resumed when its output is already there, so a rerun resumes):

1. write the procedural fundus phantom dataset (``data.root``),
2. validate it into a Parquet manifest,
3. fine-tune the generator (VAE, then UNet) into ``runs/<name>/``,
4. generate a pool of samples for held-out prompts,
5. write the demo rating pool with SIMULATED expert ratings and ingest them into the
   ratings store (``rewards.ratings_db``),
6. train the reward models (selector, alignment policy) into ``runs/<name>/rewards``,
7. run the RL loop on a local Ray (``rl.num_samplers`` sampler actors, the reward
   service, a DeepSpeed learner under Ray Train),
8. export the RL adapter (diffusers and kohya formats) to ``runs/<name>/export``.

It opens nothing; it prints where the results are.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pandas as pd

from medrl.config import RunConfig, to_dict
from medrl.runs import prepare_run_dir, print_proxy_and_gold

log = logging.getLogger(__name__)


def run_demo(cfg: RunConfig) -> dict[str, Path]:
    from generators.datasets import ingest_csv, read_manifest
    from generators.finetune import finetune
    from generators.generate import generate_images
    from generators.model import load_generator, resolve_device
    from generators.phantom import write_demo_dataset

    t0 = time.time()
    data_root = Path(cfg.data.root)
    csv = Path(cfg.data.csv_path)
    if not csv.is_file():
        log.info("step 1/8: writing %d phantom fundus images to %s", cfg.data.demo_count, data_root)
        write_demo_dataset(
            data_root,
            count=cfg.data.demo_count,
            size=cfg.data.demo_size,
            seed=cfg.data.demo_seed,
            val_fraction=cfg.data.val_fraction,
        )
    else:
        log.info("step 1/8: phantom dataset already at %s", data_root)
    manifest = Path(cfg.data.manifest_path)
    if not manifest.is_file():
        log.info("step 2/8: validating %s", csv)
        ingest_csv(csv, root=data_root, out=manifest)
    else:
        log.info("step 2/8: manifest already at %s", manifest)

    run_dir = prepare_run_dir(cfg)
    log.info("step 3/8: fine-tuning the generator in %s", run_dir)
    result = finetune(
        run_dir,
        cfg.model,
        cfg.data,
        cfg.lora,
        cfg.finetune,
        cfg.sampling,
        seed=cfg.run.seed,
        device=cfg.run.device,
        resolved_config=to_dict(cfg),
    )

    log.info("step 4/8: sampling held-out prompts")
    table = read_manifest(manifest)
    val = table[table.split == "val"].drop_duplicates("Text")
    if val.empty:
        val = table.drop_duplicates("Text")
    val = val.head(8)
    gen = load_generator(result.generator_dir).to(resolve_device(cfg.run.device))
    samples = generate_images(
        gen,
        val.Text.tolist(),
        run_dir / "samples",
        cfg.sampling,
        num_per_prompt=3,
        seed=1000,
        generator_name=str(result.generator_dir),
    )
    comparison = _real_vs_generated(val, samples, run_dir / "samples" / "real-vs-generated.png")

    rewards_dir = _reward_models(cfg, run_dir)
    rl = _rl(cfg, run_dir)
    paths = {
        "data": data_root,
        "manifest": manifest,
        "run": run_dir,
        "generator": result.generator_dir,
        "samples": samples,
        "grid": run_dir / "samples" / "finetune-grid.png",
        "comparison": comparison,
        "ratings": Path(cfg.rewards.ratings_db),
        "rewards": rewards_dir,
        "rl_adapter": rl["adapter"],
        "export": rl["export"],
        "metrics": run_dir / "metrics.jsonl",
        "tensorboard": run_dir / "tb",
    }
    print(f"\nmedrl demo finished in {time.time() - t0:.0f} s. Results:")
    for name, path in paths.items():
        print(f"  {name:12s} {path}")
    print_proxy_and_gold(rl["records"], run_dir)
    print(f"  watch training with: tensorboard --logdir {run_dir / 'tb'} --host 127.0.0.1")
    print(f"  report: medrl eval {run_dir} --real {manifest}")
    return paths


def _reward_models(cfg: RunConfig, run_dir: Path) -> Path:
    """Steps 5-6: the SIMULATED expert rates a phantom pool; the reward models learn from it."""
    from rewards.ratings import ingest_ratings
    from rewards.simulated import write_demo_pool
    from rewards.training import train_rewards

    pool = Path(cfg.rewards.images_root or Path(cfg.data.root).parent / "demo-rating-pool")
    ratings_csv = pool / "ratings.csv"
    if not ratings_csv.is_file():
        log.info("step 5/8: rating pool of phantoms with SIMULATED expert ratings in %s", pool)
        write_demo_pool(pool, size=cfg.data.demo_size, seed=cfg.run.seed)
    db = Path(cfg.rewards.ratings_db)
    report = ingest_ratings(ratings_csv, db)  # re-ingesting the same file adds nothing
    log.info("step 5/8: %s", report.summary())
    out = run_dir / "rewards"
    if (out / "report.json").is_file():
        log.info("step 6/8: reward models already in %s", out)
        return out
    log.info("step 6/8: training the reward models from %s", db)
    train_rewards(db, pool, out, cfg.rewards, device=cfg.run.device)
    return out


def _rl(cfg: RunConfig, run_dir: Path) -> dict[str, Any]:
    """Steps 7-8: RL on a local Ray (resumes from its last checkpoint), then export."""
    from generators.lora import export_run_adapter
    from rl.loop import run_rl

    log.info(
        "step 7/8: %d RL iterations, %d samplers, reward = the trained reward models",
        cfg.rl.iterations,
        cfg.rl.num_samplers,
    )
    out = run_rl(cfg)
    export = run_dir / "export"
    log.info("step 8/8: exporting the RL adapter to %s", export)
    export_run_adapter(out["adapter"], export)
    return {"adapter": out["adapter"], "export": export, "records": out["records"]}


def _real_vs_generated(real: pd.DataFrame, samples_table: Path, out: Path) -> Path:
    """Top row: a held-out real image per prompt; below: generated images for the same prompt."""
    from generators.images import load_image, make_grid, save_png

    gen = pd.read_parquet(samples_table)
    columns = []
    for _, row in real.iterrows():
        drawn = gen[gen.prompt == row.Text].sort_values("seed")
        columns.append(
            [load_image(row.path)] + [load_image(samples_table.parent / p) for p in drawn.path]
        )
    depth = min(len(c) for c in columns)
    images = [columns[c][r] for r in range(depth) for c in range(len(columns))]
    return save_png(make_grid(images, ncols=len(columns)), out)

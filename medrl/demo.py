"""``medrl demo``: the whole path on the embedded default, on this machine's CPU.

Steps (each skipped when its output is already there, so a rerun resumes):

1. write the procedural fundus phantom dataset (``data.root``),
2. validate it into a Parquet manifest,
3. fine-tune the generator (VAE, then UNet) into ``runs/<name>/``,
4. generate a pool of samples for held-out prompts.

It opens nothing; it prints where the results are.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pandas as pd

from medrl.config import RunConfig, to_dict
from medrl.runs import prepare_run_dir

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
        log.info("step 1/4: writing %d phantom fundus images to %s", cfg.data.demo_count, data_root)
        write_demo_dataset(
            data_root,
            count=cfg.data.demo_count,
            size=cfg.data.demo_size,
            seed=cfg.data.demo_seed,
            val_fraction=cfg.data.val_fraction,
        )
    else:
        log.info("step 1/4: phantom dataset already at %s", data_root)
    manifest = Path(cfg.data.manifest_path)
    if not manifest.is_file():
        log.info("step 2/4: validating %s", csv)
        ingest_csv(csv, root=data_root, out=manifest)
    else:
        log.info("step 2/4: manifest already at %s", manifest)

    run_dir = prepare_run_dir(cfg)
    log.info("step 3/4: fine-tuning the generator in %s", run_dir)
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

    log.info("step 4/4: sampling held-out prompts")
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
    paths = {
        "data": data_root,
        "manifest": manifest,
        "run": run_dir,
        "generator": result.generator_dir,
        "samples": samples,
        "grid": run_dir / "samples" / "finetune-grid.png",
        "comparison": comparison,
        "tensorboard": run_dir / "tb",
    }
    print(f"\nmedrl demo finished in {time.time() - t0:.0f} s. Results:")
    for name, path in paths.items():
        print(f"  {name:12s} {path}")
    print(f"  watch training with: tensorboard --logdir {run_dir / 'tb'} --host 127.0.0.1")
    return paths


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

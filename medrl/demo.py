"""``medrl demo``: the whole path on the embedded default, on this machine's CPU.

Steps (each skipped or resumed when its output is already there, so a rerun resumes):

1. write the procedural fundus phantom dataset (``data.root``),
2. validate it into a Parquet manifest,
3. fine-tune the generator (VAE, then UNet) into ``runs/<name>/``,
4. generate a pool of samples for held-out prompts,
5. rate a pool with the SIMULATED expert (from pixels): phantoms of graded quality and
   (``demo.generated_pool``) the generator's own samples, VAE reconstructions and real
   anchors; ingest the ratings into the store (``rewards.ratings_db``),
6. train the reward models (selector, alignment policy pre-trained on the manifest, the
   OOD guard) into ``runs/<name>/rewards``,
7. run the RL loop on a local Ray (``rl.num_samplers`` sampler actors, the reward
   service, a DeepSpeed learner under Ray Train) in ``demo.rating_rounds`` rounds: each
   round after the first rates the RL adapter's samples on a blind sheet
   (``data/rounds/<name>-round-<r>``), retrains the reward models on every rating so far
   (``runs/<name>/rewards-round-<r>``) and resumes the RL against them; every adapter
   version is judged on held-out prompts by the proxy and by the gold (the SIMULATED
   expert), and the best by gold is kept in ``runs/<name>/rl/best``,
8. export the RL adapter the held-out judge rated best (``rl/best``; diffusers and kohya
   formats) to ``runs/<name>/export``.

It opens nothing; it prints where the results are.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import pandas as pd

from medrl.config import RunConfig
from medrl.runs import finetune_run, open_run, print_proxy_and_gold

log = logging.getLogger(__name__)


def run_demo(cfg: RunConfig) -> dict[str, Path]:
    """The steps above, in the run directory this process holds (:func:`open_run`)."""
    with open_run(cfg) as run_dir:
        return _run_demo(cfg, run_dir)


def _run_demo(cfg: RunConfig, run_dir: Path) -> dict[str, Path]:
    from generators.datasets import ingest_csv, read_manifest
    from generators.generate import generate_images
    from generators.model import load_generator, resolve_device
    from generators.phantom_dataset import write_demo_dataset

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

    log.info("step 3/8: fine-tuning the generator in %s", run_dir)
    result = finetune_run(cfg, run_dir)

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
    rl = _rl(cfg, run_dir, rewards_dir)
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
        "rl_best": run_dir / "rl" / "best",
        "rl_eval_grids": run_dir / "rl" / "eval",
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


def _ingest(csv: Path, db: Path, images_from: Path | None = None) -> None:
    """Ratings into the store, image paths relative to the store's folder (one root)."""
    from rewards.ratings import ingest_ratings

    report = ingest_ratings(csv, db, images_root=db.parent, images_from=images_from)
    log.info("%s", report.summary())  # re-ingesting the same file adds nothing


def _train(cfg: RunConfig, db: Path, out: Path) -> Path:
    from rewards.training import train_rewards
    from rewards.training_report import format_report

    if (out / "report.json").is_file():
        log.info("reward models already in %s", out)
        return out
    rewards = cfg.rewards
    if cfg.demo.pretrain_on_manifest and not rewards.pretrain_manifest:
        rewards = dataclasses.replace(rewards, pretrain_manifest=str(cfg.data.manifest_path))
    if not rewards.pretrain_cache:  # the rating rounds reuse the towers' pre-training
        rewards = dataclasses.replace(rewards, pretrain_cache=str(out.parent / "pretrain-cache"))
    report = train_rewards(db, db.parent, out, rewards, device=cfg.run.device)
    log.info("reward models in %s:\n%s", out, format_report(report))
    return out


def _reward_models(cfg: RunConfig, run_dir: Path) -> Path:
    """Steps 5-6: the SIMULATED expert rates a phantom pool and (``demo.generated_pool``)
    the generator's own samples, reconstructions and real anchors; the reward models learn
    from every rating in the store."""
    from rewards.pools import write_generated_pool
    from rewards.simulated import write_demo_pool

    db = Path(cfg.rewards.ratings_db)
    db.parent.mkdir(parents=True, exist_ok=True)
    pool = Path(cfg.rewards.images_root or Path(cfg.data.root).parent / "demo-rating-pool")
    if not (pool / "ratings.csv").is_file():
        log.info("step 5/8: rating pool of phantoms with SIMULATED expert ratings in %s", pool)
        write_demo_pool(pool, count=cfg.demo.phantom_pool, size=cfg.data.demo_size,
                        seed=cfg.run.seed)  # fmt: skip
    _ingest(pool / "ratings.csv", db, images_from=pool)
    if cfg.demo.generated_pool:
        generated = pool.parent / f"{pool.name}-generated"
        if not (generated / "ratings.csv").is_file():
            log.info("step 5/8: the generator's own samples, rated from pixels, in %s", generated)
            write_generated_pool(
                run_dir, cfg.data.manifest_path, generated, prompts=cfg.demo.pool_prompts,
                num_steps=cfg.sampling.num_steps, eta=cfg.sampling.eta,
                batch_size=cfg.sampling.batch_size, seed=cfg.run.seed, device=cfg.run.device,
            )  # fmt: skip
        _ingest(generated / "ratings.csv", db, images_from=generated)
    log.info("step 6/8: training the reward models from %s", db)
    return _train(cfg, db, run_dir / "rewards")


def round_ends(iterations: int, rounds: int) -> list[int]:
    """The RL iteration each rating round ends at: ``iterations`` split as evenly as can be."""
    rounds = max(1, min(rounds, iterations))
    return [round(iterations * (r + 1) / rounds) for r in range(rounds)]


def _rating_round(cfg: RunConfig, run_dir: Path, r: int, previous: Path) -> Path:
    """Round ``r`` > 0: a blind sheet of the RL adapter's samples, filled by the SIMULATED
    expert from the pixels, ingested; the reward models (``previous``: the last round's)
    trained on every round."""
    from rewards.rounds import export_round, round_prompts
    from rewards.simulated import simulate_ratings

    db = Path(cfg.rewards.ratings_db)
    name = f"round-{r}"
    sheet_dir = db.parent / "rounds" / f"{cfg.run.name}-{name}"
    if not (sheet_dir / "ratings.csv").is_file():
        log.info("rating round %d: the RL adapter's samples on a blind sheet, %s", r, sheet_dir)
        if not (sheet_dir / "sheet.csv").is_file():
            prompts = round_prompts(cfg.data.manifest_path, cfg.demo.round_prompts,
                                    cfg.run.seed + r, "train")  # fmt: skip
            s = cfg.sampling
            export_round(
                run_dir / "generator", prompts, sheet_dir, round_name=name,
                adapters=[str(run_dir / "rl" / "adapter")], per_prompt=cfg.demo.round_per_prompt,
                num_steps=s.num_steps, eta=s.eta, guidance_scale=s.guidance_scale,
                batch_size=s.batch_size, seed=cfg.run.seed + 1000 * r, device=cfg.run.device,
            )  # fmt: skip
        simulate_ratings(sheet_dir, sheet_dir / "ratings.csv", use_records=False)
    _ingest(sheet_dir / "ratings.csv", db)
    f = cfg.demo.round_epochs_fraction
    if f >= 1:
        log.info("rating round %d: retraining the reward models on every round", r)
        return _train(cfg, db, run_dir / f"rewards-{name}")
    log.info(
        "rating round %d: the reward models of %s continue on every round for %g of the epochs",
        r, previous, f,
    )  # fmt: skip

    def scaled(epochs: int) -> int:
        return max(1, round(epochs * f)) if epochs else 0

    rw = cfg.rewards
    rw = dataclasses.replace(
        rw, init_from=str(previous), epochs=scaled(rw.epochs),
        stage1_epochs=scaled(rw.stage1_epochs), stage2_epochs=scaled(rw.stage2_epochs),
    )  # fmt: skip
    return _train(dataclasses.replace(cfg, rewards=rw), db, run_dir / f"rewards-{name}")


def _rl(cfg: RunConfig, run_dir: Path, rewards_dir: Path) -> dict[str, Any]:
    """Steps 7-8: rounds of RL on a local Ray (each resumes the last), then export."""
    from cluster.driver import run_rl
    from generators.lora import ADAPTER_CONFIG, export_run_adapter
    from rl.checkpoints import BEST_DIR

    ends = round_ends(cfg.rl.iterations, cfg.demo.rating_rounds)
    reward = rewards_dir
    out: dict[str, Any] = {}
    for r, end in enumerate(ends):
        if r > 0:
            reward = _rating_round(cfg, run_dir, r, previous=reward)
        log.info(
            "step 7/8: RL round %d/%d: iterations up to %d, %d samplers, reward = %s",
            r + 1, len(ends), end, cfg.rl.num_samplers, reward,
        )  # fmt: skip
        rl = dataclasses.replace(cfg.rl, iterations=end, reward=str(reward))
        out = run_rl(dataclasses.replace(cfg, rl=rl))
    export = run_dir / "export"
    # the version the held-out judge rated best (gold where a gold judge runs), not merely
    # the last: a round that hacked the proxy must not be what the demo hands on
    best = run_dir / "rl" / BEST_DIR
    chosen = best if (best / ADAPTER_CONFIG).is_file() else Path(out["adapter"])
    if chosen == best:
        meta = json.loads((best / ADAPTER_CONFIG).read_text())
        log.info(
            "step 8/8: exporting the best RL adapter (version %s by %s) to %s",
            meta.get("version"), meta.get("selected_by"), export,
        )  # fmt: skip
    else:
        log.info("step 8/8: exporting the final RL adapter to %s", export)
    export_run_adapter(chosen, export)
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

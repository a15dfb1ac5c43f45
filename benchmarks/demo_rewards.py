"""What the demo's reward models say about the demo generator's samples.

    python benchmarks/demo_rewards.py runs/demo data/demo/manifest.parquet data/demo-rating-pool

Scores, with the run's reward models (``runs/demo/rewards``) and its ``rewards.*``
weights and threshold, three sets: the generator's samples (``runs/demo/samples``, the
held-out prompts of ``make demo``), the real phantoms of the manifest with their own
prompts, and the rating pool grouped by its simulated rating. Then the generator's
ceiling: what the SIMULATED expert measures (rewards.simulated: sharpness decides the
blur level, the worst defect decides the rating) and rates from the pixels, for held-out
real phantoms, the same phantoms passed through the run's VAE (encode, decode: the
sharpest image the decoder gives for them) and the generated samples. The numbers of
docs/rl.md, "The demo", come from this script after ``make demo``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from generators.images import load_image, to_tensor
from medrl.config import load_config
from rewards.scorers import RewardModelScorer
from rewards.simulated import (
    MEASURE_LEVELS,
    SimulatedExpert,
    measure_at_analysis_size,
)


def _score(scorer: RewardModelScorer, root: Path, paths: list[str], prompts: list[str]):
    images = [to_tensor(load_image(root / p)) for p in paths]
    scores = scorer.score_images(images, prompts)
    quality = np.array([s.quality for s in scores])
    alignment = np.array([s.alignment for s in scores])
    passed = np.array([s.passed for s in scores])
    return quality, alignment, passed


def _line(name: str, quality: np.ndarray, alignment: np.ndarray, passed: np.ndarray) -> str:
    return (
        f"{name:28s} n={len(quality):4d}  quality mean {quality.mean():.3f} "
        f"[{quality.min():.3f}, {quality.max():.3f}]  alignment mean {alignment.mean():.3f} "
        f"sd {alignment.std():.3f}  pass rate {passed.mean():.2f}"
    )


def _expert_line(name: str, expert: SimulatedExpert, images: list[np.ndarray], prompts) -> str:
    sharp = np.array([measure_at_analysis_size(im)["sharpness"] for im in images])
    rated = np.array([expert.rate(p, image=im)[0] for im, p in zip(images, prompts, strict=True)])
    return (
        f"{name:28s} n={len(images):4d}  sharpness median {np.median(sharp):.4f} "
        f"[{sharp.min():.4f}, {sharp.max():.4f}]  SIMULATED rating from pixels: "
        + "  ".join(
            f"{lab} {np.mean(rated == r):.2f}" for r, lab in ((1, "poor"), (2, "fair"), (3, "good"))
        )
    )


def _ceiling(run: Path, real: pd.DataFrame, root: Path, samples: pd.DataFrame) -> None:
    from generators.images import to_uint8
    from generators.model import load_generator
    from generators.vae_training import vae_reconstruct

    gen = load_generator(run / "generator")
    expert = SimulatedExpert()
    images = [load_image(root / p) for p in real.path]
    recon = vae_reconstruct(gen, torch.stack([to_tensor(im) for im in images]))
    blur1, blur2 = MEASURE_LEVELS["sharpness"]
    print(
        f"\nthe SIMULATED expert's blur levels: sharpness <= {blur1} is level 1, <= {blur2} "
        "level 2 (poor)"
    )
    prompts = list(real.Text)
    print(_expert_line("real phantoms", expert, images, prompts))
    print(_expert_line("VAE reconstructions of them", expert, list(to_uint8(recon)), prompts))
    gen_images = [load_image(run / "samples" / p) for p in samples.path]
    print(_expert_line("generated samples", expert, gen_images, list(samples.prompt)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="run directory (runs/demo)")
    parser.add_argument("manifest", type=Path, help="data/demo/manifest.parquet")
    parser.add_argument("pool", type=Path, help="the demo rating pool (data/demo-rating-pool)")
    parser.add_argument("--real", type=int, default=96, help="real phantoms to score")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    cfg = load_config(args.run / "config.yaml")
    scorer = RewardModelScorer.from_config(args.run / "rewards", cfg.rewards)
    print(f"reward models {args.run / 'rewards'}; threshold {cfg.rewards.threshold}")

    samples = pd.read_parquet(args.run / "samples" / "samples.parquet")
    root = args.run / "samples"
    print(
        _line("generated samples", *_score(scorer, root, list(samples.path), list(samples.prompt)))
    )

    real = pd.read_parquet(args.manifest).head(args.real)
    root = args.manifest.parent
    print(_line("real phantoms", *_score(scorer, root, list(real.path), list(real.Text))))

    pool = pd.read_csv(args.pool / "ratings.csv")
    for rating, label in ((1, "poor"), (2, "fair"), (3, "good")):
        part = pool[pool.rating == rating]
        scored = _score(scorer, args.pool, list(part.image_path), list(part.prompt))
        print(_line(f"pool rated {rating} ({label}, SIMULATED)", *scored))

    val = pd.read_parquet(args.manifest)
    val = val[val.split == "val"].head(args.real)
    _ceiling(args.run, val, root, samples)


if __name__ == "__main__":
    main()

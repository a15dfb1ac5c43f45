"""How sharp can the demo's VAE draw a phantom? Train it from scratch, measure its decoding.

    OMP_NUM_THREADS=1 python benchmarks/vae_ceiling.py data/demo/manifest.parquet        # the preset
    OMP_NUM_THREADS=1 python benchmarks/vae_ceiling.py data/demo/manifest.parquet \\
        finetune.vae_steps=1200 model.vae.block_out_channels=[32,64]                    # overrides
    OMP_NUM_THREADS=1 python benchmarks/vae_ceiling.py data/demo/manifest.parquet \\
        finetune.vae_laplacian_weight=0 finetune.vae_disc_weight=0 finetune.vae_mse_weight=1
                                                          # the recipe before issue 10

Trains the VAE of ``model.vae`` exactly as ``medrl finetune`` does (``train_vae``, with
``finetune.vae_*`` and the seed of the preset, ``--config``, default configs/demo.yaml,
plus the overrides), timing it, then encodes and decodes the first ``--images`` held-out
phantoms and prints, for the originals and the reconstructions, the SIMULATED expert's
sharpness measure (rewards.simulated) against the line below which the expert calls any
image "poor" (blur level 2), the reconstructions' PSNR, and the share of the phantoms
the expert rates fair-or-better (quality >= 2, from the pixels) whose reconstruction it
also rates fair-or-better. The RL trains only the UNet, so the reconstructions bound how
sharp a fundus the generator can draw. ``--json`` appends the numbers as one line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from generators.finetune import (  # noqa: E402
    ImageTextData,
    reconstruction_psnr,
    train_vae,
    vae_reconstruct,
)
from generators.images import make_grid, save_png, to_uint8  # noqa: E402
from generators.model import build_generator  # noqa: E402
from medrl.config import load_config  # noqa: E402
from rewards.simulated import (  # noqa: E402
    MEASURE_LEVELS,
    SimulatedExpert,
    measure_at_analysis_size,
)


def _sharpness(images: torch.Tensor) -> np.ndarray:
    return np.array([measure_at_analysis_size(im)["sharpness"] for im in to_uint8(images)])


def _quality(images: torch.Tensor, prompts: list[str]) -> np.ndarray:
    expert = SimulatedExpert()
    return np.array(
        [expert.rate(p, image=im)[0] for p, im in zip(prompts, to_uint8(images), strict=True)]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifest", type=Path, help="data/demo/manifest.parquet")
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument(
        "--images", type=int, default=0, help="held-out phantoms measured (0: all of them)"
    )
    parser.add_argument("--json", type=Path, default=None, help="append the numbers here")
    parser.add_argument(
        "--grid", type=Path, default=None, help="PNG: originals (top) over reconstructions"
    )
    parser.add_argument(
        "overrides", nargs="*", help="dotted overrides (finetune.vae_*, model.vae.*)"
    )
    args = parser.parse_intermixed_args()
    cfg = load_config(args.config, args.overrides)
    res = cfg.model.resolution
    train = ImageTextData.from_manifest(args.manifest, res)
    val = ImageTextData.from_manifest(args.manifest, res, split="val")
    n = len(val) if args.images <= 0 else min(args.images, len(val))
    x, prompts = val.batch(torch.arange(n))

    gen = build_generator(cfg.model, seed=cfg.run.seed)
    t0 = time.perf_counter()
    train_vae(gen, train, cfg.finetune, cfg.run.seed)
    seconds = time.perf_counter() - t0
    recon_images = vae_reconstruct(gen, x)
    real, recon = _sharpness(x), _sharpness(recon_images)
    q_real, q_recon = _quality(x, prompts), _quality(recon_images, prompts)
    fair = q_real >= 2
    kept = float((q_recon[fair] >= 2).mean()) if fair.any() else float("nan")
    psnr = reconstruction_psnr(gen, x)
    ft = cfg.finetune
    print(  # after a newline: the VAE's progress bar (stderr) leaves the line unfinished
        f"\nVAE {list(cfg.model.vae.block_out_channels)}, {cfg.model.vae.layers_per_block} layer(s) "
        f"per block, {cfg.model.vae.latent_channels} latent channels; "
        f"{ft.vae_steps} steps at lr {ft.vae_lr:g} in {seconds:.0f} s; loss: L1 {ft.vae_l1_weight:g}, "
        f"MSE {ft.vae_mse_weight:g}, Laplacian {ft.vae_laplacian_weight:g}, KL {ft.vae_kl_weight:g}, "
        f"disc {ft.vae_disc_weight:g} from step {ft.vae_disc_start}"
    )
    print(f"held-out phantoms: {n}; PSNR of the reconstructions {psnr:.1f} dB")
    print(
        f"sharpness, mean: originals {real.mean():.4f}, reconstructions {recon.mean():.4f} "
        f"(median {np.median(recon):.4f}, max {recon.max():.4f}); the SIMULATED expert's "
        f"'poor' line {MEASURE_LEVELS['sharpness'][1]}"
    )
    print(
        f"SIMULATED expert, fair-or-better: originals {int(fair.sum())}/{n}, reconstructions "
        f"{int((q_recon >= 2).sum())}/{n}; of the fair-or-better originals, reconstructions "
        f"still fair-or-better: {kept:.0%}"
    )
    if args.grid is not None:
        k = min(n, 8)
        tiles = list(to_uint8(x[:k])) + list(to_uint8(recon_images[:k]))
        save_png(make_grid(tiles, ncols=k), args.grid)
    if args.json is not None:
        row = {
            "overrides": args.overrides,
            "steps": ft.vae_steps,
            "seconds": round(seconds, 1),
            "psnr": round(psnr, 2),
            "sharpness_real": float(real.mean()),
            "sharpness_recon": float(recon.mean()),
            "sharpness_recon_median": float(np.median(recon)),
            "fair_real": int(fair.sum()),
            "fair_recon": int((q_recon >= 2).sum()),
            "fair_kept": kept,
            "n": n,
        }
        with args.json.open("a") as fh:
            fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()

"""How sharp can the demo's VAE draw a phantom? Train it from scratch, measure its decoding.

    OMP_NUM_THREADS=1 python benchmarks/vae_ceiling.py data/demo/manifest.parquet        # ~3.5 min
    OMP_NUM_THREADS=1 python benchmarks/vae_ceiling.py data/demo/manifest.parquet \\
        finetune.vae_steps=1200                                                      # ~10 min

Trains the VAE of ``model.vae`` exactly as ``medrl finetune`` does (``train_vae``, with
``finetune.vae_*`` and the seed of the preset, ``--config``, default configs/demo.yaml,
plus the overrides), then encodes and decodes the first ``--images`` held-out phantoms
and prints the SIMULATED expert's sharpness measure (rewards.simulated) of the
originals and of their reconstructions, against the line below which the expert calls
any image "poor" (blur level 2), and the reconstructions' PSNR. The RL trains only the
UNet, so the reconstructions bound how sharp a fundus the generator can draw. The VAE
table of docs/rl.md ("The demo") comes from this script.
"""

from __future__ import annotations

import argparse
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
from generators.images import to_uint8  # noqa: E402
from generators.model import build_generator  # noqa: E402
from medrl.config import load_config  # noqa: E402
from rewards.simulated import MEASURE_LEVELS, measure_at_analysis_size  # noqa: E402


def _sharpness(images: torch.Tensor) -> np.ndarray:
    return np.array([measure_at_analysis_size(im)["sharpness"] for im in to_uint8(images)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifest", type=Path, help="data/demo/manifest.parquet")
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--images", type=int, default=16, help="held-out phantoms measured")
    parser.add_argument(
        "overrides", nargs="*", help="dotted overrides (finetune.vae_*, model.vae.*)"
    )
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    res = cfg.model.resolution
    train = ImageTextData.from_manifest(args.manifest, res)
    val = ImageTextData.from_manifest(args.manifest, res, split="val")
    x = val.batch(torch.arange(min(args.images, len(val))))[0]

    gen = build_generator(cfg.model, seed=cfg.run.seed)
    t0 = time.perf_counter()
    train_vae(gen, train, cfg.finetune, cfg.run.seed)
    seconds = time.perf_counter() - t0
    real, recon = _sharpness(x), _sharpness(vae_reconstruct(gen, x))
    print(  # after a newline: the VAE's progress bar (stderr) leaves the line unfinished
        f"\nVAE {list(cfg.model.vae.block_out_channels)}, {cfg.model.vae.layers_per_block} layer(s) "
        f"per block, {cfg.model.vae.latent_channels} latent channels; "
        f"{cfg.finetune.vae_steps} steps at lr {cfg.finetune.vae_lr:g} in {seconds:.0f} s"
    )
    print(
        f"held-out phantoms: {len(x)}; PSNR of the reconstructions {reconstruction_psnr(gen, x):.1f} dB"
    )
    print(
        f"sharpness, mean: originals {real.mean():.4f}, reconstructions {recon.mean():.4f} "
        f"(max {recon.max():.4f}); the SIMULATED expert's 'poor' line {MEASURE_LEVELS['sharpness'][1]}"
    )


if __name__ == "__main__":
    main()

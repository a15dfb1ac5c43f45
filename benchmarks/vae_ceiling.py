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
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from generators.images import make_grid, save_png, to_uint8  # noqa: E402
from generators.model import build_generator  # noqa: E402
from generators.training_common import ImageTextData  # noqa: E402
from generators.vae_training import train_vae  # noqa: E402
from medrl.config import load_config  # noqa: E402
from medrl.demo_weights import measure_reconstructions  # noqa: E402


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

    # from scratch, never the shipped weights of model.vae.pretrained
    vae = dataclasses.replace(cfg.model.vae, pretrained=None, subfolder=None)
    gen = build_generator(dataclasses.replace(cfg.model, vae=vae), seed=cfg.run.seed)
    t0 = time.perf_counter()
    train_vae(gen, train, cfg.finetune, cfg.run.seed)
    seconds = time.perf_counter() - t0
    m = measure_reconstructions(gen, x, prompts)
    recon_images = m["reconstructions"]
    psnr, kept = m["psnr"], m["fair_kept"] if m["fair_kept"] is not None else float("nan")
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
        f"sharpness, mean: originals {m['sharpness_real']:.4f}, reconstructions "
        f"{m['sharpness_recon']:.4f} (median {m['sharpness_recon_median']:.4f}, max "
        f"{m['sharpness_recon_max']:.4f}); the SIMULATED expert's 'poor' line {m['poor_line']}"
    )
    print(
        f"SIMULATED expert, fair-or-better: originals {m['fair_real']}/{n}, reconstructions "
        f"{m['fair_recon']}/{n}; of the fair-or-better originals, reconstructions "
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
            "sharpness_real": m["sharpness_real"],
            "sharpness_recon": m["sharpness_recon"],
            "sharpness_recon_median": m["sharpness_recon_median"],
            "fair_real": m["fair_real"],
            "fair_recon": m["fair_recon"],
            "fair_kept": kept,
            "n": n,
        }
        with args.json.open("a") as fh:
            fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()

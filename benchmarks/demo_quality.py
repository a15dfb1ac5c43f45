"""Quality of a fine-tuned demo generator: held-out VAE PSNR, Fréchet distance to the
phantom against the shipped base it started from and an untrained generator (ratio),
laterality of generated images.

    python benchmarks/demo_quality.py runs/demo data/demo/manifest.parquet

The numbers in docs/generator.md come from this script after `make demo`.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from PIL import Image

from eval.distances import frechet_distance
from eval.features import FallbackFeatures
from generators.datasets import read_manifest
from generators.finetune import ImageTextData, reconstruction_psnr
from generators.images import to_uint8
from generators.model import build_generator, load_generator
from generators.phantom import measure
from generators.sampling import sample
from medrl.config import load_config
from medrl.demo_weights import from_scratch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="run directory (runs/demo)")
    parser.add_argument("manifest", help="the demo manifest (data/demo/manifest.parquet)")
    parser.add_argument("--images", type=int, default=48)
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = load_config(f"{args.run}/config.yaml")
    gen = load_generator(f"{args.run}/generator")
    untrained = build_generator(from_scratch(cfg).model, seed=0)
    shipped = build_generator(cfg.model, seed=0)  # the preset's base (pretrained paths)
    res = cfg.model.resolution
    val = ImageTextData.from_manifest(args.manifest, res, split="val")
    x = val.batch(torch.arange(len(val)))[0]
    print(
        f"held-out VAE PSNR: {reconstruction_psnr(gen, x):.2f} dB "
        f"(untrained VAE {reconstruction_psnr(untrained, x):.2f} dB, {len(val)} images)"
    )

    table = read_manifest(args.manifest)
    val_prompts = table.loc[table.split == "val", "Text"].tolist()
    prompts = (val_prompts * (args.images // max(len(val_prompts), 1) + 1))[: args.images]
    real = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in table.path[:96]])
    kw = dict(
        num_steps=cfg.sampling.num_steps, eta=cfg.sampling.eta,
        guidance_scale=cfg.sampling.guidance_scale,
    )  # fmt: skip
    seeds = list(range(len(prompts)))
    feats = FallbackFeatures()
    f_real = feats(real)
    fd = {
        name: frechet_distance(feats(to_uint8(sample(g, prompts, seeds, **kw).images)), f_real)
        for name, g in (("fine-tuned", gen), ("base", shipped), ("untrained", untrained))
    }
    print(
        f"Frechet distance to 96 phantoms (fallback features, {len(prompts)} images): "
        + ", ".join(f"{k} {v:.3f}" for k, v in fd.items())
        + f"; fine-tuned / untrained {fd['fine-tuned'] / fd['untrained']:.4f}"
    )

    eyes = [f"colour fundus photograph, {e} eye" for e in ("left", "right")]
    lat_prompts = [eyes[i % 2] for i in range(32)]
    for name, g in (("fine-tuned", gen), ("base", shipped)):
        imgs = to_uint8(sample(g, lat_prompts, list(range(32)), **kw).images)
        hits = [
            measure(im)["laterality"] == ("left" if "left" in p else "right")
            for im, p in zip(imgs, lat_prompts, strict=True)
        ]
        print(f"laterality of 32 images, {name}: {np.mean(hits):.2f} correct (chance 0.50)")


if __name__ == "__main__":
    main()

"""Quality of a fine-tuned demo generator: held-out VAE PSNR, Fréchet distance to the
phantom against the shipped base it started from and an untrained generator (ratio),
laterality of generated images (where the optic disc is, per prompt eye) beside the
held-out phantoms', and whether the alignment reward sees the eye.

    python benchmarks/demo_quality.py runs/demo data/demo/manifest.parquet --rewards runs/demo/rewards
    python benchmarks/demo_quality.py runs/demo data/demo/manifest.parquet --generators /tmp/base1200

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
from generators.images import to_uint8
from generators.model import build_generator, load_generator
from generators.sampling import sample
from generators.training_common import ImageTextData
from generators.vae_training import reconstruction_psnr
from medrl.config import load_config
from medrl.demo_weights import from_scratch
from rewards.simulated import measure_at_analysis_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="run directory (runs/demo)")
    parser.add_argument("manifest", help="the demo manifest (data/demo/manifest.parquet)")
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--eye-images", type=int, default=48, help="images per eye check")
    parser.add_argument("--generators", nargs="*", default=[], help="more generator dirs")
    parser.add_argument("--rewards", default="", help="reward models dir: alignment's eye")
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
    kw = dict(
        num_steps=cfg.sampling.num_steps, eta=cfg.sampling.eta,
        guidance_scale=cfg.sampling.guidance_scale,
    )  # fmt: skip
    generators = {"fine-tuned": gen, "base": shipped, "untrained": untrained}
    _frechet(table, val_prompts, args.images, generators, kw)
    eyes = [f"colour fundus photograph, {e} eye" for e in ("left", "right")]
    lat_prompts = [eyes[i % 2] for i in range(args.eye_images)]
    _eyes(table, args, lat_prompts, gen, shipped, kw)
    _text_encoder_eye(gen, val_prompts)
    if args.rewards:
        _alignment_eye(args.rewards, gen, lat_prompts, kw)


def _frechet(table, val_prompts: list[str], n: int, generators: dict, kw: dict) -> None:
    """Frechet distance of each generator's held-out-prompt samples to 96 phantoms."""
    prompts = (val_prompts * (n // max(len(val_prompts), 1) + 1))[:n]
    real = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in table.path[:96]])
    seeds = list(range(len(prompts)))
    feats = FallbackFeatures()
    f_real = feats(real)
    fd = {
        name: frechet_distance(feats(to_uint8(sample(g, prompts, seeds, **kw).images)), f_real)
        for name, g in generators.items()
    }
    print(
        f"Frechet distance to 96 phantoms (fallback features, {len(prompts)} images): "
        + ", ".join(f"{k} {v:.3f}" for k, v in fd.items())
        + f"; fine-tuned / untrained {fd['fine-tuned'] / fd['untrained']:.4f}"
    )


def _eyes(table, args, lat_prompts: list[str], gen, shipped, kw: dict) -> None:
    """Where the optic disc is (measure(): the SIMULATED expert's reading of the eye)."""
    val_real = table.loc[table.split == "val"].head(args.eye_images)
    rows = [("held-out phantoms", [np.asarray(Image.open(p).convert("RGB")) for p in val_real.path],
             val_real.Text.tolist())]  # fmt: skip
    for name, g in (("fine-tuned", gen), ("base", shipped),
                    *((d, load_generator(d)) for d in args.generators)):  # fmt: skip
        rows.append(
            (
                name,
                to_uint8(sample(g, lat_prompts, list(range(len(lat_prompts))), **kw).images),
                lat_prompts,
            )
        )
    for name, imgs, prompts_ in rows:
        ms = [measure_at_analysis_size(im) for im in imgs]
        said = np.array(["left eye" in p for p in prompts_])
        hits = np.array([(m["laterality"] == "left") == s for m, s in zip(ms, said, strict=True)])
        x = np.array([m["disc_x"] for m in ms])
        side = (x < 0.4) | (x > 0.6)
        print(
            f"eye of {len(imgs)} images, {name}: {hits.mean():.2f} show the prompt's eye; disc x "
            f"{x[said].mean():.2f} +- {x[said].std():.2f} (left-eye prompts), "
            f"{x[~said].mean():.2f} +- {x[~said].std():.2f} (right); the disc at a side "
            f"(x < 0.4 or > 0.6) in {int(side.sum())} of {len(x)}"
        )


def _text_encoder_eye(gen, val_prompts: list[str]) -> None:
    """How far apart the text encoder puts the two eyes, against another diagnosis."""
    from rewards.contrastive import swap_eye

    p = val_prompts[0]
    other = next((q for q in val_prompts if q.split(",")[2:] != p.split(",")[2:]), p)
    if ("left eye" in p) != ("left eye" in other):
        other = swap_eye(other)  # the same eye, another diagnosis
    with torch.no_grad():
        h = gen.encode_prompts([p, swap_eye(p), other])
    norm = h[0].norm()
    print(
        f"text encoder: swapping the eye changes a prompt's encoding by "
        f"{(h[0] - h[1]).norm() / norm:.2f} of its norm, another diagnosis by "
        f"{(h[0] - h[2]).norm() / norm:.2f}"
    )


def _alignment_eye(rewards: str, gen, lat_prompts: list[str], kw: dict) -> None:
    """Does the alignment reward see the eye on the fine-tuned samples?"""
    from rewards.contrastive import swap_eye
    from rewards.models import AlignmentPolicy

    ali = AlignmentPolicy.from_pretrained(f"{rewards}/alignment")
    imgs = sample(gen, lat_prompts, list(range(len(lat_prompts))), **kw).images
    shown = np.array([m["laterality"] for m in map(measure_at_analysis_size, to_uint8(imgs))])
    with torch.no_grad():
        a = ali.score(imgs, lat_prompts).numpy()
        b = ali.score(imgs, [swap_eye(p) for p in lat_prompts]).numpy()
    told = np.array(["left" if "left eye" in p else "right" for p in lat_prompts])
    margin = np.where(
        shown == told, a - b, b - a
    )  # score of the shown eye's prompt minus the other's
    print(
        f"alignment ({rewards}) scores the prompt naming the eye the image shows higher "
        f"on {(margin > 0).mean():.2f} of {len(margin)} fine-tuned samples (mean margin "
        f"{margin.mean():.2f})"
    )


if __name__ == "__main__":
    main()

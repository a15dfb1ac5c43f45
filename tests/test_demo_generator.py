"""The demo generator, trained for real on the phantom: the VAE reconstructs held-out
images, and the fine-tuned generator is much closer to the phantom than an untrained one.

Slow (a few minutes): one shortened demo fine-tune shared by the tests of this module.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eval.distances import frechet_distance
from eval.features import FallbackFeatures
from generators.datasets import ingest_csv, read_manifest
from generators.finetune import ImageTextData, finetune, reconstruction_psnr
from generators.images import to_uint8
from generators.model import build_generator, load_generator
from generators.phantom import write_demo_dataset
from generators.sampling import sample
from medrl.config import load_config

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

# the demo preset, shortened to fit the test budget
OVERRIDES = [
    "finetune.vae_steps=300",
    "finetune.steps=400",
    "finetune.sample_every=0",
    "finetune.checkpoint_every=400",
    "data.demo_count=256",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    cfg = load_config(
        ROOT / "configs" / "demo.yaml",
        [*OVERRIDES, f"data.root={tmp / 'data'}", f"run.root={tmp / 'runs'}"],
    )
    write_demo_dataset(
        cfg.data.root,
        count=cfg.data.demo_count,
        size=cfg.data.demo_size,
        seed=cfg.data.demo_seed,
        val_fraction=0.25,
    )
    ingest_csv(Path(cfg.data.root) / "data.csv")
    result = finetune(
        cfg.run_dir,
        cfg.model,
        cfg.data,
        cfg.lora,
        cfg.finetune,
        cfg.sampling,
        seed=cfg.run.seed,
        device="cpu",
    )
    return cfg, result


def _val(cfg) -> ImageTextData:
    return ImageTextData.from_manifest(cfg.data.manifest_path, cfg.model.resolution, split="val")


def test_trained_vae_reconstructs_held_out_phantoms(trained):
    cfg, result = trained
    gen = load_generator(result.generator_dir)
    val = _val(cfg)
    psnr = reconstruction_psnr(gen, val.batch(torch.arange(len(val)))[0])
    untrained = build_generator(cfg.model, seed=0)
    psnr_random = reconstruction_psnr(untrained, val.batch(torch.arange(len(val)))[0])
    print(f"held-out VAE PSNR {psnr:.2f} dB (untrained VAE {psnr_random:.2f} dB)")
    assert psnr >= 26.0
    assert psnr > psnr_random + 10


def test_finetuned_generator_is_closer_to_the_phantom_than_untrained(trained):
    cfg, result = trained
    table = read_manifest(cfg.data.manifest_path)
    prompts = table.loc[table.split == "val", "Text"].tolist()[:48]
    real = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in table.path[:96]])
    feats = FallbackFeatures()
    seeds = list(range(len(prompts)))
    kw = dict(num_steps=cfg.sampling.num_steps, eta=1.0, guidance_scale=cfg.sampling.guidance_scale)
    tuned = to_uint8(sample(load_generator(result.generator_dir), prompts, seeds, **kw).images)
    untrained = to_uint8(sample(build_generator(cfg.model, seed=0), prompts, seeds, **kw).images)
    f_real = feats(real)
    fd_tuned = frechet_distance(feats(tuned), f_real)
    fd_untrained = frechet_distance(feats(untrained), f_real)
    print(
        f"Frechet distance to the phantom (fallback features): fine-tuned {fd_tuned:.2f}, "
        f"untrained {fd_untrained:.2f}"
    )
    assert fd_tuned < 0.3 * fd_untrained
    # fundus-like: a dark surround and a bright, reddish field of view
    centre, corner = tuned[:, 24:40, 24:40].astype(float), tuned[:, :6, :6].astype(float)
    assert centre.mean() > corner.mean() + 60
    assert centre[..., 0].mean() > centre[..., 1].mean() + 30  # red dominates green

"""A small generator for the RL tests: 32 px, its VAE trained briefly on phantoms.

A randomly initialised decoder hardly lets latents change the image (its GroupNorm
erases most of what they say), so a reward on pixels could not be learnt through it;
120 VAE steps on 96 phantom images (~20 s) give a decoder that does.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")

RL_OVERRIDES = [
    "model.resolution=32",
    "data.demo_size=32",
    "sampling.num_steps=6",
    "sampling.batch_size=8",
    "rl.prompts_per_iteration=2",
    "rl.group_size=4",
    "rl.micro_batch=4",
    "rl.sampler_chunk=4",
    "rl.eval_prompts=4",
    "rl.eval_per_prompt=1",
    "rl.inner_epochs=1",
    "rl.reward=spatial",
    # the tests' generators are built from the configs (their own 32 px VAE, an untrained
    # UNet), not loaded from the demo's shipped base
    "model.unet.pretrained=null",
    "model.vae.pretrained=null",
    "model.text_encoder.pretrained=null",
    "model.text_encoder.tokenizer_subfolder=null",
]


def rl_config(tmp_path: Path, *overrides: str):
    from medrl.config import load_config

    return load_config(
        "configs/demo.yaml",
        [*RL_OVERRIDES, f"run.root={tmp_path}", f"data.root={tmp_path / 'data'}", *overrides],
    )


PROMPTS = [
    "colour fundus photograph, left eye, no diabetic retinopathy",
    "colour fundus photograph, right eye, moderate diabetic retinopathy",
    "colour fundus photograph, left eye, severe diabetic retinopathy",
    "colour fundus photograph, right eye, no diabetic retinopathy",
]


#: held-out prompts of the evaluation images (never trained on; the training prompts are
#: PROMPTS): the demo's other DR grades
EVAL_PROMPTS = [
    "colour fundus photograph, left eye, mild non-proliferative diabetic retinopathy",
    "colour fundus photograph, right eye, proliferative diabetic retinopathy",
    "colour fundus photograph, right eye, mild non-proliferative diabetic retinopathy",
    "colour fundus photograph, left eye, proliferative diabetic retinopathy",
]


def build_rl_generator(root: Path, vae_steps: int = 120) -> Path:
    """The tests' generator under ``root``: the 32 px demo model, its VAE trained
    ``vae_steps`` steps on 96 phantom images, its UNet untrained (benchmarks/rl_learning.py
    builds the same one)."""
    from dataclasses import replace

    from generators.datasets import ingest_csv
    from generators.model import build_generator
    from generators.phantom_dataset import write_demo_dataset
    from generators.training_common import ImageTextData
    from generators.vae_training import train_vae
    from medrl.config import load_config

    cfg = load_config("configs/demo.yaml", RL_OVERRIDES)
    csv = write_demo_dataset(root / "data", count=96, size=32, seed=5)
    manifest = root / "data" / "manifest.parquet"
    ingest_csv(csv, root=root / "data", out=manifest)
    data = ImageTextData.from_manifest(manifest, resolution=32)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        gen = build_generator(cfg.model, seed=0)
        train_vae(gen, data, replace(cfg.finetune, vae_steps=vae_steps, vae_batch_size=16), seed=0)
    finally:
        torch.set_num_threads(threads)
    return gen.save(root / "generator")


def build_tiny_selector(root: Path) -> Path:
    """A tiny quality selector (tests/rewards' 32 px one-layer ViT, random weights) saved
    under ``root``: the expert of the feature-alignment tests."""
    from rewards.models import QualitySelector
    from tests.rewards.conftest import tiny_rewards_cfg

    with torch.random.fork_rng():
        torch.manual_seed(0)
        selector = QualitySelector.from_config(tiny_rewards_cfg())
    return selector.save_pretrained(root / "selector")


class ReversedTrainingRewards:
    """The reward with its training scores r replaced by 1 - r and the gate applied to
    those (``passed`` = 1 - r >= the reward's threshold); evaluation scores untouched."""

    def __init__(self, inner):
        self.inner, self.threshold = inner, getattr(inner, "threshold", None)

    def score(self, images, prompts, ids):
        from dataclasses import replace

        result = self.inner.score(images, prompts, ids)
        for sid, s in list(result.scores.items()):
            if not sid.startswith("eval"):
                r = 1.0 - s.reward
                passed = self.threshold is None or r >= self.threshold
                result.scores[sid] = replace(s, reward=r, quality=r, passed=passed)
        return result

"""What both fine-tuning stages share: the image-text data held in memory, the per-step
random generators that make a resumed run draw what an uninterrupted one draws, and the
checkpoint commits of a stage (runfiles underneath).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from runfiles import (
    prune_checkpoints,
    staged_folder,
    write_latest,
)

log = logging.getLogger(__name__)


VAE_DIR = "vae"
#: the VAE's training state (VAE, discriminator, optimizers) while stage 1 runs
VAE_STATE_DIR = "vae-train"
#: step-seed stride: generator for UNet step s is seeded with seed * STRIDE + s
STRIDE = 1_000_003


# --------------------------------------------------------------------------- data


class ImageTextData:
    """Image-text pairs held in memory as uint8 (fast random access for small sets).

    Args:
        images: uint8 tensor (N, 3, H, W).
        texts: N captions.
    """

    def __init__(self, images: torch.Tensor, texts: list[str]):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(
                f"expected uint8 (N, 3, H, W) images, got {images.dtype} {tuple(images.shape)}"
            )
        if len(texts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(texts)} captions")
        if images.shape[0] == 0:
            raise ValueError("no training images")
        self.images, self.texts = images, texts

    def __len__(self) -> int:
        return self.images.shape[0]

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
        x = self.images[idx].float().div(127.5).sub(1.0)
        return x, [self.texts[i] for i in idx.tolist()]

    @classmethod
    def from_manifest(
        cls, manifest: str | os.PathLike, resolution: int, split: str = "train"
    ) -> ImageTextData:
        from generators.datasets import ManifestDataset

        ds = ManifestDataset(manifest, resolution=resolution, split=split)
        imgs, texts = [], []
        for i in tqdm(range(len(ds)), desc=f"loading {split} images", leave=False):
            item = ds[i]
            imgs.append(
                item["pixel_values"].add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)
            )
            texts.append(item["text"])
        return cls(torch.stack(imgs), texts)


def step_generator(seed: int, step: int, salt: int = 0) -> torch.Generator:
    return torch.Generator("cpu").manual_seed((seed * STRIDE + step) * 7 + salt)


def batch_indices(n: int, batch_size: int, g: torch.Generator) -> torch.Tensor:
    if batch_size <= n:
        return torch.randperm(n, generator=g)[:batch_size]
    return torch.randint(0, n, (batch_size,), generator=g)


# --------------------------------------------------------------------------- the denoising loss


@dataclass(frozen=True)
class NoisedLatents:
    """Clean latents noised at random timesteps: ``noisy`` = add_noise(latents, noise, t), and
    the ``target`` the UNet is trained to predict (the noise, or v for v-prediction)."""

    latents: torch.Tensor
    noise: torch.Tensor
    t: torch.Tensor
    noisy: torch.Tensor
    target: torch.Tensor


def encode_latents(vae: Any, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Scaled latents of pixels ``x`` in [-1, 1]: a draw from the VAE's posterior (noise from
    ``g``) times its scaling factor, as the UNet is trained on."""
    with torch.no_grad():
        posterior = vae.encode(x.to(vae.device)).latent_dist
        eps_z = torch.randn(posterior.mean.shape, generator=g).to(vae.device)
        return (posterior.mean + posterior.std * eps_z) * vae.config.scaling_factor


def noise_latents(scheduler: Any, latents: torch.Tensor, g: torch.Generator) -> NoisedLatents:
    """Noise ``latents`` at timesteps drawn uniformly from the training schedule (noise, then
    timesteps, from ``g``)."""
    dev = latents.device
    noise = torch.randn(latents.shape, generator=g).to(dev)
    n_train = scheduler.config.num_train_timesteps
    t = torch.randint(0, n_train, (latents.shape[0],), generator=g).to(dev)
    return noised_at(scheduler, latents, noise, t)


def noised_at(
    scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
) -> NoisedLatents:
    """``latents`` noised with the given ``noise`` at timesteps ``t``."""
    noisy = scheduler.add_noise(latents, noise, t)
    target = (
        noise
        if scheduler.config.prediction_type == "epsilon"
        else scheduler.get_velocity(latents, noise, t)
    )
    return NoisedLatents(latents, noise, t, noisy, target)


def denoising_error(pred: torch.Tensor, noised: NoisedLatents) -> torch.Tensor:
    """Per-sample mean squared error of the UNet's prediction against the target, (B,); its
    mean is the supervised fine-tuning loss."""
    return (pred.float() - noised.target.float()).pow(2).flatten(1).mean(1)


# --------------------------------------------------------------------------- checkpoints


def commit_checkpoint(ckpt_root: Path, name: str, write: callable, keep: int) -> Path:
    """Write a checkpoint into a temporary dir, commit it into place, then update ``latest``.

    Old checkpoints are deleted only after the new one is committed, oldest first, keeping
    ``keep`` of them.
    """
    final = ckpt_root / name
    with staged_folder(final) as tmp:
        write(tmp)
    write_latest(ckpt_root, name)
    prune_checkpoints(ckpt_root, keep)
    return final

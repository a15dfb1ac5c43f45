"""Stage 1 of fine-tuning: the VAE recipe (reconstruction, perceptual and optional
adversarial losses, resumable), and how well a VAE reconstructs held-out images.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from generators.config import FinetuneConfig
from generators.model import Generator
from generators.training_common import (
    STRIDE,
    ImageTextData,
    batch_indices,
    commit_checkpoint,
    step_generator,
)
from generators.vae_loss import (
    PatchDiscriminator,
    adaptive_weight,
    generator_loss,
    hinge_d_loss,
    laplacian_pyramid_loss,
)
from runfiles import read_latest

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- stage 1: VAE


def _vae_disc_on(cfg: FinetuneConfig) -> bool:
    return cfg.vae_disc_weight > 0 and cfg.vae_disc_start < cfg.vae_steps


def _save_vae_state(tmp: Path, vae, disc, opt, sched, d_opt, step: int) -> None:
    save_file(
        {k: v.contiguous() for k, v in vae.state_dict().items()}, str(tmp / "vae.safetensors")
    )
    state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step}
    if disc is not None:
        save_file(
            {k: v.contiguous() for k, v in disc.state_dict().items()},
            str(tmp / "discriminator.safetensors"),
        )
        state["disc_optimizer"] = d_opt.state_dict()
    torch.save(state, tmp / "state.pt")
    (tmp / "step.json").write_text(json.dumps({"step": step}))


def _load_vae_state(path: Path, vae, disc, opt, sched, d_opt) -> int:
    vae.load_state_dict(load_file(str(path / "vae.safetensors")))
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    if disc is not None:
        if not (path / "discriminator.safetensors").is_file():
            raise ValueError(
                f"{path} has no discriminator but finetune.vae_disc_weight > 0; use a new run.name"
            )
        disc.load_state_dict(load_file(str(path / "discriminator.safetensors")))
        d_opt.load_state_dict(state["disc_optimizer"])
    return int(state["step"])


def train_vae(
    gen: Generator,
    data: ImageTextData,
    cfg: FinetuneConfig,
    seed: int,
    writer=None,
    metrics: list | None = None,
    ckpt_dir: str | os.PathLike | None = None,
    stop_after: int | None = None,
) -> float:
    """Train the VAE on the images; returns the latent scaling factor it sets.

    The loss (``finetune.vae_*``; :mod:`generators.vae_loss`): ``vae_l1_weight`` * pixel L1
    + ``vae_mse_weight`` * MSE + ``vae_laplacian_weight`` * Laplacian-pyramid L1 +
    ``vae_kl_weight`` * KL per latent element, and from step ``vae_disc_start`` on (when
    ``vae_disc_weight`` > 0) ``vae_disc_weight`` * the LDM adaptive weight * the PatchGAN
    hinge generator loss, while the discriminator trains on real images against the
    reconstructions. Step ``s`` draws its images and noise from ``(seed, s)``.

    ``ckpt_dir``: every ``checkpoint_every`` steps the VAE, the discriminator and both
    optimizers are committed there, and a call with the same directory resumes from the
    newest (exactly: an interrupted run ends where the uninterrupted one would).
    ``stop_after``: return after this many steps (before the scaling factor; tests,
    interruption) without touching the learning-rate schedule.
    """
    vae = gen.vae
    device = gen.device
    vae.train().requires_grad_(True)
    opt, sched, disc, d_opt = _vae_optimizers(vae, cfg, seed, device)
    start = 0
    ckpt_root = Path(ckpt_dir) if ckpt_dir is not None else None
    if ckpt_root is not None:
        latest = read_latest(ckpt_root)
        if latest is not None:
            start = _load_vae_state(latest, vae, disc, opt, sched, d_opt)
            log.info("VAE: resuming from %s at step %d", latest, start)
    end = cfg.vae_steps if stop_after is None else min(cfg.vae_steps, stop_after)
    bar = tqdm(range(start, end), desc="VAE", initial=start, total=cfg.vae_steps, leave=False)
    for step in bar:
        g = step_generator(seed, step, salt=1)
        x, _ = data.batch(batch_indices(len(data), cfg.vae_batch_size, g))
        losses = _vae_step(vae, disc, opt, sched, d_opt, x.to(device), g, step, cfg)
        done = step + 1
        if step % cfg.log_every == 0 or done == cfg.vae_steps:
            bar.set_postfix(loss=f"{losses['loss'].item():.4f}")
            values = {k: v.item() for k, v in losses.items()}
            if writer is not None:
                for k, v in values.items():
                    writer.add_scalar(f"vae/{k}", v, step)
            if metrics is not None:
                metrics.append({"stage": "vae", "step": step, **values})
        if ckpt_root is not None and (done % cfg.checkpoint_every == 0 or done == end):
            commit_checkpoint(
                ckpt_root,
                f"step-{done:06d}",
                lambda tmp, done=done: _save_vae_state(tmp, vae, disc, opt, sched, d_opt, done),
                keep=1,
            )
    bar.close()
    if end < cfg.vae_steps:
        return float("nan")
    vae.eval().requires_grad_(False)
    factor = _latent_scaling(vae, data, seed, device)
    vae.register_to_config(scaling_factor=factor)
    gen.vae_untrained = False
    return factor


def _vae_optimizers(
    vae, cfg: FinetuneConfig, seed: int, device
) -> tuple[
    torch.optim.Optimizer,
    torch.optim.lr_scheduler.LambdaLR,
    PatchDiscriminator | None,
    torch.optim.Optimizer | None,
]:
    """(VAE optimizer, its warmup-cosine schedule, discriminator, its optimizer); the last
    two are None when the discriminator is off."""
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / max(1, cfg.warmup_steps))
            * 0.5
            * (1 + math.cos(math.pi * s / cfg.vae_steps))
        ),
    )
    disc = d_opt = None
    if _vae_disc_on(cfg):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * STRIDE + 11)  # the discriminator's init
            disc = PatchDiscriminator(3, cfg.vae_disc_channels, cfg.vae_disc_layers).to(device)
        disc.train()
        d_opt = torch.optim.Adam(disc.parameters(), lr=cfg.vae_disc_lr, betas=(0.5, 0.9))
    return opt, sched, disc, d_opt


def _vae_step(
    vae,
    disc,
    opt,
    sched,
    d_opt,
    x: torch.Tensor,
    g: torch.Generator,
    step: int,
    cfg: FinetuneConfig,
) -> dict[str, torch.Tensor]:
    """One optimizer step of the VAE, then of the discriminator once it is active; the
    loss terms (``loss``, ``rec``, ``kl``, ``g_loss``, ``d_weight``, ``d_loss``)."""
    device = x.device
    posterior = vae.encode(x).latent_dist
    z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g).to(device)
    recon = vae.decode(z).sample
    rec = cfg.vae_l1_weight * F.l1_loss(recon, x)
    if cfg.vae_mse_weight > 0:
        rec = rec + cfg.vae_mse_weight * F.mse_loss(recon, x)
    if cfg.vae_laplacian_weight > 0:
        rec = rec + cfg.vae_laplacian_weight * laplacian_pyramid_loss(
            recon, x, cfg.vae_laplacian_levels
        )
    kl = posterior.kl().mean() / z[0].numel()
    loss = rec + cfg.vae_kl_weight * kl
    disc_active = disc is not None and step >= cfg.vae_disc_start
    g_loss = d_weight = d_loss = torch.zeros((), device=device)
    if disc_active:
        disc.requires_grad_(False)
        g_loss = generator_loss(disc(recon))
        last_layer = vae.decoder.conv_out.weight
        d_weight = adaptive_weight(rec, g_loss, last_layer, cfg.vae_disc_max_weight)
        loss = loss + cfg.vae_disc_weight * d_weight * g_loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(vae.parameters(), cfg.grad_clip)
    opt.step()
    sched.step()
    if disc_active:
        disc.requires_grad_(True)
        d_loss = hinge_d_loss(disc(x), disc(recon.detach()))
        d_opt.zero_grad(set_to_none=True)
        d_loss.backward()
        d_opt.step()
    return {
        "loss": loss,
        "rec": rec,
        "kl": kl,
        "g_loss": g_loss,
        "d_weight": d_weight,
        "d_loss": d_loss,
    }


@torch.no_grad()
def _latent_scaling(vae, data: ImageTextData, seed: int, device) -> float:
    """1 / std of the VAE's latents of up to 256 training images (the latent scaling factor)."""
    g = torch.Generator("cpu").manual_seed(seed)
    idx = batch_indices(len(data), min(len(data), 256), g)
    zs = [
        vae.encode(data.batch(chunk)[0].to(device)).latent_dist.sample() for chunk in idx.split(32)
    ]
    std = torch.cat(zs).float().std().item()
    return 1.0 / max(std, 1e-6)


@torch.no_grad()
def vae_reconstruct(gen: Generator, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] encoded (mode latent) and decoded by the VAE, on cpu:
    the closest the generator's decoder comes to them."""
    parts = [
        gen.vae.decode(gen.vae.encode(x.to(gen.device)).latent_dist.mode()).sample.clamp(-1, 1)
        for x in images.split(batch_size)
    ]
    return torch.cat(parts).float().cpu()


def reconstruction_psnr(gen: Generator, images: torch.Tensor) -> float:
    """Mean PSNR (dB, images in [-1, 1] mapped to [0, 1]) of VAE reconstructions (mode latent)."""
    x = images.float().cpu()
    mse = ((vae_reconstruct(gen, x) - x) / 2).pow(2).flatten(1).mean(1).clamp(min=1e-10)
    return float((10 * torch.log10(1.0 / mse)).mean())

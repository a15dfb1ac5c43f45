"""The VAE recipe (issue 10): Laplacian-pyramid term, PatchGAN with the LDM adaptive weight
switched on at ``finetune.vae_disc_start``, and train_vae's resume with the discriminator."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from generators.config import FinetuneConfig, VaeConfig
from generators.model import build_vae
from generators.training_common import ImageTextData
from generators.vae_loss import (
    PatchDiscriminator,
    adaptive_weight,
    generator_loss,
    hinge_d_loss,
    laplacian_pyramid_loss,
)
from generators.vae_training import train_vae
from runfiles import read_latest

RES = 16


def _images(n: int = 8, res: int = RES) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(res), torch.arange(res), indexing="ij")
    imgs = []
    for i in range(n):
        base = torch.rand(3, 1, 1, generator=g) * 0.5
        stripes = ((xx + i) % 4 < 2).float()  # edges for the Laplacian term to see
        imgs.append((base + 0.5 * stripes).clamp(0, 1))
    return torch.stack(imgs).mul(2).sub(1)


def _data() -> ImageTextData:
    u8 = _images().add(1).mul(127.5).round().to(torch.uint8)
    return ImageTextData(u8, [f"image {i}" for i in range(len(u8))])


def _gen():
    """What train_vae uses of a Generator (its VAE, built as build_generator builds it)."""
    torch.manual_seed(0)
    vae = build_vae(
        VaeConfig(block_out_channels=(8, 16), latent_channels=2, norm_num_groups=4), RES
    )
    return SimpleNamespace(vae=vae, device=torch.device("cpu"), vae_untrained=True)


def _cfg(**kw) -> FinetuneConfig:
    base = dict(
        vae_steps=4,
        vae_batch_size=4,
        vae_disc_start=2,
        vae_disc_weight=0.5,
        vae_disc_channels=8,
        vae_disc_layers=1,
        warmup_steps=1,
        log_every=1,
        checkpoint_every=2,
    )
    return FinetuneConfig(**{**base, **kw})


def test_laplacian_term_zero_for_identical_positive_for_blurred():
    x = _images()
    assert laplacian_pyramid_loss(x, x.clone()).item() == 0.0
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), 3, stride=1)
    assert laplacian_pyramid_loss(blurred, x).item() > 0.0


def test_adaptive_weight_finite_and_positive():
    torch.manual_seed(0)
    x = _images(4)
    last = torch.nn.Conv2d(3, 3, 3, padding=1)
    recon = last(x * 0.9)
    disc = PatchDiscriminator(3, 8, 1)
    rec = F.l1_loss(recon, x) + laplacian_pyramid_loss(recon, x)
    g = generator_loss(disc(recon))
    w = adaptive_weight(rec, g, last.weight)
    assert torch.isfinite(w) and w.item() > 0
    assert adaptive_weight(rec, g, last.weight, max_weight=1e-3).item() == pytest.approx(1e-3)
    d = hinge_d_loss(disc(x), disc(recon.detach()))
    assert torch.isfinite(d) and d.item() > 0


def test_discriminator_starts_exactly_at_the_configured_step():
    metrics: list[dict] = []
    factor = train_vae(_gen(), _data(), _cfg(), seed=0, metrics=metrics)
    assert factor > 0
    by_step = {m["step"]: m for m in metrics if m["stage"] == "vae"}
    assert sorted(by_step) == [0, 1, 2, 3]
    for s in (0, 1):  # before vae_disc_start: no adversarial term, no discriminator step
        assert by_step[s]["d_weight"] == 0.0
        assert by_step[s]["g_loss"] == 0.0
        assert by_step[s]["d_loss"] == 0.0
    for s in (2, 3):
        assert by_step[s]["d_weight"] > 0.0
        assert by_step[s]["d_loss"] > 0.0


def test_discriminator_off_keeps_the_old_loss_reachable():
    metrics: list[dict] = []
    cfg = _cfg(vae_disc_weight=0.0, vae_laplacian_weight=0.0, vae_mse_weight=1.0)
    train_vae(_gen(), _data(), cfg, seed=0, metrics=metrics)
    assert all(m["d_weight"] == 0.0 and m["d_loss"] == 0.0 for m in metrics)


@pytest.mark.parametrize("disc_weight", [0.5, 0.0])
def test_train_vae_resume_matches_uninterrupted(tmp_path, disc_weight):
    cfg = _cfg(vae_disc_weight=disc_weight)
    whole = _gen()
    f_whole = train_vae(whole, _data(), cfg, seed=0)

    cut = _gen()
    ckpt = tmp_path / "vae-train"
    train_vae(cut, _data(), cfg, seed=0, ckpt_dir=ckpt, stop_after=3)
    assert read_latest(ckpt).name == "step-000003"
    if disc_weight > 0:
        assert (read_latest(ckpt) / "discriminator.safetensors").is_file()
    resumed = _gen()  # a fresh process: the same random init, then the checkpoint
    f_resumed = train_vae(resumed, _data(), cfg, seed=0, ckpt_dir=ckpt)
    assert f_resumed == pytest.approx(f_whole, rel=1e-5)
    resumed_state = resumed.vae.state_dict()
    for k, a in whole.vae.state_dict().items():
        torch.testing.assert_close(a, resumed_state[k], msg=k)


def test_config_fields_documented_with_constraints():
    fields = {f.name: f for f in dataclasses.fields(FinetuneConfig)}
    for name in ("vae_l1_weight", "vae_laplacian_weight", "vae_disc_weight", "vae_disc_start"):
        assert fields[name].metadata["help"]
        assert fields[name].metadata["min"] == 0

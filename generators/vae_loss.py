"""Loss pieces of the VAE recipe (``train_vae``): the latent-diffusion autoencoder recipe
adapted to a CPU budget.

- :func:`laplacian_pyramid_loss`: L1 between the band-pass levels of two Laplacian
  pyramids, so thin edges (the phantom's vessels) cost as much as the smooth background;
  zero for identical images.
- :class:`PatchDiscriminator`: a small PatchGAN (pix2pix / LDM ``NLayerDiscriminator``
  shape: 4x4 convolutions, stride 2, LeakyReLU, one logit per patch).
- :func:`hinge_d_loss`, :func:`generator_loss`: the hinge GAN losses of the LDM recipe.
- :func:`adaptive_weight`: the LDM balance between reconstruction and adversarial
  gradients, ``||d rec / d last|| / (||d g / d last|| + 1e-4)``, clamped to ``[0, max]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_GAUSS5 = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0


def _blur(x: torch.Tensor) -> torch.Tensor:
    """5-tap binomial blur per channel, reflect-padded."""
    c = x.shape[1]
    k = _GAUSS5.to(x.device, x.dtype)
    kernel = (k[:, None] * k[None, :]).expand(c, 1, 5, 5)
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), kernel, groups=c)


def laplacian_pyramid(x: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """Band-pass levels (finest first) of ``x`` (B, C, H, W); the last entry is the low-pass
    residual. Each level halves the side; stops early when a side would drop below 4."""
    bands = []
    cur = x
    for _ in range(levels):
        if min(cur.shape[-2:]) < 8:
            break
        low = _blur(cur)
        down = low[..., ::2, ::2]
        up = F.interpolate(down, size=cur.shape[-2:], mode="bilinear", align_corners=False)
        bands.append(cur - up)
        cur = down
    bands.append(cur)
    return bands


def laplacian_pyramid_loss(x: torch.Tensor, y: torch.Tensor, levels: int = 3) -> torch.Tensor:
    """Mean over the band-pass levels of the mean L1 between ``x``'s and ``y``'s bands
    (the low-pass residual is left to the pixel L1). Zero iff the bands agree."""
    bx, by = laplacian_pyramid(x, levels), laplacian_pyramid(y, levels)
    terms = [F.l1_loss(a, b) for a, b in zip(bx[:-1], by[:-1], strict=True)]
    if not terms:  # too small for one band: fall back to the pixels
        return F.l1_loss(x, y)
    return torch.stack(terms).mean()


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator: ``layers`` stride-2 4x4 convolutions (channels doubling from
    ``channels``, capped at 8x), a stride-1 one, then a 1-channel logit map."""

    def __init__(self, in_channels: int = 3, channels: int = 32, layers: int = 2):
        super().__init__()
        mods: list[nn.Module] = [
            nn.Conv2d(in_channels, channels, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        mult = 1
        for n in range(1, layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < layers else 1
            mods += [
                nn.Conv2d(
                    channels * prev, channels * mult, 4, stride=stride, padding=1, bias=False
                ),
                nn.BatchNorm2d(channels * mult),
                nn.LeakyReLU(0.2, inplace=True),
            ]
        mods.append(nn.Conv2d(channels * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*mods)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: 0.5 * (mean relu(1 - real) + mean relu(1 + fake))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """The decoder's adversarial loss: -mean logit of its reconstructions."""
    return -logits_fake.mean()


def adaptive_weight(
    rec_loss: torch.Tensor,
    g_loss: torch.Tensor,
    last_layer: torch.Tensor,
    max_weight: float = 1e4,
) -> torch.Tensor:
    """LDM's weight of the adversarial term: ``||grad rec|| / (||grad g|| + 1e-4)`` w.r.t. the
    decoder's last layer, clamped to ``[0, max_weight]`` and detached."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    w = rec_grad.norm() / (g_grad.norm() + 1e-4)
    return w.clamp(0.0, max_weight).detach()

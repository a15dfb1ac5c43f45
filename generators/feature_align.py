"""Feature-Aligned Diffusion (FAD; L. Nair, "Improved Generation of Synthetic Imaging Data
Using Feature-Aligned Diffusion", section IV): the alignment term that
``medrl finetune`` (``finetune.align_weight``) and ``rl.algorithm=feature_align`` add to
the supervised denoising loss.

A frozen expert (the quality selector: anything with :class:`FeatureExpert`'s shape) sees
the noisy training image; a trainable projection W_p (:class:`AlignHead`, no bias, the
paper's R^{E_e x E_d}) maps its pooled features onto the UNet's features of the same
noisy input at timestep t, the output of the UNet's last down block average-pooled over
space (:class:`DownFeatures`, a forward hook, so the denoising forward that gives the
noise prediction gives the features too: no second UNet call):

    L_align = -cos(W_p f_expert(x_t^pix), pool(f_down(z_t, t, c)))        (eq. 4)
    L       = L_noise + align_weight * L_align                              (eq. 5, w1 = 1)

What the expert sees, in latent diffusion: the clean image x_0 in pixels (in finetune the
training pixels; in RL the micro-batch's clean latents decoded by the VAE, one decode per
step without gradients), resized to the expert's input side, then noised with the
diffusion's own schedule at the same timestep t as the latent,
``x_t^pix = sqrt(a_t) x_0 + sqrt(1 - a_t) eps_pix`` (:func:`noisy_pixels`: the scheduler's
``add_noise``), fresh pixel noise. This is the paper's eq. 1 applied to the image the
expert was trained on, so the expert reads an image at the same noise level as the UNet's
latent. Decoding the noisy latent z_t instead would hand it the decoder's rendering of
latent noise, which neither it nor the decoder was trained on, at the same cost in RL and
at a decode per step in finetune, where this costs none. The pixel noise is another draw
than the latent noise (no map carries one to the other), so the two views share x_0, t
and the noise level, not the noise itself.

W_p is training-only: the exported adapter never holds it, and the expert is not needed
to sample (the paper: alignment is applied only during fine-tuning).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from generators.images import resize


class FeatureExpert(Protocol):
    """What alignment needs of an expert (``rewards.models.QualitySelector`` is one):
    ``features`` maps images (B, 3, S, S) in [-1, 1] at ``image_size`` to (B, feature_dim)."""

    @property
    def image_size(self) -> int: ...

    @property
    def feature_dim(self) -> int: ...

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor: ...


class AlignHead(nn.Linear):
    """W_p: the expert's pooled features (E_e) projected to the UNet's down-block width (E_d)."""

    def __init__(self, expert_dim: int, unet_dim: int, seed: int = 0):
        super().__init__(expert_dim, unet_dim, bias=False)
        g = torch.Generator().manual_seed(seed)
        nn.init.kaiming_uniform_(self.weight, a=5**0.5, generator=g)  # nn.Linear's, seeded


def unet_feature_dim(unet: Any) -> int:
    """E_d: the channels of the UNet's last down block (its mid block's input)."""
    return int(unet.config.block_out_channels[-1])


class DownFeatures:
    """The output of ``unet.down_blocks[-1]`` (B, E_d, h, w), average-pooled to (B, E_d), of
    the UNet's latest forward (a hook; :meth:`remove` takes it off)."""

    def __init__(self, unet: Any):
        self.pooled: torch.Tensor | None = None
        self._handle = unet.down_blocks[-1].register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, args: Any, output: Any) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        self.pooled = hidden.mean(dim=(2, 3))

    def take(self, rows: int) -> torch.Tensor:
        """The last ``rows`` rows of the latest forward's features (the conditional half of a
        guided call, whose uncond rows come first), then forgets them."""
        if self.pooled is None:
            raise RuntimeError("no UNet forward since the features were last taken")
        out, self.pooled = self.pooled[-rows:], None
        return out

    def remove(self) -> None:
        self._handle.remove()


def decode_pixels(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> images in [-1, 1] on the latents' device, without gradients."""
    with torch.no_grad():
        images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    return images.float().clamp(-1, 1)


def noisy_pixels(
    scheduler: Any, pixels: torch.Tensor, t: torch.Tensor, size: int, g: torch.Generator
) -> torch.Tensor:
    """``pixels`` in [-1, 1] resized to ``size`` and noised at timesteps ``t`` with the
    diffusion's schedule (noise from ``g``): the expert's view of x_t."""
    x = resize(pixels.float(), size)
    noise = torch.randn(x.shape, generator=g).to(x.device)
    return scheduler.add_noise(x, noise, t.to(x.device))


def expert_features(expert: FeatureExpert, noisy: torch.Tensor) -> torch.Tensor:
    """f_e(x_t): the frozen expert's pooled features, no gradients."""
    with torch.no_grad():
        return expert.features(noisy).float()


def alignment_loss(
    head: nn.Module,
    expert_feats: torch.Tensor,
    unet_feats: torch.Tensor,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_align, per-row cosine): ``-cos(W_p f_e, f_d)`` per row, weighted mean over rows."""
    cos = F.cosine_similarity(head(expert_feats.to(head.weight)).float(), unet_feats.float(), dim=1)
    w = torch.ones_like(cos) if weights is None else weights.to(cos)
    return -(cos * w).sum() / w.sum().clamp(min=1e-8), cos.detach()


class Alignment:
    """The alignment term of one ``medrl finetune`` run: the frozen ``expert``, its W_p
    (``head``, trained in a parameter group of the run's optimizer) and the hook on the
    UNet; ``weight`` is ``finetune.align_weight``."""

    #: W_p in a fine-tuning checkpoint (its optimizer state is in the run's optimizer's)
    FILE = "align_head.safetensors"

    def __init__(self, unet: Any, expert: FeatureExpert, weight: float, seed: int = 0):
        self.expert, self.weight = expert, float(weight)
        device = next(unet.parameters()).device
        self.head = AlignHead(expert.feature_dim, unet_feature_dim(unet), seed).to(device)
        self.down = DownFeatures(unet)

    def loss(
        self, scheduler: Any, pixels: torch.Tensor, t: torch.Tensor, g: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_align, per-row cosine) of the UNet's latest forward on ``pixels`` noised at
        ``t`` (the expert's view drawn from ``g``)."""
        noisy = noisy_pixels(scheduler, pixels, t, self.expert.image_size, g)
        feats = expert_features(self.expert, noisy)
        return alignment_loss(self.head, feats, self.down.take(len(pixels)))

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        state = {k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}
        save_file(state, str(folder / self.FILE))

    def load(self, folder: Path) -> None:
        """W_p from checkpoint ``folder``; a checkpoint without it (written with
        finetune.align_weight=0) is a ValueError naming the file."""
        from safetensors.torch import load_file

        path = folder / self.FILE
        if not path.is_file():
            raise ValueError(
                f"{path}: no alignment head: the checkpoint was written with "
                "finetune.align_weight=0; use a new run.name to fine-tune with alignment"
            )
        self.head.load_state_dict(load_file(str(path)))

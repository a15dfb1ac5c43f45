"""The parts the reward models are built from: the ViT image tower (loaded or built from
config, with its fixed detail channels), token pooling, the image preparation, and the
Beta policy and value heads of the two-stage REINFORCE.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import ViTConfig, ViTModel

from generators.images import resize, to_tensor
from rewards.config import VisionConfig

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- parts


def build_vit(cfg: VisionConfig) -> ViTModel:
    """A ViT without pooler: ``from_pretrained`` (safetensors) or built from the sizes.

    A built ViT takes 6 channels when ``cfg.use_detail_channels`` (see :class:`DetailChannels`).
    """
    if cfg.pretrained:
        kwargs = {"subfolder": cfg.subfolder} if cfg.subfolder else {}
        return ViTModel.from_pretrained(
            cfg.pretrained, use_safetensors=True, add_pooling_layer=False, **kwargs
        )
    return ViTModel(
        ViTConfig(
            image_size=cfg.image_size,
            patch_size=cfg.patch_size,
            hidden_size=cfg.hidden_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            intermediate_size=cfg.intermediate_size,
            num_channels=6 if cfg.use_detail_channels else 3,
        ),
        add_pooling_layer=False,
    )


class DetailChannels(nn.Module):
    """RGB in [-1, 1] -> RGB + 3 local-detail channels |x - blur3x3(x)|, scaled to [-1, 1].

    A fixed, parameter-free input transform for ViTs trained from scratch. A ViT's first
    operation is linear over each patch, so per-pixel statistics such as sensor noise or
    the loss of fine detail to blur (which need a nonlinearity per pixel) average out
    inside the patch; measured on the phantom, a tiny ViT did not learn to detect noise
    from RGB at all (AUC 0.59 on 1600 images) but does with these channels. Pretrained
    ViTs have learnt such features and take plain RGB. Each image is transformed on its
    own (a depthwise 3x3 convolution), so images in a batch stay independent.
    """

    #: |x - blur(x)| >= 2 / GAIN (0.25 in [-1, 1] units) maps to the top of the range (1).
    GAIN = 8.0

    def __init__(self) -> None:
        super().__init__()
        k = torch.tensor([1.0, 2.0, 1.0])
        kernel = (k[:, None] * k[None, :] / 16.0).expand(3, 1, 3, 3).clone()
        self.register_buffer("kernel", kernel, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blurred = F.conv2d(
            F.pad(x, (1, 1, 1, 1), mode="replicate"), self.kernel.to(x.dtype), groups=3
        )
        detail = ((x - blurred).abs() * self.GAIN).clamp(max=2.0) - 1.0
        return torch.cat([x, detail], dim=1)


POOLINGS = ("mean", "cls", "grid")


def check_pooling(pooling: str) -> None:
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; allowed: {', '.join(map(repr, POOLINGS))}")


def pooled_size(hidden: int, pooling: str) -> int:
    """Width of the pooled image embedding: D, or 4 D for ``grid``."""
    check_pooling(pooling)
    return 4 * hidden if pooling == "grid" else hidden


def pool_tokens(hidden: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, 1 + patches, D) final ViT states -> (B, D) or (B, 4 D).

    ``mean``: patch-token mean; ``cls``: the [CLS] token; ``grid``: the patch-token means
    of the four quadrants (top-left, top-right, bottom-left, bottom-right) side by side,
    which keeps where a structure lies (which side the optic disc is on: the eye) where a
    mean over all patches is blind to it until the ViT writes position into its tokens.
    """
    check_pooling(pooling)
    if pooling == "mean":
        return hidden[:, 1:].mean(dim=1)
    if pooling == "cls":
        return hidden[:, 0]
    patches = hidden[:, 1:]
    side = math.isqrt(patches.shape[1])
    if side * side != patches.shape[1] or side < 2:
        raise ValueError(
            f"grid pooling needs a square grid of >= 2x2 patches, got {patches.shape[1]}"
        )
    grid = patches.reshape(len(patches), side, side, -1)
    h = side // 2
    quads = [grid[:, :h, :h], grid[:, :h, h:], grid[:, h:, :h], grid[:, h:, h:]]
    return torch.cat([q.mean(dim=(1, 2)) for q in quads], dim=-1)


def image_stem(vit: ViTModel) -> nn.Module:
    """What turns RGB into the ViT's input: DetailChannels for a 6-channel ViT, else nothing."""
    channels = int(vit.config.num_channels)
    if channels == 6:
        return DetailChannels()
    if channels == 3:
        return nn.Identity()
    raise ValueError(f"ViT takes {channels} channels; reward models feed it 3 (RGB) or 6")


def vision_input_size(cfg: VisionConfig) -> int:
    """The image side the ViT of ``cfg`` takes (a loaded ViT's own, read from its config)."""
    if cfg.pretrained:
        kwargs = {"subfolder": cfg.subfolder} if cfg.subfolder else {}
        return int(ViTConfig.from_pretrained(cfg.pretrained, **kwargs).image_size)
    return cfg.image_size


def drop_pooler(model: nn.Module) -> nn.Module:
    """Remove an unused BERT pooler (mean pooling is used), so every weight gets gradients."""
    if getattr(model, "pooler", None) is not None:
        model.pooler = None
    return model


def mlp(in_dim: int, hidden: Sequence[int], out_dim: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_dim, width), nn.GELU()]
        in_dim = width
    layers.append(nn.Linear(in_dim, out_dim))
    return nn.Sequential(*layers)


def prepare_images(
    images: torch.Tensor | np.ndarray | Sequence[np.ndarray], size: int
) -> torch.Tensor:
    """uint8 (H, W, 3) arrays or float (B, 3, H, W) in [-1, 1] -> (B, 3, size, size) in [-1, 1].

    [-1, 1] is also what ViT checkpoints normalised with mean = std = 0.5 expect.
    """
    if isinstance(images, torch.Tensor):
        if images.dim() == 3:
            images = images.unsqueeze(0)
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (B, 3, H, W), got {tuple(images.shape)}")
        x = images.float()
    else:
        arrays = [images] if isinstance(images, np.ndarray) and images.ndim == 3 else images
        x = torch.stack([to_tensor(np.asarray(a)) for a in arrays])
    return resize(x, size)


# --------------------------------------------------------------------------- policy output


@dataclass
class PolicyOutput:
    """Beta parameters (B,), the value estimate (B,) and the features they came from."""

    alpha: torch.Tensor
    beta: torch.Tensor
    value: torch.Tensor

    def distribution(self) -> torch.distributions.Beta:
        return torch.distributions.Beta(self.alpha, self.beta)

    @property
    def mean(self) -> torch.Tensor:
        """The score: the policy's mean alpha / (alpha + beta), in (0, 1)."""
        return self.alpha / (self.alpha + self.beta)


class BetaPolicyHead(nn.Module):
    """Features -> (alpha, beta) = softplus(MLP(features)) + 1."""

    def __init__(self, in_dim: int, hidden: Sequence[int]):
        super().__init__()
        self.mlp = mlp(in_dim, hidden, 2)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        params = F.softplus(self.mlp(features)) + 1.0
        return params[:, 0], params[:, 1]


class ValueHead(nn.Module):
    """Features -> V(x), the expected REINFORCE reward (its own MLP; trained by MSE)."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.mlp = mlp(in_dim, (hidden,), 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(features).squeeze(-1)


# --------------------------------------------------------------------------- models

